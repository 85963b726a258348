"""The bundled reference model: a ~7.7M-parameter byte-level Llama trained by train.py.

WEIGHTS_DIR holds config.json, model.safetensors (bf16) and tokenizer.json; load it with
`transformers.AutoModelForCausalLM.from_pretrained(WEIGHTS_DIR)`.
"""
import os

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
