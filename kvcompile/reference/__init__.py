"""The bundled reference model: a ~7.7M-parameter byte-level Llama trained by train.py.

WEIGHTS_DIR holds config.json, model.safetensors (bf16) and standard byte-level tokenizer files
(tokenizer.json, tokenizer_config.json; written by make_tokenizer.py); load them with
`transformers.AutoModelForCausalLM.from_pretrained(WEIGHTS_DIR)` and
`transformers.AutoTokenizer.from_pretrained(WEIGHTS_DIR)`.
"""
import os

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
