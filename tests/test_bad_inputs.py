"""Every bad input a user can give gets one line and a documented exit code — never a traceback.

BAD_INPUTS is the table: what was given -> exit code (CLI) or exception (API) -> what the one
line must say. `python tests/test_bad_inputs.py` prints it as markdown (docs/CLI_ERRORS.md).
Exit codes (kvcompile.errors): 2 usage, 3 bad model/artifact input, 4 runtime failure.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

import kvcompile
from kvcompile.cli.main import EVAL_TASKS, main
from kvcompile.errors import (ConfigError, ContextLengthError, InputError, InputValidationError, LoadError,
                              UsageError)

CLI, API = "cli", "api"
ONNX_ART, TORCH_ART = "{onnx}", "{torch}"  # artifact folders made once per module
TRT_ART = "{tensorrt}"  # a tensorrt artifact's manifest over the ONNX artifact's graphs
INVALID_UTF8 = b"def f(\xff\xfe):".decode("utf-8", "surrogateescape")

# (label, kind, argv or API case name, expected exit code or exception, message fragment)
BAD_INPUTS = [
    ("--topn abc", CLI, ["export", "reference", "--cache", "kcache", "--topn", "abc"], 2, "invalid value 'abc'"),
    ("--topn 0", CLI, ["export", "reference", "--cache", "kcache", "--topn", "0"], 2, "topn must be ≥ 1"),
    ("--topn 1.5", CLI, ["export", "reference", "--cache", "kcache", "--topn", "1.5"], 2, "fractional topn lies in (0, 1]"),
    ("--cache full --topn 5", CLI, ["export", "reference", "--topn", "5"], 2, "--topn applies to --cache kcache only"),
    ("--cache full --select layer", CLI, ["export", "reference", "--select", "layer"], 2, "--select applies to --cache kcache"),
    ("--cache paged", CLI, ["export", "reference", "--cache", "paged"], 2, "invalid choice: 'paged'"),
    ("--target tensorflow", CLI, ["export", "reference", "--target", "tensorflow"], 2, "invalid choice: 'tensorflow'"),
    ("--max-batch with --target onnx", CLI, ["export", "tiny-llama", "--target", "onnx", "--max-batch", "2", "-o",
                                            "{tmp}/mb"], 2, "--max-batch applies to --target tensorrt"),
    ("run: tensorrt artifact, no TensorRT here", CLI, ["run", TRT_ART, "--prompt", "x"], 4,
     "TensorRT is not installed here"),
    ("run: tensorrt artifact on --backend torch", CLI, ["run", TRT_ART, "--backend", "torch", "--prompt", "x"], 2,
     "runs on --backend tensorrt"),
    ("--full-layers -1", CLI, ["export", "reference", "--cache", "kcache", "--full-layers", "-1"], 2, "must be ≥ 0"),
    ("--full-layers 999", CLI, ["export", "tiny-llama", "--cache", "kcache", "--full-layers", "999", "-o", "{tmp}/a"], 2,
     "no layer would use kcache"),
    ("--topn beyond the context", CLI, ["export", "tiny-llama", "--cache", "kcache", "--topn", "100000", "-o", "{tmp}/b"],
     2, "≥ the model's context"),
    ("-o /proc/x", CLI, ["export", "tiny-llama", "-o", "/proc/x"], 3, "cannot write artifact /proc/x"),
    ("-o a file in the way", CLI, ["export", "tiny-llama", "-o", "{tmp}/a_file"], 3, "a file of that name is in the way"),
    ("-o under a missing folder", CLI, ["export", "tiny-llama", "-o", "{tmp}/missing/x"], 3, "does not exist"),
    ("model folder missing", CLI, ["export", "{tmp}/no_model"], 3, "does not exist"),
    ("model path is a file", CLI, ["export", "{tmp}/a_file"], 3, "is not a folder"),
    ("checkpoint without config.json", CLI, ["export", "{tmp}/empty_dir"], 3, "has no config.json"),
    ("config.json not JSON", CLI, ["export", "{tmp}/bad_config"], 3, "is not valid JSON"),
    ("no weight files", CLI, ["export", "{tmp}/no_weights"], 3, "has no weight files"),
    ("truncated safetensors", CLI, ["export", "{tmp}/truncated"], 3, "is corrupt"),
    ("unknown tiny model", CLI, ["export", "tiny-nothing"], 2, "unknown tiny model 'tiny-nothing'"),
    ("unsupported attention (ALiBi, own code)", CLI, ["export", "{tmp}/bloom"], 3, "computed by the model's own code"),
    ("no command", CLI, [], 2, "the following arguments are required"),
    ("unknown command", CLI, ["compress"], 2, "invalid choice: 'compress'"),
    ("export without a model", CLI, ["export"], 2, "the following arguments are required: model"),
    ("run: no such folder", CLI, ["run", "{tmp}/nothing", "--prompt", "x"], 3, "no such folder"),
    ("run: folder without manifest", CLI, ["run", "{tmp}/empty_dir", "--prompt", "x"], 3, "manifest.json is missing"),
    ("run: manifest not JSON", CLI, ["run", "{tmp}/broken_manifest", "--prompt", "x"], 3, "is not valid JSON"),
    ("run: a graph file modified", CLI, ["run", "{tmp}/tampered", "--prompt", "x"], 3, "does not match its sha256"),
    ("run: a graph file truncated", CLI, ["run", "{tmp}/truncated_art", "--prompt", "x"], 3, "modified or truncated"),
    ("run: ONNX artifact on --backend torch", CLI, ["run", ONNX_ART, "--backend", "torch", "--prompt", "x"], 2,
     "runs on --backend onnxruntime"),
    ("run: torch artifact on --backend onnxruntime", CLI, ["run", TORCH_ART, "--backend", "onnxruntime", "--prompt", "x"],
     2, "runs on --backend torch"),
    ("run: empty prompt", CLI, ["run", ONNX_ART, "--prompt", ""], 2, "the prompt is empty"),
    ("run: --max-new-tokens 100000", CLI, ["run", ONNX_ART, "--prompt", "x", "--max-new-tokens", "100000"], 2,
     "exceed the model's context of 512 positions by"),
    ("run: --max-new-tokens -1", CLI, ["run", ONNX_ART, "--prompt", "x", "--max-new-tokens", "-1"], 2, "must be ≥ 0"),
    ("run: --temperature 0", CLI, ["run", ONNX_ART, "--prompt", "x", "--temperature", "0"], 2, "temperature must be > 0"),
    ("run: --top-p 2", CLI, ["run", ONNX_ART, "--prompt", "x", "--top-p", "2"], 2, "top_p must lie in (0, 1]"),
    ("run: --top-k abc", CLI, ["run", ONNX_ART, "--prompt", "x", "--top-k", "abc"], 2, "expected an int ≥ 0"),
    ("run without --prompt", CLI, ["run", ONNX_ART], 2, "required: --prompt"),
    ("export --fuse to a torch artifact", CLI, ["export", "tiny-llama", "--fuse", "-o", "{tmp}/f"], 2,
     "--fuse applies to --target onnx"),
    ("run --chunks on an ONNX artifact exported without --fuse", CLI,
     ["run", ONNX_ART, "--chunks", "{tmp}/a_file", "--prompt", "x"], 2, "--target onnx --fuse"),
    ("run --chunks with a missing file", CLI, ["run", TORCH_ART, "--chunks", "{tmp}/nothing.txt", "--prompt", "x"], 2,
     "cannot read chunk"),
    ("run --recompute-ratio 2", CLI, ["run", TORCH_ART, "--chunks", "{tmp}/a_file", "--prompt", "x",
                                      "--recompute-ratio", "2"], 2, "must be in [0, 1]"),
    ("eval --tasks bogus", CLI, ["eval", "--tasks", "bogus"], 2, "unknown task(s) bogus"),
    ("eval --samples 0", CLI, ["eval", "--samples", "0"], 2, "must be ≥ 1"),
    ("bench: unknown benchmark", CLI, ["bench", "bench_nothing"], 2, "no benchmark 'bench_nothing'"),
    ("inspect: no such model", CLI, ["inspect", "{tmp}/no_model"], 3, "does not exist"),
    ("store without a verb", CLI, ["store"], 2, "the following arguments are required"),
    ("store: unknown URL scheme", CLI, ["store", "ls", "--store", "s3://bucket"], 2, "unknown store URL scheme 's3'"),
    ("store: bad max_bytes", CLI, ["store", "ls", "--store", "file://{tmp}/store?max_bytes=lots"], 2,
     "max_bytes 'lots' is not a positive amount"),
    ("store: folder that cannot be made", CLI, ["store", "ls", "--store", "file:///proc/kvstore"], 2,
     "cannot use /proc/kvstore as a store folder"),
    ("store: redis not reachable", CLI, ["store", "ls", "--store", "redis://127.0.0.1:1/0"], 4, "is unreachable"),
    ("store get: not a chunk-cache key", CLI, ["store", "get", "nope", "-o", "{tmp}/x", "--store", "file://{tmp}/store"],
     2, "is not a chunk-cache key"),
    ("store get: key not in the store", CLI, ["store", "get", "kvc1/ab/cd.10/full/float32/raw", "-o", "{tmp}/x",
                                              "--store", "file://{tmp}/store"], 3, "some piece is missing"),
    ("store put: no such file", CLI, ["store", "put", "{tmp}/nothing.safetensors", "--store", "file://{tmp}/store"], 3,
     "no chunk cache file"),
    ("store put: not a chunk cache", CLI, ["store", "put", "{tmp}/a_file", "--store", "file://{tmp}/store"], 3,
     "cannot read chunk cache"),
    ("store put: unknown codec level", CLI, ["store", "put", "{tmp}/chunk.safetensors", "--codec", "9", "--store",
                                             "file://{tmp}/store"], 2, "unknown codec level 9"),
    ("codec without a verb", CLI, ["codec"], 2, "the following arguments are required"),
    ("codec encode: no such KV file", CLI, ["codec", "encode", "{tmp}/nothing.safetensors"], 3, "does not exist"),
    ("codec encode: not safetensors", CLI, ["codec", "encode", "{tmp}/a_file"], 3, "cannot read KV file"),
    ("codec encode: safetensors but not a KV file", CLI, ["codec", "encode", "{tmp}/chunk.safetensors"], 3,
     "is not a kvcompile KV file"),
    ("codec encode --level 9", CLI, ["codec", "encode", "{tmp}/chunk.safetensors", "--level", "9"], 2,
     "invalid choice: 9"),
    ("codec decode: no such bitstream", CLI, ["codec", "decode", "{tmp}/nothing.kvcb"], 3, "does not exist"),
    ("codec inspect: not a bitstream", CLI, ["codec", "inspect", "{tmp}/a_file"], 3, "KV bitstream is truncated"),
    ("export --codec 9", CLI, ["export", "tiny-llama", "--codec", "9"], 2, "invalid choice: 9"),
    ("run --save-kv with --chunks", CLI, ["run", TORCH_ART, "--save-kv", "{tmp}/kv", "--chunks", "{tmp}/a_file",
                                          "--prompt", "x"], 2, "--save-kv cannot be combined with --chunks"),
    ("run --from-kv: no such bitstream", CLI, ["run", TORCH_ART, "--from-kv", "{tmp}/nothing.kvcb", "--prompt", "x"],
     3, "does not exist"),
    ("run --from-kv: not a bitstream", CLI, ["run", TORCH_ART, "--from-kv", "{tmp}/chunk.safetensors", "--prompt",
                                             "x"], 3, "not a kvcompile KV bitstream"),
    ("compile(torch.nn.Linear)", API, "compile_linear", InputError, "needs a Hugging Face causal LM"),
    ("float input_ids", API, "float_ids", InputValidationError, "must hold integer token ids"),
    ("1-D input_ids", API, "one_d_ids", InputValidationError, "must be [batch, tokens]"),
    ("empty input_ids", API, "empty_ids", InputValidationError, "is empty"),
    ("token id ≥ vocab", API, "big_id", InputValidationError, "outside the model's vocabulary"),
    ("negative token id", API, "negative_id", InputValidationError, "outside the model's vocabulary"),
    ("mask of the wrong shape", API, "mask_shape", InputValidationError, "they must match"),
    ("all-zero mask row", API, "mask_empty_row", InputValidationError, "hides every token of batch row(s) [1]"),
    ("right padding", API, "mask_right_pad", InputValidationError, "must pad on the left"),
    ("mask values other than 0/1", API, "mask_values", InputValidationError, "only 0 (padding) and 1"),
    ("prompt + max_new_tokens beyond the context", API, "too_long", ContextLengthError, "exceed the model's context"),
    ("CacheConfig(kind='paged')", API, "config_kind", ConfigError, "unknown cache kind 'paged'"),
    ("CacheConfig(topn=0)", API, "config_topn", ConfigError, "topn must be ≥ 1"),
    ("load_model of a missing folder", API, "load_missing", LoadError, "does not exist"),
    ("generate_from_kv: a context of another shape", API, "foreign_context", InputError, "this model has"),
]


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def places(tmp_path_factory):
    """Folders the table's rows name: broken checkpoints, artifacts, a tampered copy."""
    from transformers import BloomConfig, BloomForCausalLM

    from kvcompile.frontend.tiny_models import tiny_model

    tmp = tmp_path_factory.mktemp("bad_inputs")
    (tmp / "a_file").write_text("not a folder")
    from kvcompile.fusion.chunks import ChunkCache

    ChunkCache(torch.arange(4), [torch.zeros(1, 2, 4, 8)], [torch.ones(1, 2, 4, 8)], "f" * 16, "float32",
               "full").save(tmp / "chunk.safetensors")
    (tmp / "empty_dir").mkdir()
    (tmp / "bad_config").mkdir()
    (tmp / "bad_config" / "config.json").write_text("{not json")
    (tmp / "no_weights").mkdir()
    (tmp / "no_weights" / "config.json").write_text("{}")
    model = tiny_model("llama")
    model.save_pretrained(tmp / "truncated")
    weights = tmp / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    torch.manual_seed(0)
    BloomForCausalLM(BloomConfig(vocab_size=272, hidden_size=64, n_layer=2, n_head=4)).save_pretrained(tmp / "bloom")
    assert main(["export", "tiny-llama", "--target", "onnx", "-o", str(tmp / "onnx")]) == 0
    assert main(["export", "tiny-llama", "--target", "torch", "-o", str(tmp / "torch")]) == 0
    shutil.copytree(tmp / "onnx", tmp / "tampered")
    graph = tmp / "tampered" / "decode.onnx"
    data = bytearray(graph.read_bytes())
    data[-10] ^= 0xFF
    graph.write_bytes(bytes(data))
    shutil.copytree(tmp / "onnx", tmp / "truncated_art")
    graph = tmp / "truncated_art" / "prefill.onnx"
    graph.write_bytes(graph.read_bytes()[:-100])
    shutil.copytree(tmp / "onnx", tmp / "broken_manifest")
    (tmp / "broken_manifest" / "manifest.json").write_text('{"format": ')
    tensorrt_artifact(tmp / "onnx", tmp / "tensorrt")
    return tmp


def tensorrt_artifact(onnx_dir: Path, out: Path) -> None:
    """The ONNX artifact's graphs under a --target tensorrt manifest without engines (what an
    export on a machine without TensorRT writes, less the plugin sources)."""
    from kvcompile.export.manifest import RESERVED_FIELDS, load_manifest, write_artifact

    fields = {k: v for k, v in load_manifest(onnx_dir).items() if k not in RESERVED_FIELDS}

    def write(folder):
        for name in ("prefill.onnx", "decode.onnx"):
            shutil.copyfile(onnx_dir / name, folder / name)
        engines = {role: {"file": f"engines/{role}.plan", "built": False} for role in ("prefill", "decode")}
        return {**fields, "target": "tensorrt", "tensorrt": {"engines": engines, "build_script": "build_engines.sh",
                                                             "plugins": {"library": None}}}
    write_artifact(out, write)


def fill(argv, tmp: Path) -> list:
    return [a.replace("{tmp}", str(tmp)).replace(ONNX_ART, str(tmp / "onnx")).replace(TORCH_ART, str(tmp / "torch"))
            .replace(TRT_ART, str(tmp / "tensorrt")) for a in argv]


def run_cli(argv, capsys) -> tuple:
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.fixture(scope="module")
def compiled():
    from kvcompile.frontend.tiny_models import tiny_model

    return kvcompile.compile(tiny_model("llama"))


def api_case(name: str, compiled):
    ids = torch.randint(3, 200, (2, 6))
    mask = torch.ones_like(ids)
    cases = {
        "compile_linear": lambda: kvcompile.compile(torch.nn.Linear(4, 4)),
        "float_ids": lambda: compiled.generate(ids.float()),
        "one_d_ids": lambda: compiled.generate(ids[0]),
        "empty_ids": lambda: compiled.generate(ids[:, :0]),
        "big_id": lambda: compiled.generate(ids.clone().index_fill_(1, torch.tensor([2]), 5000)),
        "negative_id": lambda: compiled.prefill(ids.clone().index_fill_(1, torch.tensor([0]), -1)),
        "mask_shape": lambda: compiled.generate(ids, mask[:, :3]),
        "mask_empty_row": lambda: compiled.generate(ids, mask.index_fill(0, torch.tensor([1]), 0)),
        "mask_right_pad": lambda: compiled.generate(ids, mask.index_fill(1, torch.tensor([5]), 0)),
        "mask_values": lambda: compiled.generate(ids, mask * 2),
        "too_long": lambda: compiled.generate(ids, max_new_tokens=100000),
        "config_kind": lambda: kvcompile.CacheConfig(kind="paged"),
        "config_topn": lambda: kvcompile.CacheConfig(kind="kcache", topn=0),
        "load_missing": lambda: kvcompile.load_model("/nonexistent/model"),
        "foreign_context": lambda: compiled.generate_from_kv(kvcompile.codec.encode(
            (torch.zeros(1, 1, 4, 8), torch.zeros(1, 1, 4, 8)), level=1), ids[:1]),
    }
    return cases[name]


# ---------------------------------------------------------------------------- tests
@pytest.mark.parametrize("label, kind, what, expected, fragment", BAD_INPUTS, ids=[row[0] for row in BAD_INPUTS])
def test_bad_input_gets_one_line(label, kind, what, expected, fragment, places, compiled, capsys):
    if kind == CLI:
        code, output = run_cli(fill(what, places), capsys)
        assert code == expected, output
        assert "Traceback" not in output
        errors = [line for line in output.splitlines() if "error:" in line]
        assert len(errors) == 1 and fragment in errors[0], output
    else:
        with pytest.raises(expected) as error:
            api_case(what, compiled)()
        message = str(error.value)
        assert fragment in message and "\n" not in message


def test_the_table_is_long_enough():
    assert len(BAD_INPUTS) >= 40


def test_invalid_utf8_prompt_and_default_backend_just_work(places, capsys):
    """Not errors: invalid UTF-8 bytes are bytes to a byte-level model; the backend follows the artifact."""
    code, output = run_cli(["run", str(places / "onnx"), "--prompt", INVALID_UTF8, "--max-new-tokens", "4"], capsys)
    assert code == 0 and "Traceback" not in output and "onnxruntime" in output


def test_unexpected_failure_is_one_line_and_exit_1(monkeypatch, capsys):
    import kvcompile.cli.main as cli

    def broken(args):
        raise KeyError("boom")
    monkeypatch.setattr(cli, "cmd_inspect", broken)
    parser_func = cli.build_parser
    monkeypatch.setattr(cli, "build_parser", lambda: _with_inspect(parser_func(), broken))
    code, output = run_cli(["inspect", "x"], capsys)
    assert code == 1 and "internal error (KeyError)" in output and "Traceback" not in output


def _with_inspect(parser, func):
    for action in parser._subparsers._group_actions:
        action.choices["inspect"].set_defaults(func=func)
    return parser


def test_eval_task_names_match_the_eval_package():
    from kvcompile.eval import TASKS

    assert tuple(EVAL_TASKS) == tuple(TASKS)


def test_usage_errors_are_value_errors_for_api_callers():
    assert issubclass(UsageError, ValueError) and issubclass(InputValidationError, UsageError)


def markdown_table() -> str:
    codes = {2: "2 usage", 3: "3 input", 4: "4 runtime"}
    lines = ["| input | where | exit code / exception | the line says |", "| --- | --- | --- | --- |"]
    for label, kind, _, expected, fragment in BAD_INPUTS:
        result = codes.get(expected, str(expected)) if kind == CLI else expected.__name__
        lines.append(f"| {label} | {kind} | {result} | …{fragment}… |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(markdown_table() + "\n")
