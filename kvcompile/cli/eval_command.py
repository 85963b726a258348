"""`kvcompile eval`: the reference model's quality tasks, through kvcompile or plain transformers.

--runner compiled (default) scores the model compiled for the given cache; --runner hf scores
transformers itself (DynamicCache), the reference every lossy setting is compared with.
"""
from __future__ import annotations

import json
from pathlib import Path


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
    with stage(f"compiling ({args.runner} runner)"):
        runner = make_runner(args, model, config)
    with stage(f"scoring {', '.join(tasks)} ({args.samples} samples each)"):
        report = evaluate(runner, tasks=tasks, count=args.samples, seed=args.seed, ppl_windows=args.ppl_windows)
    report.update(model=args.model, runner=args.runner,
                  cache_config=config.to_dict() if args.runner == "compiled" else None)
    console.print(format_report(report), markup=False, highlight=False)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0
