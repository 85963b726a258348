"""Fuzzing the KV codec's public decoder (bench/fuzz_corpus.py has the mutations).

Each mutated or truncated bitstream must raise BitstreamError or decode to tensors of its
header's shape; a raw mutation (checksums not recomputed) that decodes must give the original
tensors. Anything else (another exception, a hang, a MemoryError from a header's claimed shape)
is a finding. The fuzzer runs in a subprocess with a 3 GiB heap limit, so a decoder that believes
a header's huge shape fails there instead of taking the machine's memory.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

FUZZER = Path(__file__).resolve().parents[2] / "bench" / "fuzz_corpus.py"


def fuzz(*args) -> dict:
    result = subprocess.run([sys.executable, str(FUZZER), *args], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)


def check(report: dict, count: int) -> None:
    assert report["findings"] == {}, json.dumps(report["findings"], indent=1)
    assert sum(report["tally"].values()) == count
    assert "raw:differs" not in report["tally"]  # the CRCs caught every raw mutation that changed a value
    # a mutant that decodes gives finite K/V: a corrupted scale is refused, not decoded to inf
    assert report["nonfinite"] == 0
    for family in ("raw", "resealed.chunk", "resealed.header"):
        assert report["tally"].get(f"{family}:error", 0) > 0  # each family reached the decoder's checks


def test_mutated_bitstreams_fail_with_the_codec_error(tmp_path):
    report = fuzz("--count", "600", "--seed", "1", "--out", str(tmp_path))
    check(report, 600)
    index = json.loads((tmp_path / "index.json").read_text())
    assert sum(item["family"] != "seed" for item in index["files"]) == report["survivors"]
    assert all((tmp_path / item["file"]).is_file() for item in index["files"])
    replayed = fuzz("--replay", str(tmp_path), "--device", "cpu")  # through the kv_decode op
    assert replayed["agree"] == replayed["files"] == len(index["files"])


@pytest.mark.slow
def test_ten_thousand_mutated_bitstreams():
    report = fuzz("--count", "10000", "--seed", "0")
    check(report, 10000)
    print(f"10,000 mutants in {report['seconds']} s: {report['tally']}")
