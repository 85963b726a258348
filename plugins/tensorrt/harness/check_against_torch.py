"""Compare what the C++ plugin harness computed on the GPU with the torch ops' definitions.

    python plugins/tensorrt/harness/check_against_torch.py KV_DIR --write-kv-inputs
    kvcompile_plugin_harness DUMP_DIR KV_DIR && python plugins/tensorrt/harness/check_against_torch.py DUMP_DIR [--json OUT]

Each DUMP_DIR/<case>.json names the plugin, its fields and the raw input/output files the
harness wrote; the reference is the op's plain-torch definition (kcache_attention_reference,
rerotate_reference, kv_decode_reference) on the same inputs, on the CPU. Exit status 1 when any case differs.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int64": torch.int64,
          "int32": torch.int32, "uint8": torch.uint8}
ONNX_DTYPE_INDEX = {1: 0, 10: 1, 16: 2}  # TensorProto type -> kv_decode's dtype code (KVC_DTYPE_*)
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
    if case["plugin"] == "kv_decode":
        from kvcompile.ops.kv_decode.definition import kv_decode_reference

        return kv_decode_reference(inputs["data"], inputs["chunk_offsets"], inputs["bank_cdf"], inputs["halves"],
                                   inputs["table_base"], inputs["scale_steps"],
                                   *(field(fields, name) for name in ("layers", "kv_heads", "head_dim", "tokens",
                                                                      "group", "log_scales")),
                                   ONNX_DTYPE_INDEX[field(fields, "onnx_dtype")])
    raise ValueError(f"no reference for plugin {case['plugin']!r}")


def write_kv_inputs(folder: Path, level: int = 2) -> None:
    """A small KV cache encoded at codec `level` (float16, 3 chunks), as the kv_decode node's inputs
    for the harness: folder/kv_decode.txt and folder/kv_input.<name>.bin."""
    import io

    import kvcompile.codec as codec
    from kvcompile.codec.bitstream import DTYPES as NAMES
    from kvcompile.codec.quantise import LEVELS
    from kvcompile.ops.kv_decode.definition import level_tables

    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(3, 2, 96, 8, generator=generator)
    values = torch.randn(3, 2, 96, 8, generator=generator) * 2
    keys[..., 0] += 4  # an outlier channel, as real keys have
    stream = io.BytesIO(codec.encode((keys.half(), values.half()), level=level, chunk_tokens=32))
    header = codec.read_header(stream)
    chunks = [data for _, data in codec.iter_chunks(stream, header)]
    offsets, at = [], 0
    for data in chunks:
        offsets.append(at)
        at += len(data) + (-len(data) % 4)
    blob = b"".join(data + b"\0" * (-len(data) % 4) for data in chunks)
    bank_cdf, halves, table_base, steps = level_tables(header.level, header.layers)
    tensors = {"data": torch.frombuffer(bytearray(blob), dtype=torch.uint8),
               "chunk_offsets": torch.tensor(offsets, dtype=torch.int64), "bank_cdf": bank_cdf, "halves": halves,
               "table_base": table_base, "scale_steps": steps.float()}
    names = {v: k for k, v in DTYPES.items()}
    onnx_dtype = {0: 1, 1: 10, 2: 16}[NAMES.index(header.dtype)]
    fields = {"layers": header.layers, "kv_heads": header.kv_heads, "head_dim": header.head_dim,
              "tokens": header.chunk_tokens, "group": header.group, "log_scales": int(LEVELS[header.level].log_scales),
              "onnx_dtype": onnx_dtype}
    folder.mkdir(parents=True, exist_ok=True)
    lines = [f"field {name} {value}" for name, value in fields.items()]
    for name, tensor in tensors.items():
        (folder / f"kv_input.{name}.bin").write_bytes(tensor.contiguous().numpy().tobytes())
        lines.append(f"input {name} {names[tensor.dtype]} {' '.join(map(str, tensor.shape))}")
    (folder / "kv_decode.txt").write_text("\n".join(lines) + "\n")


def check(folder: Path) -> list:
    results = []
    for path in sorted(folder.glob("*.json")):
        case = json.loads(path.read_text())
        inputs = {spec["name"]: load_tensor(folder, spec) for spec in case["inputs"]}
        got = load_tensor(folder, case["output"])
        want = reference(case, inputs)
        difference = (got.float() - want.float()).abs().max().item()
        tolerance = 0.0 if case["plugin"] == "kv_decode" else TOLERANCE[got.dtype]  # the kernel is bit-exact
        results.append({"case": case["case"], "plugin": case["plugin"], "dtype": case["output"]["dtype"],
                        "max_abs_diff": difference, "tolerance": tolerance,
                        "equal": bool(math.isfinite(difference) and difference <= tolerance)})
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--write-kv-inputs", action="store_true", help="write a codec bitstream's kv_decode inputs "
                        "into FOLDER for the harness (its second argument) and exit")
    args = parser.parse_args(argv)
    if args.write_kv_inputs:
        write_kv_inputs(args.folder)
        return 0
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
