"""The streaming loader measured for real: TTFT under emulated bandwidth traces, on the device at hand.

bench/sim_codec_streaming.py simulates an 8B model on an H200; this runs the actual
StreamingLoader (kvcompile/codec/streaming.py) on the bundled reference model, its chunks served
by a source that delivers bytes at the rate of a trace (the simulator's steady / dropping / bursty
shapes, slowed by --time-scale so they fit the reference model's times on this device). Every
time is a wall-clock measurement of the whole path: fetch (trace-paced), decode through the
kv_decode op or recompute from text, the cache, the query's prefill. Rows per trace:
  text      the context's token ids fetched, then one prefill of context + query
  8-bit     int8 + an fp32 scale per (layer, token), K and V, fetched; dequantised into the cache
  level N   every chunk at codec level N (the loader with only that level, no deadline)
  adaptive  the loader's planner with --deadline-s, levels 1-3 or text

    python bench/measure_codec_streaming.py --out docs/    # codec_streaming_measured.json + .png
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sim_codec_streaming import BIN_S, arrival, plot_ttft_bars, traces  # noqa: E402

import kvcompile  # noqa: E402
from kvcompile.codec import streaming  # noqa: E402
from kvcompile.codec.restore import append_context  # noqa: E402
from kvcompile.codec.saved_kv import prompt_kv  # noqa: E402


class TraceSource:
    """get() returns each value when the trace has delivered its bytes, one transfer at a time,
    from the moment `start()` was called."""

    def __init__(self, source, trace: np.ndarray):
        self.source, self.trace, self.origin, self.link_free = source, trace, 0.0, 0.0

    def start(self) -> None:
        self.origin, self.link_free = time.perf_counter(), 0.0

    def transfer(self, size: int) -> None:
        now = time.perf_counter() - self.origin
        begin = max(now, self.link_free)
        self.link_free = arrival(self.trace, begin, size)
        time.sleep(max(0.0, self.link_free - (time.perf_counter() - self.origin)))

    def get(self, key: str):
        data = self.source.get(key)
        if data is not None and not key.endswith("/meta"):
            self.transfer(len(data))
        return data


def eight_bit(x: torch.Tensor):
    """[L, H, T, D] -> (int8 values, fp32 scale per (layer, token)) as a cache would ship them."""
    scale = x.abs().amax(dim=(1, 3), keepdim=True).clamp_min(1e-12)
    return torch.round(x / scale * 127).to(torch.int8), scale.float()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--chunk-tokens", type=int, default=256)
    parser.add_argument("--mean-mbps", type=float, default=8.0, help="steady rate, megabits/s")
    parser.add_argument("--time-scale", type=float, default=10.0, help="trace events (drop, bursts) × this")
    parser.add_argument("--deadline-s", type=float, default=0.9)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(1)
    compiled = kvcompile.compile(kvcompile.load_model("reference")).to(args.device)
    from kvcompile.reference import corpus

    text = corpus.text_bytes("heldout", max_bytes=200_000)[50_000:50_000 + args.context + 16]
    ids, query = torch.tensor(list(text[:args.context])), torch.tensor(list(text[args.context:]))
    kv = prompt_kv(compiled, ids)
    store: dict = {}
    streaming.publish(store.__setitem__, "ctx", (kv.keys, kv.values), ids, kv.fingerprint, args.chunk_tokens,
                      levels=(1, 2, 3))
    quantised = {name: eight_bit(x) for name, x in (("k", kv.keys), ("v", kv.values))}
    eight_bit_bytes = sum(q.numel() + s.numel() * 4 for q, s in quantised.values())
    costs = streaming.Costs.calibrate(compiled, tokens=64)
    results = {}
    for name, trace in traces(args.mean_mbps / 1e3, 60.0, 0, args.time_scale).items():
        source = TraceSource(store, trace)
        rows = {}
        source.start()  # text: token ids over the link, then one prefill of context + query
        source.transfer(4 * args.context)
        compiled.prefill(torch.cat([ids, query])[None].to(args.device))
        rows["text"] = {"ttft_s": time.perf_counter() - source.origin, "bytes": 4 * args.context}
        source.start()  # 8-bit KV over the link, dequantised into the cache, then the query
        source.transfer(eight_bit_bytes)
        cache = compiled.new_cache(1, args.context + query.shape[0])
        k, v = ((q.to(args.device).float() / 127 * s.to(args.device)).to(compiled.dtype) for q, s in quantised.values())
        append_context(cache, k, v)
        compiled.prefill(query[None].to(args.device), cache=cache)
        rows["8-bit"] = {"ttft_s": time.perf_counter() - source.origin, "bytes": eight_bit_bytes}
        for label, levels, deadline in (("level 1", (1,), 1e9), ("level 2", (2,), 1e9), ("level 3", (3,), 1e9),
                                        ("adaptive", (1, 2, 3), args.deadline_s)):
            loader = streaming.StreamingLoader(compiled, source, "ctx", deadline, costs, levels=levels,
                                               initial_throughput_bps=float(trace[0]))
            source.start()
            _, report, _ = loader.load(query)
            rows[label] = {"ttft_s": report.ttft_s, "bytes": sum(c.bytes for c in report.chunks),
                           "choices": [str(c.choice) for c in report.chunks]}
        for row in rows.values():
            row["ttft_s"] = round(row["ttft_s"], 3)
        results[name] = {"mean_mbps": round(float(trace[: int(3 / BIN_S)].mean()) * 8 / 1e6, 2), "rows": rows}
        print(name, {label: row["ttft_s"] for label, row in rows.items()}, rows["adaptive"]["choices"])
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU, 1 thread"
    result = {"date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "device": device,
              "model": "reference", "context_tokens": args.context, "query_tokens": 16,
              "chunk_tokens": args.chunk_tokens, "deadline_s": args.deadline_s, "time_scale": args.time_scale,
              "traces": results}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "codec_streaming_measured.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out / "codec_streaming_measured.png")
    return 0


def plot(result: dict, path: Path) -> None:
    plot_ttft_bars(
        path,
        {name: (f"{name} (mean {trace['mean_mbps']} Mbit/s over 3 s)",
                {label: row["ttft_s"] * 1e3 for label, row in trace["rows"].items()})
         for name, trace in result["traces"].items()},
        deadline_ms=result["deadline_s"] * 1e3,
        ylabel="time to first token, ms (measured)",
        title=f"The streaming loader measured: reference model, {result['context_tokens']}-token context, "
              f"{result['device']}, emulated links")


if __name__ == "__main__":
    sys.exit(main())
