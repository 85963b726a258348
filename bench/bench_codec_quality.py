"""Quality of each codec level on the reference model: prefill a context, round-trip its KV cache
through kvcompile.codec (encode -> bytes -> decode), continue from the decoded cache.

    python bench/bench_codec_quality.py --out docs/codec_quality.json      # ~10 min on 2 CPU cores

Per level: held-out bits per byte of the continuation (the first `--context` bytes of each
2048-byte window are the compressed context, the rest is scored), retrieval accuracy (the whole
prompt but its last token is the compressed context) and cross-chunk accuracy (full prefill,
compressed the same way); plus the cache's size against fp16 and against 8-bit per-(layer, token)
quantisation of the same KV ("none" is the uncompressed baseline).

`--model reference-long --lengths 4096 8192 --window 8192 --context 4096` runs the long-context
model; add `--chunks 6 --chunk-tokens 512` for its cross-chunk layout (6 chunks of up to 512 tokens,
the one its chain was trained and measured in, docs/REFERENCE_MODEL.md; the default is the first
reference model's 4 chunks x 16 lines). The first job's long weights did not learn the chain
(`--no-cross-chunk` then); the shipped second job's did.

Settings not (yet) a level: `--try 'k=5,5,11,15/v=2,2,7,3'` scores K / V with those halves (levels
each side of zero) per equal group of layers; `--seed` picks other prompts of the same tasks (tune
on one seed, confirm on another); `--nll` scores the answers' likelihood instead of generating them
(answer_nll: continuous, for finding which layers matter).
"""
from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F
from transformers import DynamicCache

import kvcompile.codec as codec
from kvcompile.codec import quantise as codec_quantise
from kvcompile.eval import HFRunner
from kvcompile.eval.cross_chunk import score_cross_chunk
from kvcompile.eval.perplexity import heldout_windows
from kvcompile.eval.retrieval import score_retrieval


def eight_bit_bytes(layers: int, heads: int, tokens: int, dim: int) -> int:
    """int8 per element + an fp32 scale per (layer, token), for K and for V."""
    return 2 * layers * tokens * (heads * dim + 4)


class CodecRunner(HFRunner):
    """HFRunner whose prompts' KV caches pass through the codec at `level` (None: untouched)
    before decoding continues; records the sizes it saw."""

    def __init__(self, model, level):
        super().__init__(model)
        self.level = level
        self.sizes = {"codec": 0, "fp16": 0, "8bit": 0}

    def round_trip(self, cache: DynamicCache, batch: int) -> DynamicCache:
        keys = torch.stack([layer.keys for layer in cache.layers], dim=1)  # [B, L, Hkv, T, D]
        values = torch.stack([layer.values for layer in cache.layers], dim=1)
        if self.level is not None:
            decoded = []
            for row in range(batch):
                blob = codec.encode((keys[row], values[row]), level=self.level)
                self.sizes["codec"] += len(blob)
                decoded.append(codec.decode(blob))
            keys = torch.stack([k for k, _ in decoded]).to(keys.dtype)
            values = torch.stack([v for _, v in decoded]).to(values.dtype)
        _, layers, heads, tokens, dim = keys.shape
        self.sizes["fp16"] += batch * 2 * keys[0].numel() * 2
        self.sizes["8bit"] += batch * eight_bit_bytes(layers, heads, tokens, dim)
        out = DynamicCache()
        for layer in range(layers):
            out.update(keys[:, layer].contiguous(), values[:, layer].contiguous(), layer)
        return out

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> DynamicCache:
        cache = DynamicCache()
        positions = torch.arange(ids.shape[1])
        self.model(input_ids=ids, position_ids=positions[None].expand(ids.shape[0], -1),
                   cache_position=positions, past_key_values=cache, use_cache=True)
        return self.round_trip(cache, ids.shape[0])

    @torch.no_grad()
    def greedy(self, prompts, max_new_tokens: int) -> list[list[int]]:
        results = []
        for prompt in prompts:  # one at a time: the codec takes one sequence's cache
            ids = self._ids([list(prompt)])
            cache = self.prefill(ids[:, :-1])
            results.append(self._decode(ids[:, -1:], cache, start=ids.shape[1] - 1,
                                        max_new_tokens=max_new_tokens)[0])
        return results

    @torch.no_grad()
    def continuation_bits(self, window: list[int], context: int) -> tuple[float, int]:
        ids = self._ids([window])
        cache = self.prefill(ids[:, :context])
        positions = torch.arange(context, ids.shape[1])
        logits = self.model(input_ids=ids[:, context:], position_ids=positions[None],
                            cache_position=positions, past_key_values=cache, use_cache=True).logits
        # logits at the context's last position are not computed: score bytes context+1..
        nats = F.cross_entropy(logits[0, :-1].float(), ids[0, context + 1:], reduction="sum")
        return float(nats) / math.log(2), ids.shape[1] - context - 1


SHIPPED = frozenset(codec_quantise.LEVELS)
TRIAL_LEVEL = 200  # --try settings are registered from here up, for this process only


def trial_level(spec: str):
    """'k=7,11/v=3,2' -> a Level with those halves (levels each side of zero) per layer group
    (quantise.Steps: n entries split the layers into n equal groups); 'clip=0.9' optional."""
    fields = dict(part.split("=", 1) for part in spec.split("/"))
    halves = {w: codec_quantise.Steps(tuple(int(h) for h in fields[w].split(","))) for w in ("k", "v")}
    return codec_quantise.Level(halves["k"], halves["v"], spec)


def evaluate_level(model, level, args) -> dict:
    runner = CodecRunner(model, level)
    began = time.perf_counter()
    bits = count = 0
    for window in heldout_windows(args.window, args.windows):
        b, n = runner.continuation_bits(window, args.context)
        bits, count = bits + b, count + n
    retrieval = score_retrieval(runner, tuple(args.lengths), args.count, args.seed, batch_size=args.count)
    row = {"level": level if level is None or level in SHIPPED else codec_quantise.LEVELS[level].note,
           "bpb": bits / count, "retrieval": {k: v for k, v in retrieval.items() if k.isdigit()}}
    if args.cross_chunk:
        cross = score_cross_chunk(runner, args.count, args.seed, modes=("full_prefill",),
                                  n_chunks=args.chunks, chunk_tokens=args.chunk_tokens)
        row["cross_chunk"] = {kind: cross[kind]["full_prefill"] for kind in ("chain", "direct")}
        row["cross_chunk_layout"] = {key: cross[key] for key in ("n_chunks", "lines_per_chunk", "chunk_tokens",
                                                                 "prompt_tokens") if key in cross}
    sizes = runner.sizes
    row.update(bytes=sizes, seconds=round(time.perf_counter() - began, 1))
    if level is not None:
        row["vs_fp16"] = sizes["fp16"] / sizes["codec"]
        row["vs_8bit"] = sizes["8bit"] / sizes["codec"]
    return row


@torch.no_grad()
def answer_nll(model, level, args) -> dict:
    """The tasks' answers scored instead of generated: for each retrieval prompt (the longest of
    --lengths) and chain prompt, the answer's negative log-likelihood in nats, teacher-forced after
    the prompt's KV went through the codec. Continuous, so a setting's effect shows on a few dozen
    prompts where exact-match accuracy moves one prompt at a time (used to find which K/V layers
    matter; the levels are judged on accuracy)."""
    from kvcompile.eval.cross_chunk import cross_chunk_example
    from kvcompile.eval.retrieval import _TOKENIZER, retrieval_examples

    prompts = [("retrieval", e["prompt"], e["answer"])
               for e in retrieval_examples(max(args.lengths), args.count, args.seed)]
    for i in range(args.count):
        example = cross_chunk_example(i, args.seed, "chain", args.chunks, chunk_tokens=args.chunk_tokens)
        prompts.append(("chain", [t for c in example["chunks"] for t in c] + list(example["question"]),
                        example["answer"]))
    runner = CodecRunner(model, level)
    nll: dict = {"retrieval": [], "chain": []}
    for task, prompt, answer in prompts:
        ids = torch.tensor([list(prompt) + _TOKENIZER.encode(answer)])
        start = len(prompt) - 1
        cache = runner.prefill(ids[:, :start])
        positions = torch.arange(start, ids.shape[1] - 1)
        logits = model(input_ids=ids[:, start:-1], position_ids=positions[None], cache_position=positions,
                       past_key_values=cache, use_cache=True).logits[0].float()
        nll[task].append(float(F.cross_entropy(logits, ids[0, start + 1:], reduction="sum")))
    row = {"level": level if level is None or level in SHIPPED else codec_quantise.LEVELS[level].note,
           "answer_nll": nll}
    if level is not None:
        row["vs_8bit"] = runner.sizes["8bit"] / runner.sizes["codec"]
    return row


def with_nll_increase(row: dict, baseline: dict) -> dict:
    """Mean answer NLL over the uncompressed cache's, per task (nats)."""
    row["nll_increase"] = {task: sum(a - b for a, b in zip(row["answer_nll"][task], baseline[task]))
                           / max(1, len(baseline[task])) for task in baseline}
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", default="none,0,1,2,3")
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument("--out", default="")
    parser.add_argument("--model", default="reference", help="bundled name or checkpoint folder")
    parser.add_argument("--lengths", type=int, nargs="*", default=[512, 1024], help="retrieval context lengths")
    parser.add_argument("--window", type=int, default=2048, help="held-out window bytes (the first --context compressed)")
    parser.add_argument("--seed", type=int, default=0,
                        help="prompt seed of the retrieval and cross-chunk tasks (0: the documented tables)")
    parser.add_argument("--try", dest="trials", nargs="*", default=[],
                        help="extra settings scored after --levels, e.g. 'k=7,7,11,11/v=3,2' (trial_level)")
    parser.add_argument("--nll", action="store_true", help="score the answers' likelihood (answer_nll) "
                        "instead of generating; an uncompressed baseline is always scored first")
    parser.add_argument("--no-cross-chunk", dest="cross_chunk", action="store_false")
    parser.add_argument("--chunks", type=int, default=4, help="cross-chunk task: chunks per prompt")
    parser.add_argument("--chunk-tokens", type=int, default=None,
                        help="cross-chunk task: tokens per chunk (reference-long: 512); default 16 lines a chunk")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    from kvcompile.frontend.loading import resolve_model_dir
    model = AutoModelForCausalLM.from_pretrained(resolve_model_dir(args.model), dtype=torch.float32).eval()
    rows = []
    levels = [None if name == "none" else int(name) for name in args.levels.split(",") if name]
    for offset, spec in enumerate(args.trials):
        codec_quantise.LEVELS[TRIAL_LEVEL + offset] = trial_level(spec)
        levels.append(TRIAL_LEVEL + offset)
    baseline = answer_nll(model, None, args)["answer_nll"] if args.nll else None
    for level in levels:
        row = with_nll_increase(answer_nll(model, level, args), baseline) if args.nll else evaluate_level(model, level, args)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            import sys

            json.dump({"command": "python bench/bench_codec_quality.py " + " ".join(sys.argv[1:] if argv is None else argv),
                       "model": f"{args.model} (float32 on CPU)", "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
