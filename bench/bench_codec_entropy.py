"""Where the codec's bits go over the per-channel entropy, on the GPU benchmark's workload (CPU).

    python bench/bench_codec_entropy.py --layers 4 --out docs/codec_entropy.json
    python bench/bench_codec_entropy.py --layers 4 --encode-only FILE   # just write the bitstream
    python bench/bench_codec_entropy.py --layers 4 --blob FILE          # the breakdown of that file

--encode-only with an older kvcompile first on PYTHONPATH writes that version's bitstream of the
same workload (docs/CODEC.md, "Format 3", measures format 2 so); --blob reads format 2 or 3.

    python bench/bench_codec_entropy.py --layers 4 --banks    # other banks' ideal cost (not coded)

--banks: the ideal cost (Σ -log2 f/2^16, each channel's best centre and shape chosen on all chunks
together, as the header's tables are) under the codec's bank and under candidate banks of the
Laplace discretised by rounding (p(0) = 1 - e^(-1/2b), p(d) = sinh(1/2b) e^(-|d|/b)), 64 to 256
shapes; what a new bank would gain before any rANS or side cost.

The workload is bench_codec_gpu.py's (`workload_symbols`: 12 chunks x 256 tokens, 1,024 channels,
31-level Laplace symbols with a random centre and spread per channel), with fewer layers so the CPU
reference coder handles it; every figure is per symbol, so it carries over to 32 layers (the
per-(side, layer) parts do not depend on the layer count). The chunks are coded by the real
encoder (`codec.encode`, the bench-only 31-level level) and the breakdown is exact:

  entropy     mean per-(chunk, side, layer, channel) empirical entropy: the bound the issue names
              (also: pooled over all chunks per channel, and the generator's true entropy, which
              show how far below any static code the per-chunk bound sits)
  fields      each part of the bitstream in bits/symbol: header (its tables apart: format 3), the
              chunks' scales, tables (format 2: every channel's; format 3: own flags and own
              tables), stream ends (format 2: u32 ends; format 3: u16 lengths + u32 starts), words
  words       = ideal cost of the symbols under the tables the encoder chose (Σ -log2 f/2^16)
              + rANS flush (each stream's final state: 48 - log2(final state) bits)
              + rANS rounding (what is left: the state arithmetic's loss)
  ideal       = entropy + bank misfit (the chosen table against the chunk's own distribution)
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_codec_gpu import BENCH_LEVEL, channel_entropy_bits, register_bench_level, workload_symbols  # noqa: E402


def per_channel_entropy_bits(symbols: np.ndarray) -> float:
    """Σ over the leading blocks of [.., T, C] symbols of each channel's empirical entropy · T."""
    return channel_entropy_bits(symbols) * symbols.size


def generator_entropy_bits(chunks, tokens, layers, channels, seed=0) -> float:
    """Exact entropy of the workload's per-channel distribution (clipped rounded Laplace; channel
    0 is ±15 with equal odds), summed over all its symbols."""
    rng = np.random.default_rng(seed)
    centre = rng.integers(-3, 4, (1, 2, layers, 1, channels))[0, :, :, 0]  # as workload_symbols draws them
    spread = rng.uniform(0.7, 4.0, (1, 2, layers, 1, channels))[0, :, :, 0]
    mu, b = centre[..., None].astype(float), spread[..., None]

    def cdf(x):
        return np.where(x < mu, 0.5 * np.exp(np.minimum(x - mu, 0) / b), 1 - 0.5 * np.exp(-np.maximum(x - mu, 0) / b))

    q = np.arange(-15, 16, dtype=float)
    p = cdf(q + 0.5) - cdf(q - 0.5)
    p[..., 0] = cdf(np.full(1, -14.5))[..., 0]  # the clip: everything below -14.5 rounds to -15
    p[..., -1] = 1 - cdf(np.full(1, 14.5))[..., 0]
    h = -(p * np.log2(np.where(p > 0, p, 1))).sum(-1)  # [2, L, C]
    h[:, :, 0] = 1.0
    return float(h.sum() * chunks * tokens)


def breakdown(blob: bytes, symbols: np.ndarray) -> dict:
    """The exact split of `blob` (a codec bitstream of `symbols` [N, 2, L, T, C] in -15..15)."""
    from kvcompile.codec import chunk as chunk_codec
    from kvcompile.codec import rans, tables
    from kvcompile.codec.bitstream import iter_chunks, read_header

    stream = io.BytesIO(blob)
    header = read_header(stream)
    header_bytes = stream.tell()
    count = symbols.size
    table_bytes = 0
    if header.version >= 3:  # u32 length + the deflated tables, after the chunk rows
        from kvcompile.codec.bitstream import _FIXED

        at = _FIXED.size + len(header.fingerprint.encode()) + 8 * header.chunks
        table_bytes = 4 + int.from_bytes(blob[at:at + 4], "little")
    bits = {"header": 8 * (header_bytes - table_bytes), "header_tables": 8 * table_bytes, "scales": 0,
            "chunk_tables": 0, "stream_ends": 0, "words": 0, "ideal": 0.0, "flush": 0.0}
    own = 0
    for index, data in iter_chunks(stream, header):
        parsed = chunk_codec.parse_chunk(header, index, data)
        layout = chunk_codec.Layout.of_chunk(header, parsed.tokens, data)
        own += int(parsed.own.sum()) if parsed.own is not None else 2 * header.layers
        bits["scales"] += 8 * layout.own
        bits["chunk_tables"] += 8 * (layout.ends - layout.own)
        bits["stream_ends"] += 8 * (layout.words - layout.ends)
        bits["words"] += 8 * (len(data) - layout.words)
        # ideal cost: every symbol under the table its channel was coded with
        freqs, table_index = chunk_codec._tables_of(header, parsed.shapes)  # the tables each channel was coded with
        d = rans.decode(parsed.words, parsed.ends, freqs, table_index, parsed.tokens * header.group)
        rows = table_index[np.arange(d.shape[0])[:, None], np.arange(d.shape[1])[None] % header.group]
        bits["ideal"] += float((rans.PRECISION - np.log2(freqs[rows, d].astype(np.float64))).sum())
        begins = np.concatenate([[0], parsed.ends[:-1]])
        states = (parsed.words[begins].astype(np.int64) << 16) | parsed.words[begins + 1]
        bits["flush"] += float((48 - np.log2(states.astype(np.float64))).sum())
    entropy = per_channel_entropy_bits(symbols)
    n, _, layers, t, c = symbols.shape
    pooled = per_channel_entropy_bits(symbols.transpose(1, 2, 0, 3, 4).reshape(1, 2 * layers, n * t, c))
    true = generator_entropy_bits(n, t, layers, c)
    total = 8 * len(blob)
    per = lambda b: b / count
    out = {
        "symbols": count, "bytes": len(blob), "bits_per_symbol": per(total),
        "entropy_per_chunk_channel": per(entropy), "vs_entropy": total / entropy,
        "entropy_pooled_over_chunks": per(pooled), "entropy_of_the_generator": per(true),
        "format": header.version, "group": header.group,
        "chunk_side_layers_with_own_tables": f"{own} of {2 * header.layers * header.chunks}",
        "fields_bits_per_symbol": {k: per(bits[k]) for k in ("header", "header_tables", "scales", "chunk_tables",
                                                              "stream_ends", "words")},
        "words_split_bits_per_symbol": {
            "ideal_under_chosen_tables": per(bits["ideal"]), "rans_flush": per(bits["flush"]),
            "rans_rounding": per(bits["words"] - bits["ideal"] - bits["flush"])},
        "bank_misfit_bits_per_symbol": per(bits["ideal"] - entropy),
        "bank_misfit_vs_pooled_bits_per_symbol": per(bits["ideal"] - pooled),
    }
    # the same as points (percent of the entropy), the form docs/CODEC.md gives
    points = {k: 100 * bits[k] / entropy for k in ("header", "header_tables", "scales", "chunk_tables", "stream_ends")}
    points.update(bank_misfit=100 * (bits["ideal"] - entropy) / entropy, rans_flush=100 * bits["flush"] / entropy,
                  rans_rounding=100 * (bits["words"] - bits["ideal"] - bits["flush"]) / entropy)
    out["points_over_entropy"] = points
    out["points_total"] = 100 * (total / entropy - 1)
    out["vs_entropy_pooled_over_chunks"] = total / pooled
    out["vs_entropy_of_the_generator"] = total / true
    return out


def rounded_laplace_bank(alphabet: int, shapes: int, gaussians: int = 0) -> np.ndarray:
    """[shapes + gaussians, A] 16-bit frequency tables: rounded Laplaces with b log-spaced over
    0.15 .. 60, then the codec bank's first `gaussians` Gaussian shapes, every other one."""
    from kvcompile.codec import tables

    distance = np.minimum(np.arange(alphabet), alphabet - np.arange(alphabet))
    rows = []
    for b in np.exp(np.linspace(np.log(0.15), np.log(60), shapes)):
        p = np.sinh(0.5 / b) * np.exp(-distance / b)
        p[0] = 1 - np.exp(-0.5 / b)
        rows.append(p)
    rows += [q ** (distance ** 2) for q in tables.gaussian_qs()[::2][:gaussians]]
    return np.stack([tables.quantise_frequencies(p) for p in rows])


def pooled_ideal_bits(symbols: np.ndarray, freqs: np.ndarray) -> float:
    """Bits/symbol of symbols [N, 2, L, T, C] (values 0..A-1) under `freqs` [K, A], each
    (side, layer, channel) taking its cheapest centre and table over all N chunks."""
    n, sides, layers, tokens, channels = symbols.shape
    alphabet = freqs.shape[1]
    bits = 16 - np.log2(freqs.astype(np.float64))  # [K, A]
    total = 0.0
    for side in range(sides):
        for layer in range(layers):
            flat = symbols[:, side, layer].reshape(n * tokens, channels)
            counts = np.zeros((channels, alphabet))
            np.add.at(counts, (np.broadcast_to(np.arange(channels), flat.shape).ravel(), flat.ravel()), 1)
            best = np.full(channels, np.inf)
            for centre in range(alphabet):
                best = np.minimum(best, (np.roll(counts, -centre, axis=1) @ bits.T).min(axis=1))
            total += best.sum()
    return total / symbols.size


def compare_banks(symbols: np.ndarray) -> dict:
    from kvcompile.codec import tables

    q = symbols.astype(np.int64) + 15  # 0..30
    out = {"codec bank (32 geometric + 32 Gaussian)": pooled_ideal_bits(q, tables.bank(31))}
    for shapes in (64, 128, 256):
        out[f"rounded Laplace, {shapes} shapes"] = pooled_ideal_bits(q, rounded_laplace_bank(31, shapes))
    out["rounded Laplace 48 + Gaussian 16"] = pooled_ideal_bits(q, rounded_laplace_bank(31, 48, 16))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--chunks", type=int, default=12)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--group", type=int, default=None, help="channels per rANS stream (codec.encode's group)")
    parser.add_argument("--encode-only", metavar="FILE", help="write the workload's bitstream to FILE and stop")
    parser.add_argument("--blob", metavar="FILE", help="break down this bitstream of the workload instead of encoding")
    parser.add_argument("--banks", action="store_true", help="compare candidate banks' ideal cost instead")
    parser.add_argument("--out", default=None, help="a JSON file for the result")
    args = parser.parse_args(argv)
    register_bench_level()
    import torch

    import kvcompile.codec as codec

    L, H, D, T, N = args.layers, args.heads, args.dim, args.tokens, args.chunks
    symbols = workload_symbols(N, T, L, H * D)  # [N, 2, L, T, C]
    if args.banks:
        pooled = per_channel_entropy_bits(symbols.transpose(1, 2, 0, 3, 4).reshape(1, 2 * L, N * T, H * D))
        result = {"command": "python bench/bench_codec_entropy.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                  "entropy_pooled_over_chunks": pooled / symbols.size,
                  "ideal_bits_per_symbol_under_pooled_tables": compare_banks(symbols)}
        print(json.dumps(result, indent=1))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
        return 0
    # as the GPU bench builds it: per-token quantisation at 15 levels a side reproduces the symbols
    kv = [torch.from_numpy(np.concatenate(list(symbols[:, side]), axis=1).astype(np.float32) / 15)
          .reshape(L, N * T, H, D).permute(0, 2, 1, 3).half() for side in range(2)]
    began = time.perf_counter()
    if args.blob:
        with open(args.blob, "rb") as f:
            blob = f.read()
    else:
        extra = {"group": args.group} if args.group else {}  # an older encode() has no group
        blob = codec.encode(tuple(kv), level=BENCH_LEVEL, chunk_tokens=T, **extra)
    seconds = time.perf_counter() - began
    if args.encode_only:
        with open(args.encode_only, "wb") as f:
            f.write(blob)
        return 0
    keys, values = codec.decode(blob)
    assert torch.equal(keys, kv[0]) and torch.equal(values, kv[1]), "the bench workload must round-trip exactly"
    result = {"command": "python bench/bench_codec_entropy.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "workload": {"chunks": N, "tokens": T, "layers": L, "channels": H * D, "levels": 31},
              **({} if args.blob else {"encode_s": seconds}), **breakdown(blob, symbols)}
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
