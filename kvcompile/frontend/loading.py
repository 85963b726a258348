"""load_model: a local Hugging Face checkpoint folder or a bundled model, ready to trace.

Models load with SDPA attention, or eager where transformers allows nothing else; the trace captures
attention through kvcompile's attention function either way (frontend/attention_capture.py)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

import torch
from kvcompile.errors import LoadError  # noqa: F401  (raised here)

BUNDLED_MODELS = ("reference", "reference-long")




def bundled_model_dir(name: str) -> Path:
    if name == "reference":
        from kvcompile.reference import WEIGHTS_DIR

        return Path(WEIGHTS_DIR)
    if name == "reference-long":
        from kvcompile.reference import LONG_WEIGHTS_DIR

        if not (Path(LONG_WEIGHTS_DIR) / "config.json").is_file():
            raise LoadError(f"reference-long has no weights in {LONG_WEIGHTS_DIR} yet: train it with "
                            "bench/gpu_train_long.sh and export them (docs/REFERENCE_MODEL.md)")
        return Path(LONG_WEIGHTS_DIR)
    raise LoadError(f"unknown bundled model {name!r}; bundled: {', '.join(BUNDLED_MODELS)}")


def resolve_model_dir(name_or_dir: Union[str, Path]) -> Path:
    """A bundled name or a local folder -> the folder holding config.json and weights."""
    text = str(name_or_dir)
    if text in BUNDLED_MODELS:
        return bundled_model_dir(text)
    return Path(text).expanduser()


def check_checkpoint_dir(path: Path) -> None:
    """Fail with one clear line before transformers prints a page of traceback."""
    if not path.exists():
        raise LoadError(f"model folder {path} does not exist (and is not a bundled name: {', '.join(BUNDLED_MODELS)})")
    if not path.is_dir():
        raise LoadError(f"{path} is not a folder; pass a Hugging Face checkpoint folder")
    config = path / "config.json"
    if not config.is_file():
        raise LoadError(f"{path} has no config.json; is it a Hugging Face checkpoint folder?")
    try:
        json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LoadError(f"{config} is not valid JSON: {err}") from None
    weights = list(path.glob("*.safetensors")) + list(path.glob("*.bin"))
    if not weights:
        raise LoadError(f"{path} has no weight files (*.safetensors)")
    for shard in path.glob("*.safetensors"):
        check_safetensors_header(shard)


def check_safetensors_header(shard: Path) -> None:
    """A truncated or overwritten shard fails here with its name, not deep inside the loader."""
    size = shard.stat().st_size
    try:
        with open(shard, "rb") as handle:
            header_len = int.from_bytes(handle.read(8), "little")
            if header_len <= 0 or 8 + header_len > size:
                raise ValueError("header length out of range")
            header = json.loads(handle.read(header_len))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + header_len + end != size:
            raise ValueError(f"file is {size} bytes, header describes {8 + header_len + end}")
    except (ValueError, KeyError, TypeError, json.JSONDecodeError) as err:
        raise LoadError(f"weight file {shard} is corrupt: {err}") from None


def with_attention_implementation(build):
    """build(implementation) with SDPA, or eager attention for a model transformers runs only eagerly
    (soft-capping, sinks). Either way the model stays transformers' own — the reference kvcompile
    is compared with; tracing switches it to kvcompile's capture function for the trace only."""
    try:
        return build("sdpa")
    except ValueError:
        return build("eager")


def load_model(
    name_or_dir: Union[str, Path] = "reference",
    dtype: Optional[torch.dtype] = None,
    device: Union[str, torch.device, None] = None,
):
    """Load a causal LM with an attention implementation kvcompile can capture, in eval mode."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_dir(name_or_dir)
    check_checkpoint_dir(path)
    try:
        model = with_attention_implementation(
            lambda implementation: AutoModelForCausalLM.from_pretrained(
                path, attn_implementation=implementation, dtype=dtype or "auto", local_files_only=True))
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LoadError(f"cannot load {path}: {first_line}") from None
    if dtype is None and model.dtype == torch.bfloat16 and (device is None or torch.device(device).type == "cpu"):
        # bf16 weights run slowly and inexactly on CPU; fp32 is what CPU users want.
        model = model.float()
    model.config._kvcompile_source = str(name_or_dir)
    if device is not None:
        model = model.to(device)
    return model.eval()
