"""Streaming a compressed context (kvcompile/codec/streaming.py): sources, the planner's choices
under a fast, a slow and a dropping link, and exactness of the text fallback."""
from __future__ import annotations

import json
import socket
import threading
import time

import pytest
import torch

import kvcompile
import kvcompile.errors
from kvcompile.codec import streaming
from kvcompile.codec.saved_kv import prompt_kv

CHUNK, CHUNKS = 32, 4


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    compiled = kvcompile.compile(kvcompile.load_model("reference"))
    text = ("import os\nimport sys\n\ndef main(argv):\n    for name in argv[1:]:\n        if os.path.isfile(name):\n"
            "            print(name, os.path.getsize(name))\n    return 0\n")
    ids = torch.tensor(list(text.encode()))[:CHUNK * CHUNKS]
    kv = prompt_kv(compiled, ids)
    store = {}
    meta = streaming.publish(store.__setitem__, "ctx", (kv.keys, kv.values), ids, kv.fingerprint, chunk_tokens=CHUNK,
                              levels=(1, 2, 3))
    costs = streaming.Costs.calibrate(compiled, tokens=CHUNK)
    return compiled, ids, store, meta, costs


QUERY = torch.tensor(list(b"\nif __name__ == "))


class Throttled:
    """A source whose n-th get takes len(bytes) / bandwidth(n) seconds."""

    def __init__(self, source, bandwidth):
        self.source, self.bandwidth, self.gets = source, bandwidth, 0

    def get(self, key):
        data = self.source.get(key)
        if data is not None and not key.endswith("/meta"):
            time.sleep(len(data) / self.bandwidth(self.gets))
            self.gets += 1
        return data


def test_publish_stores_every_chunk_at_every_level_and_as_text(setup):
    compiled, ids, store, meta, _ = setup
    assert meta["tokens"] == CHUNK * CHUNKS and meta["levels"] == [1, 2, 3]
    assert json.loads(store["ctx/meta"]) == meta
    for level in meta["levels"]:
        sizes = meta["bytes"][str(level)]
        assert [len(store[f"ctx/{i}/level{level}"]) for i in range(CHUNKS)] == sizes
    assert all(a > b for a, b in zip(meta["bytes"]["1"], meta["bytes"]["3"]))  # coarser is smaller
    assert store["ctx/2/text"] == ids[2 * CHUNK:3 * CHUNK].numpy().astype("<i4").tobytes()


def test_directory_and_socket_sources_serve_the_same_bytes(setup, tmp_path):
    _, _, store, _, _ = setup
    folder = streaming.DirectorySource(tmp_path)
    for key, data in store.items():
        folder.put(key, data)
    left, right = socket.socketpair()
    server = threading.Thread(target=streaming.serve, args=(folder, right), daemon=True)
    server.start()
    remote = streaming.SocketSource(left)
    for key in ("ctx/meta", "ctx/0/level2", "ctx/3/text"):
        assert folder.get(key) == store[key] and remote.get(key) == store[key]
    assert folder.get("ctx/9/level2") is None and remote.get("ctx/9/level2") is None
    left.close()
    server.join(timeout=5)
    assert not server.is_alive()


def test_the_kv_store_is_a_source(setup, tmp_path):
    from kvcompile.store import open_store

    compiled, ids, store, _, costs = setup
    with open_store(f"file://{tmp_path}/store") as kv_store:
        for key, data in store.items():
            kv_store.put(key, data)
        cache, report = streaming.StreamingLoader(compiled, kv_store, "ctx", deadline_s=30.0, costs=costs,
                                                  levels=(2,)).load()
    assert [c.choice for c in report.chunks] == [2] * CHUNKS and cache.length == CHUNK * CHUNKS


def test_a_fast_link_gets_the_best_level_everywhere(setup):
    compiled, ids, store, _, costs = setup
    loader = streaming.StreamingLoader(compiled, store, "ctx", deadline_s=30.0, costs=costs, levels=(1, 2, 3))
    cache, report, logits = loader.load(QUERY)
    assert [c.choice for c in report.chunks] == [1] * CHUNKS and cache.length == CHUNK * CHUNKS + QUERY.shape[0]
    full, _ = compiled.prefill(torch.cat([ids, QUERY])[None])
    assert report.ttft_s >= report.context_ready_s > 0
    assert torch.equal(logits[0, -1].argmax(), full[0, -1].argmax())  # level 1 keeps the next token


def test_a_slow_link_recomputes_from_text_exactly(setup):
    compiled, ids, store, _, costs = setup
    slow = Throttled(store, lambda n: 20e3)  # 20 KB/s: a chunk of the smallest level takes ~0.4 s
    loader = streaming.StreamingLoader(compiled, slow, "ctx", deadline_s=0.2, costs=costs,
                                       initial_throughput_bps=20e3)
    _, report, logits = loader.load(QUERY)
    assert [c.choice for c in report.chunks] == [streaming.TEXT] * CHUNKS
    full, _ = compiled.prefill(torch.cat([ids, QUERY])[None])
    torch.testing.assert_close(logits, full[:, -QUERY.shape[0]:], rtol=1e-4, atol=1e-4)


def test_a_dropping_link_moves_to_text_when_the_deadline_nears(setup):
    compiled, _, store, _, costs = setup
    dropping = Throttled(store, lambda n: 50e6 if n < 2 else 20e3)  # 50 MB/s, then 20 KB/s from chunk 2
    loader = streaming.StreamingLoader(compiled, dropping, "ctx", deadline_s=1.0, costs=costs, levels=(1, 2, 3),
                                       initial_throughput_bps=50e6)
    _, report = loader.load()
    # chunk 2's level was chosen before the drop; chunk 3, after it, no longer fits any level
    assert [c.choice for c in report.chunks] == [1, 1, 1, streaming.TEXT]


def test_the_planner_picks_the_best_level_that_fits():
    costs = streaming.Costs(lambda level, tokens: 0.01, lambda tokens, cached: 0.05)
    sizes = {1: [100e3] * 4, 2: [50e3] * 4, 3: [25e3] * 4}
    planner = streaming.Planner(sizes, [1000] * 4, [256] * 4, costs, deadline_s=1.0)
    assert planner.choose(0, 0.0, 1e6) == 1  # 400 KB in 0.4 s
    assert planner.choose(0, 0.0, 0.3e6) == 2  # 200 KB in 0.67 s (400 KB would take 1.33 s)
    assert planner.choose(0, 0.8, 0.3e6) == streaming.TEXT  # 0.2 s left: recompute (0.05 s) beats 0.09 s
    assert planner.choose(3, 0.99, 10e6) == 3  # nothing fits; fetching the smallest (0.0125 s) beats 0.05 s
    slow_decoder = streaming.Costs(lambda level, tokens: 0.3, lambda tokens, cached: 0.05)
    planner = streaming.Planner(sizes, [1000] * 4, [256] * 4, slow_decoder, deadline_s=1.0)
    assert planner.choose(0, 0.0, 1e9) == streaming.TEXT  # the link is fast, but 4 decodes take 1.2 s
    assert planner.choose(2, 0.0, 1e9) == 1 and planner.choose(2, 0.0, 1e9, backlog_s=0.5) == streaming.TEXT


def test_the_planner_orders_levels_by_size_not_number():
    """Level 4 (the default) is smaller than 1 and larger than 2: the planner tries levels from
    the largest published size down and falls back to the smallest, whatever their numbers."""
    costs = streaming.Costs(lambda level, tokens: 0.01, lambda tokens, cached: 0.05)
    sizes = {1: [100e3] * 4, 2: [50e3] * 4, 3: [25e3] * 4, 4: [60e3] * 4}
    planner = streaming.Planner(sizes, [1000] * 4, [256] * 4, costs, deadline_s=1.0)
    assert planner.choose(0, 0.0, 1e6) == 1  # 400 KB in 0.4 s
    assert planner.choose(0, 0.0, 0.3e6) == 4  # 240 KB in 0.81 s: fits, and larger than level 2
    assert planner.choose(0, 0.0, 0.22e6) == 2  # 240 KB would take 1.1 s; 200 KB 0.92 s
    assert planner.choose(3, 0.99, 10e6) == 3  # nothing fits: the smallest, not the highest number


def test_a_missing_context_or_chunk_is_one_line(setup):
    compiled, _, store, _, costs = setup
    with pytest.raises(streaming.StreamingError, match="no context 'other'"):
        streaming.StreamingLoader(compiled, store, "other", deadline_s=1.0, costs=costs)
    meta = dict(json.loads(store["ctx/meta"]), fingerprint="0" * 16)
    foreign = dict(store, **{"ctx/meta": json.dumps(meta).encode()})
    with pytest.raises(kvcompile.errors.InputError, match="computed by another model"):
        streaming.StreamingLoader(compiled, foreign, "ctx", deadline_s=1.0, costs=costs)
    partial = {k: v for k, v in store.items() if k != "ctx/1/level1"}
    with pytest.raises(streaming.StreamingError, match="chunk 1 of 'ctx' \\(1\\) is missing"):
        streaming.StreamingLoader(compiled, partial, "ctx", deadline_s=30.0, costs=costs, levels=(1,)).load()


def test_the_simulator_runs_the_same_planner_on_its_traces(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench" / "sim_codec_streaming.py"
    spec = importlib.util.spec_from_file_location("sim_codec_streaming", path)
    sim = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sim)
    assert sim.main(["--out", str(tmp_path), "--bits", "1:3.4,2:2.4,3:2.0", "--context", "2048"]) == 0
    result = json.loads((tmp_path / "codec_streaming.json").read_text())
    assert set(result["traces"]) == {"steady", "dropping", "bursty"} and (tmp_path / "codec_streaming.png").is_file()
    for trace in result["traces"].values():
        rows = trace["rows"]
        assert rows["level 1"]["ttft_ms"] > rows["level 2"]["ttft_ms"] > rows["level 3"]["ttft_ms"]
        assert rows["8-bit"]["bytes"] > rows["level 1"]["bytes"] > rows["text"]["bytes"]
        # adaptive is never worse than the best fixed level that meets the deadline
        meeting = [rows[f"level {n}"]["ttft_ms"] for n in (1, 2, 3) if rows[f"level {n}"]["ttft_ms"] <= 120]
        if meeting:
            assert rows["adaptive"]["ttft_ms"] <= max(meeting) + 1e-6
