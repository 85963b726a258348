"""Compare what the C++ plugin harness computed on the GPU with the torch ops' definitions.

    kvcompile_plugin_harness DUMP_DIR && python plugins/tensorrt/harness/check_against_torch.py DUMP_DIR [--json OUT]

Each DUMP_DIR/<case>.json names the plugin, its fields and the raw input/output files the
harness wrote; the reference is the op's plain-torch definition (kcache_attention_reference,
rerotate_reference) on the same inputs, on the CPU. Exit status 1 when any case differs.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int64": torch.int64}
# bf16 / fp16 outputs are rounded once to their type: a few units in the last place of values ~1
TOLERANCE = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def load_tensor(folder: Path, spec: dict) -> torch.Tensor:
    data = bytearray((folder / spec["file"]).read_bytes())
    return torch.frombuffer(data, dtype=DTYPES[spec["dtype"]]).reshape(spec["shape"]).clone()


def field(fields: dict, name: str):
    values = [float("-inf") if v == "-inf" else v for v in fields[name]]
    return values[0] if len(values) == 1 else values


def reference(case: dict, inputs: dict) -> torch.Tensor:
    import kvcompile.ops  # noqa: F401  (registers the ops)
    from kvcompile.core.modes import SelectMode

    fields = case["fields"]
    if case["plugin"] == "kcache_attention":
        from kvcompile.ops.kcache_attention.definition import kcache_attention_reference

        context = inputs["key_cache"].shape[2] + 1
        numerator, denominator = field(fields, "topn_numerator"), field(fields, "topn_denominator")
        topn = max(1, (context * numerator + denominator // 2) // denominator) if denominator > 0 else field(fields, "topn")
        sinks = fields["sinks"]
        sinks = None if sinks == ["-inf"] else [float(s) for s in sinks]
        select = [m for m in SelectMode if m.code == field(fields, "select_layer")][0].value
        return kcache_attention_reference(inputs["query"], inputs["key"], inputs["value"], inputs["key_cache"],
                                          inputs["value_host"], inputs["attn_bias"], field(fields, "scale"), int(topn),
                                          select, bool(field(fields, "renormalize")), field(fields, "softcap"), sinks)
    if case["plugin"] == "rerotate_keys":
        from kvcompile.ops.rerotate_keys.definition import rerotate_reference

        return rerotate_reference(inputs["keys"], inputs["delta"], inputs["inv_freq"], bool(field(fields, "interleaved")))
    raise ValueError(f"no reference for plugin {case['plugin']!r}")


def check(folder: Path) -> list:
    results = []
    for path in sorted(folder.glob("*.json")):
        case = json.loads(path.read_text())
        inputs = {spec["name"]: load_tensor(folder, spec) for spec in case["inputs"]}
        got = load_tensor(folder, case["output"])
        want = reference(case, inputs)
        difference = (got.float() - want.float()).abs().max().item()
        tolerance = TOLERANCE[got.dtype]
        results.append({"case": case["case"], "plugin": case["plugin"], "dtype": case["output"]["dtype"],
                        "max_abs_diff": difference, "tolerance": tolerance,
                        "equal": bool(math.isfinite(difference) and difference <= tolerance)})
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    results = check(args.folder)
    for r in results:
        print(f"{'EQUAL' if r['equal'] else 'DIFFERS'} {r['case']}: max |plugin - torch| = {r['max_abs_diff']:.3g} "
              f"(tolerance {r['tolerance']:g}, {r['dtype']})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if not results:
        print(f"no harness dumps under {args.folder}")
        return 1
    return 0 if all(r["equal"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
