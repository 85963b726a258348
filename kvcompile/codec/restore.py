"""Start a compiled model from a compressed context instead of prefilling it (issue 13, part 4).

    tokens = cm.generate_from_kv("context.kvcb", query_ids[None], max_new_tokens=32)

The bitstream (kvcompile.codec.encode of the context's KV, computed from position 0 by the same
model) is decoded chunk by chunk straight into a fresh cache at positions 0..T-1; the query then
runs as a continuation of that cache (positions T..) and generation goes on as usual. Nothing
about the context is recomputed, so the time to first token is decode + the query's prefill.

A context is only valid for the model that computed it: the bitstream's fingerprint
(kvcompile.fusion.model_fingerprint) and its shape and dtype are checked against the model before
anything is decoded (RestoreMismatchError, one line).
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Optional

import torch

from kvcompile.errors import InputError


class RestoreMismatchError(InputError):
    """A compressed context that does not belong to this model (fingerprint, shape or dtype)."""


def open_context(source):
    """bytes, a path to a bitstream file, or a binary file object -> (Header, stream at chunk 0)."""
    import kvcompile.codec as codec

    if isinstance(source, (bytes, bytearray, memoryview)):
        stream = io.BytesIO(bytes(source))
    elif isinstance(source, (str, Path)):
        path = Path(source)
        try:
            stream = io.BytesIO(path.read_bytes())
        except FileNotFoundError:
            raise codec.BitstreamError(f"KV bitstream {path} does not exist") from None
        except OSError as error:
            raise codec.BitstreamError(f"cannot read KV bitstream {path}: {error.strerror or error}") from None
    elif hasattr(source, "read"):
        stream = source
    else:
        raise codec.BitstreamError(f"a compressed context is bytes, a path or a file object, "
                                   f"not {type(source).__name__}")
    return codec.read_header(stream), stream


def check_context(model, header) -> None:
    """Refuse a context from another model, shape or dtype (before decoding any of it)."""
    from kvcompile.fusion.chunks import model_fingerprint

    spec = model.spec
    expected = model_fingerprint(spec, model.model_config)
    if header.fingerprint and header.fingerprint != expected:
        raise RestoreMismatchError(f"the compressed context was computed by another model (fingerprint "
                                   f"{header.fingerprint}, this model {expected})")
    shape, want = (header.layers, header.kv_heads, header.head_dim), (spec.num_layers, spec.kv_heads, spec.head_dim)
    if shape != want:
        raise RestoreMismatchError(f"the compressed context holds KV of {shape[0]} layers × {shape[1]} KV heads × "
                                   f"head_dim {shape[2]}; this model has {want[0]} × {want[1]} × {want[2]}")
    if header.dtype != spec.dtype:
        raise RestoreMismatchError(f"the compressed context holds {header.dtype} KV, this model runs in {spec.dtype}")
    if header.tokens > spec.max_context:
        raise RestoreMismatchError(f"the compressed context holds {header.tokens} tokens, beyond the model's context "
                                   f"of {spec.max_context} positions")


def append_context(cache, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Append one piece of context KV ([layers, kv_heads, t, head_dim]) to a batch-1 cache, at
    the positions after what it holds (a continuation of the same sequence)."""
    tokens = keys.shape[2]
    start = int(cache.valid.long().sum()) if cache.length else 0
    positions = torch.arange(start, start + tokens, device=cache.device)[None]
    valid = torch.ones(1, tokens, dtype=torch.bool, device=cache.device)
    cache.append([k[None].to(cache.device, cache.dtype) for k in keys.unbind(0)],
                 [v[None].to(cache.device, cache.dtype) for v in values.unbind(0)], valid, positions)


def restore_runner(model, header):
    """(data [B] uint8, chunk_offsets [N] int64) -> [past_key.0, past_value.0, ...] for whole chunks
    of `header`'s level and size: an ONNX artifact's restore.onnx when it was exported for them,
    else the restore graph (passes/restore_from_codec.py: the kv_decode op, CUDA kernel on a GPU)."""
    graph = ((getattr(model, "manifest", None) or {}).get("graphs") or {}).get("restore")
    if graph and (graph["level"], graph["chunk_tokens"]) == (header.level, header.chunk_tokens):
        import onnxruntime as ort

        session = ort.InferenceSession(str(model.artifact_dir / graph["file"]), providers=model.providers)
        return lambda data, offsets: [torch.from_numpy(a) for a in session.run(
            None, {"data": data.numpy(), "chunk_offsets": offsets.numpy()})]
    from kvcompile.passes.restore_from_codec import restore_graph

    module = restore_graph(model.spec, header.level, header.chunk_tokens).to(model.device)
    return lambda data, offsets: list(module(data.to(model.device), offsets.to(model.device)))


def restore_cache(model, source, extra_capacity: int = 0):
    """A new batch-1 cache holding the decoded context (kvcompile.runtime.cache.KVCacheManager):
    the whole chunks in one restore-graph call, a short last chunk through the codec."""
    import kvcompile.codec as codec
    from kvcompile.codec import chunk as chunk_codec

    if isinstance(source, tuple):  # already decoded (keys, values)
        keys, values = source
        cache = model.new_cache(1, keys.shape[2] + extra_capacity)
        append_context(cache, keys, values)
        return cache
    header, stream = open_context(source)
    check_context(model, header)
    cache = model.new_cache(1, header.tokens + extra_capacity)
    chunks = [data for _, data in codec.iter_chunks(stream, header)]
    whole = header.tokens // header.chunk_tokens
    # the restore graph's streams are codec.default_group wide; a bitstream written with another
    # width (codec.encode's group) decodes through the codec instead
    if header.group != codec.default_group(header.channels, header.chunk_tokens):
        whole = 0
    # the graph's kv_decode node (and an exported restore.onnx) reads format-2 chunks: a format-3
    # chunk is laid out as one (the same words; its header's tables copied into it)
    chunks[:whole] = [chunk_codec.to_format2(header, index, data) for index, data in enumerate(chunks[:whole])]
    if whole:
        offsets, at = [], 0
        for data in chunks[:whole]:
            offsets.append(at)
            at += len(data) + (-len(data) % 4)  # the op reads chunks at 4-byte offsets
        data = torch.frombuffer(bytearray(b"".join(c + b"\0" * (-len(c) % 4) for c in chunks[:whole])),
                                dtype=torch.uint8)
        outputs = restore_runner(model, header)(data, torch.tensor(offsets, dtype=torch.int64))
        values = [v.transpose(1, 2) if model.spec.layers[i].host_values else v
                  for i, v in enumerate(outputs[1::2])]  # back to [1, Hkv, T, D] for append
        append_context(cache, torch.cat(outputs[0::2]), torch.cat(values))
    for index in range(whole, header.chunks):
        keys, values = codec.decode_chunk(header, index, chunks[index], device=model.device)
        append_context(cache, keys, values)
    return cache


class RestoreMethods:
    """Mixed into a runtime with `spec`, `step`, `new_cache`, `device` and `model_config`."""

    def restore_cache(self, source, extra_capacity: int = 0):
        """The compressed context `source` (bitstream bytes, its path, a file object, or decoded
        (keys, values) [layers, kv_heads, T, head_dim]) decoded into a new batch-1 cache."""
        return restore_cache(self, source, extra_capacity)

    @torch.no_grad()
    def generate_from_kv(self, source, query_ids: torch.Tensor, max_new_tokens: int = 32,
                         eos_token_id: Optional[int] = None, on_tokens=None) -> torch.Tensor:
        """Greedy generation after a compressed context: returns query + new tokens [1, n + new].
        The context is decoded into the cache, never prefilled; the query follows it."""
        from kvcompile.runtime import generate as gen
        from kvcompile.runtime.inputs import check_fits, check_token_ids

        query_ids = torch.as_tensor(query_ids)
        query_ids = query_ids[None] if query_ids.dim() == 1 else query_ids
        check_token_ids(query_ids, self.spec.vocab_size, "query_ids")
        if query_ids.shape[0] != 1:
            from kvcompile.errors import InputValidationError

            raise InputValidationError(f"generate_from_kv continues one context: query_ids must be [1, n], got "
                                       f"{tuple(query_ids.shape)}")
        cache = self.restore_cache(source, query_ids.shape[1] + max_new_tokens)
        check_fits(query_ids.shape[1], max_new_tokens, self.spec.max_context, cached=cache.length)
        eos_token_id, pad_token_id = gen.special_ids(self.model_config, eos_token_id, None)
        return gen.generate(self, lambda batch, capacity: cache, query_ids.to(self.device), None, max_new_tokens,
                            eos_token_id, pad_token_id, None, on_tokens)


def codec_manifest_field(model, level: int) -> dict:
    """What an artifact exported with `--codec LEVEL` records (manifest field "codec"): the
    level its contexts are encoded at, the bitstream format it reads, and the fingerprint a
    context must carry to be restored into it."""
    import kvcompile.codec as codec
    from kvcompile.codec.bitstream import FORMAT_VERSION
    from kvcompile.errors import UsageError
    from kvcompile.fusion.chunks import model_fingerprint

    if level not in codec.LEVELS:
        raise UsageError(f"unknown codec level {level}; levels: {', '.join(map(str, codec.LEVELS))}")
    return {"level": level, "note": codec.LEVELS[level], "bitstream_version": FORMAT_VERSION,
            "chunk_tokens": codec.CHUNK_TOKENS, "fingerprint": model_fingerprint(model.spec, model.model_config),
            "restore": "CompiledModel.generate_from_kv (kvcompile.codec.restore), `kvcompile run --from-kv`"}
