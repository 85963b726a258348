"""Runtimes timed by bench_kcache_e2e.py: the model, kvcompile's full and kcache caches, HF peers.

Each `run_*` fills a cache with synthetic K/V of `args.context` positions, times decode steps
and returns a row dict (step_ms, attention_ms of one step's attention ops, peak GPU memory).
"""
from __future__ import annotations

import gc
import inspect
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kcache_op import time_calls, time_graph  # noqa: E402  (shared timing)
from floors import hbm_bytes_per_s, host_to_device_bytes_per_s, link_rate  # noqa: E402  (measured on the running device)
from kernel_timeline import profile_kernels  # noqa: E402

GIB = 2**30


# model ---------------------------------------------------------------------------------------
# The model shapes the benchmark runs (random weights). "1b" is where KV dominates a step; "8b" is
# the KCache paper's regime (issue 12, part 5): 16 GB of weights read every step, so the batch a
# fixed KV budget holds, which K-only caching doubles, decides the throughput.
MODEL_SHAPES = {
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                 intermediate_size=256, vocab_size=1000),
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=8192, vocab_size=32000),  # head_dim 64
    "8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=14336, vocab_size=128256),  # Llama-3-8B's shape, head_dim 128
}


def llama_config(model: str, context: int):
    from transformers import LlamaConfig

    return LlamaConfig(**MODEL_SHAPES[model], max_position_embeddings=max(32768, 2 * context),
                       tie_word_embeddings=False, attn_implementation="sdpa")


def build_model(config, device: torch.device, dtype: torch.dtype):
    """Random weights, created directly on the device in the target dtype (the trace needs both)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.to(device=device, dtype=dtype).eval()


class Shape:
    """The cache-relevant numbers of the model (layers, heads, head_dim, element size)."""

    def __init__(self, config, dtype: torch.dtype):
        self.layers = config.num_hidden_layers
        self.query_heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.element = torch.empty((), dtype=dtype).element_size()

    def kv_row_bytes(self) -> int:  # one token's K (or V) of one layer, all KV heads
        return self.kv_heads * self.head_dim * self.element


def _split_suffix(name: str, marker: str, default: int) -> tuple[str, int]:
    head, _, tail = name.rpartition(marker)
    return (head, int(tail)) if head and tail.isdigit() else (name, default)


def pipeline_parts_of(name: str) -> int:
    """Batch slices the kcache op pipelines inside each layer ($KVC_PIPELINE_PARTS):
    "kvc_kcache_layer_p4" -> 4, "..._p1" -> 1 (off); 0 without the suffix (the library's rule)."""
    return _split_suffix(name, "_p", 0)[1]


def microbatches_of(name: str) -> int:
    """How many micro-batches a runtime's name asks for: "kvc_kcache_layer_mb2" -> 2, else 1."""
    return _split_suffix(_split_suffix(name, "_p", 0)[0], "_mb", 1)[1]


def base_runtime(name: str) -> str:
    """The runtime without its micro-batching or pipelining: "kvc_kcache_layer_mb2" and
    "kvc_kcache_layer_p4" -> "kvc_kcache_layer" (same cache, batch and floor; only the step is split)."""
    return _split_suffix(_split_suffix(name, "_p", 0)[0], "_mb", 1)[0]


def gpu_kv_bytes_per_token(name: str, shape: Shape) -> int:
    """Bytes of cache per token that stay on the GPU across a step."""
    name = base_runtime(name)
    row = shape.kv_row_bytes()
    if name == "kvc_full" or name == "hf_dynamic":
        return 2 * shape.layers * row
    if name.startswith("kvc_kcache"):
        return shape.layers * row  # K only (full_layers = 0)
    if name == "hf_offloaded":
        return 2 * 2 * row  # the layer being computed + the prefetched next one
    raise ValueError(name)


def host_kv_bytes_per_token(name: str, shape: Shape) -> int:
    """Bytes of cache per token kept in host memory between steps."""
    name = base_runtime(name)
    if name == "hf_offloaded":
        return 2 * shape.layers * shape.kv_row_bytes()
    if name.startswith("kvc_kcache"):
        return shape.layers * shape.kv_row_bytes()  # V, token-major and pinned
    return 0


# timing --------------------------------------------------------------------------------------
def reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device):
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


def free_memory(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        # freed pinned buffers stay cached by torch's host allocator; give them back to the OS
        # so the next runtime's host cache does not stack on the previous one's
        getattr(torch._C, "_host_emptyCache", lambda: None)()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def attention_floor_ms(name: str, shape: Shape, batch: int, context: int, topn: int) -> float:
    """Per decode step, all layers: the bytes the attention must move / the rate they move at
    (the same for a micro-batched step: its micro-batches move the batch's bytes between them)."""
    name = base_runtime(name)
    kv_bytes = batch * context * shape.kv_row_bytes()  # one layer's K (or V)
    if name in ("kvc_full", "hf_dynamic"):
        per_layer = 2 * kv_bytes / hbm_bytes_per_s()
    elif name == "hf_offloaded":
        per_layer = 2 * kv_bytes / host_to_device_bytes_per_s()
    else:
        kept = min(topn, context)
        if name.endswith("layer"):
            row_bytes, rows = shape.kv_row_bytes(), batch * kept
        else:
            row_bytes, rows = shape.head_dim * shape.element, batch * shape.kv_heads * kept
        per_layer = kv_bytes / hbm_bytes_per_s() + rows * row_bytes / link_rate(row_bytes)
    return per_layer * shape.layers * 1e3


# kvcompile runtimes ----------------------------------------------------------------------------
def fill_kvcompile_cache(cache, context: int, seed: int = 0) -> None:
    """Make `cache` look like it holds `context` prefilled positions of random normal K/V."""
    generator = torch.Generator(device=cache.device).manual_seed(seed)
    batch, spec = cache.batch, cache.spec
    for layer in range(spec.num_layers):
        cache.keys[layer][:, :, :context].normal_(generator=generator)  # [B, Hkv, ctx, D]
        if cache.is_host_layer(layer):
            # generated on the device in one go, then one copy into the pinned token-major buffer
            values = torch.randn(batch, context, spec.kv_heads, spec.head_dim, dtype=cache.dtype,
                                 device=cache.device, generator=generator)  # [B, ctx, Hkv, D]
            cache.values[layer][:, :context].copy_(values)
            del values
        else:
            cache.values[layer][:, :, :context].normal_(generator=generator)
    cache.length = context
    cache.valid = torch.ones(batch, context, dtype=torch.bool, device=cache.device)
    cache.positions = torch.arange(context, device=cache.device).expand(batch, -1).contiguous()
    sync(cache.device)


def kvcompile_attention_ms(compiled, cache, args, device):
    """One layer's attention op on the filled cache (what the graph calls) -> (ms, whether a
    kcache call runs the CUDA kernels rather than the torch reference; None for full layers)."""
    spec = cache.spec
    batch, dtype = cache.batch, cache.dtype
    generator = torch.Generator(device=device).manual_seed(1)
    query = torch.randn(batch, spec.query_heads, 1, spec.head_dim, dtype=dtype, device=device, generator=generator)
    key = torch.randn(batch, spec.kv_heads, 1, spec.head_dim, dtype=dtype, device=device, generator=generator)
    value = torch.randn_like(key)
    past_key, past_value = cache.past(0)
    bias = torch.zeros(batch, 1, 1, cache.length + 1, dtype=dtype, device=device)
    scale = spec.head_dim ** -0.5
    config = compiled.cache_config
    uses_kernels = None
    if cache.is_host_layer(0):
        if device.type == "cuda":
            from kvcompile.ops.kcache_attention import kernels as kcache_decode

            uses_kernels = kcache_decode.can_use_kernels(query, key, value, past_key, past_value, bias)
        topn = config.topn_for(cache.length + 1)
        fn = lambda: torch.ops.kvcompile.kcache_attention(  # noqa: E731
            query, key, value, past_key, past_value, bias, scale, topn, config.select.value, config.renormalize)
    else:
        from kvcompile.ops.cached_attention import decode_backends

        def fn():  # one shape repeated, as the CUDA-graph decoder runs it (cuDNN is a candidate)
            with decode_backends.static_past_length():
                return torch.ops.kvcompile.cached_attention(query, key, value, past_key, past_value, bias, scale)
    eager_ms = time_calls(fn, device, args.warmup, args.steps)
    graph_ms = time_graph(fn, args.steps) if device.type == "cuda" else None
    return eager_ms, graph_ms, uses_kernels


def sdpa_backends_ms(cache, device, iters: int) -> dict:
    """One layer's decode attention on this cache's shape through stock torch SDPA (GQA, no
    mask, K/V [B, Hkv, ctx, D] already on the GPU: no copy), each fused backend forced, CUDA
    graph replay; ms, or why it did not run."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    spec, batch = cache.spec, cache.batch
    query = torch.randn(batch, spec.query_heads, 1, spec.head_dim, dtype=cache.dtype, device=device)
    keys = cache.keys[0][:, :, : cache.length]
    values = cache.values[0][:, :, : cache.length] if not cache.is_host_layer(0) else torch.randn_like(keys)
    out = {}
    for backend in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"):
        def attention(backend=backend):
            with sdpa_kernel(getattr(SDPBackend, backend)):
                return torch.nn.functional.scaled_dot_product_attention(query, keys, values, enable_gqa=True)
        try:
            attention()
            out[backend.split("_")[0].lower()] = time_graph(attention, iters)
        except RuntimeError as error:
            out[backend.split("_")[0].lower()] = f"not run: {str(error).splitlines()[0][:200]}"
    return out


def capacity(args, rows: int = 2) -> int:
    """Cache positions to allocate: the context plus every step that the `rows` runtimes sharing
    the cache append to it, two timed runs of warm-up + steps each (eager and graph-replayed, or
    micro-batches overlapped and serial); a full buffer would double itself (cache.reserve).
    The graph-replayed steps attend this whole capacity."""
    return args.context + 2 * rows * (args.warmup + args.steps) + 8


def compile_timed(model, cache_config):
    """(compiled model, seconds the compile took)."""
    start_s = time.perf_counter()
    import kvcompile

    # kvcompile.frontend.trace defers shape guards to run time, which torch 2.11 +
    # transformers 5.17 (the GPU machine's versions) need; no workaround is needed here.
    compiled = kvcompile.compile(model, cache_config)
    return compiled, time.perf_counter() - start_s


def filled_cache(compiled, batch: int, args, cache=None, rows: int = 2):
    """`cache` if given (a cache of the same layout, shared by the runtimes of one kind), else
    a new one filled with `args.context` synthetic positions."""
    if cache is None:
        cache = compiled.new_cache(batch, capacity(args, rows))
        fill_kvcompile_cache(cache, args.context)
    return cache


def run_kvcompile(model, cache_config, batch: int, args, device, cache=None, rows: int = 2):
    """Compile for `cache_config`, fill a cache (or reuse `cache`), time decode steps -> (row, cache)."""
    compiled, compile_s = compile_timed(model, cache_config)
    cache = filled_cache(compiled, batch, args, cache, rows)
    next_ids = torch.randint(0, model.config.vocab_size, (batch,), device=device)

    def step():
        nonlocal next_ids
        logits = compiled.decode_step(next_ids, cache)  # [B, 1, V]
        next_ids = logits[:, -1].argmax(dim=-1)

    reset_peak(device)
    eager_step_ms = time_calls(step, device, args.warmup, args.steps)
    row = dict(eager_step_ms=eager_step_ms, step_ms=eager_step_ms, step_mode="eager",
               compile_s=round(compile_s, 1), cache_capacity=cache.capacity)
    if args.cuda_graph and device.type == "cuda":
        try:
            decoder = compiled.cuda_graph_decoder(cache)

            def graph_step():
                nonlocal next_ids
                next_ids = decoder.step(next_ids)[:, -1].argmax(dim=-1)

            row["graph_step_ms"] = time_calls(graph_step, device, args.warmup, args.steps)
            row["step_ms"], row["step_mode"] = row["graph_step_ms"], "cuda_graph"
            if args.profile:
                row["timeline"] = profile_kernels(graph_step, calls=2)
            del decoder
        except Exception as error:  # noqa: BLE001 - keep the eager row, say why
            import traceback

            traceback.print_exc()
            row["graph_error"] = f"{type(error).__name__}: {error}"[:1000]
    row.update(peak_gpu_gib=peak_gib(device), cache_device_gib=cache.device_bytes() / GIB,
               context_at_end=cache.length)
    if args.split:
        attention_eager, attention_graph, row["cuda_kernels"] = kvcompile_attention_ms(compiled, cache, args, device)
        row["attention_eager_ms"] = attention_eager * cache.spec.num_layers
        row["attention_ms"] = (attention_graph or attention_eager) * cache.spec.num_layers
        if not cache.is_host_layer(0) and device.type == "cuda":
            from kvcompile.ops.cached_attention import decode_backends

            row["full_decode_backends"] = decode_backends.chosen()
            row["sdpa_backends_ms_per_layer"] = sdpa_backends_ms(cache, device, args.steps)
    return row, cache


def time_microbatched(decoder, ids, args, device, overlap: bool):
    """Mean ms per greedy step of every micro-batch (`args.warmup` steps first), and the last
    ids. The caller's stream waits for all micro-batches before the end event: the steps
    themselves never join."""
    for _ in range(args.warmup):
        ids = decoder.greedy_step(ids, overlap)
    decoder.join()
    sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    start_s = time.perf_counter()
    for _ in range(args.steps):
        ids = decoder.greedy_step(ids, overlap)
    decoder.join()
    if device.type != "cuda":
        return (time.perf_counter() - start_s) * 1e3 / args.steps, ids
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / args.steps, ids


def run_kvcompile_microbatched(model, cache_config, batch: int, parts: int, args, device, cache=None,
                               rows: int = 2):
    """The batch decoded as `parts` micro-batches over row views of one cache
    (kvcompile/runtime/microbatch.py): their captured steps replayed concurrently on their own
    streams (step_ms), then the same graphs one after the other on one stream (serial_step_ms:
    what micro-batching costs without the overlap) -> (row, cache)."""
    from kvcompile.runtime.microbatch import MicroBatchDecoder

    compiled, compile_s = compile_timed(model, cache_config)
    cache = filled_cache(compiled, batch, args, cache, rows)
    reset_peak(device)
    capture = device.type == "cuda" and args.cuda_graph
    decoder = MicroBatchDecoder(compiled, cache, parts, capture=capture, priorities=args.mb_priorities)
    ids = decoder.split(torch.randint(0, model.config.vocab_size, (batch,), device=device))
    step_ms, ids = time_microbatched(decoder, ids, args, device, overlap=True)
    serial_ms, ids = time_microbatched(decoder, ids, args, device, overlap=False)
    row = dict(step_ms=step_ms, serial_step_ms=serial_ms, overlap_speedup=serial_ms / step_ms,
               step_mode="cuda_graph" if capture else "static_eager", microbatches=len(decoder.sizes),
               microbatch_sizes=decoder.sizes, stream_priorities=args.mb_priorities,
               compile_s=round(compile_s, 1), cache_capacity=cache.capacity,
               peak_gpu_gib=peak_gib(device), cache_device_gib=cache.device_bytes() / GIB,
               context_at_end=decoder.caches[0].length)
    if args.profile and device.type == "cuda":
        def overlapped_step():
            nonlocal ids
            ids = decoder.greedy_step(ids, True)
            decoder.join()

        row["timeline"] = profile_kernels(overlapped_step, calls=2)
    print(f"  micro-batches {decoder.sizes}: overlapped {step_ms:.2f} ms, serial {serial_ms:.2f} ms a step",
          flush=True)
    del decoder
    return row, cache


# HF peers --------------------------------------------------------------------------------------
def cache_classes() -> dict:
    """What the installed transformers calls its caches (names change between releases)."""
    from transformers import cache_utils

    names = sorted(n for n in dir(cache_utils) if n.endswith("Cache"))
    offloading = "offloading" in inspect.signature(cache_utils.DynamicCache.__init__).parameters
    return dict(cache_classes=names, dynamic_cache_has_offloading=offloading)


def offloaded_cache(config):
    """The offloaded cache of the installed transformers, and the name it goes by there."""
    from transformers import cache_utils

    if "offloading" in inspect.signature(cache_utils.DynamicCache.__init__).parameters:
        return cache_utils.DynamicCache(config=config, offloading=True), "DynamicCache(offloading=True)"
    return cache_utils.OffloadedCache(), "OffloadedCache"


def filled_hf_cache(model, batch: int, context: int, offloading: bool, device, seed: int = 0):
    from transformers import DynamicCache

    shape = Shape(model.config, model.dtype)
    cache, cache_name = offloaded_cache(model.config) if offloading else (DynamicCache(config=model.config), "DynamicCache")
    generator = torch.Generator(device=device).manual_seed(seed)
    for layer in range(shape.layers):
        kv_shape = (batch, shape.kv_heads, context, shape.head_dim)  # [B, Hkv, ctx, D]
        keys = torch.randn(kv_shape, dtype=model.dtype, device=device, generator=generator)
        values = torch.randn(kv_shape, dtype=model.dtype, device=device, generator=generator)
        cache.update(keys, values, layer)  # offloading: moves the layer to host memory as generate would
        del keys, values
    sync(device)
    return cache, cache_name


def hf_attention_ms(model, cache, args, device) -> float:
    """One layer of what HF attention does per decode step: DynamicLayer.update's torch.cat of
    K and V, then SDPA with GQA (no mask: generate drops the all-ones mask for sdpa), ms."""
    shape = Shape(model.config, model.dtype)
    keys, values = cache.layers[0].keys, cache.layers[0].values  # [B, Hkv, ctx, D]
    batch = keys.shape[0]
    query = torch.randn(batch, shape.query_heads, 1, shape.head_dim, dtype=model.dtype, device=device)
    new = torch.randn(batch, shape.kv_heads, 1, shape.head_dim, dtype=model.dtype, device=device)

    def attention():
        all_keys, all_values = torch.cat([keys, new], dim=-2), torch.cat([values, new], dim=-2)
        return torch.nn.functional.scaled_dot_product_attention(query, all_keys, all_values, enable_gqa=True)

    return time_calls(attention, device, args.warmup, args.steps)


@torch.no_grad()
def run_hf(name: str, model, batch: int, args, device) -> dict:
    offloading = name == "hf_offloaded"
    cache, cache_name = filled_hf_cache(model, batch, args.context, offloading, device)
    next_ids = torch.randint(0, model.config.vocab_size, (batch, 1), device=device)
    position = args.context

    def step():
        nonlocal next_ids, position
        positions = torch.full((batch, 1), position, dtype=torch.long, device=device)
        out = model(input_ids=next_ids, position_ids=positions, past_key_values=cache, use_cache=True)
        next_ids = out.logits[:, -1:].argmax(dim=-1)  # [B, 1]
        position += 1

    reset_peak(device)
    warmup, steps = (args.offload_warmup, args.offload_steps) if offloading else (args.warmup, args.steps)
    step_ms = time_calls(step, device, warmup, steps)
    row = dict(step_ms=step_ms, cache_class=cache_name, peak_gpu_gib=peak_gib(device),
               context_at_end=cache.get_seq_length(), warmup=warmup, steps=steps)
    if args.split and not offloading:
        row["attention_ms"] = hf_attention_ms(model, cache, args, device) * model.config.num_hidden_layers
    del cache
    return row
