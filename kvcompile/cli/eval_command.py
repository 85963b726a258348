"""`kvcompile eval`: the reference models' quality tasks, through kvcompile or plain transformers.

--runner compiled (default) scores the model compiled for the given cache; --runner hf scores
transformers itself (DynamicCache), the reference every lossy setting is compared with.
Task lengths follow the model's context (kvcompile.eval.suite_for_context: 512/1K/2K and
4 chunks x 16 lines for `reference`; 2K/4K/8K and 6 chunks x 512 tokens for `reference-long`);
--lengths, --chunks, --chunk-tokens and --ppl-window override them.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path


def parse_lengths(text: str) -> tuple:
    try:
        lengths = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        lengths = ()
    if not lengths or min(lengths) < 64:
        raise argparse.ArgumentTypeError(f"--lengths takes comma-separated token counts >= 64, got {text!r}")
    return lengths


def add_length_options(parser) -> None:
    from kvcompile.cli.options import positive_int

    group = parser.add_argument_group("task lengths (default: from the model's context; reference-long: "
                                      "2048,4096,8192 and 6 chunks of 512 tokens)")
    unset = argparse.SUPPRESS  # absent unless given: the model's suite decides
    group.add_argument("--lengths", type=parse_lengths, default=unset,
                       help="retrieval prompt lengths in tokens, e.g. 2048,4096,8192,16384")
    group.add_argument("--chunks", type=positive_int, default=unset, help="cross-chunk: number of chunks (at least 2)")
    group.add_argument("--chunk-tokens", type=positive_int, default=unset,
                       help="cross-chunk: fill each chunk to this many tokens")
    group.add_argument("--ppl-window", type=positive_int, default=unset, help="perplexity: window in bytes; 2048 unless given")


def suite_from(args, model):
    """The model's default task lengths with the command line's overrides."""
    from kvcompile.errors import UsageError
    from kvcompile.eval import suite_for_context

    suite = suite_for_context(int(getattr(model.config, "max_position_embeddings", 2048) or 2048))
    if getattr(args, "lengths", None):
        suite = replace(suite, context_lengths=args.lengths)
    if getattr(args, "chunks", None):
        if args.chunks < 2:
            raise UsageError("--chunks must be at least 2 (the task needs a value to cross a chunk boundary)")
        suite = replace(suite, n_chunks=args.chunks)
    if getattr(args, "chunk_tokens", None):
        if args.chunk_tokens < 40:
            raise UsageError(f"--chunk-tokens {args.chunk_tokens} is too short; a chunk needs at least 40 tokens")
        suite = replace(suite, chunk_tokens=args.chunk_tokens)
    if getattr(args, "ppl_window", None):
        suite = replace(suite, ppl_window=args.ppl_window)
    return suite


def make_runner(args, model, config):
    import kvcompile
    from kvcompile.core.modes import CacheKind

    if args.runner == "hf":
        from kvcompile.eval import HFRunner

        return HFRunner(model)
    from kvcompile.runtime.eval_runner import CompiledRunner

    compiled = kvcompile.compile(model, config)
    # Under kcache, the question tokens go through decode steps so they read the compressed cache.
    tail = args.decode_tail if args.decode_tail is not None else (16 if config.kind is CacheKind.KCACHE else 0)
    return CompiledRunner(compiled, decode_tail=tail)


def run_eval_command(args, load_model, cache_config_from, console, stage) -> int:
    from kvcompile.eval import TASKS, evaluate, format_report

    config = cache_config_from(args)
    tasks = args.tasks  # parsed and checked against the known tasks by the CLI
    assert set(tasks) <= set(TASKS)
    with stage(f"loading {args.model}"):
        model = load_model(args.model, args.dtype)
        if args.device:
            model = model.to(args.device)
    suite = suite_from(args, model)
    with stage(f"compiling ({args.runner} runner)"):
        runner = make_runner(args, model, config)
    with stage(f"scoring {', '.join(tasks)} ({args.samples} samples each)"):
        report = evaluate(runner, tasks=tasks, count=args.samples, seed=args.seed, ppl_windows=args.ppl_windows,
                          **suite.as_kwargs())
    report.update(model=args.model, runner=args.runner,
                  cache_config=config.to_dict() if args.runner == "compiled" else None)
    console.print(format_report(report), markup=False, highlight=False)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0
