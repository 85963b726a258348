"""Artifact manifest: atomic writes, and refusal of tampered / incomplete / foreign folders."""
import json
import os

import pytest

import kvcompile
from kvcompile.export.manifest import (
    MANIFEST_NAME,
    ArtifactError,
    load_manifest,
    sha256_file,
    write_artifact,
)


def _fill_two_files(folder):
    (folder / "graph.bin").write_bytes(b"graph" * 100)
    (folder / "weights").mkdir()
    (folder / "weights" / "w.bin").write_bytes(bytes(range(256)))
    return {"target": "test", "model_config": {"layers": 2}}


@pytest.fixture
def artifact(tmp_path):
    return write_artifact(tmp_path / "art", _fill_two_files)


def test_written_manifest_lists_files_with_checksums(artifact):
    manifest = load_manifest(artifact, target="test")
    assert manifest["kvcompile_version"] == kvcompile.__version__
    assert manifest["model_config"] == {"layers": 2}
    assert set(manifest["files"]) == {"graph.bin", "weights/w.bin"}
    assert manifest["files"]["graph.bin"]["sha256"] == sha256_file(artifact / "graph.bin")
    # no temporary siblings left behind
    assert [p.name for p in artifact.parent.iterdir()] == ["art"]


def test_tampered_file_is_refused(artifact):
    data = bytearray((artifact / "graph.bin").read_bytes())
    data[0] ^= 1  # same size, different content: only the checksum can catch it
    (artifact / "graph.bin").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="graph.bin does not match its sha256"):
        load_manifest(artifact)


def test_truncated_file_is_refused(artifact):
    (artifact / "weights" / "w.bin").write_bytes(b"short")
    with pytest.raises(ArtifactError, match="w.bin is 5 bytes"):
        load_manifest(artifact)


def test_missing_file_is_refused(artifact):
    os.remove(artifact / "graph.bin")
    with pytest.raises(ArtifactError, match="graph.bin is missing"):
        load_manifest(artifact)


def test_missing_manifest_is_refused(artifact):
    os.remove(artifact / MANIFEST_NAME)
    with pytest.raises(ArtifactError, match="manifest.json is missing"):
        load_manifest(artifact)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("kvcompile_version", "0.0.0-other", "exported by kvcompile '0.0.0-other'"),
        ("manifest_version", 999, "manifest version 999 is not supported"),
        ("format", "something-else", "not a kvcompile artifact manifest"),
    ],
)
def test_foreign_manifest_is_refused(artifact, field, value, message):
    manifest = json.loads((artifact / MANIFEST_NAME).read_text())
    manifest[field] = value
    (artifact / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=message):
        load_manifest(artifact)


def test_wrong_target_is_refused(artifact):
    with pytest.raises(ArtifactError, match="is a 'test' artifact, expected 'onnx'"):
        load_manifest(artifact, target="onnx")


def test_garbage_manifest_is_refused(artifact):
    (artifact / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_manifest(artifact)


def test_failed_write_keeps_previous_artifact_and_leaves_no_partial(artifact):
    before = (artifact / MANIFEST_NAME).read_text()

    def failing_fill(folder):
        (folder / "graph.bin").write_bytes(b"half written")
        raise RuntimeError("exporter crashed")

    with pytest.raises(RuntimeError, match="exporter crashed"):
        write_artifact(artifact, failing_fill)
    assert (artifact / MANIFEST_NAME).read_text() == before
    load_manifest(artifact)
    assert [p.name for p in artifact.parent.iterdir()] == ["art"]


def test_rewrite_replaces_previous_artifact(artifact):
    def other_fill(folder):
        (folder / "only.bin").write_bytes(b"new")
        return {"target": "test"}

    write_artifact(artifact, other_fill)
    assert set(load_manifest(artifact)["files"]) == {"only.bin"}
    assert not (artifact / "graph.bin").exists()
    assert [p.name for p in artifact.parent.iterdir()] == ["art"]


def test_unwritable_parent_is_one_clear_error(tmp_path, monkeypatch):
    with pytest.raises(ArtifactError, match="does not exist"):
        write_artifact(tmp_path / "no" / "such" / "art", _fill_two_files)
    # CI runs as root, which ignores permission bits: simulate a read-only parent instead.
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(ArtifactError, match="is not writable"):
        write_artifact(tmp_path / "art", _fill_two_files)
    assert list(tmp_path.iterdir()) == []


def test_fill_may_not_forge_checksums(tmp_path):
    def forging_fill(folder):
        (folder / "a.bin").write_bytes(b"a")
        return {"files": {}}

    with pytest.raises(ArtifactError, match="reserved"):
        write_artifact(tmp_path / "art", forging_fill)
    assert list(tmp_path.iterdir()) == []
