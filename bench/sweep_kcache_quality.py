"""KCache quality sweep on the reference model: perplexity and retrieval vs top-N and selection.

For every (topn, select) the same prompts run through the compiled model:
- perplexity: held-out windows of `--window` bytes; all but the last `--ppl-tail` are prefilled,
  the tail is fed one token at a time as decode steps (so every scored token reads the top-N
  cache); bits per byte over the decoded tail, against the full cache on the same bytes;
- retrieval: key→value lookup at 512/1K/2K tokens; the context is prefilled and the question
  tokens are decoded (decode_tail=16), so the lookup itself goes through top-N retrieval.

    python bench/sweep_kcache_quality.py --out results/ [--device cuda] [--samples 20]
Writes kcache_quality.json and kcache_quality.png into --out.

Long context (`--model reference-long --lengths 2048 4096 8192`): retrieval only unless
`--bpb-window` is given, absolute and fractional (`--fractions`) top-N, the full cache as the
reference row. Every prompt is prefilled once (a prefill over an empty cache is exact under
every cache config) and that cache is copied into each config's layout before its decode
steps, so a sweep of C configs costs one prefill per prompt instead of C:

    python bench/sweep_kcache_quality.py --model reference-long --lengths 2048 4096 8192 \
        --topn 64 128 256 512 1024 8192 --fractions 0.0625 0.125 0.25 --name kcache_quality_long --out docs
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import kvcompile
from kvcompile.eval.perplexity import heldout_windows
from kvcompile.eval.retrieval import VALUE_DIGITS, answer_of, retrieval_examples, score_retrieval
from kvcompile.runtime import generate as gen
from kvcompile.runtime.eval_runner import CompiledRunner

TOPNS = (16, 32, 64, 128, 256, 512, 1024)
QUESTION_TAIL = 16


def tail_bits_per_byte(runner, windows, tail: int, batch: int) -> float:
    nats, count = 0.0, 0
    for start in range(0, len(windows), batch):
        ids = torch.tensor(windows[start:start + batch])
        logits = runner.logits(ids).float().cpu()  # [B, T, V]
        scored = slice(ids.shape[1] - tail - 1, ids.shape[1] - 1)
        nats += float(F.cross_entropy(logits[:, scored].reshape(-1, logits.shape[-1]),
                                      ids[:, scored.start + 1:].reshape(-1), reduction="sum"))
        count += ids[:, scored.start + 1:].numel()
    return nats / count / math.log(2)


def measure(model, config, windows, args) -> dict:
    compiled = kvcompile.compile(model, config)
    began = time.perf_counter()
    bpb = tail_bits_per_byte(CompiledRunner(compiled, decode_tail=args.ppl_tail), windows, args.ppl_tail, args.batch)
    retrieval = score_retrieval(CompiledRunner(compiled, decode_tail=QUESTION_TAIL), count=args.samples,
                                batch_size=args.samples)
    return {"bpb": bpb, "retrieval": {k: v for k, v in retrieval.items() if k.isdigit()},
            "seconds": round(time.perf_counter() - began, 1)}


def branch(cache, compiled):
    """A copy of a prefilled cache in `compiled`'s layout (host-resident V is token-major)."""
    copy = compiled.new_cache(cache.batch, cache.capacity)
    for layer in range(cache.spec.num_layers):
        key, value = cache.past(layer)
        if cache.is_host_layer(layer):
            value = value.permute(0, 2, 1, 3)  # [B, P, Hkv, D] -> [B, Hkv, P, D]
        copy.keys[layer][:, :, : cache.length].copy_(key)
        if copy.is_host_layer(layer):
            copy.values[layer][:, : cache.length].copy_(value.permute(0, 2, 1, 3))
        else:
            copy.values[layer][:, :, : cache.length].copy_(value)
    copy.valid, copy.positions, copy.length = cache.valid.clone(), cache.positions.clone(), cache.length
    return copy


@torch.no_grad()
def decode(compiled, cache, ids: torch.Tensor) -> torch.Tensor:
    """Feed `ids` [B, T] one token at a time; logits [B, T, V]."""
    return torch.cat([gen.decode_step(compiled, cache, ids[:, t]) for t in range(ids.shape[1])], dim=1)


def config_label(config) -> str:
    if config.kind.value == "full":
        return "full"
    options = config.kcache
    return f"{options.select.value} topn={options.topn}"


@torch.no_grad()
def prefill_in_chunks(prefill_model, cache, ids: torch.Tensor, chunk: int) -> torch.Tensor:
    """Prefill `ids` through a full-cache model in chunks (exact attention, about half the work of
    one square prefill at 8K); logits of the last chunk."""
    for start in range(0, ids.shape[1], chunk):
        logits = gen.prefill(prefill_model, cache, ids[:, start:start + chunk])
    return logits


@torch.no_grad()
def shared_prefill_retrieval(prefill_model, compiled: dict, lengths, samples: int, device, on_length,
                             chunk: int) -> dict:
    """{label: {length: accuracy}}: each prompt's head prefilled once, its question decoded per config."""
    accuracy = {label: {} for label in compiled}
    for length in lengths:
        examples = retrieval_examples(length, samples)
        batch = max(1, 4096 // length)  # the prefill chunks' masks stay small
        correct = dict.fromkeys(compiled, 0)
        for start in range(0, samples, batch):
            group = examples[start:start + batch]
            ids = torch.tensor([e["prompt"] for e in group], device=device)
            prefilled = prefill_model.new_cache(len(group), length + VALUE_DIGITS)
            prefill_in_chunks(prefill_model, prefilled, ids[:, :-QUESTION_TAIL], chunk)
            for label, model in compiled.items():
                cache = branch(prefilled, model)
                logits = decode(model, cache, ids[:, -QUESTION_TAIL:])
                tokens = []
                for step in range(VALUE_DIGITS):
                    tokens.append(logits[:, -1].argmax(dim=-1))
                    if step + 1 < VALUE_DIGITS:
                        logits = gen.decode_step(model, cache, tokens[-1])
                answers = torch.stack(tokens, dim=1).tolist()
                correct[label] += sum(answer_of(a) == e["answer"] for a, e in zip(answers, group))
        for label in compiled:
            accuracy[label][str(length)] = correct[label] / samples
        on_length(accuracy)
    return accuracy


@torch.no_grad()
def shared_prefill_bits_per_byte(prefill_model, compiled: dict, windows, tail: int, device, chunk: int) -> dict:
    """{label: bits per byte of each window's last `tail` bytes}, the window's head prefilled once.

    The same bytes as tail_bits_per_byte: the first scored byte is predicted by the prefill's
    last logits, the other tail - 1 by decode steps through the config's cache."""
    nats = dict.fromkeys(compiled, 0.0)
    count = 0
    for window in windows:
        ids = torch.tensor([window], device=device)
        head, scored = ids[:, : ids.shape[1] - tail], ids[:, ids.shape[1] - tail:]
        prefilled = prefill_model.new_cache(1, ids.shape[1])
        first = prefill_in_chunks(prefill_model, prefilled, head, chunk)[:, -1:].float()
        for label, model in compiled.items():
            logits = torch.cat([first, decode(model, branch(prefilled, model), scored[:, :-1]).float()], dim=1)
            nats[label] += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).cpu(),
                                                 scored.reshape(-1).cpu(), reduction="sum"))
        count += tail
    return {label: value / count / math.log(2) for label, value in nats.items()}


def long_configs(args) -> dict:
    configs = {"full": kvcompile.CacheConfig(kind="full")}
    for select in args.selects:
        for topn in [*args.topn, *args.fractions]:
            config = kvcompile.CacheConfig(kind="kcache", topn=topn, select=select, renormalize=False,
                                           full_layers=args.full_layers)
            configs[config_label(config)] = config
    return configs


def run_long(args, out: Path) -> None:
    from kvcompile.core.config import topn_for_context

    model = kvcompile.load_model(args.model, dtype=torch.float32, device=args.device)
    configs = long_configs(args)
    compiled = {label: kvcompile.compile(model, config) for label, config in configs.items()}
    # The shared prefill runs with the full cache (exact attention, as a single prefill is under
    # every config); branch() copies it into each config's layout.
    prefill_model = compiled["full"]
    results = {"model": args.model, "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
               "date": time.strftime("%Y-%m-%d"), "samples": args.samples, "lengths": args.lengths,
               "question_tail": QUESTION_TAIL, "prefill_chunk": args.prefill_chunk, "rows": []}
    path = out / f"{args.name}.json"

    def rows_from(accuracy: dict, bpb: dict) -> list:
        rows = []
        for label, config in configs.items():
            row = {"label": label, "kind": config.kind.value}
            if config.kind.value == "kcache":
                row.update(topn=config.kcache.topn, select=config.kcache.select.value,
                           kept={n: min(int(n), topn_for_context(config.kcache.topn, int(n)))
                                 for n in accuracy.get(label, {})})
            row["retrieval"] = accuracy.get(label, {})
            if label in bpb:
                row["bpb"] = bpb[label]
            rows.append(row)
        return rows

    began = time.perf_counter()
    accuracy, bpb = {}, {}
    if args.lengths:
        def on_length(partial):
            results["rows"] = rows_from(partial, bpb)
            results["seconds"] = round(time.perf_counter() - began, 1)
            path.write_text(json.dumps(results, indent=2) + "\n")
            print(time.strftime("%H:%M:%S"), {k: v for k, v in partial.items()}, flush=True)

        accuracy = shared_prefill_retrieval(prefill_model, compiled, args.lengths, args.samples, args.device,
                                            on_length, args.prefill_chunk)
    if args.bpb_window:
        windows = heldout_windows(args.bpb_window, args.windows)
        bpb = shared_prefill_bits_per_byte(prefill_model, compiled, windows, args.ppl_tail, args.device,
                                           args.prefill_chunk)
        results.update(bpb_window=args.bpb_window, bpb_windows=len(windows), ppl_tail=args.ppl_tail)
        print(bpb, flush=True)
    results["rows"] = rows_from(accuracy, bpb)
    results["seconds"] = round(time.perf_counter() - began, 1)
    path.write_text(json.dumps(results, indent=2) + "\n")
    (out / f"{args.name}.md").write_text(long_table(results))
    if args.lengths:
        plot_long(results, out / f"{args.name}.png")


def kept(row: dict, length: str) -> int:
    """Positions a row keeps at a context length (top-N never exceeds the context)."""
    return min(int(length), row["kept"][length])


def long_table(results: dict) -> str:
    """Retrieval per length (kept positions in brackets) and bits/byte vs the full cache."""
    lengths = [str(n) for n in results["lengths"]]
    full = next(r for r in results["rows"] if r["kind"] == "full")
    has_bpb = "bpb" in full
    columns = ["select", "top-N", *(f"retrieval {n}" for n in lengths), *(["bits/byte", "vs full"] if has_bpb else [])]
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for row in results["rows"]:
        cells = ["full cache", "-"] if row["kind"] == "full" else [row["select"], str(row["topn"])]
        for n in lengths:
            if n not in row["retrieval"]:
                cells.append("-")
            elif row["kind"] == "full":
                cells.append(f"{row['retrieval'][n]:.0%}")
            else:
                cells.append(f"{row['retrieval'][n]:.0%} ({kept(row, n)})")
        if has_bpb:
            cells += [f"{row['bpb']:.4f}", f"{row['bpb'] / full['bpb']:.3f}"] if "bpb" in row else ["-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_long(results: dict, path: Path) -> None:
    """Retrieval vs kept positions, one panel per context length; fractions as hollow markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = [str(n) for n in results["lengths"]]
    full = next(r for r in results["rows"] if r["kind"] == "full")
    fig, axes = plt.subplots(1, len(lengths), figsize=(4.5 * len(lengths), 4), squeeze=False)
    for axis, n in zip(axes[0], lengths):
        for select, color in (("head", "C0"), ("layer", "C1")):
            for fractional, fill in ((False, None), (True, "none")):
                rows = [r for r in results["rows"] if r["kind"] == "kcache" and r["select"] == select
                        and isinstance(r["topn"], float) == fractional and n in r["retrieval"]]
                rows.sort(key=lambda r: kept(r, n))
                if rows:
                    axis.plot([kept(r, n) for r in rows], [100 * r["retrieval"][n] for r in rows],
                              "--" if fractional else "-", color=color, marker="o", fillstyle=fill or "full",
                              label=f"{select}, {'fraction' if fractional else 'absolute'}")
        if n in full["retrieval"]:
            axis.axhline(100 * full["retrieval"][n], color="grey", ls=":", lw=1, label="full cache")
        axis.set_xscale("log", base=2)
        axis.set_xlabel("positions kept (top-N)")
        axis.set_ylabel("retrieval accuracy (%)")
        axis.set_ylim(-3, 103)
        axis.set_title(f"{results['model']}, context {n}")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    exact = results["full"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for select, marker in (("head", "o"), ("layer", "s")):
        for renormalize, style in ((False, "-"), (True, "--")):
            rows = [r for r in results["kcache"] if r["select"] == select and bool(r["renormalize"]) == renormalize]
            if not rows:
                continue
            ns = [r["topn"] for r in rows]
            label = f"{select}{', renorm' if renormalize else ''}"
            left.plot(ns, [100 * (r["bpb"] / exact["bpb"] - 1) for r in rows], style, marker=marker, label=label)
            right.plot(ns, [r["retrieval"]["2048"] * 100 for r in rows], style, marker=marker, label=label)
    left.axhline(1.0, color="grey", ls="--", lw=1, label="+1% target")
    right.axhline(99 * exact["retrieval"]["2048"], color="grey", ls="--", lw=1, label="99% of exact")
    for axis, title in ((left, "bits/byte increase vs full cache (%)"), (right, "retrieval accuracy at 2K (%)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("top-N")
        axis.set_title(title)
        axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def markdown_table(results: dict) -> str:
    """The sweep as a markdown table, with each row's ratio to the full cache."""
    exact = results["full"]
    lengths = sorted(exact["retrieval"], key=int)
    head = "| select | renormalize | full_layers | top-N | bits/byte | vs full | " + " | ".join(f"retrieval {n}" for n in lengths) + " |"
    lines = [head, "|" + " --- |" * (6 + len(lengths))]
    cells = " | ".join(f"{exact['retrieval'][n]:.0%}" for n in lengths)
    lines.append(f"| full cache | - | - | - | {exact['bpb']:.4f} | 1.000 | {cells} |")
    for row in results["kcache"]:
        cells = " | ".join(f"{row['retrieval'][n]:.0%}" for n in lengths)
        lines.append(f"| {row['select']} | {'yes' if row.get('renormalize') else 'no'} | {row.get('full_layers', 0)} | {row['topn']} | "
                     f"{row['bpb']:.4f} | {row['bpb'] / exact['bpb']:.3f} | {cells} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="results")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--window", type=int, default=2048)
    parser.add_argument("--ppl-tail", type=int, default=1024, help="tokens per window scored as decode steps")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--topn", type=int, nargs="*", default=list(TOPNS))
    parser.add_argument("--renormalize", type=int, nargs="*", default=[0, 1], choices=[0, 1],
                        help="sweep without (0) and/or with (1) renormalising over the kept positions")
    parser.add_argument("--full-layers", type=int, default=0, help="first layers keeping V on the device")
    parser.add_argument("--selects", nargs="*", default=["head", "layer"], choices=["head", "layer"])
    parser.add_argument("--from-json", help="only redraw the plot and table of an earlier run's JSON")
    parser.add_argument("--model", default="reference", help="bundled name or checkpoint folder")
    parser.add_argument("--lengths", type=int, nargs="*",
                        help="retrieval context lengths: runs the shared-prefill sweep (see the docstring)")
    parser.add_argument("--fractions", type=float, nargs="*", default=[], help="fractional top-N (shared-prefill sweep)")
    parser.add_argument("--bpb-window", type=int, default=0, help="shared-prefill sweep: also bits/byte on windows this long")
    parser.add_argument("--name", default="kcache_quality", help="output file stem")
    parser.add_argument("--prefill-chunk", type=int, default=1024, help="shared-prefill sweep: prefill chunk tokens")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.lengths is not None or args.bpb_window:
        args.lengths = args.lengths or []
        if args.from_json:
            results = json.loads(Path(args.from_json).read_text())
            (out / f"{args.name}.md").write_text(long_table(results))
            plot_long(results, out / f"{args.name}.png")
        else:
            run_long(args, out)
        return
    if args.from_json:
        results = json.loads(Path(args.from_json).read_text())
        plot(results, out / "kcache_quality.png")
        (out / "kcache_quality.md").write_text(markdown_table(results))
        return
    model = kvcompile.load_model(args.model, dtype=torch.float32, device=args.device)
    windows = heldout_windows(args.window, args.windows)
    results = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
               "window": args.window, "ppl_tail": args.ppl_tail, "windows": len(windows),
               "samples": args.samples, "kcache": []}
    results["full"] = measure(model, kvcompile.CacheConfig(kind="full"), windows, args)
    print("full", results["full"], flush=True)
    for renormalize in map(bool, args.renormalize):
        for select in args.selects:
            for topn in args.topn:
                config = kvcompile.CacheConfig(kind="kcache", topn=topn, select=select, renormalize=renormalize,
                                               full_layers=args.full_layers)
                row = {"topn": topn, "select": select, "renormalize": renormalize, "full_layers": args.full_layers,
                       **measure(model, config, windows, args)}
                results["kcache"].append(row)
                print(row, flush=True)
                # written as it goes, so a run cut short still leaves its rows
                (out / "kcache_quality.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, out / "kcache_quality.png")
    (out / "kcache_quality.md").write_text(markdown_table(results))


if __name__ == "__main__":
    main()
