"""Trace-driven simulation of streaming a compressed context: TTFT per bandwidth trace and strategy.

The same planner as the real loader (kvcompile/codec/streaming.py, CacheGen's rule) chooses each
chunk's level from the throughput measured on the previous chunk and the deadline left, or sends
the chunk as text and recomputes it. The network carries one chunk after another; the GPU decodes
(or recomputes) one chunk after another as they arrive, so a fetch overlaps the previous decode.
TTFT = every chunk in the cache + the query's prefill. Strategies compared on each trace:
  text      the context's token ids (4 bytes each), one prefill of context + query
  8-bit     every chunk as int8 + an fp32 scale per (layer, token), dequantised at HBM speed
  level N   every chunk at codec level N
  adaptive  the planner, levels 1-3 or text, against --deadline-ms

Inputs and where they come from (each lands in the JSON):
  bits/value per level  measured here, on the CPU: the codec on the bundled reference model's KV
                        of held-out text (--bits to give them instead); applied to an 8B-shaped
                        KV (32 layers, 8 KV heads, head_dim 128: 64 Ki values per token)
  prefill time          a + b·tokens fitted to the H200 measurements of HF full prefill of an
                        8B-shaped Llama (bf16): 94.7 ms for 3136 tokens, 25.9 ms for 534
                        (docs/ARCHITECTURE.md "Floors", 2026-11-29); a chunk recomputed from text
                        costs one such forward of its tokens
  decode rate           --decode-gbps, GB/s of fp16 KV produced; default 59, LMCache's CacheGen
                        GPU coder on the H200 (the issue's table); kvcompile's GPU decoder rate
                        replaces it once measured (docs/CODEC.md)
  8-bit dequantise      3 bytes moved per value at the H200's measured HBM copy rate, 4157 GB/s

    python bench/sim_codec_streaming.py --out docs/     # codec_streaming.json + codec_streaming.png
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvcompile.codec.streaming import TEXT, Costs, Planner  # noqa: E402

VALUES_PER_TOKEN = 2 * 32 * 8 * 128  # K and V, 32 layers, 8 KV heads, head_dim 128
PREFILL_MS = {3136: 94.7, 534: 25.9}  # H200, HF full prefill, 8B-shaped Llama, bf16
HBM_GBPS = 4157.0
BIN_S = 0.001  # trace resolution


def prefill_s(tokens: int) -> float:
    (n1, t1), (n2, t2) = sorted(PREFILL_MS.items())
    slope = (t2 - t1) / (n2 - n1)
    return (t1 + slope * (tokens - n1)) / 1e3


def traces(mean_gbps: float, seconds: float, seed: int = 0, time_scale: float = 1.0) -> dict:
    """Bandwidth (bytes/s) per BIN_S bin: steady, dropping (to a quarter at 40 ms), bursty
    (seeded on/off periods of 10-40 ms at 2× and 0.2× the mean); times × time_scale."""
    bins = int(seconds / BIN_S)
    rate = mean_gbps * 1e9 / 8
    steady = np.full(bins, rate)
    dropping = np.where(np.arange(bins) * BIN_S < 0.04 * time_scale, rate, rate / 4)
    rng = np.random.default_rng(seed)
    bursty, t, high = np.empty(bins), 0, True
    while t < bins:
        length = int(rng.integers(10, 41) * time_scale)
        bursty[t:t + length] = rate * (2.0 if high else 0.2)
        t, high = t + length, not high
    return {"steady": steady, "dropping": dropping, "bursty": bursty}


def arrival(trace: np.ndarray, start_s: float, size: float) -> float:
    """When `size` bytes sent from `start_s` have arrived over `trace`."""
    cumulative = np.concatenate([[0.0], np.cumsum(trace) * BIN_S])
    first = cumulative[int(start_s / BIN_S)] + (start_s % BIN_S) * trace[min(int(start_s / BIN_S), len(trace) - 1)]
    end = np.searchsorted(cumulative, first + size)
    if end >= len(cumulative):
        raise ValueError("the trace is too short for this transfer: raise --trace-s")
    before = cumulative[end - 1]
    return (end - 1) * BIN_S + (first + size - before) / trace[end - 1]


def simulate(trace, chunk_sizes: dict, chunk_tokens: list, costs: Costs, choose, query_tokens: int) -> dict:
    """Network then GPU, chunk after chunk, as the loader runs them: consecutive text chunks wait
    and are recomputed in one prefill when their run ends. `choose(index, now_s, throughput,
    gpu_backlog_s, text_run_tokens)` picks each chunk's choice."""
    net_free = gpu_free = 0.0
    throughput, choices, run, run_start = None, [], 0, 0

    def flush(gpu_free):  # the pending text run's one prefill
        return max(gpu_free, net_free) + costs.recompute_s(run, run_start) if run else gpu_free
    for index, tokens in enumerate(chunk_tokens):
        choice = choose(index, net_free, throughput, max(0.0, gpu_free - net_free), run)
        size = chunk_sizes[choice][index]
        arrived = arrival(trace, net_free, size)
        throughput = size / max(arrived - net_free, 1e-9)
        if choice == TEXT:
            run, run_start = run + tokens, run_start if run else sum(chunk_tokens[:index])
        else:
            gpu_free, run = flush(gpu_free), 0
            gpu_free = max(gpu_free, arrived) + costs.decode_s(choice, tokens)
        net_free = arrived
        choices.append(choice)
    gpu_free = flush(gpu_free)
    ttft = gpu_free + prefill_s(query_tokens)
    return {"ttft_ms": round(float(ttft) * 1e3, 2), "context_ready_ms": round(float(gpu_free) * 1e3, 2),
            "bytes": int(sum(chunk_sizes[c][i] for i, c in enumerate(choices))), "choices": [str(c) for c in choices]}


def measured_bits(tokens: int = 1024) -> dict:
    """Bits per value of each codec level on the reference model's KV of held-out text (CPU)."""
    import torch

    import kvcompile
    import kvcompile.codec as codec
    from kvcompile.codec.saved_kv import prompt_kv
    from kvcompile.reference import corpus

    torch.set_num_threads(1)
    compiled = kvcompile.compile(kvcompile.load_model("reference"))
    ids = torch.tensor(list(corpus.text_bytes("heldout", max_bytes=200_000)[50_000:50_000 + tokens]))
    kv = prompt_kv(compiled, ids)
    values = 2 * kv.keys.numel()
    return {level: round(8 * len(codec.encode((kv.keys, kv.values), level=level)) / values, 3) for level in (1, 2, 3)}


def run(args) -> dict:
    bits = ({int(k): float(v) for k, v in (item.split(":") for item in args.bits.split(","))} if args.bits
            else measured_bits())
    chunk_tokens = [min(args.chunk_tokens, args.context - s) for s in range(0, args.context, args.chunk_tokens)]
    sizes = {level: [t * VALUES_PER_TOKEN * b / 8 for t in chunk_tokens] for level, b in bits.items()}
    sizes["8bit"] = [t * (VALUES_PER_TOKEN + 2 * 32 * 4) for t in chunk_tokens]
    sizes[TEXT] = [4 * t for t in chunk_tokens]
    fp16_per_token = 2 * VALUES_PER_TOKEN
    decode = {**{level: args.decode_gbps for level in bits}, "8bit": HBM_GBPS / 1.5}  # fp16 GB/s produced
    costs = Costs(lambda level, tokens: tokens * fp16_per_token / (decode[level] * 1e9),
                  lambda tokens, cached: prefill_s(tokens))
    # the planner's deadline is for the context: the query's prefill comes after it
    planner = Planner({level: sizes[level] for level in bits}, sizes[TEXT], chunk_tokens, costs,
                      args.deadline_ms / 1e3 - prefill_s(args.query_tokens))
    results = {}
    for name, trace in traces(args.mean_gbps, args.trace_s, args.seed).items():
        initial = trace[0]
        rows = {"text": {"ttft_ms": round(float(prefill_s(args.context + args.query_tokens)
                                                 + arrival(trace, 0.0, sum(sizes[TEXT]))) * 1e3, 2),
                         "bytes": int(sum(sizes[TEXT])), "choices": ["text (one prefill)"]}}
        for fixed in ["8bit", *sorted(bits)]:
            rows[f"level {fixed}" if fixed != "8bit" else "8-bit"] = simulate(
                trace, sizes, chunk_tokens, costs, lambda i, now, tp, backlog, run, fixed=fixed: fixed,
                args.query_tokens)
        rows["adaptive"] = simulate(trace, sizes, chunk_tokens, costs,
                                    lambda i, now, tp, backlog, run: planner.choose(i, now, tp if tp else initial,
                                                                                    backlog, run),
                                    args.query_tokens)
        results[name] = {"mean_gbps": round(float(trace[: int(0.3 / BIN_S)].mean()) * 8 / 1e9, 2), "rows": rows}
    return {"date": datetime.date.today().isoformat(), "device": "simulation (CPU); inputs below",
            "context_tokens": args.context, "chunk_tokens": args.chunk_tokens, "query_tokens": args.query_tokens,
            "deadline_ms": args.deadline_ms, "link_mean_gbps": args.mean_gbps,
            "inputs": {"bits_per_value": bits, "bits_source": "given (--bits)" if args.bits else
                       "measured: reference model KV, 1024 held-out tokens, CPU",
                       "decode_gbps_fp16_out": args.decode_gbps, "prefill_ms_fit_points": PREFILL_MS,
                       "hbm_gbps": HBM_GBPS, "values_per_token": VALUES_PER_TOKEN},
            "traces": results}


def plot(result: dict, path: Path) -> None:
    plot_ttft_bars(
        path,
        {name: (f"{name} (mean {trace['mean_gbps']} Gbps over 0.3 s)",
                {label: row["ttft_ms"] for label, row in trace["rows"].items()})
         for name, trace in result["traces"].items()},
        deadline_ms=result["deadline_ms"],
        ylabel="time to first token, ms",
        title=f"Streaming an 8B-shaped context of {result['context_tokens']} tokens "
              f"(simulated; decode {result['inputs']['decode_gbps_fp16_out']} GB/s, H200 prefill fit)")


def plot_ttft_bars(path: Path, panels: dict[str, tuple[str, dict[str, float]]], *, deadline_ms: float,
                   ylabel: str, title: str) -> None:
    """One bar panel per trace (panels: name -> (panel title, {row label: TTFT in ms})) against
    the deadline; the simulated and the measured streaming results are drawn alike."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.2), sharey=True)
    for ax, (panel_title, ttft_ms) in zip(axes, panels.values()):
        labels = list(ttft_ms)
        values = [ttft_ms[label] for label in labels]
        colours = ["#999999", "#d62728", "#9ecae1", "#6baed6", "#3182bd", "#31a354"][: len(labels)]
        ax.bar(range(len(labels)), values, color=colours)
        ax.axhline(deadline_ms, color="black", linestyle="--", linewidth=1, label="deadline")
        ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right")
        ax.set_title(panel_title)
        for x, value in enumerate(values):
            ax.text(x, value, f"{value:.0f}", ha="center", va="bottom", fontsize=8)
    axes[0].set_ylabel(ylabel)
    axes[0].legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--context", type=int, default=4096, help="context tokens")
    parser.add_argument("--chunk-tokens", type=int, default=256)
    parser.add_argument("--query-tokens", type=int, default=32)
    parser.add_argument("--deadline-ms", type=float, default=120.0)
    parser.add_argument("--mean-gbps", type=float, default=10.0, help="the steady trace's rate")
    parser.add_argument("--decode-gbps", type=float, default=59.0, help="GPU decode, GB/s of fp16 KV produced")
    parser.add_argument("--bits", help="bits/value per level, e.g. 1:3.42,2:2.36,3:1.96 (default: measure)")
    parser.add_argument("--trace-s", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    result = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "codec_streaming.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out / "codec_streaming.png")
    for name, trace in result["traces"].items():
        print(name, {label: row["ttft_ms"] for label, row in trace["rows"].items()},
              "adaptive:", " ".join(trace["rows"]["adaptive"]["choices"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
