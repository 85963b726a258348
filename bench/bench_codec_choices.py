"""The measurements behind the codec's design choices, on the reference model's KV (docs/CODEC.md).

    python bench/bench_codec_choices.py delta      # anchor + delta token groups vs none (seconds)
    python bench/bench_codec_choices.py tables     # parametric table bank vs the channels' own tables
    python bench/bench_codec_choices.py scales     # per-token / per-channel / per-layer scales on the
                                                   # model's tasks (~3 min per setting on 2 cores)
    python bench/bench_codec_choices.py schedules  # K / V levels per layer half, through the codec
                                                   # (20 prompts per task, ~3 min per setting)
    python bench/bench_codec_choices.py sizes      # bytes of every level's bitstream (JSON line);
                                                   # with an older kvcompile first on PYTHONPATH,
                                                   # that version's (docs/CODEC.md, "Format 3")

KV: the reference model's cache of the first 1,023 held-out bytes (8 layers, 2 KV heads, head_dim
32), chunks of 256 tokens. "bits" is the per-(layer, channel) empirical entropy of the symbols in
a chunk (what per-channel tables could reach, their own size not counted).
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

CHUNK = 256


def reference_kv():
    from transformers import AutoModelForCausalLM, DynamicCache

    from kvcompile.reference import WEIGHTS_DIR
    from kvcompile.reference.corpus import text_bytes

    model = AutoModelForCausalLM.from_pretrained(WEIGHTS_DIR, dtype=torch.float32).eval()
    ids = torch.tensor([[1] + list(text_bytes("heldout", max_bytes=1023))])
    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
    return model, (torch.stack([layer.keys[0] for layer in cache.layers]),
                   torch.stack([layer.values[0] for layer in cache.layers]))


def rows(x: torch.Tensor) -> np.ndarray:
    layers, heads, tokens, dim = x.shape
    return x.permute(0, 2, 1, 3).reshape(layers, tokens, heads * dim).double().numpy()


def channel_entropy(symbols: np.ndarray) -> float:
    """Total bits of [L, T, C] symbols coded with each (layer, channel)'s own empirical table."""
    total = 0.0
    for layer in symbols:
        for column in layer.T:
            _, counts = np.unique(column, return_counts=True)
            total += -(counts * np.log2(counts / column.size)).sum()
    return total


def quantise(x: np.ndarray, half, mode: str):
    """[L, T, C] -> (symbols, dequantised) with abs-max per token, channel (over the chunk) or layer."""
    h = np.asarray(half, dtype=np.float64)[:, None, None]
    axis = {"token": 2, "channel": 1, "layer": (1, 2)}[mode]
    scale = np.abs(x).max(axis=axis, keepdims=True)
    scale = np.where(scale > 0, scale, 1.0)
    symbols = np.rint(x / scale * h)
    return symbols, symbols * scale / h


def anchor_delta(symbols: np.ndarray, group: int = 10) -> np.ndarray:
    """CacheGen's token locality: the first token of each group as is, the others minus it."""
    out = symbols.copy()
    for start in range(0, symbols.shape[1], group):
        out[:, start + 1:start + group] = symbols[:, start + 1:start + group] - symbols[:, start:start + 1]
    return out


def run_delta(kv) -> None:
    print("side  levels  bits (plain)  bits (anchor+delta, groups of 10)")
    for name, x in zip("KV", kv):
        r = rows(x)
        for half in (3, 7, 15):
            plain = delta = count = 0
            for start in range(0, r.shape[1], CHUNK):
                symbols, _ = quantise(r[:, start:start + CHUNK], [half] * r.shape[0], "token")
                plain += channel_entropy(symbols)
                delta += channel_entropy(anchor_delta(symbols))
                count += symbols.size
            print(f"{name}     {2 * half + 1:6d}  {plain / count:12.3f}  {delta / count:12.3f}")


def run_tables(kv) -> None:
    from kvcompile.codec import quantise as codec_quantise
    from kvcompile.codec import rans, tables

    print("side  levels  own tables (entropy)  bank (geometric+Gaussian)  bank geometric only  coded (rANS, 4 ch/stream)")
    for name, x in zip("KV", kv):
        r = rows(x).astype(np.float32)
        for half in (3, 7):
            alphabet = 2 * half + 1
            side = codec_quantise.Side(half, half, 1.0)
            own = bank = geometric = coded = count = 0
            bits = tables.bank_bits(alphabet)
            for start in range(0, r.shape[1], CHUNK):
                part = r[:, start:start + CHUNK]
                scales = np.abs(part).max(axis=2)
                symbols = codec_quantise.quantise(part, side, scales)  # [L, T, C]
                own += channel_entropy(symbols)
                count += symbols.size
                for layer in symbols:
                    centre, shape = tables.choose(layer.T, alphabet)
                    d = (layer - centre[None]) % alphabet  # [T, C]
                    bank += bits[shape[None, :], d].sum()
                    counts = np.stack([np.bincount(col, minlength=alphabet) for col in d.T])
                    geometric += (counts @ bits[:tables.GEOMETRIC].T).min(axis=1).sum()  # centre fixed
                    streams = d.reshape(d.shape[0], -1, 4).transpose(1, 0, 2).reshape(-1, d.shape[0] * 4)
                    words = rans.encode(streams, tables.bank(alphabet), shape.reshape(-1, 4))
                    coded += 16 * sum(w.size for w in words) + 2 * 8 * layer.shape[1]  # + centre, shape bytes
            print(f"{name}     {alphabet:6d}  {own / count:20.3f}  {bank / count:25.3f}  {geometric / count:19.3f}"
                  f"  {coded / count:24.3f}")


def run_scales(model, settings) -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_codec_quality as quality

    from kvcompile.eval.cross_chunk import score_cross_chunk
    from kvcompile.eval.perplexity import heldout_windows
    from kvcompile.eval.retrieval import score_retrieval

    class QuantiseRunner(quality.CodecRunner):
        """Round-trips the cache through quantisation only (no entropy stage), counting entropy."""

        def __init__(self, model, k, v):
            super().__init__(model, None)
            self.setting, self.bits, self.count = (k, v), 0.0, 0

        def round_trip(self, cache, batch):
            out = quality.DynamicCache()
            decoded = []
            for x, (half, mode) in zip((torch.stack([l.keys[0] for l in cache.layers]),
                                        torch.stack([l.values[0] for l in cache.layers])), self.setting):
                layers, heads, tokens, dim = x.shape
                r = rows(x)
                y = np.zeros_like(r)
                for start in range(0, tokens, CHUNK):
                    symbols, y[:, start:start + CHUNK] = quantise(r[:, start:start + CHUNK], [half] * layers, mode)
                    self.bits += channel_entropy(symbols)
                    self.count += symbols.size
                decoded.append(torch.from_numpy(y).float().reshape(layers, tokens, heads, dim).permute(0, 2, 1, 3))
            for layer in range(len(cache.layers)):
                out.update(decoded[0][layer][None].contiguous(), decoded[1][layer][None].contiguous(), layer)
            return out

    for name, (k, v) in settings.items():
        runner = QuantiseRunner(model, k, v)
        bits = count = 0
        for window in heldout_windows(2048, 2):
            b, n = runner.continuation_bits(window, 1024)
            bits, count = bits + b, count + n
        retrieval = score_retrieval(runner, (512, 1024), 10, 0, batch_size=10)
        cross = score_cross_chunk(runner, 10, 0, modes=("full_prefill",))
        print(name, f"bits={runner.bits / runner.count:.3f} bpb={bits / count:.4f}",
              {k: v for k, v in retrieval.items() if k.isdigit()}, "chain", cross["chain"]["full_prefill"],
              "direct", cross["direct"]["full_prefill"], flush=True)


def run_schedules(model) -> None:
    """Each setting registered as a temporary codec level and scored like bench_codec_quality."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import json

    import bench_codec_quality as quality

    from kvcompile.codec import quantise as codec_quantise

    class Options:
        windows, context, count = 4, 1024, 20

    side = codec_quantise.Side
    for index, (name, (k, v)) in enumerate(SCHEDULES.items()):
        level = 100 + index
        codec_quantise.LEVELS[level] = codec_quantise.Level(side(*k), side(*v), name)
        row = quality.evaluate_level(model, level, Options)
        print(name, json.dumps({key: row[key] for key in ("bpb", "retrieval", "cross_chunk", "vs_8bit")}), flush=True)


# name: (K (shallow, deep, split), V (shallow, deep, split)) in levels each side of zero
SCHEDULES = {
    "K 15 / V 7": ((7, 7, 1.0), (3, 3, 1.0)),
    "K 19 first 2 layers then 15 / V 7": ((9, 7, 0.25), (3, 3, 1.0)),
    "K 15 / V 9": ((7, 7, 1.0), (4, 4, 1.0)),
    "K 13 / V 7": ((6, 6, 1.0), (3, 3, 1.0)),
    "K 31 / V 15": ((15, 15, 1.0), (7, 7, 1.0)),
    "K 31 shallow half, 15 deep / V 7": ((15, 7, 0.5), (3, 3, 1.0)),
    "K 15 shallow half, 31 deep / V 7": ((7, 15, 0.5), (3, 3, 1.0)),
    "K 23 / V 7": ((11, 11, 1.0), (3, 3, 1.0)),
    "K 15 shallow half, 23 deep / V 7": ((7, 11, 0.5), (3, 3, 1.0)),
    "K 23 / V 5": ((11, 11, 1.0), (2, 2, 1.0)),
    "K 15 shallow half, 23 deep / V 7 shallow, 5 deep": ((7, 11, 0.5), (3, 2, 0.5)),
}

SCALE_SETTINGS = {  # (levels each side, scale mode) for K and V
    "token, 15 levels": ((7, "token"), (7, "token")),
    "layer, 15 levels": ((7, "layer"), (7, "layer")),
    "layer, 23 levels": ((11, "layer"), (11, "layer")),
    "channel, 11 levels": ((5, "channel"), (5, "channel")),
    "K channel 11, V token 15": ((5, "channel"), (7, "token")),
    "token, 11 levels": ((5, "token"), (5, "token")),
}


def run_sizes(kv) -> None:
    """Bytes of each level's bitstream of this KV, and the 8-bit baseline's (int8 + an fp32 scale
    per (layer, token), K and V), as one JSON line."""
    import json

    import kvcompile.codec as codec
    from kvcompile.codec.bitstream import FORMAT_VERSION

    keys, values = kv
    layers, heads, tokens, dim = keys.shape
    eight = 2 * layers * tokens * (heads * dim + 4)
    import io

    from kvcompile.codec import chunk

    sizes, own = {}, {}
    for level in sorted(codec.LEVELS):
        blob = codec.encode(kv, level=level, chunk_tokens=CHUNK)
        sizes[str(level)] = len(blob)
        stream = io.BytesIO(blob)
        header = codec.read_header(stream)
        if FORMAT_VERSION >= 3:  # how many (side, layer)s of each chunk carry their own tables
            own[str(level)] = [int(chunk.parse_chunk(header, i, data).own.sum())
                               for i, data in codec.iter_chunks(stream, header)]
    print(json.dumps({"format": FORMAT_VERSION, "kv": list(keys.shape), "eight_bit_bytes": eight, "bytes": sizes,
                      "vs_8bit": {level: round(eight / size, 4) for level, size in sizes.items()},
                      **({"own_tables_per_chunk_of_2L": own} if own else {})}))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("delta", "tables", "scales", "schedules", "sizes"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model, kv = reference_kv()
    if args.what == "delta":
        run_delta(kv)
    elif args.what == "tables":
        run_tables(kv)
    elif args.what == "scales":
        run_scales(model, SCALE_SETTINGS)
    elif args.what == "sizes":
        run_sizes(kv)
    else:
        run_schedules(model)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
