"""GPU decode of the KV codec beside nvCOMP ANS and LMCache's CacheGen coder, in one run.

    python bench/bench_codec_gpu.py --out DIR        # on the GPU machine (bench/gpu_codec.sh)

Workload (issue 13's anchor table): 12 chunks x 256 tokens of 8B-shaped KV, 2 x 32 layer-streams
x 1024 channels (8 KV heads x 128), Laplace symbols with a random centre and spread per channel,
31 levels (the anchors used 32 bins). The KV is built so that per-token quantisation reproduces
exactly those symbols, and coded with a bench-only codec level of 15 levels each side for K and V.

Measured, every figure on the running device:
  ours        kvc_kv_decode, all 12 chunks in one launch and one chunk per launch; fp16 KV written
              into a [L, H, T, D] cache (dequantisation included); checked bit-equal to the CPU decoder;
              both kernels side by side (v1: kv_decode.cu, v2: kv_decode_v2.cu), the top-level
              figures being the faster one's. Bitstream format 3, once per stream width (--groups,
              default 4 and 8 channels a stream; the first gives the top-level figures), and the
              fastest kernel again on the same chunks laid out as format 2 ("<kernel>_format2")
  nvCOMP ANS  the same symbols as bytes, one buffer per chunk, batched decode (symbols only)
  LMCache     torchac_cuda (CacheGen's GPU arithmetic coder), one chunk per launch (symbols only)
  sizes       bits per symbol of each, and the per-(layer, channel) empirical entropy (the bound)
  encode      our CPU reference encoder (a process per chunk), nvCOMP's and torchac's GPU encoders
  context     the same bytes over 10 / 25 / 100 Gbps links; prefilling the 3,072 tokens on a
              random-weight 8B-shaped Llama (recompute); codec sizes per level on that model's KV
              (its statistics are a random model's, not a trained one's: timing only)
  floors      bench/floors.py: HBM rates on this device; our decode vs writing its output at HBM rate
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import floors  # noqa: E402  (bench/floors.py: hardware floors and the CUDA-event timer)

# Workers are spawned, not forked: a fork of a process whose torch (or CUDA) threads are running
# can hang in the child (it did, encoding the random model's KV).
_SPAWN = multiprocessing.get_context("spawn")
BENCH_LEVEL = 9  # a bench-only level: 15 levels each side (31 symbols) for K and V
LINKS_GBPS = (10, 25, 100)


def codec_levels() -> tuple:
    """The codec's own levels (not the bench-only one)."""
    from kvcompile.codec import quantise

    return tuple(level for level in sorted(quantise.LEVELS) if level != BENCH_LEVEL)


def register_bench_level():
    from kvcompile.codec import quantise

    quantise.LEVELS.setdefault(BENCH_LEVEL, quantise.Level(quantise.Side(15, 15, 1.0), quantise.Side(15, 15, 1.0),
                                                           "bench: 31 symbols, K and V"))


def workload_symbols(chunks, tokens, layers, channels, seed=0) -> np.ndarray:
    """[chunks, 2, L, T, C] int8 symbols in -15..15; channel 0 holds ±15 so each token's abs-max is 1."""
    rng = np.random.default_rng(seed)
    centre = rng.integers(-3, 4, (1, 2, layers, 1, channels))
    spread = rng.uniform(0.7, 4.0, (1, 2, layers, 1, channels))
    symbols = np.clip(np.rint(rng.laplace(centre, spread, (chunks, 2, layers, tokens, channels))), -15, 15)
    symbols[..., 0] = np.where(rng.random(symbols[..., 0].shape) < 0.5, -15, 15)
    return symbols.astype(np.int8)


def _code_one(args):
    header, quantised = args
    register_bench_level()
    from kvcompile.codec import chunk

    began = time.perf_counter()
    data = chunk.code_chunk(header, quantised)
    return data, time.perf_counter() - began


def encode_chunks(level, layers, heads, dim, chunk_rows, workers, group=4):
    """chunk_rows: list of {"k", "v": [L, T, C] float32} -> (format-3 Header with its tables, chunk
    bytes list, wall seconds). As codec.encode: every chunk quantised, the header's tables chosen
    on all of them, then each chunk coded (a process per chunk)."""
    from kvcompile.codec import bitstream, chunk

    began = time.perf_counter()
    tokens = chunk_rows[0]["k"].shape[1]
    header = bitstream.Header(layers, heads, dim, "float16", level, group, tokens * len(chunk_rows), tokens)
    quantised = [chunk.quantise_chunk(header, rows) for rows in chunk_rows]
    header.centres, header.shapes = chunk.choose_tables(header, quantised)
    with ProcessPoolExecutor(max_workers=workers, mp_context=_SPAWN) as pool:
        results = list(pool.map(_code_one, [(header, q) for q in quantised]))
    return header, [data for data, _ in results], time.perf_counter() - began


def channel_entropy_bits(symbols: np.ndarray) -> float:
    """Mean per-(chunk, side, layer, channel) empirical entropy, bits/symbol; symbols [..., T, C]."""
    tokens, channels = symbols.shape[-2:]
    total = 0.0
    for block in symbols.reshape(-1, tokens, channels).astype(np.int64) + 128:  # [T, C]
        counts = np.bincount((np.arange(channels)[None, :] * 256 + block).ravel(), minlength=channels * 256)
        p = counts / tokens
        total += -(counts * np.log2(np.where(p > 0, p, 1))).sum()
    return total / symbols.size


def event_seconds(fn, repeats: int) -> dict:
    times = floors.event_times(fn, repeats)
    return {"best_s": min(times), "median_s": float(np.median(times))}


def bench_ours(chunks_bytes, header, repeats, kernel=None):
    """Time `kernel` on the chunks (format header.version; format 3 with the header's tables)."""
    from kvcompile.ops.kv_decode import kernels
    from kvcompile.ops.kv_decode.definition import level_tables

    device = torch.device("cuda")
    layers, heads, dim, tokens, group = header.layers, header.kv_heads, header.head_dim, header.chunk_tokens, header.group
    blob, table = kernels.packed_chunks(chunks_bytes, tokens, device)
    n = len(chunks_bytes)
    tables = kernels._kernel_tables(*level_tables(BENCH_LEVEL, layers, device))
    channel_tables = torch.from_numpy(header.channel_tables()).to(device) if header.version == 3 else None
    out = torch.empty((2, layers, heads, n * tokens, dim), dtype=torch.float16, device=device)
    status = torch.zeros(n, dtype=torch.int32, device=device)
    fmt = dict(kernel=kernel, version=header.version, channel_tables=channel_tables)

    def all_chunks():
        kernels.launch(blob, table, tables, out, layers, heads, dim, group, 1, 1, status, **fmt)

    def chunk_per_launch():
        for i in range(n):
            kernels.launch(blob, table[i:i + 1], tables, out, layers, heads, dim, group, 1, 1, status[i:i + 1], **fmt)

    one = event_seconds(all_chunks, repeats)
    kernels.check_status(status)
    each = event_seconds(chunk_per_launch, max(3, repeats // 4))
    kernels.check_status(status)
    return out, {"all_chunks_one_launch": one, "one_chunk_per_launch": each}


def bench_nvcomp(symbols: np.ndarray, repeats: int) -> dict:
    try:
        from nvidia import nvcomp
    except ImportError as error:
        return {"error": f"nvidia.nvcomp not importable: {error}"}
    stream = torch.cuda.current_stream().cuda_stream
    codec = nvcomp.Codec(algorithm="ANS", cuda_stream=stream)
    buffers = [torch.from_numpy(np.ascontiguousarray(c)).view(torch.uint8).reshape(-1).cuda() for c in symbols]
    batch = nvcomp.as_arrays(buffers)  # one chunk per buffer, decoded as one batch
    encode = event_seconds(lambda: codec.encode(batch), 3)
    encoded = codec.encode(batch)
    torch.cuda.synchronize()
    compressed = sum(encoded.buffer_sizes)
    decoded = codec.decode(encoded)
    torch.cuda.synchronize()
    same = all(torch.equal(torch.as_tensor(d, device="cuda").view(torch.uint8).reshape(-1), b)
               for d, b in zip(decoded, buffers))
    timing = event_seconds(lambda: codec.decode(encoded), repeats)
    return {"bits_per_symbol": 8 * compressed / symbols.size, "compressed_bytes": compressed, "round_trip_exact": same,
            "decode": timing, "encode_s": encode["best_s"], "version": getattr(nvcomp, "__version__", "?")}


def bench_torchac(symbols: np.ndarray, repeats: int) -> dict:
    try:
        import torchac_cuda
    except ImportError as error:
        return {"error": f"torchac_cuda not importable: {error}"}
    chunks, sides, layers, tokens, channels = symbols.shape
    results = []
    for c in range(chunks):  # LMCache layout: [layer-streams, tokens, channels], symbols 0..bins-1
        sym = torch.from_numpy((symbols[c].reshape(sides * layers, tokens, channels) + 15).astype(np.int8)).cuda()
        results.append(sym)
    bins = 32
    began = time.perf_counter()
    coded = []
    for sym in results:
        cdf = torchac_cuda.calculate_cdf(sym, bins)
        buf = torch.zeros((sym.shape[0], channels, tokens * 2), dtype=torch.uint8, device="cuda")
        lengths = torch.zeros((sym.shape[0], channels), dtype=torch.int32, device="cuda")
        torchac_cuda.encode_fast_new(cdf, sym, buf, lengths)
        coded.append((cdf, buf, lengths))
    torch.cuda.synchronize()
    encode_s = time.perf_counter() - began
    payload = sum(int(lengths.sum()) for _, _, lengths in coded)
    cdf_bytes = sum(cdf.numel() * 2 for cdf, _, _ in coded)
    outs = [torch.zeros((sides * layers, tokens, channels), dtype=torch.uint8, device="cuda") for _ in coded]

    def decode_all():
        for (cdf, buf, lengths), out in zip(coded, outs):
            torchac_cuda.decode_fast_new(cdf, buf, lengths, out)

    timing = event_seconds(decode_all, max(3, repeats // 4))
    same = all(torch.equal(o.to(torch.int8), s) for o, s in zip(outs, results))
    return {"bits_per_symbol": 8 * payload / symbols.size, "bits_per_symbol_with_cdf": 8 * (payload + cdf_bytes) / symbols.size,
            "round_trip_exact": same, "decode_one_chunk_per_launch": timing, "encode_s": encode_s}


def random_8b(tokens: int, levels, workers: int, device: str = "cuda", layers: int = 32) -> dict:
    """Prefill time and per-level codec sizes on a random-weight 8B-shaped Llama (bf16; weights
    N(0, 0.02), norms 1). `layers` < 32 keeps the first layers only (a layer's KV depends on the
    layers below it, so these are the full model's first layers' KV)."""
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    import kvcompile.codec as codec

    config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0)
    torch.manual_seed(0)
    with torch.device("meta"):  # no host-side init of 8B parameters: allocate on the GPU, fill there
        model = LlamaForCausalLM(config)
    model = model.to_empty(device=device).to(torch.bfloat16).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.fill_(1.0)
            else:
                parameter.normal_(0.0, 0.02)
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(config=config).to(device)  # its buffers were left on meta
    ids = torch.randint(0, config.vocab_size, (1, tokens), device=device)
    with torch.no_grad():
        timing = event_seconds(lambda: model(input_ids=ids, use_cache=False), 3) if device == "cuda" else None
    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
    keys = torch.stack([layer.keys[0] for layer in cache.layers]).to(torch.float16).cpu()  # [L, H, T, D]
    values = torch.stack([layer.values[0] for layer in cache.layers]).to(torch.float16).cpu()
    del model, cache
    if device == "cuda":
        torch.cuda.empty_cache()
    sample = 256  # one chunk per level: the sizes per chunk, not the whole context
    sizes = {}
    fp16 = 2 * keys[:, :, :sample].numel() * 2
    eight = 2 * keys.shape[0] * sample * (keys.shape[1] * keys.shape[3] + 4)
    with ProcessPoolExecutor(max_workers=min(workers, len(levels)), mp_context=_SPAWN) as pool:
        blobs = dict(zip(levels, pool.map(_encode_level, [(lvl, keys[:, :, :sample], values[:, :, :sample])
                                                          for lvl in levels])))
    for level, size in blobs.items():
        sizes[str(level)] = {"bytes": size, "vs_fp16": fp16 / size, "vs_8bit": eight / size}
    return {"prefill_tokens": tokens, "prefill": timing, "layers": layers, "sizes_one_chunk": sizes,
            "note": "random weights: not a trained model's statistics (timing only)"}


def _encode_level(args):
    level, keys, values = args
    import kvcompile.codec as codec

    return len(codec.encode((keys, values), level=level))


def guarded(fn, *args) -> dict:
    """A peer that fails is reported, not fatal to the run."""
    try:
        return fn(*args)
    except Exception as error:
        return {"error": f"{type(error).__name__}: {error}"}


def run_group(group, rows, symbols, entropy, pooled, kv_bytes, args, workers) -> dict:
    """Encode the workload with `group` channels a stream (format 3), and time every kernel on
    it; the fastest kernel also on the same chunks laid out as format 2 (chunk.to_format2: the
    same words, tables and u32 ends per chunk), so the formats' rates compare in one run."""
    import dataclasses

    from kvcompile.codec import bitstream, chunk

    L, H, D, T = args.layers, args.heads, args.dim, args.tokens
    header, chunks_bytes, encode_wall = encode_chunks(BENCH_LEVEL, L, H, D, rows, workers, group)
    blob = bitstream.write(header, chunks_bytes)
    coded = len(blob)
    words = sum(len(c) - chunk.Layout.of_chunk(header, T, c).words for c in chunks_bytes)
    result = {"group": group, "format": header.version}
    result["sizes"] = {
        "entropy_bits_per_symbol": entropy, "entropy_pooled_over_chunks_bits_per_symbol": pooled,
        "ours_bits_per_symbol": 8 * coded / symbols.size, "ours_words_only_bits_per_symbol": 8 * words / symbols.size,
        "ours_bytes": coded, "ours_vs_entropy": (8 * coded / symbols.size) / entropy,
        "ours_vs_entropy_pooled": (8 * coded / symbols.size) / pooled, "vs_8bit_symbols": symbols.size / coded}
    result["encode_ours_cpu"] = {"seconds": encode_wall, "workers": workers,
                                 "GBps_of_fp16_kv": kv_bytes / encode_wall / 1e9}
    print("group", group, "encoded", json.dumps(result["sizes"]), flush=True)
    ours = {}
    cpu = chunk.decode_chunk_rows(header, 0, chunks_bytes[0])  # the CPU decoder is slow: one chunk
    old = dataclasses.replace(header, version=2, centres=None, shapes=None)
    format2 = [chunk.to_format2(header, i, c) for i, c in enumerate(chunks_bytes)]
    first_out = None
    for kernel in args.kernels.split(",") + ["format2"]:
        name, fmt_header, data = kernel, header, chunks_bytes
        if kernel == "format2":  # the fastest kernel once more, on format-2 chunks
            kernel = min((k for k in ours if "error" not in ours[k]),
                         key=lambda k: ours[k]["all_chunks_one_launch"]["best_s"], default=None)
            if kernel is None:
                break
            name, fmt_header, data = f"{kernel}_format2", old, format2
        try:  # a kernel that fails or differs is reported; the other kernel and the peers still run
            out, timings = bench_ours(data, fmt_header, args.repeats, kernel)
            # bit-exact: chunk 0 against the CPU decoder, every chunk against the first kernel's output
            for side, which in enumerate(chunk.SIDES):
                want = torch.from_numpy(cpu[which]).reshape(L, T, H, D).permute(0, 2, 1, 3).to(torch.float16)
                assert torch.equal(out[side, :, :, :T].cpu(), want), f"{name}: chunk 0 {which} differs from the CPU"
            if first_out is None:
                first_out = out
            else:
                assert torch.equal(out, first_out), f"{name} differs from the first kernel on some chunk"
            del out
        except Exception as error:
            ours[name] = {"error": f"{type(error).__name__}: {error}"}
            print("ours", name, ours[name], flush=True)
            continue
        for timing in timings.values():
            timing["GBps_of_fp16_kv"] = kv_bytes / timing["best_s"] / 1e9
        timings["bit_exact_vs_cpu"] = True
        ours[name] = timings
        print("ours", group, name, json.dumps(timings), flush=True)
    del first_out
    fastest = min((k for k in ours if "error" not in ours[k] and not k.endswith("format2")),
                  key=lambda k: ours[k]["all_chunks_one_launch"]["best_s"])
    ours.update(fastest=fastest, all_chunks_one_launch=ours[fastest]["all_chunks_one_launch"],
                one_chunk_per_launch=ours[fastest]["one_chunk_per_launch"], bit_exact_vs_cpu=True)
    result["ours"] = ours
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--chunks", type=int, default=12)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--skip-8b", action="store_true")
    parser.add_argument("--kernels", default="v1,v2", help="our decoder kernels to time, comma-separated")
    parser.add_argument("--groups", default="4,8", help="channels per rANS stream to encode and time, comma-separated "
                                                         "(the first gives the top-level figures)")
    parser.add_argument("--random-8b-only", type=int, metavar="LAYERS", default=0,
                        help="only the codec sizes on the first LAYERS layers of the random 8B model, on the CPU")
    args = parser.parse_args(argv)
    if args.random_8b_only:
        result = random_8b(256, codec_levels(), 2, device="cpu", layers=args.random_8b_only)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "codec_random8b_sizes.json"), "w") as f:
            json.dump({"command": "python bench/bench_codec_gpu.py --random-8b-only "
                                  f"{args.random_8b_only} --out {args.out}", **result}, f, indent=1)
        print(json.dumps(result, indent=1))
        return 0
    register_bench_level()
    workers = min(args.chunks, os.cpu_count() or 1)
    L, H, D, T, N = args.layers, args.heads, args.dim, args.tokens, args.chunks
    C = H * D
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "workload": {"chunks": N, "tokens": T, "layer_streams": 2 * L, "channels": C, "symbols": "Laplace, 31 levels"}}
    began = time.perf_counter()
    symbols = workload_symbols(N, T, L, C)  # [N, 2, L, T, C]
    rows = [{"k": symbols[i, 0].astype(np.float32) / 15, "v": symbols[i, 1].astype(np.float32) / 15} for i in range(N)]
    kv_bytes = 2 * L * C * T * N * 2  # fp16 K and V
    entropy = channel_entropy_bits(symbols[:2])  # two chunks: the per-chunk bound per channel
    pooled = channel_entropy_bits(symbols.transpose(1, 2, 0, 3, 4).reshape(1, 2 * L, N * T, C))  # all chunks
    report["groups"] = {}
    for group in [int(g) for g in args.groups.split(",")]:
        report["groups"][str(group)] = run_group(group, rows, symbols, entropy, pooled, kv_bytes, args, workers)
        save(report, args.out)
    first = report["groups"][args.groups.split(",")[0]]  # the top-level figures: the first group's
    report.update(sizes=first["sizes"], encode_ours_cpu=first["encode_ours_cpu"], ours=first["ours"])
    print("workload, encode and ours", round(time.perf_counter() - began, 1), "s", flush=True)
    save(report, args.out)
    coded = first["sizes"]["ours_bytes"]
    ours = first["ours"]

    nv = guarded(bench_nvcomp, symbols.reshape(N, -1), args.repeats)
    if "decode" in nv:
        nv["decode"]["GBps_of_fp16_kv"] = kv_bytes / nv["decode"]["best_s"] / 1e9
        nv["encode_GBps_of_fp16_kv"] = kv_bytes / nv["encode_s"] / 1e9
    report["nvcomp_ans"] = nv
    print("nvcomp", json.dumps(nv), flush=True)
    tac = guarded(bench_torchac, symbols, args.repeats)
    if "decode_one_chunk_per_launch" in tac:
        tac["decode_one_chunk_per_launch"]["GBps_of_fp16_kv"] = kv_bytes / tac["decode_one_chunk_per_launch"]["best_s"] / 1e9
        tac["encode_GBps_of_fp16_kv"] = kv_bytes / tac["encode_s"] / 1e9
    report["lmcache_torchac"] = tac
    print("torchac", json.dumps(tac), flush=True)
    save(report, args.out)

    decode_s = ours["all_chunks_one_launch"]["best_s"]
    report["links"] = {f"{g}Gbps_s": coded * 8 / (g * 1e9) for g in LINKS_GBPS}
    report["links"]["decode_s"] = decode_s
    report["links"]["fp16_at_100Gbps_s"] = kv_bytes * 8 / 100e9
    hbm = floors.hbm_bytes_per_s()
    report["floors"] = {"hbm_bytes_per_s": hbm,
                        "write_output_at_hbm_s": kv_bytes / hbm,
                        "ours_vs_hbm_write_floor": decode_s / (kv_bytes / hbm)}
    save(report, args.out)
    if not args.skip_8b:
        try:
            report["random_8b"] = random_8b(N * T, codec_levels(), workers)
            report["links"]["recompute_prefill_s"] = report["random_8b"]["prefill"]["best_s"]
        except Exception as error:  # report, do not lose the rest of the run
            report["random_8b"] = {"error": f"{type(error).__name__}: {error}"}
    save(report, args.out)
    plot(report, os.path.join(args.out, "codec_gpu.png"))
    print(json.dumps(report, indent=1))
    return 0


def save(report: dict, folder: str) -> None:
    """Written after every step, so a run stopped at its time limit keeps what it measured."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "codec_gpu.json"), "w") as f:
        json.dump(report, f, indent=1)


def plot(report: dict, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    bars = []
    for kernel in ("v1", "v2"):
        if "all_chunks_one_launch" in report["ours"].get(kernel, {}):
            bars += [(f"ours {kernel}, 12 chunks/launch", report["ours"][kernel]["all_chunks_one_launch"]["GBps_of_fp16_kv"]),
                     (f"ours {kernel}, 1 chunk/launch", report["ours"][kernel]["one_chunk_per_launch"]["GBps_of_fp16_kv"])]
    if "decode" in report.get("nvcomp_ans", {}):
        bars.append(("nvCOMP ANS", report["nvcomp_ans"]["decode"]["GBps_of_fp16_kv"]))
    if "decode_one_chunk_per_launch" in report.get("lmcache_torchac", {}):
        bars.append(("LMCache torchac", report["lmcache_torchac"]["decode_one_chunk_per_launch"]["GBps_of_fp16_kv"]))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.barh([b[0] for b in bars], [b[1] for b in bars])
    ax.set_xlabel("GB/s of fp16 KV produced")
    ax.set_title(f"KV decode, {report['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
