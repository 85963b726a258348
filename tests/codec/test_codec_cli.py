"""`kvcompile run --save-kv / --from-kv`, `kvcompile codec encode|decode|inspect`, `export --codec`:
the round trip on a prompt's KV, the per-layer size table, and one-line errors for bad files."""
from __future__ import annotations

import io
import json

import pytest
import torch

from kvcompile.cli.main import main

PROMPT = "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n" * 3


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    folder = tmp_path_factory.mktemp("codec_cli") / "tiny"
    assert main(["export", "tiny-llama", "--target", "torch", "--codec", "2", "-o", str(folder)]) == 0
    return folder


@pytest.fixture(scope="module")
def saved(artifact):
    path = artifact.parent / "prompt.kv.safetensors"
    assert main(["run", str(artifact), "--prompt", PROMPT, "--max-new-tokens", "2", "--save-kv", str(path)]) == 0
    return path


def test_export_records_the_codec_level(artifact):
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["codec"]["level"] == 2 and manifest["codec"]["bitstream_version"] >= 2
    assert len(manifest["codec"]["fingerprint"]) == 16


def test_save_kv_writes_the_prompts_kv_with_the_fingerprint(artifact, saved):
    from kvcompile.codec.saved_kv import SavedKV

    kv = SavedKV.load(saved)
    manifest = json.loads((artifact / "manifest.json").read_text())
    spec = manifest["graph_spec"]
    tokens = len(PROMPT.encode())  # the tiny model's byte tokenizer
    assert kv.keys.shape == (spec["num_layers"], spec["kv_heads"], tokens, spec["head_dim"])
    assert kv.token_ids.shape == (tokens,) and kv.fingerprint == manifest["codec"]["fingerprint"]


def test_encode_inspect_decode_round_trip(saved, tmp_path, capsys):
    from kvcompile.codec.saved_kv import SavedKV

    blob = tmp_path / "prompt.kvcb"
    capsys.readouterr()
    assert main(["codec", "encode", str(saved), "--level", "1", "--chunk-tokens", "64", "-o", str(blob)]) == 0
    printed = capsys.readouterr().out
    layers = SavedKV.load(saved).keys.shape[0]
    rows = sum(line.startswith("│") and "×" in line for line in printed.splitlines())
    assert rows == layers + 1  # one row per layer + the total
    assert "vs fp16" in printed and "vs 8-bit" in printed and "total" in printed
    assert main(["codec", "inspect", str(blob)]) == 0
    inspected = capsys.readouterr().out
    total_line = [line for line in inspected.splitlines() if "total" in line][0]
    assert f"{blob.stat().st_size:,}" in total_line
    decoded = tmp_path / "back.safetensors"
    assert main(["codec", "decode", str(blob), "-o", str(decoded)]) == 0
    original, back = SavedKV.load(saved), SavedKV.load(decoded)
    assert back.keys.shape == original.keys.shape and back.fingerprint == original.fingerprint
    assert back.token_ids is None and back.meta["level"] == 1
    for a, b in ((original.keys, back.keys), (original.values, back.values)):
        assert (a - b).norm() / a.norm() < 0.2  # level 1: 32-64 bins


def test_per_layer_bytes_add_up_to_the_file(saved, tmp_path):
    import kvcompile.codec as codec
    from kvcompile.cli.codec_command import layer_bytes
    from kvcompile.codec.saved_kv import SavedKV

    kv = SavedKV.load(saved)
    blob = codec.encode((kv.keys, kv.values), level=2, chunk_tokens=32)
    header, per_layer = layer_bytes(blob)
    assert len(per_layer) == header.layers and all(size > 0 for size in per_layer)
    other = len(blob) - sum(per_layer)
    # the header, its chunk table and (format 3) its tables, word padding, and the tables a chunk
    # carries itself (layer_bytes counts a chunk's fixed part as format 3 with none)
    from kvcompile.codec import chunk as chunk_codec

    stream = io.BytesIO(blob)
    codec.read_header(stream)
    own = sum(2 * header.channels * int(chunk_codec.parse_chunk(header, i, data).own.sum())
              for i, data in codec.iter_chunks(stream, header))
    assert 0 <= other <= 200 + 12 * header.chunks + 4 * header.layers * header.channels + own


def test_run_from_kv_continues_the_context(artifact, saved, tmp_path, capsys):
    blob = tmp_path / "ctx.kvcb"
    assert main(["codec", "encode", str(saved), "--level", "1", "-o", str(blob)]) == 0
    capsys.readouterr()
    assert main(["run", str(artifact), "--prompt", "x = ", "--from-kv", str(blob), "--max-new-tokens", "4"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("x = ") and "context restored from" in captured.err


def test_level_choices_are_the_codecs():
    import argparse

    import kvcompile.codec as codec
    from kvcompile.cli.main import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    codec_parser = sub.choices["codec"]
    actions = next(a for a in codec_parser._actions if isinstance(a, argparse._SubParsersAction))
    level = next(a for a in actions.choices["encode"]._actions if a.dest == "level")
    assert tuple(level.choices) == tuple(codec.LEVELS) and level.default == codec.DEFAULT_LEVEL
    export_level = next(a for a in sub.choices["export"]._actions if a.dest == "codec")
    assert tuple(export_level.choices) == tuple(codec.LEVELS)


def bad_files(tmp_path, saved):
    from safetensors.torch import save_file

    (tmp_path / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    data = saved.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.kvcb").write_bytes(b"KVCB" + b"\x00" * 40)
    return tmp_path


@pytest.mark.parametrize("argv, code, fragment", [
    (["codec", "encode", "{tmp}/missing.safetensors"], 3, "does not exist"),
    (["codec", "encode", "{tmp}/garbage.safetensors"], 3, "cannot read KV file"),
    (["codec", "encode", "{tmp}/cut.safetensors"], 3, "cannot read KV file"),
    (["codec", "encode", "{tmp}/foreign.safetensors"], 3, "is not a kvcompile KV file"),
    (["codec", "encode", "{saved}", "--level", "7"], 2, "invalid choice: 7"),
    (["codec", "decode", "{tmp}/missing.kvcb"], 3, "does not exist"),
    (["codec", "inspect", "{tmp}/junk.kvcb"], 3, "KV bitstream"),
    (["codec", "inspect", "{saved}"], 3, "not a kvcompile KV bitstream"),
    (["codec"], 2, "required"),
    (["run", "{artifact}", "--prompt", "x", "--save-kv", "{tmp}/a", "--chunks", "{saved}"], 2, "cannot be combined"),
    (["run", "{artifact}", "--prompt", "x", "--from-kv", "{tmp}/missing.kvcb"], 3, "does not exist"),
])
def test_bad_files_get_one_line(argv, code, fragment, artifact, saved, tmp_path, capsys):
    bad_files(tmp_path, saved)
    argv = [a.format(tmp=tmp_path, saved=saved, artifact=artifact) for a in argv]
    try:
        result = main(argv)
    except SystemExit as exiting:  # argparse's own errors
        result = exiting.code
    err = capsys.readouterr().err.strip().splitlines()
    assert result == code and fragment in err[-1] and "Traceback" not in "\n".join(err)


def test_a_context_from_another_model_is_refused(artifact, tmp_path, capsys):
    import kvcompile.codec as codec
    from kvcompile.codec.saved_kv import SavedKV

    path = artifact.parent / "prompt.kv.safetensors"
    kv = SavedKV.load(path)
    blob = tmp_path / "other.kvcb"
    blob.write_bytes(codec.encode((kv.keys, kv.values), level=2, fingerprint="0123456789abcdef"))
    assert main(["run", str(artifact), "--prompt", "x", "--from-kv", str(blob)]) == 3
    assert "computed by another model" in capsys.readouterr().err
