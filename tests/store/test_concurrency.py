"""Several processes at once, and writers that die: readers see whole entries or none."""
from __future__ import annotations

import hashlib
import multiprocessing
import os
import random
import signal
import time

import pytest

from kvcompile.store import open_store

PROCESSES, ROUNDS, KEYS = 8, 12, ("same/0", "same/1", "same/2")


def value_for(writer: int, round_: int, size: int) -> bytes:
    """Bytes that only (writer, round) produce: a mix of two writers' bytes cannot pass."""
    seed = hashlib.sha256(f"{writer}/{round_}".encode()).digest()
    return (seed * (size // 32 + 1))[:size]


def hammer(url: str, writer: int, failures) -> None:
    """Write every key with this writer's values, read them back, check each entry is one writer's."""
    rng = random.Random(writer)
    bad = []
    try:
        check_rounds(url, writer, rng, bad)
    except Exception as error:  # a refused (torn) entry among them: report it, do not hang the parent
        bad.append(f"writer {writer}: {type(error).__name__}: {error}")
    failures.put(bad)


def check_rounds(url: str, writer: int, rng, bad: list) -> None:
    with open_store(url) as store:
        for round_ in range(ROUNDS):
            for key in KEYS:
                size = rng.choice((1_000, 300_000, 1_500_000))
                value = value_for(writer, round_, size)
                store.put(key, value, {"writer": writer, "round": round_, "sha": hashlib.sha256(value).hexdigest()})
                entry = store.get_entry(rng.choice(KEYS))  # raises if torn (checksum) or misplaced
                if entry is None:
                    continue
                meta = entry.meta
                if (hashlib.sha256(entry.payload).hexdigest() != meta["sha"]
                        or entry.payload != value_for(meta["writer"], meta["round"], len(entry.payload))):
                    bad.append(f"{entry.key}: payload is not writer {meta['writer']} round {meta['round']}'s")


def run_processes(url: str) -> list:
    context = multiprocessing.get_context("fork")
    failures = context.Queue()
    workers = [context.Process(target=hammer, args=(url, w, failures)) for w in range(PROCESSES)]
    for worker in workers:
        worker.start()
    reports = [failures.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join(timeout=30)
    assert all(worker.exitcode == 0 for worker in workers), [w.exitcode for w in workers]
    return [line for report in reports for line in report]


@pytest.mark.slow
@pytest.mark.parametrize("budget", ["", "?max_bytes=4M"], ids=["unbounded", "evicting"])
def test_eight_processes_write_and_read_the_same_keys(store_url, budget):
    assert run_processes(store_url + budget) == []
    with open_store(store_url + budget) as store:
        for key in KEYS:  # what is left is one writer's last value, whole
            entry = store.get_entry(key)
            if entry is not None:
                assert entry.payload == value_for(entry.meta["writer"], entry.meta["round"], len(entry.payload))
        stats = store.stats()
        if budget:
            assert stats["bytes"] <= 4 * 2**20
        if store.scheme == "file":  # the shared usage count agrees with the files
            assert int((store.root / "usage").read_text()) == stats["bytes"]


def die_while_writing_file(url: str, ready) -> None:
    import kvcompile.store.local as local

    def stall(_descriptor):  # the data is written, the rename has not happened: be killed here
        ready.set()
        time.sleep(60)
    local.os.fsync = stall
    open_store(url).put("dying/entry", b"k" * 5_000_000, {})


def test_file_writer_killed_mid_write_leaves_nothing_visible(tmp_path):
    url = f"file://{tmp_path / 'store'}"
    context = multiprocessing.get_context("fork")
    ready = context.Event()
    writer = context.Process(target=die_while_writing_file, args=(url, ready))
    writer.start()
    assert ready.wait(30)
    os.kill(writer.pid, signal.SIGKILL)
    writer.join()
    store = open_store(url)
    assert store.get("dying/entry") is None and store.list() == [] and store.stats()["entries"] == 0
    assert store.stats()["writes_in_flight_or_abandoned"] == 1  # the dead writer's tmp file
    assert store.gc()["abandoned_writes"] == 1 and store.stats()["writes_in_flight_or_abandoned"] == 0
    store.put("dying/entry", b"again", {})
    assert store.get("dying/entry") == b"again"


def die_while_writing_redis(url: str, ready) -> None:
    """Send half of the store's real write command, then wait to be killed."""
    import socket

    from redis.connection import Connection

    from kvcompile.store.entry import pack

    store = open_store(url)
    key = "dying/entry"
    blob = pack(key, b"k" * 5_000_000, {})
    command = b"".join(Connection().pack_command(
        "EVALSHA", store._put.sha, 3, store.prefix + key, store.lru_key, store.size_key, blob, time.time(), 0, 0,
        key, store.prefix))
    host, port = url.split("//")[1].split("/")[0].split(":")
    conn = socket.create_connection((host, int(port)))
    conn.sendall(command[:len(command) // 2])
    ready.set()
    time.sleep(60)


def test_redis_writer_killed_mid_write_leaves_nothing_visible(redis_url):
    with open_store(redis_url) as store:
        store.put("other/entry", b"x", {})  # loads the write script, as any earlier put would have
        context = multiprocessing.get_context("fork")
        ready = context.Event()
        writer = context.Process(target=die_while_writing_redis, args=(redis_url, ready))
        writer.start()
        assert ready.wait(30)
        time.sleep(0.2)  # the half command reaches the server
        os.kill(writer.pid, signal.SIGKILL)
        writer.join()
        assert store.get("dying/entry") is None
        assert [info.key for info in store.list()] == ["other/entry"] and store.stats()["entries"] == 1
        store.put("dying/entry", b"again", {})
        assert store.get("dying/entry") == b"again"
