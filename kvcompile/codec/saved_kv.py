"""A prompt's KV cache as a file: what `kvcompile run --save-kv` writes and `kvcompile codec` reads.

safetensors (no pickle): tensors `keys` and `values`, each [layers, kv_heads, tokens, head_dim]
(the codec's layout), `token_ids` [tokens] when the tokens are known (a KV decoded from a
bitstream has none), and a JSON header in the metadata: format, version, the model fingerprint
(kvcompile.fusion.model_fingerprint: the same model is needed to use the KV), dtype, and where
it came from. Reading a file that is missing, not safetensors, or not this format raises
SavedKVError with one line.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from kvcompile.errors import InputError

FORMAT = "kvcompile-kv"
VERSION = 1


class SavedKVError(InputError):
    """A saved-KV file that cannot be read: missing, truncated, or not a kvcompile KV file."""


@dataclass
class SavedKV:
    keys: torch.Tensor  # [layers, kv_heads, tokens, head_dim]
    values: torch.Tensor  # [layers, kv_heads, tokens, head_dim]
    fingerprint: str
    token_ids: Optional[torch.Tensor] = None  # [tokens] int64
    meta: dict = field(default_factory=dict)

    @property
    def dtype(self) -> str:
        return str(self.keys.dtype).removeprefix("torch.")

    def save(self, path) -> Path:
        from safetensors.torch import save_file

        tensors = {"keys": self.keys.detach().cpu().contiguous(), "values": self.values.detach().cpu().contiguous()}
        if self.token_ids is not None:
            tensors["token_ids"] = self.token_ids.detach().cpu().long().contiguous()
        header = {"format": FORMAT, "version": VERSION, "fingerprint": self.fingerprint, "dtype": self.dtype,
                  "meta": self.meta}
        path = Path(path)
        temporary = path.with_name(f".{path.name}.writing")
        try:
            save_file(tensors, str(temporary), metadata={"kvcompile": json.dumps(header)})
            temporary.replace(path)  # a half-written file never takes the name
        except OSError as error:
            temporary.unlink(missing_ok=True)
            raise SavedKVError(f"cannot write KV file {path}: {error.strerror or error}") from None
        return path

    @classmethod
    def load(cls, path) -> "SavedKV":
        from safetensors import SafetensorError
        from safetensors.torch import load_file, safe_open

        path = Path(path)
        if not path.is_file():
            raise SavedKVError(f"KV file {path} does not exist" if not path.exists() else f"{path} is not a file")
        try:
            with safe_open(str(path), framework="pt") as handle:
                header = json.loads((handle.metadata() or {}).get("kvcompile", "{}"))
            tensors = load_file(str(path))
        except (OSError, SafetensorError, json.JSONDecodeError, UnicodeDecodeError) as error:
            raise SavedKVError(f"cannot read KV file {path}: {str(error).splitlines()[0]} (not a safetensors "
                               "file, or truncated)") from None
        if header.get("format") != FORMAT or header.get("version") != VERSION:
            raise SavedKVError(f"{path} is not a kvcompile KV file of version {VERSION} (write one with "
                               "`kvcompile run --save-kv`)")
        keys, values = tensors.get("keys"), tensors.get("values")
        if keys is None or values is None or keys.shape != values.shape or keys.dim() != 4:
            raise SavedKVError(f"{path} lacks keys/values of one [layers, kv_heads, tokens, head_dim] shape")
        token_ids = tensors.get("token_ids")
        if token_ids is not None and token_ids.shape != (keys.shape[2],):
            raise SavedKVError(f"{path} holds {tuple(token_ids.shape)} token ids for {keys.shape[2]} tokens of KV")
        return cls(keys, values, str(header.get("fingerprint", "")), token_ids, dict(header.get("meta") or {}))


def prompt_kv(model, token_ids) -> SavedKV:
    """The KV cache of `token_ids` ([T]) run alone from position 0 by a runtime (CompiledModel or
    the ONNX Runtime backend): one prefill, no generation."""
    from kvcompile.fusion.chunks import model_fingerprint

    chunk = model.precompute_chunk(torch.as_tensor(token_ids, dtype=torch.long).reshape(-1))
    return SavedKV(torch.cat(chunk.keys).cpu(), torch.cat(chunk.values).cpu(),
                   model_fingerprint(model.spec, model.model_config), chunk.token_ids.cpu(),
                   {"cache_kind": chunk.cache_kind})
