"""`kvcompile store ls|put|get|rm|stats|gc --store URL`, and what open_store accepts."""
from __future__ import annotations

import pytest
import torch

from kvcompile.cli.main import main
from kvcompile.store import CacheKey, StoreURLError, open_store
from kvcompile.store.local import LocalStore
from test_backends import chunk_cache


def run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_cli_round_trip(store_url, tmp_path, capsys):
    chunk = chunk_cache(tokens=300, dtype=torch.float32)
    chunk.save(tmp_path / "chunk.safetensors")
    store = ["--store", store_url]
    code, output = run(["store", "put", str(tmp_path / "chunk.safetensors"), *store], capsys)
    assert code == 0
    key = output.strip().splitlines()[-1]
    assert CacheKey.parse(key)[0].pieces == 2
    code, output = run(["store", "ls", *store], capsys)
    assert code == 0 and "2 entries" in output and "raw-safetensors" in output and "256..300" in output
    code, output = run(["store", "get", key, "-o", str(tmp_path / "back.safetensors"), *store], capsys)
    assert code == 0 and "300 tokens, 3 layers" in output
    from kvcompile.fusion.chunks import ChunkCache

    back = ChunkCache.load(tmp_path / "back.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(chunk.keys + chunk.values, back.keys + back.values))
    code, output = run(["store", "get", f"{key}/1", "-o", str(tmp_path / "piece.bin"), *store], capsys)
    assert code == 0 and (tmp_path / "piece.bin").read_bytes()[:8]  # safetensors bytes of piece 1
    code, output = run(["store", "stats", *store], capsys)
    assert code == 0 and "entries" in output
    code, output = run(["store", "gc", "--verify", *store], capsys)
    assert code == 0 and "refused: 0" in output
    code, output = run(["store", "rm", key, *store], capsys)
    assert code == 0 and "removed 2 entries" in output
    code, output = run(["store", "get", key, "-o", str(tmp_path / "x"), *store], capsys)
    assert code == 3 and "some piece is missing" in output and "Traceback" not in output


def test_cli_integrity_key_file(tmp_path, capsys, monkeypatch):
    chunk_cache(tokens=10).save(tmp_path / "chunk.safetensors")
    (tmp_path / "secret").write_bytes(b"a-secret-of-more-than-16-bytes\n")
    store = ["--store", f"file://{tmp_path / 'store'}"]
    code, output = run(["store", "put", str(tmp_path / "chunk.safetensors"), *store], capsys)
    key = output.strip().splitlines()[-1]
    code, output = run(["store", "get", key, "-o", str(tmp_path / "x"), *store, "--integrity-key-file",
                        str(tmp_path / "secret")], capsys)
    assert code == 3 and "carries no HMAC and this store requires one" in output
    monkeypatch.setenv("KVCOMPILE_STORE_KEY", "a-secret-of-more-than-16-bytes")
    assert run(["store", "put", str(tmp_path / "chunk.safetensors"), *store], capsys)[0] == 0
    assert run(["store", "get", key, "-o", str(tmp_path / "x"), *store], capsys)[0] == 0


def test_urls(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    store = open_store("file://~/kv?max_bytes=2G&ttl=1h")
    assert isinstance(store, LocalStore) and store.root == tmp_path / "kv"
    assert store.budget_bytes == 2 * 2**30 and store.ttl == 3600
    assert open_store(str(tmp_path / "plain")).root == tmp_path / "plain"
    assert open_store(f"file://{tmp_path}/x", max_bytes="512M").budget_bytes == 512 * 2**20
    for url, message in (("s3://bucket", "unknown store URL scheme 's3'"),
                         (f"file://{tmp_path}?max_bytes=lots", "max_bytes 'lots' is not a positive amount"),
                         (f"file://{tmp_path}?ttl=-1", "ttl '-1' is not a positive amount"),
                         (f"file://{tmp_path}?colour=red", "unknown file store option(s) colour"),
                         ("file:///proc/kvstore", "cannot use /proc/kvstore as a store folder")):
        with pytest.raises(StoreURLError, match=message.replace("(", r"\(").replace(")", r"\)")):
            open_store(url)
    with pytest.raises(StoreURLError, match="at least 16"):
        open_store(f"file://{tmp_path}", integrity_key="short")
    with pytest.raises(StoreURLError, match="must be 1-400 characters"):
        open_store(f"file://{tmp_path}").put("bad key with spaces", b"x")
