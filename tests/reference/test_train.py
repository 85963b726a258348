"""The training script runs, checkpoints, and resumes where it stopped (tiny model, CPU)."""
import json
import os

import pytest

from kvcompile.reference import train


def _run(out, *extra):
    argv = ["--out", str(out), "--size", "tiny", "--batch-size", "2", "--seq-len", "256",
            "--workers", "0", "--warmup-steps", "2", "--decay-steps", "2", "--log-every", "2",
            "--bpb-every-s", "1e9", "--tasks-every-s", "1e9", "--max-text-bytes", "300000",
            "--device", "cpu", "--answer-weight", "3", *extra]
    assert train.main(argv) == 0
    with open(os.path.join(out, train.LOG_FILE)) as f:
        return [json.loads(line) for line in f]


def test_train_then_resume(tmp_path):
    first = _run(tmp_path / "a", "--total-steps", "4")
    assert first[-1]["event"] == "saved" and first[-1]["step"] == 4
    losses = [r["loss"] for r in first if "loss" in r]
    assert losses and all(0 < x < 10 for x in losses)
    second = _run(tmp_path / "b", "--resume", str(tmp_path / "a"), "--total-steps", "6")
    assert second[: len(first)] == first  # the log continues the resumed one
    starts = [r for r in second if r.get("event") == "start"]
    assert starts[-1]["step"] == 4 and starts[-1]["rewarm"] is False
    assert second[-1]["step"] == 6


def test_resume_without_moments_rewarms(tmp_path):
    _run(tmp_path / "a", "--total-steps", "2", "--no-optimizer-state")
    log = _run(tmp_path / "b", "--resume", str(tmp_path / "a"), "--total-steps", "3")
    assert [r for r in log if r.get("event") == "start"][-1]["rewarm"] is True


@pytest.mark.parametrize("step,expected", [(0, 0.5), (5, 1.0), (8, 1.0), (9, 0.525)])
def test_schedule_is_warmup_stable_decay(step, expected):
    args = train.parse_args(["--out", "x", "--lr", "1", "--warmup-steps", "2", "--total-steps", "10",
                             "--decay-steps", "2", "--final-lr-frac", "0.05"])
    assert train.lr_at(step, args, resume_step=0, rewarm=False) == pytest.approx(expected)
