"""Would compressing KCache's host-resident V pay? An estimate from measured rates (no GPU needed).

A KCache decode step gathers N rows of V per (sequence, KV head) from pinned host memory
(docs/KCACHE.md). Compressed V would move fewer bytes over the link but must be decoded after
retrieval. Per layer and step, B=8 sequences, 8 KV heads, head_dim 128, bf16, N=128, 32K context
(the op benchmark's shape), three ways:
  today        bf16 rows gathered: the measured gather kernel time (docs/kcache_op.json)
  chunk codec  the codec's bitstream as it is: a stream codes 256 tokens in order, so a row is
               only reachable by decoding its whole chunk; rows are spread over the context, so
               the expected share of chunks touched is decoded (and fetched, compressed)
  row codec    a row-addressable variant (each row its own rANS stream + an fp16 scale + its
               final state, tables on the device): compressed rows gathered at the measured rate
               for their size, then decoded; with the gather rate of a 128 MiB and of a 1 GiB
               pinned buffer (short rows lose up to 7x over large buffers: page translations)
Inputs, each with its source: the gather kernel's time and the gather rate by row size and
buffer size (H200, 2026-11-29, docs/kcache_op.json and docs/kcache_floors_h200.json), bits per
value of codec level 2 on the reference model's KV (docs/codec_streaming.json, CPU), GPU decode
rates of LMCache's CacheGen coder (59 GB/s) and nvCOMP ANS (557 GB/s) on the H200 (the issue's
table, fp16 produced per second; kvcompile's own decoder is not measured yet).

    python bench/estimate_kcache_v_codec.py --out docs/     # codec_kcache_v.json + a table
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
B, HEADS, DIM, N, CONTEXT, CHUNK = 8, 8, 128, 128, 32768, 256
DECODE_GBPS = {"LMCache CacheGen coder (H200)": 59.0, "nvCOMP ANS (H200)": 557.0}
ROW_OVERHEAD_BYTES = 2 + 4  # a row's fp16 scale and its rANS final state


def gather_rate(table: dict, row_bytes: float) -> float:
    """bytes/s for rows of `row_bytes`, log-interpolated in a measured {row bytes: rate} table."""
    sizes = sorted(int(k) for k in table)
    rates = [table[str(k)] for k in sizes]
    x = math.log(min(max(row_bytes, sizes[0]), sizes[-1]))
    return float(np.interp(x, [math.log(k) for k in sizes], rates))


def estimate(level: str = "2") -> dict:
    op = json.loads((ROOT / "docs" / "kcache_op.json").read_text())
    floors = json.loads((ROOT / "docs" / "kcache_floors_h200.json").read_text())
    gather = op["gather_link_rate"]
    bits = json.loads((ROOT / "docs" / "codec_streaming.json").read_text())["inputs"]["bits_per_value"][level]
    values = B * HEADS * N * DIM  # gathered per layer and step
    out_bytes = 2 * values  # bf16
    result = {"shape": {"batch": B, "kv_heads": HEADS, "head_dim": DIM, "topn": N, "context": CONTEXT},
              "bits_per_value": bits, "level": int(level), "sources": {"gather_kernel": op.get("date"),
              "gather_rates": floors.get("date"), "device": floors.get("device")}, "rows": {}}
    fast, slow = max(DECODE_GBPS.values()), min(DECODE_GBPS.values())
    for selection, key in (("head", f"{CONTEXT}/head/{N}"), ("layer", f"{CONTEXT}/layer/{N}")):
        measured = gather[key]
        row_bytes, today_us = measured["row_bytes"], measured["gather_us"]
        rows = out_bytes // row_bytes
        link = out_bytes / (today_us * 1e-6)  # bytes/s the kernel reached
        # chunk codec: P(a chunk holds none of the N rows of one (sequence, head)) = (1 - 1/chunks)^N
        chunks = CONTEXT // CHUNK
        touched = 1 - (1 - 1 / chunks) ** N
        chunk_values = touched * CONTEXT * B * HEADS * DIM
        compressed_row = row_bytes // 2 * bits / 8 + ROW_OVERHEAD_BYTES * (row_bytes // (2 * DIM))
        cases = {"today (bf16 rows)": today_us}
        for name, rate in DECODE_GBPS.items():
            fetch = chunk_values * bits / 8 / floors["host_to_device_bytes_per_s"]  # whole chunks: a plain copy
            cases[f"chunk codec, decode {name}"] = (fetch + 2 * chunk_values / (rate * 1e9)) * 1e6
        for footprint, label in (("134217728", "128 MiB"), ("1073741824", "1 GiB")):
            rate = gather_rate(floors["host_gather_by_footprint"][footprint], compressed_row)
            fetch_us = rows * compressed_row / rate * 1e6
            cases[f"row codec, {label} buffer, decode 557 GB/s"] = fetch_us + out_bytes / (fast * 1e9) * 1e6
            cases[f"row codec, {label} buffer, decode 59 GB/s"] = fetch_us + out_bytes / (slow * 1e9) * 1e6
        result["rows"][selection] = {"row_bytes": row_bytes, "compressed_row_bytes": round(compressed_row, 1),
                                     "link_gbps_measured": round(link / 1e9, 1), "chunks_touched": round(touched, 3),
                                     "us_per_layer_step": {k: round(v, 1) for k, v in cases.items()}}
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write codec_kcache_v.json here")
    parser.add_argument("--level", default="2")
    args = parser.parse_args(argv)
    result = estimate(args.level)
    for selection, row in result["rows"].items():
        print(f"{selection} selection ({row['row_bytes']} B rows, {row['compressed_row_bytes']} B compressed):")
        for case, us in row["us_per_layer_step"].items():
            print(f"  {case:45s} {us:10.1f} µs")
    if args.out:
        Path(args.out, "codec_kcache_v.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
