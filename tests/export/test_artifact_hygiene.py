"""Nothing left behind (issue 11, part 2): a killed export leaves the previous artifact loadable
and no temporary folder after the next write or `clean`; a live export's folders are never
swept; manifest.json checksums itself; artifact folders get the umask's permissions."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvcompile.export import manifest as manifest_module
from kvcompile.export.manifest import (
    KILL_POINTS,
    MANIFEST_CHECKSUM_FIELD,
    MANIFEST_NAME,
    TEST_KILL_ENV,
    ArtifactError,
    clean,
    load_manifest,
    manifest_checksum,
    sweep_stale,
    write_artifact,
)

REPO_ROOT = Path(__file__).resolve().parents[2]

# A writer in its own process: four 1 MiB files, then the manifest and the swap. argv: out_dir,
# then "mid_fill" (SIGKILL itself after two files), "wait" (after two files, say "filling" and
# wait for a line on stdin) or "-". The hook points come from KVCOMPILE_TEST_KILL_AT.
CHILD = r"""
import os, signal, sys
from kvcompile.export.manifest import write_artifact

out_dir, mode = sys.argv[1], sys.argv[2]

def fill(folder):
    for i in range(4):
        (folder / f"part{i}.bin").write_bytes(os.urandom(1 << 20))
        if i == 1 and mode == "mid_fill":
            os.kill(os.getpid(), signal.SIGKILL)
        if i == 1 and mode == "wait":
            print("filling", flush=True)
            sys.stdin.readline()
    return {"target": "test", "generation": "child"}

write_artifact(out_dir, fill)
"""


def _child(out_dir, mode="-", kill_at=None, **popen):
    env = {k: v for k, v in os.environ.items() if k != TEST_KILL_ENV}
    if kill_at is not None:
        env[TEST_KILL_ENV] = kill_at
    return subprocess.Popen([sys.executable, "-c", CHILD, str(out_dir), mode], cwd=REPO_ROOT, env=env, **popen)


def _fill(generation):
    def fill(folder):
        (folder / "graph.bin").write_bytes(generation.encode() * 1000)
        (folder / "weights").mkdir()
        (folder / "weights" / "w.bin").write_bytes(os.urandom(4096))
        return {"target": "test", "generation": generation, "cache_config": {"topn": 512}}
    return fill


def _names(folder):
    return sorted(p.name for p in folder.iterdir())


def _temps(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".art."))


@pytest.fixture
def artifact(tmp_path):
    return write_artifact(tmp_path / "art", _fill("previous"))


# kill point -> (temporary folders it leaves, whose artifact `art` holds after a sweep)
KILLED = {
    "created": (["building"], "previous"),
    "mid_fill": (["building"], "previous"),
    "manifest_written": (["building"], "previous"),
    "between_renames": (["building", "old"], "previous"),  # `art` itself is missing until swept
    "swapped": (["old"], "child"),  # the new one is in place, the old one not yet removed
}


def test_every_hook_point_is_covered():
    assert set(KILL_POINTS) <= set(KILLED)


@pytest.mark.parametrize("then", ["clean", "write"])
@pytest.mark.parametrize("point", list(KILLED))
def test_killed_export_leaves_previous_artifact_and_nothing_after_next_sweep(artifact, point, then):
    parent = artifact.parent
    child = _child(artifact, mode="mid_fill" if point == "mid_fill" else "-",
                   kill_at=None if point == "mid_fill" else point)
    assert child.wait(timeout=30) == -signal.SIGKILL

    left, survivor = KILLED[point]
    assert sorted(name.split(".")[2].split("-")[0] for name in _temps(parent)) == left
    if point == "between_renames":
        assert not artifact.exists()
    else:
        assert load_manifest(artifact, target="test")["generation"] == survivor

    if then == "clean":
        swept = [n for n in _temps(parent) if not (point == "between_renames" and ".old-" in n)]
        removed = clean(parent)
        assert sorted(p.name for p in removed) == swept
        assert _names(parent) == ["art"]
        assert load_manifest(artifact, target="test")["generation"] == survivor
        assert clean(parent) == []
    else:
        write_artifact(artifact, _fill("next"))
        assert _names(parent) == ["art"]
        assert load_manifest(artifact, target="test")["generation"] == "next"


def test_clean_of_one_artifact_path_restores_it_and_sweeps_its_siblings(artifact):
    child = _child(artifact, kill_at="between_renames")
    assert child.wait(timeout=30) == -signal.SIGKILL
    assert not artifact.exists()
    removed = clean(artifact)  # `kvcompile clean exported/art`, though art is missing
    assert [p.name.split("-")[0] for p in removed] == [".art.building"]
    assert _names(artifact.parent) == ["art"]
    assert load_manifest(artifact)["generation"] == "previous"


def test_clean_walks_subfolders_but_not_into_artifacts(tmp_path):
    nested = tmp_path / "exported" / "team"
    nested.mkdir(parents=True)
    art = write_artifact(nested / "art", _fill("previous"))
    assert _child(art, mode="mid_fill").wait(timeout=30) == -signal.SIGKILL
    assert len(_temps(nested)) == 1
    removed = clean(tmp_path / "exported")
    assert len(removed) == 1 and removed[0].parent == nested
    assert _names(nested) == ["art"]
    assert clean(tmp_path / "does-not-exist") == []


def test_live_concurrent_writer_is_never_swept(artifact):
    parent = artifact.parent
    child = _child(artifact, mode="wait", stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "filling"
        (building,) = _temps(parent)
        # another export of the same name, and `kvcompile clean`, while the child is mid-fill
        write_artifact(artifact, _fill("parent"))
        assert clean(parent) == []
        assert sweep_stale(parent) == []
        assert _temps(parent) == [building]
        assert len(list((parent / building).iterdir())) == 2
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.wait(timeout=30) == 0
    finally:
        child.kill()
        child.wait()
    assert _names(parent) == ["art"]
    assert load_manifest(artifact)["generation"] == "child"


def test_externally_killed_writer_is_swept(artifact):
    parent = artifact.parent
    child = _child(artifact, mode="wait", stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "filling"
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        child.kill()
        child.wait()
    left = _temps(parent)
    assert len(left) == 1
    assert [p.name for p in clean(parent)] == left
    assert _names(parent) == ["art"]
    assert load_manifest(artifact)["generation"] == "previous"


def _owned(parent, kind, pid, host, start, name="art"):
    folder = parent / f".{name}.{kind}-{pid}.{host}.{start}-0123abcd"
    folder.mkdir()
    (folder / "part.bin").write_bytes(b"x" * 100)
    return folder


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_folder_owned_by_this_process_is_kept_others_by_owner_and_age(tmp_path):
    me = manifest_module._owner_tag()
    pid, host, start = me.split(".")
    live = _owned(tmp_path, "building", pid, host, start)
    live_old = _owned(tmp_path, "old", pid, host, start)
    dead = _owned(tmp_path, "building", _dead_pid(), host, start)
    reused = _owned(tmp_path, "building", pid, host, "00000000" if start != "00000000" else "11111111")
    remote = _owned(tmp_path, "building", pid, "ffffffff" if host != "ffffffff" else "eeeeeeee", start)
    legacy_young = tmp_path / ".art.building-abc_1234"  # mkdtemp's names, before owners
    legacy_idle = tmp_path / ".art.old-xyz_9876"
    remote_idle = _owned(tmp_path, "old", 1, "ffffffff" if host != "ffffffff" else "eeeeeeee", start, name="b")
    for folder in (legacy_young, legacy_idle):
        folder.mkdir()
        (folder / "f").write_bytes(b"1")
    two_hours_ago = time.time() - 7200
    for folder in (legacy_idle, remote_idle):
        for path in (*folder.iterdir(), folder):
            os.utime(path, (two_hours_ago, two_hours_ago))
    not_ours = tmp_path / ".art.building-notakvcompilename"
    not_ours.mkdir()
    lookalike_file = tmp_path / ".art.building-abc_1235"
    lookalike_file.write_bytes(b"a file, not a folder")

    assert sorted(p.name for p in sweep_stale(tmp_path, "b")) == [remote_idle.name]
    removed = sweep_stale(tmp_path)
    assert sorted(removed) == sorted([dead, reused, legacy_idle])
    for kept in (live, live_old, remote, legacy_young, not_ours, lookalike_file):
        assert kept.exists()
    assert sorted(p.name for p in live.iterdir()) == ["part.bin"]


def test_incomplete_old_folder_is_not_restored(tmp_path):
    art = write_artifact(tmp_path / "art", _fill("previous"))
    host, start = manifest_module._owner_tag().split(".")[1:]
    old = tmp_path / f".art.old-{_dead_pid()}.{host}.{start}-0123abcd"
    os.rename(art, old)
    (old / "graph.bin").unlink()  # a removal had started on it
    assert sweep_stale(tmp_path, "art") == [old]
    assert list(tmp_path.iterdir()) == []


def test_edited_manifest_is_refused_in_one_line(artifact):
    path = artifact / MANIFEST_NAME
    original = path.read_text()
    manifest = json.loads(original)
    assert manifest[MANIFEST_CHECKSUM_FIELD] == manifest_checksum(manifest)
    load_manifest(artifact, target="test")

    # the same data written another way (indentation, key order) is the same manifest
    path.write_text(json.dumps(dict(reversed(list(manifest.items())))))
    load_manifest(artifact, target="test")

    manifest["cache_config"]["topn"] = 612  # still valid JSON
    path.write_text(json.dumps(manifest, indent=2))
    for verify in (True, False):  # verify_checksums=False skips file hashes, not this check
        with pytest.raises(ArtifactError) as error:
            load_manifest(artifact, verify_checksums=verify)
        assert str(error.value) == (f"artifact {artifact}: manifest.json was modified after export "
                                    "(its checksum does not match)")

    del manifest[MANIFEST_CHECKSUM_FIELD]
    manifest["cache_config"]["topn"] = 512
    path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="was modified after export"):
        load_manifest(artifact)

    path.write_text(original)
    assert load_manifest(artifact)["cache_config"] == {"topn": 512}


@pytest.fixture
def umask():
    previous = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(previous)


def test_artifact_folder_has_the_umask_permissions(tmp_path, umask):
    art = write_artifact(tmp_path / "art", _fill("previous"))
    assert art.stat().st_mode & 0o777 == 0o755
    assert (art / "weights").stat().st_mode & 0o777 == 0o755
    assert (art / "graph.bin").stat().st_mode & 0o777 == 0o644
    write_artifact(art, _fill("next"))  # the swap path
    assert art.stat().st_mode & 0o777 == 0o755
    umask(0o077)
    assert write_artifact(tmp_path / "private", _fill("x")).stat().st_mode & 0o777 == 0o700
