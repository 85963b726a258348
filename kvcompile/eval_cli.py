"""`kvcompile eval`: the reference model's quality tasks through the compiled runtime."""
from __future__ import annotations

import json
from pathlib import Path


def run_eval_command(args, load_model, cache_config_from, console) -> int:
    import kvcompile
    from kvcompile.eval import evaluate, format_report
    from kvcompile.runtime.eval_runner import CompiledRunner

    config = cache_config_from(args)
    model = load_model(args.model)
    compiled = kvcompile.compile(model, config)
    # Under kcache, the question tokens go through decode steps so they read the compressed cache.
    runner = CompiledRunner(compiled, decode_tail=args.decode_tail if args.decode_tail is not None
                            else (16 if config.kind == "kcache" else 0))
    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    report = evaluate(runner, tasks=tasks, count=args.samples)
    report["cache_config"] = config.to_dict()
    console.print(format_report(report), markup=False, highlight=False)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0
