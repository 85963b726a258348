"""python -m kvcompile.eval [MODEL_DIR] [--count N] [--ppl-windows W] [--dtype float32] [--json OUT]

Scores a transformers model folder (default: the bundled reference weights) on the quality
tasks with HFRunner and prints format_report; --json also writes the raw dict.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch


def main(argv=None) -> int:
    from transformers import AutoModelForCausalLM

    from kvcompile.eval import TASKS, HFRunner, evaluate, format_report
    from kvcompile.reference import WEIGHTS_DIR

    p = argparse.ArgumentParser(description="kvcompile quality tasks")
    p.add_argument("model", nargs="?", default=WEIGHTS_DIR)
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--count", type=int, default=20)
    p.add_argument("--ppl-windows", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", help="compute dtype (weights ship in bf16)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    model = AutoModelForCausalLM.from_pretrained(args.model, attn_implementation="sdpa",
                                                 dtype=getattr(torch, args.dtype))
    runner = HFRunner(model.to(args.device))
    report = evaluate(runner, tuple(args.tasks.split(",")), count=args.count, seed=args.seed,
                      ppl_windows=args.ppl_windows)
    report.update(model=args.model, device=args.device, dtype=args.dtype)
    print(format_report(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
