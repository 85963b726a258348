"""Streaming a compressed context under a deadline (CacheGen's adaptation, issue 13 part 5).

A context is published once, chunk by chunk, at every codec level and as text:

    publish(store.put, "doc-42", (keys, values), token_ids, fingerprint=fp)     # keys [L, Hkv, T, D]

    key                      value
    doc-42/meta              JSON: tokens, chunk_tokens, fingerprint, bytes of every (chunk, level)
    doc-42/<i>/level<l>      chunk i alone as a bitstream of level l (kvcompile.codec.encode)
    doc-42/<i>/text          chunk i's token ids, int32 little-endian

and loaded into a compiled model's cache by `StreamingLoader`: chunk after chunk, the planner
picks the best level whose remaining chunks still fit the deadline at the throughput measured
on the previous chunk; when not even the smallest level fits, that chunk comes as text and is
recomputed (a prefill continuation: exact). Fetching chunk i+1 overlaps decoding chunk i. The
report gives each chunk's choice and times, and the time to first token of the query.

A source is anything with `get(key) -> bytes | None` (a dict, kvcompile's KV store); here also
`DirectorySource` (a folder, one file per key) and `SocketSource` (a length-prefixed
request/response protocol over a connected socket, served by `serve`). bench/sim_codec_streaming.py
drives the same planner with bandwidth traces instead of a real source.
"""
from __future__ import annotations

import json
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from kvcompile.errors import InputError, UsageError

TEXT = "text"


class StreamingError(InputError):
    """A streamed context that is missing from its source or contradicts its metadata."""


# --- publishing -----------------------------------------------------------------------------
def chunk_key(context: str, index: int, choice) -> str:
    return f"{context}/{index}/{choice if choice == TEXT else f'level{choice}'}"


def publish(put: Callable[[str, bytes], None], context: str, kv, token_ids, fingerprint: str = "",
            chunk_tokens: int = 256, levels=None) -> dict:
    """Encode every chunk of `kv` ((keys, values) [L, Hkv, T, D]) at every level and store it,
    with its text, under `context`; returns the metadata (also stored at `context/meta`)."""
    import kvcompile.codec as codec

    keys, values = kv
    levels = sorted(codec.LEVELS) if levels is None else sorted(levels)
    token_ids = torch.as_tensor(token_ids).reshape(-1)
    tokens = keys.shape[2]
    if token_ids.shape[0] != tokens:
        raise UsageError(f"{token_ids.shape[0]} token ids for {tokens} tokens of KV")
    sizes: Dict[str, List[int]] = {str(level): [] for level in levels}
    for index, start in enumerate(range(0, tokens, chunk_tokens)):
        part = (keys[:, :, start:start + chunk_tokens], values[:, :, start:start + chunk_tokens])
        for level in levels:
            blob = codec.encode(part, level=level, chunk_tokens=chunk_tokens, fingerprint=fingerprint)
            put(chunk_key(context, index, level), blob)
            sizes[str(level)].append(len(blob))
        text = token_ids[start:start + chunk_tokens].numpy().astype("<i4").tobytes()
        put(chunk_key(context, index, TEXT), text)
    meta = {"tokens": tokens, "chunk_tokens": chunk_tokens, "fingerprint": fingerprint, "levels": levels,
            "bytes": sizes}
    put(f"{context}/meta", json.dumps(meta).encode())
    return meta


# --- sources ----------------------------------------------------------------------------------
class DirectorySource:
    """A folder holding one file per key (keys' "/" are subfolders)."""

    def __init__(self, folder):
        self.folder = Path(folder)

    def put(self, key: str, data: bytes) -> None:
        path = self.folder / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def get(self, key: str) -> Optional[bytes]:
        path = self.folder / key
        return path.read_bytes() if path.is_file() else None


_LENGTH = struct.Struct("<I")
_MISSING = 0xFFFFFFFF


def _receive(sock, size: int) -> bytes:
    parts, left = [], size
    while left:
        part = sock.recv(min(left, 1 << 20))
        if not part:
            raise StreamingError("the KV source closed the connection mid-message")
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


class SocketSource:
    """get() over a connected socket: request = u32 length + UTF-8 key, answer = u32 length +
    bytes (length 0xFFFFFFFF: no such key)."""

    def __init__(self, sock):
        self.sock = sock

    def get(self, key: str) -> Optional[bytes]:
        name = key.encode()
        self.sock.sendall(_LENGTH.pack(len(name)) + name)
        (length,) = _LENGTH.unpack(_receive(self.sock, _LENGTH.size))
        return None if length == _MISSING else _receive(self.sock, length)


def serve(source, sock) -> None:
    """Answer SocketSource requests from `source` until the peer closes the connection."""
    while True:
        head = sock.recv(_LENGTH.size)
        if not head:
            return
        if len(head) < _LENGTH.size:
            head += _receive(sock, _LENGTH.size - len(head))
        key = _receive(sock, _LENGTH.unpack(head)[0]).decode()
        data = source.get(key)
        sock.sendall(_LENGTH.pack(_MISSING) if data is None else _LENGTH.pack(len(data)) + data)


# --- the planner ------------------------------------------------------------------------------
@dataclass
class Costs:
    """What a choice costs besides its bytes: seconds to decode a chunk of a level, and to
    recompute a chunk from text, on the machine that loads. `calibrate` measures both on the
    model at hand; the simulator passes the GPU's (docs/CODEC.md, "Streaming")."""

    decode_s: Callable[[int, int], float]  # (level, tokens) -> seconds
    recompute_s: Callable[[int, int], float]  # (tokens, tokens already cached) -> seconds

    @classmethod
    def linear(cls, values_per_token: int, decode_values_per_s: float, recompute_s_per_token: float,
               recompute_fixed_s: float = 0.0) -> "Costs":
        return cls(lambda level, tokens: tokens * values_per_token / decode_values_per_s,
                   lambda tokens, cached: recompute_fixed_s + tokens * recompute_s_per_token)

    @classmethod
    @torch.no_grad()
    def calibrate(cls, model, tokens: int = 64) -> "Costs":
        """Time one decode of a `tokens`-token chunk (default level) and one prefill of as many
        tokens on `model`, and scale both linearly with the chunk's tokens."""
        import kvcompile.codec as codec
        from kvcompile.runtime import generate as gen

        spec = model.spec
        generator = torch.Generator().manual_seed(0)
        shape = (spec.num_layers, spec.kv_heads, tokens, spec.head_dim)
        kv = tuple(torch.randn(shape, generator=generator).to(getattr(torch, spec.dtype)) for _ in "kv")
        blob = codec.encode(kv, level=codec.DEFAULT_LEVEL, chunk_tokens=tokens)
        start = time.perf_counter()
        decode_published_chunk(codec.read_header(blob), blob, model.device)
        decode_s = time.perf_counter() - start
        ids = torch.zeros(1, tokens, dtype=torch.long, device=model.device)
        start = time.perf_counter()
        gen.prefill(model, model.new_cache(1, tokens), ids)
        prefill_s = time.perf_counter() - start
        values = 2 * spec.num_layers * spec.kv_heads * spec.head_dim
        return cls.linear(values, values * tokens / decode_s, prefill_s / tokens)


@dataclass
class Planner:
    """CacheGen's rule: for chunk i, the best (largest) level such that chunks i..n-1 at that level,
    at the throughput just measured, are in the cache before the deadline. When none is, the
    chunk is sent as text if recomputing the rest of the context from text (consecutive text
    chunks run as one prefill) is quicker than fetching the rest at the smallest level.
    Fetching and decoding overlap, so the rest takes the longer of the two pipelines: the
    network's bytes (then one decode), or the decoder's backlog plus every remaining decode."""

    sizes: Dict[int, List[int]]  # level -> bytes of each chunk
    text_bytes: List[int]
    chunk_tokens: List[int]
    costs: Costs
    deadline_s: float  # for the context to be in the cache

    def finish_s(self, choice, index: int, throughput_bps: float, backlog_s: float, text_run: int = 0) -> float:
        """Seconds until chunks index.. are in the cache if all of them come as `choice`;
        `text_run`: tokens of the text chunks just before, waiting to be recomputed in one prefill
        (which text continues, and anything else runs first)."""
        cached = sum(self.chunk_tokens[:index]) - text_run
        if choice == TEXT:
            network = sum(self.text_bytes[index:]) / throughput_bps
            return max(network, backlog_s) + self.costs.recompute_s(text_run + sum(self.chunk_tokens[index:]), cached)
        network = sum(self.sizes[choice][index:]) / throughput_bps
        decodes = [self.costs.decode_s(choice, tokens) for tokens in self.chunk_tokens[index:]]
        flush = self.costs.recompute_s(text_run, cached) if text_run else 0.0
        return max(network + decodes[-1], backlog_s + flush + sum(decodes))

    def choose(self, index: int, elapsed_s: float, throughput_bps: float, backlog_s: float = 0.0,
               text_run: int = 0):
        """`backlog_s`: decoding still queued (chunks fetched, not yet decoded); `text_run`: see finish_s."""
        left = self.deadline_s - elapsed_s
        # best first = largest first: level numbers do not order sizes (level 4 sits between 1 and 2)
        levels = sorted(self.sizes, key=lambda level: (-sum(self.sizes[level]), level))
        for level in levels:
            if self.finish_s(level, index, throughput_bps, backlog_s, text_run) <= left:
                return level
        smallest = levels[-1]
        text = self.finish_s(TEXT, index, throughput_bps, backlog_s, text_run)
        return TEXT if text < self.finish_s(smallest, index, throughput_bps, backlog_s, text_run) else smallest


def decode_published_chunk(header, blob: bytes, device) -> torch.Tensor:
    """A one-chunk bitstream -> [2, L, Hkv, t, D] through the kv_decode op (the CUDA kernel on a
    GPU, the codec's reference decoder on the CPU)."""
    import dataclasses
    import io

    import kvcompile.codec as codec
    from kvcompile.ops.kv_decode.definition import decode_chunks

    stream = io.BytesIO(blob)
    codec.read_header(stream)
    chunks = [data for _, data in codec.iter_chunks(stream, header)]
    if len(chunks) != 1:
        raise StreamingError(f"a published chunk holds {len(chunks)} chunks, not 1")
    return decode_chunks(dataclasses.replace(header, chunk_tokens=header.tokens), chunks, device)


# --- the loader -------------------------------------------------------------------------------
@dataclass
class ChunkRecord:
    index: int
    choice: object  # a level, or "text"
    bytes: int
    fetch_s: float
    compute_s: float  # decode, or recompute
    throughput_bps: float


@dataclass
class StreamReport:
    chunks: List[ChunkRecord] = field(default_factory=list)
    context_ready_s: float = 0.0  # every chunk in the cache
    ttft_s: Optional[float] = None  # the query's first-token logits computed
    deadline_s: float = 0.0

    def summary(self) -> dict:
        choices = [str(c.choice) for c in self.chunks]
        return {"ttft_s": self.ttft_s, "context_ready_s": self.context_ready_s, "deadline_s": self.deadline_s,
                "choices": choices, "bytes": sum(c.bytes for c in self.chunks)}


class StreamingLoader:
    """Load a published context into `model`'s cache under a deadline (for the whole context to
    be in the cache; the query's prefill comes after it), then run the query. `levels` limits the
    levels the planner may pick; `initial_throughput_bps` is its guess before the first fetch."""

    def __init__(self, model, source, context: str, deadline_s: float, costs: Optional[Costs] = None,
                 initial_throughput_bps: float = 1.25e9, levels=None):
        from kvcompile.codec.restore import RestoreMismatchError
        from kvcompile.fusion.chunks import model_fingerprint

        self.model, self.source, self.context = model, source, context
        self.meta = self._meta()
        expected = model_fingerprint(model.spec, model.model_config)
        if self.meta.get("fingerprint") and self.meta["fingerprint"] != expected:
            raise RestoreMismatchError(f"context {context!r} was computed by another model (fingerprint "
                                       f"{self.meta['fingerprint']}, this model {expected})")
        sizes = {int(level): list(map(int, sizes)) for level, sizes in self.meta["bytes"].items()
                 if levels is None or int(level) in levels}
        if not sizes:
            raise UsageError(f"none of the levels {levels} is published for {context}")
        tokens, step = int(self.meta["tokens"]), int(self.meta["chunk_tokens"])
        spans = [min(step, tokens - start) for start in range(0, tokens, step)]
        self.planner = Planner(sizes, [4 * t for t in spans], spans, costs or Costs.calibrate(model), deadline_s)
        self.throughput_bps = initial_throughput_bps

    def _meta(self) -> dict:
        data = self.source.get(f"{self.context}/meta")
        if data is None:
            raise StreamingError(f"no context {self.context!r} in the KV source")
        try:
            return json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise StreamingError(f"the metadata of context {self.context!r} is not valid JSON") from None

    def _fetch(self, index: int, choice):
        start = time.perf_counter()
        data = self.source.get(chunk_key(self.context, index, choice))
        if data is None:
            raise StreamingError(f"chunk {index} of {self.context!r} ({choice}) is missing from the KV source")
        return data, time.perf_counter() - start

    @torch.no_grad()
    def load(self, query_ids=None):
        """-> (cache, report[, logits of the query]): the context in a new batch-1 cache."""
        from kvcompile.codec.restore import append_context, check_context
        from kvcompile.runtime import generate as gen

        import kvcompile.codec as codec

        start = time.perf_counter()
        report = StreamReport(deadline_s=self.planner.deadline_s)
        extra = 0 if query_ids is None else torch.as_tensor(query_ids).reshape(-1).shape[0]
        cache = self.model.new_cache(1, int(self.meta["tokens"]) + extra)
        spans = self.planner.chunk_tokens
        text: List[torch.Tensor] = []
        with ThreadPoolExecutor(1) as fetcher:
            choice = self.planner.choose(0, 0.0, self.throughput_bps)
            pending = fetcher.submit(self._fetch, 0, choice)
            for index in range(len(spans)):
                data, fetch_s = pending.result()
                self.throughput_bps = len(data) / max(fetch_s, 1e-9)
                if index + 1 < len(spans):  # the next chunk's level, from this chunk's throughput
                    run = sum(t.shape[0] for t in text) + (spans[index] if choice == TEXT else 0)
                    backlog = 0.0 if choice == TEXT else self.planner.costs.decode_s(choice, spans[index])
                    next_choice = self.planner.choose(index + 1, time.perf_counter() - start, self.throughput_bps,
                                                      backlog, run)
                    pending = fetcher.submit(self._fetch, index + 1, next_choice)
                compute = time.perf_counter()
                if choice == TEXT:  # consecutive text chunks are recomputed in one prefill
                    ids = torch.from_numpy(np.frombuffer(data, dtype="<i4").astype(np.int64))
                    if ids.shape[0] != spans[index]:
                        raise StreamingError(f"chunk {index} of {self.context!r} holds {ids.shape[0]} tokens, "
                                             f"not {spans[index]}")
                    text.append(ids)
                    if index + 1 == len(spans) or next_choice != TEXT:
                        gen.prefill(self.model, cache, torch.cat(text)[None].to(self.model.device))
                        text = []
                else:
                    header = codec.read_header(data)
                    check_context(self.model, header)
                    if header.tokens != spans[index]:
                        raise StreamingError(f"chunk {index} of {self.context!r} holds {header.tokens} tokens, "
                                             f"not {spans[index]}")
                    kv = decode_published_chunk(header, data, self.model.device)
                    append_context(cache, kv[0], kv[1])
                report.chunks.append(ChunkRecord(index, choice, len(data), fetch_s, time.perf_counter() - compute,
                                                 self.throughput_bps))
                if index + 1 < len(spans):
                    choice = next_choice
        report.context_ready_s = time.perf_counter() - start
        if query_ids is None:
            return cache, report
        logits = gen.prefill(self.model, cache, torch.as_tensor(query_ids).reshape(1, -1).to(self.model.device))
        report.ttft_s = time.perf_counter() - start
        return cache, report, logits
