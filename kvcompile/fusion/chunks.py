"""ChunkCache: one chunk's KV cache, computed alone from position 0, and what makes reuse safe.

A chunk cache is only valid for the model, dtype and cache kind that computed it, and for
positions the model has: `check_usable` refuses anything else with one line, before any of
its tensors are used. Files are safetensors (no pickle): the tensors `key.i` / `value.i`
([1, Hkv, L, D] per layer) and `token_ids`, and a JSON header in the metadata; or, saved with a
`codec_level`, `token_ids` and one `codec` tensor holding the KV codec's bitstream of every
layer's K/V (kvcompile.codec; levels 1-3 are lossy, see docs/CODEC.md), decoded on loading —
on the GPU by its decoder when loaded to a CUDA device.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import torch

from kvcompile.errors import InputError

FORMAT = "kvcompile-chunk-cache"
VERSION = 1


class ChunkMismatchError(InputError):
    """A chunk cache that does not belong to this model, dtype, cache kind or context."""


def model_fingerprint(spec, model_config) -> str:
    """A hash of what a chunk's K/V depend on: the model's config and every layer's record.

    Weights are not hashed (gigabytes); the config names the checkpoint (`_name_or_path`,
    `_kvcompile_source`) and its shape, and a chunk from another checkpoint of the very same
    config is the caller's responsibility.
    """
    # The same dict whether the runtime holds the HF config (torch) or the manifest's copy of it
    # (ONNX Runtime), so a chunk cache serves both.
    config = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config or {})
    source = getattr(model_config, "_kvcompile_source", None) or config.get("_kvcompile_source")
    config = {k: v for k, v in config.items() if k not in ("transformers_version", "_attn_implementation",
                                                             "dtype", "torch_dtype", "_kvcompile_source")}
    # How a layer is cached (kind, where V lives) is checked on its own, with its own message.
    layers = [{k: v for k, v in r.to_dict().items() if k not in ("kind", "value_home")} for r in spec.layers]
    payload = json.dumps({"config": config, "source": source, "layers": layers}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass
class ChunkCache:
    token_ids: torch.Tensor  # [L] int64
    keys: List[torch.Tensor]  # per layer [1, Hkv, L, D], keys as computed at positions 0..L-1
    values: List[torch.Tensor]  # per layer [1, Hkv, L, D]
    fingerprint: str
    dtype: str
    cache_kind: str
    meta: dict = field(default_factory=dict)
    # with pin(): every layer's K and V in one pinned buffer [layers, 2, 1, Hkv, L, D], which
    # keys/values are views of (fusion/loading.py then moves a whole group of layers in one copy)
    packed: Optional[torch.Tensor] = field(default=None, repr=False, compare=False)

    def pin(self) -> "ChunkCache":
        """Move the K/V to pinned host memory, packed into one buffer when every layer's K and V
        share a shape (else each tensor pinned on its own); returns self. Pinned memory is what
        lets the host->GPU copies of the fused prefill run asynchronously."""
        shapes = {tuple(t.shape) for t in self.keys + self.values}
        pinned = torch.cuda.is_available()  # (a machine without CUDA cannot pin: packed all the same)
        if len(shapes) != 1:
            self.keys = [k.cpu().pin_memory() if pinned else k.cpu() for k in self.keys]
            self.values = [v.cpu().pin_memory() if pinned else v.cpu() for v in self.values]
            self.packed = None
            return self
        packed = torch.empty((len(self.keys), 2, *shapes.pop()), dtype=self.keys[0].dtype, pin_memory=pinned)
        for layer, (key, value) in enumerate(zip(self.keys, self.values)):
            packed[layer, 0].copy_(key)
            packed[layer, 1].copy_(value)
        self.keys = list(packed[:, 0].unbind(0))
        self.values = list(packed[:, 1].unbind(0))
        self.packed = packed
        return self

    def packed_views_current(self) -> bool:
        """Whether keys/values are still the views of `packed` (nothing replaced them since pin())."""
        if self.packed is None or len(self.keys) != self.packed.shape[0]:
            return False
        # addresses computed, not sliced: this runs per chunk on every fused prefill's host path
        base, size = self.packed.data_ptr(), self.packed.element_size()
        layer_step, side_step = self.packed.stride(0) * size, self.packed.stride(1) * size
        return all(k.data_ptr() == base + i * layer_step and v.data_ptr() == base + i * layer_step + side_step
                   for i, (k, v) in enumerate(zip(self.keys, self.values)))

    @property
    def length(self) -> int:
        return int(self.token_ids.shape[0])

    def check_usable(self, fingerprint: str, dtype: str, cache_kind: str, offset: int, max_context: int,
                     name: str = "chunk") -> None:
        if self.fingerprint != fingerprint:
            raise ChunkMismatchError(f"{name} was computed by another model (fingerprint {self.fingerprint}, "
                                     f"this model {fingerprint})")
        if self.dtype != dtype:
            raise ChunkMismatchError(f"{name} holds {self.dtype} K/V, this model runs in {dtype}")
        if self.cache_kind != cache_kind:
            raise ChunkMismatchError(f"{name} was computed with a {self.cache_kind} cache, this model uses {cache_kind}")
        if offset + self.length > max_context:
            raise ChunkMismatchError(f"{name} would sit at positions {offset}..{offset + self.length - 1}, beyond the "
                                     f"model's context of {max_context} positions")

    # the KV codec ---------------------------------------------------------------------------
    def encode(self, level: int) -> bytes:
        """Every layer's K/V as one codec bitstream (kvcompile.codec.encode of [layers, Hkv, L, D])."""
        from kvcompile import codec

        shapes = {tuple(t.shape) for t in self.keys + self.values}
        if len(shapes) != 1:
            raise ChunkMismatchError(f"the KV codec needs every layer's K and V of one shape; this chunk's are "
                                     f"{sorted(shapes)}: save it without a codec level")
        return codec.encode((torch.cat([k.cpu() for k in self.keys]), torch.cat([v.cpu() for v in self.values])),
                            level=level, fingerprint=self.fingerprint)

    def with_decoded(self, blob: bytes, device="cpu") -> "ChunkCache":
        """This chunk's identity with K/V decoded from `blob` (a bitstream of `encode`) on `device`."""
        from kvcompile import codec

        keys, values = codec.decode(blob, device=device)
        if keys.shape[0] != len(self.keys) or keys.shape[2] != self.length:
            raise ChunkMismatchError(f"the bitstream holds {keys.shape[0]} layers of {keys.shape[2]} tokens, the "
                                     f"chunk {len(self.keys)} layers of {self.length}")
        return ChunkCache(self.token_ids, list(keys.split(1)), list(values.split(1)), self.fingerprint, self.dtype,
                          self.cache_kind, dict(self.meta))

    # files --------------------------------------------------------------------------------
    def save(self, path, codec_level: Optional[int] = None) -> Path:
        """Write the chunk to `path`: raw K/V, or with `codec_level` the codec's bitstream of them."""
        from safetensors.torch import save_file

        tensors = {"token_ids": self.token_ids.cpu().contiguous()}
        if codec_level is None:
            for i, (key, value) in enumerate(zip(self.keys, self.values)):
                tensors[f"key.{i}"] = key.cpu().contiguous()
                tensors[f"value.{i}"] = value.cpu().contiguous()
        else:
            tensors["codec"] = torch.frombuffer(bytearray(self.encode(codec_level)), dtype=torch.uint8)
        header = {"format": FORMAT, "version": VERSION, "fingerprint": self.fingerprint, "dtype": self.dtype,
                  "cache_kind": self.cache_kind, "layers": len(self.keys), "meta": self.meta,
                  "codec_level": codec_level}
        path = Path(path)
        temporary = path.with_name(f".{path.name}.writing")
        save_file(tensors, str(temporary), metadata={"kvcompile": json.dumps(header)})
        temporary.replace(path)  # a half-written file never takes the name
        return path

    @classmethod
    def load(cls, path, device="cpu") -> "ChunkCache":
        from safetensors import SafetensorError
        from safetensors.torch import load_file, safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                header = json.loads((handle.metadata() or {}).get("kvcompile", "{}"))
            tensors = load_file(str(path), device=str(device))
        except (OSError, SafetensorError, json.JSONDecodeError) as error:
            raise ChunkMismatchError(f"cannot read chunk cache {path}: {str(error).splitlines()[0]}") from None
        if header.get("format") != FORMAT or header.get("version") != VERSION:
            raise ChunkMismatchError(f"{path} is not a kvcompile chunk cache of version {VERSION}")
        layers = int(header["layers"])
        if header.get("codec_level") is not None:  # the bitstream, decoded where the K/V are wanted
            from kvcompile.codec import BitstreamError

            empty = [torch.empty(0)] * layers
            chunk = cls(tensors["token_ids"].cpu(), empty, empty, header["fingerprint"], header["dtype"],
                        header["cache_kind"], header.get("meta", {}))
            try:
                return chunk.with_decoded(tensors["codec"].cpu().numpy().tobytes(), device=device)
            except BitstreamError as error:
                raise ChunkMismatchError(f"chunk cache {path}: {str(error).splitlines()[0]}") from None
        return cls(tensors["token_ids"], [tensors[f"key.{i}"] for i in range(layers)],
                   [tensors[f"value.{i}"] for i in range(layers)], header["fingerprint"], header["dtype"],
                   header["cache_kind"], header.get("meta", {}))
