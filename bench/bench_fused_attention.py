"""The fused prefill's recompute attention, kernel by kernel: which way to mask it is fastest.

KV fusion recomputes S chosen chunk tokens (scattered positions) and the Q-token question over the
fused cache of P positions. Each query sees the cache positions before its own (the chosen
tokens' stale rows hidden) and the new keys at positions up to its own. Today the op attends
with an explicit additive bias [1, 1, S+Q, P+S+Q] through torch SDPA, which picks cuDNN; on the
H200 that ran at ~87 TFLOP/s (11.5 ms of the 8B recompute's ~37 ms of GPU time,
docs/fusion_profile.txt). Rows, each timed replayed from a CUDA graph (device time only), on the
8B benchmark's shape (S=461, Q=64, P=3072, 32/8 heads, d=128, bf16):
  sdpa_bias_cudnn       SDPA with the dense bias, cuDNN backend forced (today's dispatch)
  sdpa_bias_efficient   the same, memory-efficient backend
  sdpa_bias_default     the same, SDPA's own choice
  flex_mask             FlexAttention (torch.compile) with the visibility as a mask_mod over
                        per-query / per-key positions: a block-sparse mask, no dense bias
  sdpa_no_mask_flash    no mask at all: the same FLOPs with nothing to read or skip, the
                        kernel-speed floor this attention could reach
  *_gqa_packed          the same with each KV head's 4 query heads stacked as one query
                        sequence ([1, Hkv, 4·(S+Q), D], the bias repeated): 4x the rows per
                        head, one quarter of the heads — fewer, fuller tiles for 525 queries
  sdpa_bias_efficient_expanded  the memory-efficient kernel with K/V repeated to 32 heads (it
                        refuses GQA with a bias)
  op_recompute_parts_N  the op's whole multi-token step (past ++ new, then the attention) with the
                        keys unsplit (N=1: SDPA, cuDNN) or in N parts merged by log-sum-exp
                        (ops/cached_attention/split_keys.py); op_probe_parts_N the same for the
                        question probe's shape (Q queries after the whole past, no chosen rows)
  concat_*              the op's past ++ new of one K (or V): torch.cat of the strided cache view
                        against two copies into one buffer (ops/cached_attention past_then_new)
The outputs of the masked rows are checked against the fp32 reference (a row that disagrees is
reported, not timed). Writes fused_attention.json to --out.

    python bench/bench_fused_attention.py --out DIR          # GPU
    python bench/bench_fused_attention.py --device cpu --tiny --out /tmp/x   # code paths only
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import floors  # noqa: E402  (bench/floors.py: the timers every benchmark shares)
from kvcompile.runtime.cuda_graph import capture_graph


def visibility(selected: torch.Tensor, past: int, query: int):
    """Positions of the S+Q queries and of the P+S+Q keys (the cache, then the new keys), and
    which keys are stale (the chosen tokens' reused rows)."""
    device = selected.device
    q_pos = torch.cat([selected, torch.arange(past, past + query, device=device)])
    k_pos = torch.cat([torch.arange(past, device=device), q_pos])
    stale = torch.zeros(k_pos.shape[0], dtype=torch.bool, device=device)
    stale[selected] = True
    return q_pos, k_pos, stale


def dense_bias(q_pos, k_pos, stale, dtype):
    visible = (k_pos[None, :] <= q_pos[:, None]) & ~stale[None, :]
    bias = torch.zeros(visible.shape, dtype=dtype, device=q_pos.device)
    return bias.masked_fill_(~visible, torch.finfo(dtype).min)[None, None]


def device_ms(fn, device, repeats: int) -> float:
    """Best ms of `fn` replayed from a CUDA graph (eager wall time on the CPU)."""
    if device.type != "cuda":
        return floors._best_seconds(fn, device, repeats) * 1e3
    graph, _ = capture_graph(fn, device)
    return min(floors.event_times(graph.replay, repeats)) * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    device = torch.device(args.device)
    S, Q, P, HQ, HKV, D = (12, 4, 64, 4, 2, 16) if args.tiny else (461, 64, 3072, 32, 8, 128)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    generator = torch.Generator().manual_seed(0)
    selected = torch.randperm(P, generator=generator)[:S].sort().values.to(device)
    q_pos, k_pos, stale = visibility(selected, P, Q)
    query = torch.randn(1, HQ, S + Q, D, generator=generator).to(device, dtype)
    keys = torch.randn(1, HKV, P + S + Q, D, generator=generator).to(device, dtype)
    values = torch.randn(1, HKV, P + S + Q, D, generator=generator).to(device, dtype)
    scale = D ** -0.5
    bias = dense_bias(q_pos, k_pos, stale, dtype)
    expected = F.scaled_dot_product_attention(query.float(), keys.float(), values.float(),
                                              attn_mask=dense_bias(q_pos, k_pos, stale, torch.float32), scale=scale,
                                              enable_gqa=True)
    tolerance = 3e-2 if dtype == torch.bfloat16 else 1e-4
    rows, notes = {}, {}

    def row(name, fn):
        try:
            got = fn()
            error = (got.float() - expected).abs().max().item()
            if error > tolerance:
                notes[name] = f"not timed: max |error| {error:.3g} > {tolerance}"
            else:
                rows[name] = round(device_ms(fn, device, args.repeats), 4)
        except Exception as error:  # noqa: BLE001  (a backend that refuses the call is reported)
            notes[name] = f"not measured: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        print(f"{name:24s} {rows.get(name, notes.get(name))}", flush=True)

    def sdpa(backend=None, mask=bias):
        def call():
            return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scale, enable_gqa=True)
        if backend is None:
            return call

        def forced():
            with sdpa_kernel(backend):
                return call()
        return forced

    row("sdpa_bias_cudnn", sdpa(SDPBackend.CUDNN_ATTENTION))
    row("sdpa_bias_efficient", sdpa(SDPBackend.EFFICIENT_ATTENTION))
    row("sdpa_bias_default", sdpa())
    group = HQ // HKV
    packed_query = query.view(1, HKV, group * (S + Q), D)  # heads h·group .. h·group+group-1 -> KV head h
    packed_bias = bias.repeat(1, 1, group, 1)

    def packed(backend, mask):
        def call():
            with sdpa_kernel(backend):
                out = F.scaled_dot_product_attention(packed_query, keys, values, attn_mask=mask, scale=scale)
            return out.view(1, HQ, S + Q, D)
        return call

    row("sdpa_bias_cudnn_gqa_packed", packed(SDPBackend.CUDNN_ATTENTION, packed_bias))
    row("sdpa_bias_efficient_gqa_packed", packed(SDPBackend.EFFICIENT_ATTENTION, packed_bias))
    expanded_keys, expanded_values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)

    def expanded():
        with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
            return F.scaled_dot_product_attention(query, expanded_keys, expanded_values, attn_mask=bias, scale=scale)
    row("sdpa_bias_efficient_expanded", expanded)
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        def mask_mod(b, h, q_idx, kv_idx):
            return (k_pos[kv_idx] <= q_pos[q_idx]) & ~stale[kv_idx]

        block_mask = create_block_mask(mask_mod, 1, 1, S + Q, P + S + Q, device=str(device))
        flex = torch.compile(flex_attention, dynamic=False)
        row("flex_mask", lambda: flex(query, keys, values, block_mask=block_mask, scale=scale, enable_gqa=True))
    except Exception as error:  # noqa: BLE001
        notes["flex_mask"] = f"not measured: {type(error).__name__}: {str(error).splitlines()[0]}"
        print(f"{'flex_mask':24s} {notes['flex_mask']}", flush=True)
    unmasked = sdpa(SDPBackend.FLASH_ATTENTION if device.type == "cuda" else None, mask=None)
    try:
        rows["sdpa_no_mask_flash"] = round(device_ms(unmasked, device, args.repeats), 4)
    except Exception as error:  # noqa: BLE001
        notes["sdpa_no_mask_flash"] = f"not measured: {type(error).__name__}"
    # the op's past ++ new: torch.cat of a strided cache view vs two copies (past_then_new)
    from kvcompile.ops.cached_attention.definition import past_then_new, split_step

    capacity = torch.zeros(1, HKV, P + 2 * (S + Q), D, device=device, dtype=dtype)
    past_view, new_rows = capacity[:, :, :P], keys[:, :, P:].contiguous()
    rows["concat_torch_cat"] = round(device_ms(lambda: torch.cat([past_view, new_rows], dim=2), device,
                                               args.repeats), 4)
    rows["concat_two_copies"] = round(device_ms(lambda: past_then_new(past_view, new_rows), device, args.repeats), 4)
    if device.type == "cuda":
        try:
            rows["sdpa_no_mask_flash_gqa_packed"] = round(device_ms(packed(SDPBackend.FLASH_ATTENTION, None), device,
                                                                    args.repeats), 4)
        except Exception as error:  # noqa: BLE001
            notes["sdpa_no_mask_flash_gqa_packed"] = f"not measured: {type(error).__name__}"
    # the op itself (past ++ new and the attention), unsplit and with its keys in parts
    # (ops/cached_attention/split_keys.py), on this shape and on the question probe's (Q queries
    # after the whole past, no chosen rows)
    from kvcompile.ops.cached_attention import split_keys

    def op_rows(label, q, past_k, new_k, past_v, new_v, mask, want):
        def unsplit():
            return F.scaled_dot_product_attention(q, past_then_new(past_k, new_k), past_then_new(past_v, new_v),
                                                  attn_mask=mask, scale=scale, enable_gqa=True)
        chosen = split_keys.parts_for_call(q, past_k.shape[2] + new_k.shape[2])
        notes[f"{label}_parts_chosen"] = chosen
        for parts in (1, 2, 3, 4, 6, 8):
            name = f"{label}_parts_{parts}"
            def split(parts=parts):  # the op's split path: past ++ new padded to whole parts, then the parts
                return split_step(q, new_k, new_v, past_k, past_v, mask, scale, parts)
            fn = unsplit if parts == 1 else split
            try:
                error = (fn().float() - want).abs().max().item()
                if error > tolerance:
                    notes[name] = f"not timed: max |error| {error:.3g} > {tolerance}"
                else:
                    rows[name] = round(device_ms(fn, device, args.repeats), 4)
            except Exception as error:  # noqa: BLE001
                notes[name] = f"not measured: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            print(f"{name:24s} {rows.get(name, notes.get(name))}", flush=True)

    op_rows("op_recompute", query, keys[:, :, :P], keys[:, :, P:], values[:, :, :P], values[:, :, P:], bias, expected)
    probe_q_pos = torch.arange(P, P + Q, device=device)
    probe_k_pos = torch.arange(P + Q, device=device)
    no_stale = torch.zeros(P + Q, dtype=torch.bool, device=device)
    probe_query = query[:, :, S:].contiguous()
    probe_keys, probe_values = keys[:, :, :P + Q], values[:, :, :P + Q]
    probe_expected = F.scaled_dot_product_attention(
        probe_query.float(), probe_keys.float(), probe_values.float(), scale=scale, enable_gqa=True,
        attn_mask=dense_bias(probe_q_pos, probe_k_pos, no_stale, torch.float32))
    op_rows("op_probe", probe_query, probe_keys[:, :, :P], probe_keys[:, :, P:], probe_values[:, :, :P],
            probe_values[:, :, P:], dense_bias(probe_q_pos, probe_k_pos, no_stale, dtype), probe_expected)
    flops = 4 * (S + Q) * (P + S + Q) * D * HQ
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "shape": {"selected": S, "query": Q, "past": P, "query_heads": HQ,
                                                    "kv_heads": HKV, "head_dim": D, "dtype": str(dtype)},
              "ms": rows, "tflops": {k: round(flops / (v * 1e-3) / 1e12, 1) for k, v in rows.items()
                                     if not k.startswith(("concat", "op_probe"))},
              "notes": notes, "date": time.strftime("%Y-%m-%d %H:%M")}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fused_attention.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
