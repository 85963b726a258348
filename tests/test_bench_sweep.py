"""bench/bench_kcache_op.py's main tail of the GPU sweep scripts (sweep_parser, run_sweep):
the no-GPU refusal, and the JSON each writes to --out."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_kcache_op  # noqa: E402
from bench_kcache_op import run_sweep, sweep_parser  # noqa: E402


def test_run_sweep_refuses_without_a_gpu(monkeypatch, tmp_path):
    monkeypatch.setattr(bench_kcache_op.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sys, "argv", ["bench_example.py", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="bench_example.py needs a CUDA GPU"):
        run_sweep(sweep_parser("doc"), "x.json", lambda args: pytest.fail("ran without a GPU"))
    assert not list(tmp_path.iterdir())


def test_run_sweep_writes_the_result_under_out(monkeypatch, tmp_path):
    monkeypatch.setattr(bench_kcache_op.torch.cuda, "is_available", lambda: True)
    out = tmp_path / "new" / "dir"
    monkeypatch.setattr(sys, "argv", ["bench_example.py", "--out", str(out), "--n", "3"])
    parser = sweep_parser("doc")
    parser.add_argument("--n", type=int, default=1)
    result = run_sweep(parser, "example.json", lambda args: dict(n=args.n, path=out))
    assert result["n"] == 3
    assert json.loads((out / "example.json").read_text()) == dict(n=3, path=str(out))  # default=str
