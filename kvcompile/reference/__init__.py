"""The bundled reference models, trained by train.py.

WEIGHTS_DIR (`reference`, ~7.7M parameters, 2K context) and LONG_WEIGHTS_DIR (`reference-long`,
~12.8M parameters, 8K context; present once its GPU training job has been run and exported)
each hold config.json, bf16 safetensors and standard byte-level tokenizer files
(tokenizer.json, tokenizer_config.json; written by make_tokenizer.py); load them with
`transformers.AutoModelForCausalLM.from_pretrained(folder)` and
`transformers.AutoTokenizer.from_pretrained(folder)`.
"""
import os

_HERE = os.path.dirname(os.path.abspath(__file__))
WEIGHTS_DIR = os.path.join(_HERE, "weights")
LONG_WEIGHTS_DIR = os.path.join(_HERE, "weights_long")
