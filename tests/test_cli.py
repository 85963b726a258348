"""The kvcompile command: export/run/inspect round trip, and one-line errors that leave nothing behind."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kvcompile.cli.main import main


def run_cli(*args, cwd=None):
    result = subprocess.run([sys.executable, "-m", "kvcompile.cli.main", *args], capture_output=True, text=True, cwd=cwd)
    return result.returncode, result.stdout, result.stderr


@pytest.fixture(scope="module")
def torch_artifact(tmp_path_factory):
    folder = tmp_path_factory.mktemp("art") / "tiny-llama-full"
    assert main(["export", "tiny-llama", "--target", "torch", "-o", str(folder)]) == 0
    return folder


def test_export_writes_manifest_and_program(torch_artifact):
    manifest = json.loads((torch_artifact / "manifest.json").read_text())
    assert manifest["target"] == "torch"
    assert [slot["name"] for slot in manifest["inputs"]][:3] == ["input_ids", "position_ids", "attn_bias"]
    assert "program.pt2" in manifest["files"]
    assert manifest["graph_spec"]["num_layers"] == 2


def test_run_generates(torch_artifact, capsys):
    assert main(["run", str(torch_artifact), "--prompt", "hello", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith("hello")


def test_inspect_artifact_and_model(torch_artifact, capsys):
    assert main(["inspect", str(torch_artifact)]) == 0
    text = capsys.readouterr().out
    assert "find_attention" in text and "insert_kv_cache" in text and "self_attn" in text
    assert main(["inspect", "tiny-gpt2"]) == 0
    assert "h.1.attn" in capsys.readouterr().out


def test_bad_target_is_one_line_and_writes_nothing(tmp_path):
    code, out, err = run_cli("export", "tiny-llama", "--target", "tflite", "-o", str(tmp_path / "x"))
    assert code != 0
    assert "invalid choice: 'tflite'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_missing_checkpoint_is_one_line(tmp_path):
    code, _, err = run_cli("export", str(tmp_path / "missing"), "-o", str(tmp_path / "y"))
    assert code != 0 and "does not exist" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "y").exists()


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_folder(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    code, _, err = run_cli("export", "tiny-llama", "-o", str(locked / "out"))
    assert code != 0 and "not writable" in err


def test_output_parent_missing_is_one_line(tmp_path):
    code, _, err = run_cli("export", "tiny-llama", "-o", str(tmp_path / "no" / "such" / "dir"))
    assert code != 0 and "does not exist" in err and len(err.strip().splitlines()) == 1


def test_failed_export_keeps_previous_artifact(torch_artifact, monkeypatch):
    before = (torch_artifact / "manifest.json").read_text()
    import kvcompile.export.torch_target as torch_target

    def broken(compiled):
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch_target, "export_program", broken)
    assert main(["export", "tiny-llama", "-o", str(torch_artifact)]) == 1  # unexpected failure: exit 1, one line
    assert (torch_artifact / "manifest.json").read_text() == before
    leftovers = [p.name for p in torch_artifact.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_tampered_artifact_is_refused(torch_artifact, tmp_path, capsys):
    copy = tmp_path / "copy"
    copy.mkdir()
    for item in torch_artifact.iterdir():
        (copy / item.name).write_bytes(item.read_bytes())
    program = copy / "program.pt2"
    data = bytearray(program.read_bytes())
    data[len(data) // 2] ^= 0xFF
    program.write_bytes(bytes(data))
    assert main(["run", str(copy), "--prompt", "hi"]) == 3  # a bad artifact is an input error
    assert "checksum" in capsys.readouterr().err


def test_bad_topn_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as exit_:  # argparse refuses it while parsing
        main(["inspect", "tiny-llama", "--cache", "kcache", "--topn", "0"])
    assert exit_.value.code == 2
    assert "topn must be ≥ 1" in capsys.readouterr().err


def test_clean_removes_what_a_killed_export_left(tmp_path, capsys):
    from kvcompile.export.manifest import _host_tag

    stale = tmp_path / f".model.building-999999999.{_host_tag()}.0badcafe-0123abcd"  # its owner is not alive
    stale.mkdir()
    (stale / "weights.data").write_bytes(b"x" * 1000)
    assert main(["clean", str(tmp_path)]) == 0
    assert not stale.exists() and "1 stale folder(s) removed" in capsys.readouterr().out


def test_help_and_version_do_not_import_torch():
    code = ("import sys, time; t = time.perf_counter(); from kvcompile.cli.main import build_parser; "
            "build_parser(); print('torch' in sys.modules, time.perf_counter() - t)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    imported, seconds = result.stdout.split()
    assert imported == "False" and float(seconds) < 0.5
    version = subprocess.run([sys.executable, "-m", "kvcompile.cli.main", "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.startswith("kvcompile ")


def test_run_with_chunks_fuses_them(torch_artifact, tmp_path, capsys):
    (tmp_path / "a.txt").write_text("x = 41\n")
    (tmp_path / "b.txt").write_text("y = x + 1\n")
    assert main(["run", str(torch_artifact), "--chunks", str(tmp_path / "a.txt"), str(tmp_path / "b.txt"),
                 "--prompt", "print(y)", "--max-new-tokens", "4", "--recompute-ratio", "0.5"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("print(y)") and "2 chunks fused (50% recomputed" in captured.err
