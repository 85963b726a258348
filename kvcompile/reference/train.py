"""Train the reference model: a series of short, resumable GPU jobs.

    python -m kvcompile.reference.train --out DIR [--resume CKPT] --minutes M --total-steps N

Each job trains until `--minutes` of wall time or `--total-steps`, whichever comes first,
then writes a checkpoint to DIR (see checkpoint.py) plus `train_log.jsonl` (appended to the
log found in CKPT) and, with --final-eval, `eval.json`. The learning rate is warmup, then
constant, then a linear decay over the last `--decay-steps` steps (warmup-stable-decay), so
a run can be extended by raising --total-steps on resume as long as decay has not begun.
Data is drawn from a stream seeded by (seed, step the job started at, worker), so the same
sequence of commands gives the same data.

Jobs under a hard wall-clock limit (the long model's; see bench/gpu_train_long.sh) use three
time-based options instead of step counts, since steps per second are only known once there:
--stop-at (an absolute time: stop and save then, whatever the step), --curriculum (sequence
lengths by fraction of the job's time: "1024:0.15,2048:0.4,8192:1", tokens per step held at
--batch-tokens) and --decay-frac (the learning rate decays linearly to --final-lr-frac over
that last fraction of the job's time). The log records the step of every length switch and
of the decay's start, so a replay can read them off.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from kvcompile.reference.architecture import SIZES, context_of, reference_config
from kvcompile.reference.checkpoint import load_checkpoint, save_checkpoint
from kvcompile.reference.corpus import SequenceMixer, corpus_summary, sequence_stream, text_bytes

LOG_FILE = "train_log.jsonl"


class BatchStream(IterableDataset):
    """Endless batches ([B, T] ids, [B] source index); worker w draws stream (start, w)."""

    def __init__(self, text: np.ndarray, seq_len: int, batch_size: int, seed: int, start_step: int,
                 mix):
        self.text, self.seq_len, self.batch_size = text, seq_len, batch_size
        self.seed, self.start_step, self.mix = seed, start_step, mix

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        stream = sequence_stream(self.text, self.seq_len, self.seed,
                                 self.start_step * 1000 + worker, self.mix)
        while True:
            rows, sources = zip(*(next(stream) for _ in range(self.batch_size)))
            yield torch.from_numpy(np.stack(rows)), torch.tensor(sources, dtype=torch.long)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="checkpoint folder to write")
    p.add_argument("--resume", default=None, help="checkpoint folder to continue from")
    p.add_argument("--minutes", type=float, default=8.0, help="wall-time budget of this job")
    p.add_argument("--total-steps", type=int, default=6000)
    p.add_argument("--decay-steps", type=int, default=1500)
    p.add_argument("--warmup-steps", type=int, default=300)
    p.add_argument("--rewarm-steps", type=int, default=50, help="re-warmup when moments are absent")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--final-lr-frac", type=float, default=0.05)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=None, help="default: the model's context")
    p.add_argument("--size", default="base", choices=sorted(SIZES))
    p.add_argument("--mix", default="0.4,0.3,0.3",
                   help="text,retrieval,program[,long_program[,chain]] probabilities")
    p.add_argument("--curriculum", default=None,
                   help="SEQ:UNTIL,... sequence lengths by fraction of the job's time, e.g. 1024:0.15,2048:0.4,8192:1")
    p.add_argument("--batch-tokens", type=int, default=None,
                   help="tokens per step under --curriculum (batch = this // sequence length)")
    p.add_argument("--decay-frac", type=float, default=0.0,
                   help="decay the lr linearly over this last fraction of the job's time (0: off)")
    p.add_argument("--stop-at", type=float, default=None, help="unix time to stop training and save")
    p.add_argument("--corpus", default=None, help="a corpus pack (corpus_pack.py) to read the text from")
    p.add_argument("--export", default=None, help="after training, export bf16 weights here (final eval uses them)")
    p.add_argument("--eval-stop-at", type=float, default=None,
                   help="unix time after which final-eval tasks are skipped")
    p.add_argument("--final-ppl-windows", type=int, default=256, help="held-out windows in eval.json")
    p.add_argument("--answer-weight", type=float, default=1.0,
                   help="loss weight of tokens right after '== ' (the asserts' answers)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--bpb-every-s", type=float, default=30.0)
    p.add_argument("--tasks-every-s", type=float, default=150.0)
    p.add_argument("--save-every-s", type=float, default=180.0)
    p.add_argument("--no-optimizer-state", action="store_true", help="save weights only")
    p.add_argument("--final-eval", type=int, default=0, help="prompts per task in eval.json (0: none)")
    p.add_argument("--max-text-bytes", type=int, default=None, help="cap the text (smoke runs)")
    return p.parse_args(argv)


def lr_at(step: int, args, resume_step: int, rewarm: bool, time_frac: float = 0.0) -> float:
    """time_frac: the fraction of this job's time used so far (for --decay-frac)."""
    warm = min(1.0, (step + 1) / max(1, args.warmup_steps))
    decay_start = args.total_steps - args.decay_steps
    decay = 1.0
    if step >= decay_start:
        frac = (step - decay_start) / max(1, args.decay_steps)
        decay = 1.0 - min(1.0, frac) * (1.0 - args.final_lr_frac)
    decay_frac = getattr(args, "decay_frac", 0.0)
    if decay_frac > 0 and time_frac > 1.0 - decay_frac:
        frac = (time_frac - (1.0 - decay_frac)) / decay_frac
        decay = min(decay, 1.0 - min(1.0, frac) * (1.0 - args.final_lr_frac))
    again = min(1.0, (step - resume_step + 1) / max(1, args.rewarm_steps)) if rewarm else 1.0
    return args.lr * warm * decay * again


def parse_curriculum(args) -> list[tuple[int, float, int]]:
    """[(seq_len, until time fraction, batch size)], the last phase running to the end."""
    if not args.curriculum:
        return [(args.seq_len, 1.0, args.batch_size)]
    phases = []
    for item in args.curriculum.split(","):
        seq, _, until = item.partition(":")
        seq_len, until_frac = int(seq), float(until or 1.0)
        if seq_len > args.seq_len:
            raise SystemExit(f"--curriculum length {seq_len} exceeds the model's context {args.seq_len}")
        tokens = args.batch_tokens or args.batch_size * args.seq_len
        phases.append((seq_len, until_frac, max(1, tokens // seq_len)))
    if [p[1] for p in phases] != sorted(p[1] for p in phases):
        raise SystemExit(f"--curriculum fractions must increase: {args.curriculum}")
    return phases


_ANSWER_CUE = tuple(b"== ")


def _weighted(token_loss: torch.Tensor, ids: torch.Tensor, answer_weight: float) -> torch.Tensor:
    """Mean loss with the tokens that follow "== " weighted up: in the program documents they
    are the only predictable values (names and literals are random), so their few gradients
    would otherwise be drowned by noise."""
    if answer_weight == 1.0:
        return token_loss.mean()
    # token_loss[:, j] predicts ids[:, j + 1]; its cue is ids[:, j - 2 .. j]
    cue = torch.zeros_like(token_loss, dtype=torch.bool)
    cue[:, 2:] = ((ids[:, :-3] == _ANSWER_CUE[0]) & (ids[:, 1:-2] == _ANSWER_CUE[1])
                  & (ids[:, 2:-1] == _ANSWER_CUE[2]))
    weight = 1.0 + (answer_weight - 1.0) * cue.to(token_loss.dtype)
    return (token_loss * weight).sum() / weight.sum()


def build_optimizer(model, args, device):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 else no_decay).append(p)  # no decay on RMSNorm gains
    groups = [{"params": decay, "weight_decay": args.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
                             fused=device.type == "cuda")


def flash_gqa_available(config, device) -> bool | None:
    """Whether SDPA's flash kernel takes this model's grouped heads (else SDPA would fall back to
    the math kernel, quadratic in memory: at 8K a run would crawl). None off CUDA."""
    if device.type != "cuda":
        return None
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q = torch.randn(1, config.num_attention_heads, 256, config.head_dim, device=device, dtype=torch.bfloat16)
    kv = torch.randn(1, config.num_key_value_heads, 256, config.head_dim, device=device, dtype=torch.bfloat16)
    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            F.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=True)
        return True
    except RuntimeError:
        return False


def quick_eval(model, windows, tasks: bool, count: int = 16, suite=None, seq_len: int | None = None) -> dict:
    """Held-out bpb (and, when `tasks`, small task accuracies) for the training curve.

    suite: the model's evaluation lengths (kvcompile.eval.Suite); retrieval is scored at its
    full context and, when shorter, at the length being trained (seq_len); cross-chunk "chain"
    in its layout (and, for a long suite, at 2 chunks x 128 tokens under full prefill). Without a
    suite: retrieval at 2048 and 4 chunks x 16 lines."""
    from kvcompile.eval import HFRunner
    from kvcompile.eval.cross_chunk import score_cross_chunk
    from kvcompile.eval.perplexity import bits_per_byte
    from kvcompile.eval.retrieval import score_retrieval
    model.eval()
    runner = HFRunner(model)
    device = next(model.parameters()).device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        out = {"heldout_bpb": bits_per_byte(runner, windows, batch_size=8)["bpb"]}
        if tasks:
            lengths = (2048,) if suite is None else tuple(sorted({suite.context_lengths[-1],
                                                                  min(seq_len or 0, suite.context_lengths[-1])} - {0}))
            for length in lengths:
                out[f"retrieval_{length}"] = score_retrieval(runner, (length,), count, seed=0)[str(length)]
            layout = {} if suite is None else dict(n_chunks=suite.n_chunks, lines_per_chunk=suite.lines_per_chunk,
                                                   chunk_tokens=suite.chunk_tokens)
            chunks = score_cross_chunk(runner, count, seed=0, kinds=("chain",), **layout)["chain"]
            out["cross_chunk_prefill"] = chunks["full_prefill"]
            out["cross_chunk_reuse"] = chunks["full_reuse"]
            if suite is not None and suite.chunk_tokens:
                # The chain at short range too: copying shows here before it reaches 6 x 512.
                short = score_cross_chunk(runner, count, seed=0, kinds=("chain",), n_chunks=2,
                                          chunk_tokens=128)["chain"]
                out["cross_chunk_2x128_prefill"] = short["full_prefill"]
    model.train()
    return out


def final_eval(args, step: int, model, suite, heldout: bytes | None, write) -> None:
    """eval.json in args.out: each task written as it finishes, none started after --eval-stop-at.

    With --export, the exported bf16 folder is loaded back with plain transformers and scored
    (what ships); otherwise the training weights are."""
    from kvcompile.eval import HFRunner, evaluate, format_report
    device = next(model.parameters()).device
    if args.export:
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(args.export, attn_implementation="sdpa",
                                                     dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
        model = model.to(device)
    model.eval()
    runner = HFRunner(model)
    report = {"step": step, "weights": args.export or "training weights (fp32)", "count": args.final_eval,
              "skipped": []}
    path = os.path.join(args.out, "eval.json")
    for task in ("retrieval", "cross_chunk", "perplexity"):
        if args.eval_stop_at is not None and time.time() >= args.eval_stop_at:
            report["skipped"].append(task)
            continue
        try:
            part = evaluate(runner, tasks=(task,), count=args.final_eval, ppl_windows=args.final_ppl_windows,
                            heldout_text=heldout, **suite.as_kwargs())
        except (RuntimeError, ValueError) as err:  # the checkpoint is saved; keep the other tasks
            report[task] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}
            write({"step": step, "final_eval_error": {task: report[task]["error"]}})
        else:
            report[task] = part[task]
            write({"step": step, "final_eval": {task: part[task]}})
        with open(path, "w") as f:
            json.dump(report, f, indent=1)
    print(format_report({k: v for k, v in report.items() if not (isinstance(v, dict) and "error" in v)}), flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    from transformers import LlamaForCausalLM
    from kvcompile.eval import suite_for_context
    from kvcompile.eval.perplexity import heldout_windows

    if args.seq_len is None:
        args.seq_len = context_of(args.size)
    phases = parse_curriculum(args)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(args.seed)
    config = reference_config(args.size)
    config.max_position_embeddings = max(config.max_position_embeddings, args.seq_len)
    suite = suite_for_context(config.max_position_embeddings) if args.size.startswith("long") else None
    model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa").to(device)
    optimizer = build_optimizer(model, args, device)
    os.makedirs(args.out, exist_ok=True)
    log_path = os.path.join(args.out, LOG_FILE)

    state = {"step": 0, "tokens": 0, "seconds": 0.0}
    rewarm = False
    if args.resume:
        state, had_moments = load_checkpoint(args.resume, model, optimizer)
        rewarm = not had_moments
        old_log = os.path.join(args.resume, LOG_FILE)
        if os.path.isfile(old_log) and os.path.abspath(old_log) != os.path.abspath(log_path):
            shutil.copyfile(old_log, log_path)
    start_step = state["step"]
    log = open(log_path, "a")

    def write(record: dict) -> None:
        log.write(json.dumps(record) + "\n")
        log.flush()
        print(json.dumps(record), flush=True)

    if args.corpus:
        from kvcompile.reference.corpus_pack import load as load_pack
        pack = load_pack(args.corpus)
        train_text = pack.train[:args.max_text_bytes] if args.max_text_bytes else pack.train
        heldout, corpus = pack.heldout, {"pack": os.path.basename(args.corpus), **pack.header}
    else:
        train_text = text_bytes("train", args.max_text_bytes)
        heldout = None
        corpus = {k: v for k, v in corpus_summary().items() if k != "heldout_modules"}
    flash_gqa = flash_gqa_available(config, device)
    if flash_gqa is False:
        # Grouped heads would send SDPA to its math kernel; repeated KV heads keep it on flash.
        import transformers.integrations.sdpa_attention as sdpa_integration
        sdpa_integration.use_gqa_in_sdpa = lambda *a, **k: False
    text = np.frombuffer(train_text, dtype=np.uint8)
    mix = tuple(float(x) for x in args.mix.split(","))
    windows = heldout_windows(min(args.seq_len, 2048), 8, heldout)
    write({"event": "start", "step": start_step, "resume": args.resume, "rewarm": rewarm,
           "params": sum(p.numel() for p in model.parameters()), "text_bytes": len(text),
           "corpus": corpus, "args": vars(args), "torch": torch.__version__,
           "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
           "flash_gqa": flash_gqa})

    began = time.time()
    deadline = began + args.minutes * 60.0
    if args.stop_at is not None:
        deadline = min(deadline, args.stop_at)
    span = max(1e-6, deadline - began)
    last_bpb = last_tasks = last_save = began
    step = start_step
    n_sources = len(SequenceMixer.SOURCES)
    used_sources = [i for i in range(n_sources) if i < len(mix) and mix[i] > 0]
    loss_sum = torch.zeros(n_sources, device=device)
    loss_count = torch.zeros(n_sources, device=device)
    seconds_before = state["seconds"]
    phase, batches, decay_logged = -1, None, False

    def checkpoint() -> None:
        state.update(step=step, seconds=seconds_before + time.time() - began,
                     config=config.to_dict(), args=vars(args))
        save_checkpoint(args.out, model, optimizer, dict(state), not args.no_optimizer_state)

    model.train()
    while step < args.total_steps and time.time() < deadline:
        time_frac = (time.time() - began) / span
        want = next(i for i, p in enumerate(phases) if time_frac < p[1] or i == len(phases) - 1)
        if want != phase:
            phase = want
            seq_len, _, batch_size = phases[phase]
            del batches  # stops the previous phase's workers
            # A new stream per phase, seeded by the step it starts at (reproducible given that step).
            stream = BatchStream(text, seq_len, batch_size, args.seed, step, mix)
            loader = DataLoader(stream, batch_size=None, num_workers=args.workers,
                                pin_memory=device.type == "cuda",
                                prefetch_factor=4 if args.workers > 0 else None)
            batches = iter(loader)
            write({"event": "phase", "step": step, "seq_len": seq_len, "batch_size": batch_size,
                   "elapsed_s": round(time.time() - began, 1)})
        ids, sources = next(batches)
        ids = ids.to(device, non_blocking=True)      # [B, T]
        sources = sources.to(device, non_blocking=True)
        lr = lr_at(step, args, start_step, rewarm, time_frac)
        if args.decay_frac > 0 and not decay_logged and time_frac > 1.0 - args.decay_frac:
            decay_logged = True
            write({"event": "decay", "step": step, "elapsed_s": round(time.time() - began, 1)})
        for group in optimizer.param_groups:
            group["lr"] = lr
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(input_ids=ids, use_cache=False).logits  # [B, T, V]
        token_loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                     ids[:, 1:].reshape(-1), reduction="none").view(ids.shape[0], -1)
        loss = _weighted(token_loss, ids, args.answer_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        state["tokens"] += ids.numel()
        loss_sum.index_add_(0, sources, token_loss.detach().mean(dim=1))
        loss_count.index_add_(0, sources, torch.ones_like(sources, dtype=loss_sum.dtype))

        now = time.time()
        if step % args.log_every == 0 or step == args.total_steps:
            per_source = (loss_sum / loss_count.clamp(min=1) / math.log(2)).tolist()
            record = {"step": step, "tokens": state["tokens"], "lr": lr, "loss": float(token_loss.detach().mean()),
                      "weighted_loss": float(loss.detach()), "grad_norm": float(grad_norm), "elapsed_s": round(now - began, 1),
                      "seconds_total": round(seconds_before + now - began, 1)}
            if len(phases) > 1:
                record["seq_len"] = ids.shape[1]
            record.update({f"bpb_{SequenceMixer.SOURCES[i]}": round(per_source[i], 4) for i in used_sources})
            write(record)
            loss_sum.zero_()
            loss_count.zero_()
        # No task evaluation close to the deadline: it would run past the hard stop.
        want_tasks = now - last_tasks >= args.tasks_every_s and deadline - now > max(20.0, 0.1 * span)
        if (want_tasks or now - last_bpb >= args.bpb_every_s) and now < deadline:
            try:
                write({"step": step, "eval": quick_eval(model, windows, want_tasks, suite=suite, seq_len=ids.shape[1])})
            except (RuntimeError, ValueError) as err:  # a curve point is not worth the job
                model.train()
                write({"step": step, "eval_error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"})
            last_bpb = time.time()
            last_tasks = last_bpb if want_tasks else last_tasks
        if now - last_save >= args.save_every_s:
            checkpoint()
            last_save = time.time()

    del batches
    checkpoint()
    write({"event": "saved", "step": step, "tokens": state["tokens"],
           "job_seconds": round(time.time() - began, 1)})
    if args.export:
        from kvcompile.reference.export_weights import export
        export(args.out, args.export, args.size)
    if args.final_eval:
        final_eval(args, step, model, suite or suite_for_context(config.max_position_embeddings), heldout, write)
    log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
