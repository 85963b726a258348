"""Training checkpoints that fit the GPU machine's return path (files ≤ 16 MiB each).

A checkpoint folder holds:
  model.safetensors.partNN  fp32 weights (a safetensors blob cut into ≤ 15 MiB parts)
  optim.safetensors.partNN  AdamW moments rounded to bf16 (optional; resume re-warms without)
  state.json                step, tokens seen, seconds trained, config, arguments
Resume restores the weights exactly; Adam moments come back rounded to bf16, or, when the
optim parts were not carried, start from zero under a short learning-rate re-warmup.

A job can also resume from an exported weights folder (export_weights.py: bf16 shards in
transformers' layout plus training_state.json): the weights come back rounded to bf16 and
the moments start from zero. That is how a later session continues `reference-long` when its
fp32 checkpoint (51 MB) no longer fits a device call beside the working tree.
"""
from __future__ import annotations

import glob
import json
import os

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

PART_BYTES = 15 * 1024 * 1024
STATE_FILE = "state.json"
EXPORTED_STATE = "training_state.json"  # step / tokens / seconds, written beside exported weights


def _write_parts(folder: str, stem: str, blob: bytes) -> list[str]:
    for old in glob.glob(os.path.join(folder, f"{stem}.part*")):
        os.remove(old)
    paths = []
    for i in range(0, max(1, len(blob)), PART_BYTES):
        path = os.path.join(folder, f"{stem}.part{i // PART_BYTES:02d}")
        with open(path, "wb") as f:
            f.write(blob[i:i + PART_BYTES])
        paths.append(path)
    return paths


def _read_parts(folder: str, stem: str) -> bytes | None:
    parts = sorted(glob.glob(os.path.join(folder, f"{stem}.part*")))
    if not parts:
        return None
    return b"".join(open(p, "rb").read() for p in parts)


def save_checkpoint(folder: str, model, optimizer, state: dict, with_optimizer: bool = True) -> None:
    os.makedirs(folder, exist_ok=True)
    weights = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    _write_parts(folder, "model.safetensors", save_bytes(weights))
    if with_optimizer and optimizer is not None:
        names = {id(p): n for n, p in model.named_parameters()}
        moments = {}
        for group in optimizer.param_groups:
            for p in group["params"]:
                s = optimizer.state.get(p, {})
                for key in ("exp_avg", "exp_avg_sq"):
                    if key in s:
                        moments[f"{names[id(p)]}.{key}"] = s[key].detach().to(torch.bfloat16).cpu()
                if "step" in s:
                    state["adam_step"] = float(s["step"])
        _write_parts(folder, "optim.safetensors", save_bytes(moments))
    with open(os.path.join(folder, STATE_FILE), "w") as f:
        json.dump(state, f, indent=1)


def load_checkpoint(folder: str, model, optimizer=None) -> tuple[dict, bool]:
    """Load weights (and moments when present) in place; returns (state, had_optimizer)."""
    if not glob.glob(os.path.join(folder, "model.safetensors.part*")):
        return _load_exported(folder, model), False
    with open(os.path.join(folder, STATE_FILE)) as f:
        state = json.load(f)
    weights = load_bytes(_read_parts(folder, "model.safetensors"))
    model.load_state_dict(weights)
    blob = _read_parts(folder, "optim.safetensors") if optimizer is not None else None
    if blob is None:
        return state, False
    moments = load_bytes(blob)
    step = torch.tensor(state.get("adam_step", state["step"]), dtype=torch.float32)
    fused = bool(optimizer.defaults.get("fused"))  # fused AdamW keeps `step` on the device
    for name, p in model.named_parameters():
        if f"{name}.exp_avg" not in moments:
            continue
        optimizer.state[p] = {
            "step": step.to(p.device) if fused else step.clone(),
            "exp_avg": moments[f"{name}.exp_avg"].to(p.device, torch.float32),
            "exp_avg_sq": moments[f"{name}.exp_avg_sq"].to(p.device, torch.float32),
        }
    return state, True


def _load_exported(folder: str, model) -> dict:
    """Weights from an exported folder (bf16 shards, transformers' names) -> fp32 in place."""
    from safetensors.torch import load_file

    state_path = os.path.join(folder, EXPORTED_STATE)
    shards = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not shards or not os.path.isfile(state_path):
        raise SystemExit(f"{folder} is neither a training checkpoint (model.safetensors.partNN + {STATE_FILE}) "
                         f"nor exported weights (*.safetensors + {EXPORTED_STATE})")
    weights = {}
    for shard in shards:
        weights.update(load_file(shard))
    model.load_state_dict({name: tensor.float() for name, tensor in weights.items()})
    with open(state_path) as f:
        return json.load(f)
