"""reference-long without its trained weights: shape, task layouts at its lengths, the corpus pack,
the time-limited training path (curriculum, decay, stop, resume, export) and `kvcompile eval`,
all on a tiny randomly initialised stand-in ("long-tiny": head_dim 64, GQA, 8K context)."""
import hashlib
import json
import os
import random
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from assignment_program import run_program
from kvcompile.eval import HFRunner, evaluate, format_report, suite_for_context
from kvcompile.eval import cross_chunk
from kvcompile.frontend.tokenizer import ByteTokenizer
from kvcompile.reference import LONG_WEIGHTS_DIR, corpus_pack, train
from kvcompile.reference.architecture import reference_config
from kvcompile.reference.corpus import SequenceMixer

TOK = ByteTokenizer()
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_long_model(seed: int = 0):
    from transformers import LlamaForCausalLM
    torch.manual_seed(seed)
    return LlamaForCausalLM._from_config(reference_config("long-tiny"), attn_implementation="sdpa").eval()


# --- shape --------------------------------------------------------------------------------
def test_long_shape_meets_the_issue_and_base_is_unchanged():
    from transformers import LlamaForCausalLM
    long = reference_config("long")
    assert long.head_dim >= 64 and long.num_key_value_heads < long.num_attention_heads
    assert long.max_position_embeddings >= 8192 and long.rope_parameters["rope_theta"] == 500000.0
    with torch.device("meta"):
        params = sum(p.numel() for p in LlamaForCausalLM._from_config(long).parameters())
        base = sum(p.numel() for p in LlamaForCausalLM._from_config(reference_config("base")).parameters())
    assert params * 2 <= 64_000_000  # bf16 weights
    assert params * 4 <= 4 * 15 * 2**20  # the fp32 checkpoint comes back in 4 parts of 15 MiB
    assert base == 7_739_136
    tiny = reference_config("long-tiny")
    assert (tiny.head_dim, tiny.max_position_embeddings) == (64, 8192)


# --- task layouts ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", cross_chunk.KINDS)
def test_fusion_layout_chunks_fill_512_tokens_and_answers_hold(kind):
    for index in range(8):
        ex = cross_chunk.cross_chunk_example(index, kind=kind, n_chunks=6, chunk_tokens=512)
        sizes = [len(c) for c in ex["chunks"]]
        assert sizes == [508] + [507] * 5  # header + 83 lines of 6 bytes (+ BOS on the first)
        env, _ = run_program("".join(TOK.decode(c) for c in ex["chunks"]))
        target = re.fullmatch(r"assert (\w+) == ", TOK.decode(ex["question"]))[1]
        assert env[target] == ex["answer"]
        if kind == "chain":
            assert ex["trap"] != ex["answer"]


def test_short_layout_is_what_the_first_model_was_scored_on():
    digest = hashlib.sha256()
    for i in range(4):
        for kind in cross_chunk.KINDS:
            digest.update(cross_chunk.cross_chunk_example(i, kind=kind)["text"].encode())
    assert digest.hexdigest() == "292e2ac50fbf53cb2e6a760e4d8ce90545fd40a176dc20ad42db5c4edf510889"


def test_chunk_budget_refuses_chunks_too_short():
    with pytest.raises(ValueError):
        cross_chunk.cross_chunk_example(0, n_chunks=3, chunk_tokens=20)


def test_long_training_programs_are_true_and_reach_far_back():
    doc = cross_chunk.training_long_program_doc(random.Random(4), 8000)
    _, asserts = run_program(doc)
    assert len(asserts) > 20 and all(got == want for got, want in asserts)
    assert "assert" not in "".join(TOK.decode(c) for c in cross_chunk.cross_chunk_example(0, chunk_tokens=512,
                                                                                        n_chunks=6)["chunks"])
    # Some copy reads a name last assigned more than 100 lines earlier: the long lookups the
    # evaluation's chain needs.
    last, far = {}, 0
    for n, line in enumerate(doc.splitlines()):
        if m := re.fullmatch(r"(\w+) = ([A-Za-z])", line):
            far = max(far, n - last.get(m[2], n))
        if m := re.fullmatch(r"(\w+) = \w+", line):
            last[m[1]] = n
    assert far > 100


def test_three_source_mix_draws_exactly_as_before():
    text = np.frombuffer(bytes(range(32, 127)) * 200, dtype=np.uint8)
    mixer, rng = SequenceMixer(text, 512, (0.4, 0.3, 0.3)), random.Random(7)
    seqs = [mixer.sequence(rng) for _ in range(20)]
    assert [s for _, s in seqs] == [0, 0, 0, 0, 2, 1, 1, 0, 2, 1, 1, 0, 1, 2, 2, 1, 0, 0, 2, 0]
    digest = hashlib.sha256(b"".join(ids.tobytes() for ids, _ in seqs)).hexdigest()
    assert digest == "a197a561d8c23ef529baac069485bb8364331e65ff4db82f8c1a1af4706f8db7"
    four, rng = SequenceMixer(text, 512, (0.1, 0.1, 0.1, 0.7)), random.Random(1)
    assert {four.sequence(rng)[1] for _ in range(30)} == {0, 1, 2, 3}
    with pytest.raises(ValueError):
        SequenceMixer(text, 512, (1.0, 1.0))


def test_suites_by_context():
    short, long = suite_for_context(2048), suite_for_context(8192)
    assert short.context_lengths == (512, 1024, 2048) and short.lines_per_chunk == 16 and not short.chunk_tokens
    assert long.context_lengths == (2048, 4096, 8192) and (long.n_chunks, long.chunk_tokens) == (6, 512)
    assert long.ppl_window == short.ppl_window == 2048  # bits per byte compare across models


def test_evaluate_at_long_layouts_on_a_random_stand_in():
    runner = HFRunner(tiny_long_model())
    heldout = bytes(range(32, 127)) * 20
    torch.set_num_threads(1)
    report = evaluate(runner, count=1, ppl_windows=2, context_lengths=(96, 128), n_chunks=3,
                      chunk_tokens=64, ppl_window=128, heldout_text=heldout)
    assert set(report["retrieval"]) >= {"96", "128"}
    cc = report["cross_chunk"]
    assert (cc["n_chunks"], cc["chunk_tokens"]) == (3, 64) and cc["prompt_tokens"] <= 3 * 64 + len("assert x == ")
    assert report["perplexity"]["window"] == 128 and report["perplexity"]["bytes"] == 2 * 127
    assert "3 chunks <= 64 tokens" in format_report(report)


# --- corpus pack ------------------------------------------------------------------------------
def test_corpus_pack_round_trip_and_corruption(tmp_path):
    root = tmp_path / "lib"
    (root / "json").mkdir(parents=True)
    (root / "json" / "__init__.py").write_text("x = 1\n" * 50)
    (root / "typing.py").write_text("y = 2\n" * 30)  # a held-out module (crc32 bucket 3)
    path = tmp_path / "pack.xz"
    path.write_bytes(corpus_pack.build(str(root)))
    pack = corpus_pack.load(str(path))
    assert pack.train == b"x = 1\n" * 50 and pack.heldout == b"y = 2\n" * 30
    assert pack.header["train_bytes"] == len(pack.train) and pack.text("heldout") == pack.heldout
    assert corpus_pack.build(str(root)) == path.read_bytes()  # deterministic
    import lzma
    raw = lzma.decompress(path.read_bytes())
    path.write_bytes(lzma.compress(raw[:-3] + b"zzz"))
    with pytest.raises(ValueError, match="sha256"):
        corpus_pack.load(str(path))


# --- training path ------------------------------------------------------------------------------
def _train(out, *extra):
    argv = ["--out", str(out), "--size", "long-tiny", "--workers", "0", "--warmup-steps", "2",
            "--log-every", "2", "--bpb-every-s", "1e9", "--tasks-every-s", "1e9", "--max-text-bytes", "200000",
            "--device", "cpu", "--answer-weight", "3", "--mix", "0.3,0.2,0.2,0.3", "--no-optimizer-state",
            "--batch-tokens", "256", *extra]
    assert train.main(argv) == 0
    with open(os.path.join(out, train.LOG_FILE)) as f:
        return [json.loads(line) for line in f]


def test_curriculum_decay_stop_resume_and_export(tmp_path):
    torch.set_num_threads(1)
    first = _train(tmp_path / "a", "--minutes", "0.06", "--total-steps", "100000",
                   "--curriculum", "64:0.4,128:1", "--decay-frac", "0.3", "--export", str(tmp_path / "w"))
    phases = [(r["seq_len"], r["batch_size"]) for r in first if r.get("event") == "phase"]
    assert phases == [(64, 4), (128, 2)]
    assert any(r.get("event") == "decay" for r in first)
    saved = first[-1]
    assert saved["event"] == "saved" and saved["step"] > 2 and saved["job_seconds"] < 30
    assert {"bpb_long_program", "bpb_text"} <= set(next(r for r in first if "loss" in r))

    second = _train(tmp_path / "b", "--resume", str(tmp_path / "a"), "--total-steps", str(saved["step"] + 2),
                    "--curriculum", "128:1")
    assert second[:len(first)] == first
    start = [r for r in second if r.get("event") == "start"][-1]
    assert start["step"] == saved["step"] and start["rewarm"] is True  # no moments: re-warm
    assert second[-1]["step"] == saved["step"] + 2

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "w")
    assert model.config.head_dim == 64 and model.config.max_position_embeddings == 8192
    assert AutoTokenizer.from_pretrained(tmp_path / "w")("ab")["input_ids"] == [97, 98]


def test_a_failing_curve_point_does_not_stop_training(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")
    monkeypatch.setattr(train, "quick_eval", broken)
    log = _train(tmp_path / "a", "--total-steps", "3", "--seq-len", "64", "--bpb-every-s", "0")
    assert any("eval_error" in r and "simulated" in r["eval_error"] for r in log)
    assert log[-1]["event"] == "saved" and log[-1]["step"] == 3


@pytest.mark.parametrize("step,frac,expected", [(5, 0.0, 1.0), (5, 0.7, 1.0), (5, 0.85, 0.525), (5, 1.0, 0.05)])
def test_time_based_decay(step, frac, expected):
    args = train.parse_args(["--out", "x", "--lr", "1", "--warmup-steps", "2", "--total-steps", "1000000",
                             "--decay-steps", "1", "--decay-frac", "0.3", "--final-lr-frac", "0.05"])
    assert train.lr_at(step, args, resume_step=0, rewarm=False, time_frac=frac) == pytest.approx(expected)


def test_curriculum_parsing():
    args = train.parse_args(["--out", "x", "--size", "long", "--curriculum", "1024:0.15,2048:0.4,8192:1",
                             "--batch-tokens", "65536"])
    args.seq_len = 8192
    assert train.parse_curriculum(args) == [(1024, 0.15, 64), (2048, 0.4, 32), (8192, 1.0, 8)]
    args.curriculum = "16384:1"
    with pytest.raises(SystemExit):
        train.parse_curriculum(args)


def test_long_curve_plots(tmp_path):
    pytest.importorskip("matplotlib")
    from kvcompile.reference.plot_curve import plot
    records = [{"event": "phase", "step": 0, "seq_len": 1024, "batch_size": 64},
               {"step": 50, "tokens": 3276800, "loss": 2.0, "bpb_text": 2.5, "bpb_retrieval": 2.2,
                "bpb_program": 1.5, "bpb_long_program": 1.4, "elapsed_s": 5.0},
               {"step": 50, "eval": {"heldout_bpb": 2.6, "retrieval_1024": 0.1, "retrieval_8192": 0.0,
                                     "cross_chunk_prefill": 0.1, "cross_chunk_reuse": 0.1}},
               {"event": "phase", "step": 60, "seq_len": 8192, "batch_size": 8},
               {"event": "decay", "step": 90},
               {"step": 100, "tokens": 6553600, "loss": 1.5, "bpb_text": 2.0, "bpb_retrieval": 2.0,
                "bpb_program": 1.2, "bpb_long_program": 1.1, "elapsed_s": 9.0},
               {"step": 100, "eval": {"heldout_bpb": 2.1, "retrieval_8192": 0.5, "cross_chunk_prefill": 0.4,
                                      "cross_chunk_reuse": 0.2, "cross_chunk_2x128_prefill": 0.6}}]
    log = tmp_path / "train_log.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    plot(str(log), str(tmp_path / "curve.png"))
    assert (tmp_path / "curve.png").stat().st_size > 10_000


def test_quick_eval_of_a_long_suite_scores_the_chain_at_short_range_too():
    torch.set_num_threads(1)
    windows = [[TOK.bos_id] + list(range(32, 95))]
    out = train.quick_eval(tiny_long_model(), windows, tasks=True, count=1, suite=suite_for_context(8192),
                           seq_len=256)
    assert {"retrieval_8192", "retrieval_256", "cross_chunk_prefill", "cross_chunk_2x128_prefill"} <= set(out)


# --- loading and the CLI ---------------------------------------------------------------------
def test_reference_long_resolves_by_name():
    from kvcompile.errors import LoadError
    from kvcompile.frontend.loading import BUNDLED_MODELS, bundled_model_dir
    assert "reference-long" in BUNDLED_MODELS
    if os.path.isfile(os.path.join(LONG_WEIGHTS_DIR, "config.json")):
        assert str(bundled_model_dir("reference-long")) == LONG_WEIGHTS_DIR
    else:
        with pytest.raises(LoadError, match="gpu_train_long.sh"):
            bundled_model_dir("reference-long")


def test_cli_eval_takes_length_options(tmp_path):
    folder = tmp_path / "long"
    tiny_long_model().save_pretrained(folder)
    TOK.save(str(folder))
    out = tmp_path / "r.json"
    from kvcompile.cli.main import main
    rc = main(["eval", str(folder), "--runner", "hf", "--tasks", "retrieval,cross_chunk", "--samples", "1",
               "--lengths", "128,192", "--chunks", "2", "--chunk-tokens", "64", "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert set(report["retrieval"]) >= {"128", "192"}
    assert (report["cross_chunk"]["n_chunks"], report["cross_chunk"]["chunk_tokens"]) == (2, 64)


def test_cli_length_defaults_follow_the_model():
    from types import SimpleNamespace
    from kvcompile.cli.eval_command import suite_from
    model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=8192))
    assert suite_from(SimpleNamespace(), model) == suite_for_context(8192)
    override = suite_from(SimpleNamespace(lengths=(16384,), ppl_window=8192), model)
    assert override.context_lengths == (16384,) and override.ppl_window == 8192 and override.chunk_tokens == 512


# --- the GPU script, end to end on the CPU ---------------------------------------------------------
@pytest.mark.slow  # ~2-3 minutes on 2 busy cores
def test_gpu_script_runs_end_to_end_on_cpu(tmp_path):
    root = tmp_path / "lib"
    root.mkdir()
    for i in range(40):
        (root / f"mod{i}.py").write_text(f"def f{i}(x):\n    return x + {i}\n" * 200)
    (root / "typing.py").write_text("T = 1\n" * 2000)
    pack = tmp_path / "pack.xz"
    pack.write_bytes(corpus_pack.build(str(root)))
    env = dict(os.environ, SIZE="long-tiny", TRAIN_S="30", EVAL_S="60", HARD_S="150",
               CURRICULUM="128:0.5,256:1", BATCH_TOKENS="512", WORKERS="1", FINAL_EVAL="1", PPL_WINDOWS="2",
               TASKS_EVERY="1e9", OUT=str(tmp_path / "out"), CORPUS=str(pack),
               EXPORT_DIR=str(tmp_path / "export"), PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    done = subprocess.run(["bash", os.path.join(REPO, "bench", "gpu_train_long.sh")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert "train exit: 0" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
    ckpt = tmp_path / "out" / "ckpt"
    names = sorted(p.name for p in ckpt.iterdir())
    assert names == ["eval.json", "model.safetensors.part00", "state.json", "train_log.jsonl"]
    report = json.loads((ckpt / "eval.json").read_text())
    assert {"retrieval", "cross_chunk"} <= set(report) and report["cross_chunk"]["chunk_tokens"] == 512
    assert set(report["retrieval"]) >= {"2048", "4096", "8192"}
    assert len(list((tmp_path / "out").rglob("*"))) <= 9  # 8 files + the ckpt folder

    # The resume job, as documented: from the exported bf16 folder, with the resume defaults
    # (five-share mix with chain documents, curriculum 2048 -> 4096 -> 8192).
    env.update(RESUME=str(tmp_path / "export"), TRAIN_S="20", EVAL_S="25", HARD_S="90", FINAL_EVAL="0",
               LOG_EVERY="2", OUT=str(tmp_path / "out2"), EXPORT_DIR=str(tmp_path / "export2"))
    del env["CURRICULUM"]
    done = subprocess.run(["bash", os.path.join(REPO, "bench", "gpu_train_long.sh")], env=env,
                          capture_output=True, text=True, timeout=200)
    assert "train exit: 0" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
    log = [json.loads(line) for line in (tmp_path / "out2" / "ckpt" / "train_log.jsonl").read_text().splitlines()]
    start = [r for r in log if r.get("event") == "start"][-1]
    assert start["resume"] == str(tmp_path / "export") and start["step"] == report["step"]
    assert start["args"]["mix"] == "0.2,0.05,0.25,0.05,0.45"
    assert start["args"]["curriculum"] == "2048:0.4,4096:0.9,8192:1"
    assert any("bpb_chain" in r for r in log[log.index(start):])


# --- the shipped weights, once exported into weights_long/ ---------------------------------------
needs_weights = pytest.mark.skipif(not os.path.isfile(os.path.join(LONG_WEIGHTS_DIR, "config.json")),
                                   reason="reference-long is not trained yet (bench/gpu_train_long.sh)")


@needs_weights
def test_shipped_long_weights_fit_the_limits_and_load_with_plain_transformers():
    import glob
    from transformers import AutoModelForCausalLM, AutoTokenizer
    files = glob.glob(os.path.join(LONG_WEIGHTS_DIR, "*"))
    assert sum(os.path.getsize(f) for f in files) <= 64_000_000
    shards = glob.glob(os.path.join(LONG_WEIGHTS_DIR, "*.safetensors"))
    assert shards and all(os.path.getsize(s) <= 15_000_000 for s in shards)
    model = AutoModelForCausalLM.from_pretrained(LONG_WEIGHTS_DIR)
    config = model.config
    assert config.head_dim >= 64 and config.num_key_value_heads < config.num_attention_heads
    assert config.max_position_embeddings >= 8192 and next(model.parameters()).dtype == torch.bfloat16
    assert AutoTokenizer.from_pretrained(LONG_WEIGHTS_DIR)("ab")["input_ids"] == [97, 98]
    with torch.no_grad():
        logits = model(torch.tensor([[256, 100, 101]])).logits
    assert logits.shape == (1, 3, 259) and torch.isfinite(logits).all()
