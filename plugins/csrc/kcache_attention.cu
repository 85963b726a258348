// C ABI entry of the KCache decode step: checks the arguments, plans tilings and workspace,
// maps the pinned host buffer into the device address space and enqueues the six stages.
#include <cstdlib>
#include <string>

#include "kcache_internal.h"

namespace kvc {
namespace {

thread_local std::string last_error;

int fail(int code, const std::string& message) {
  last_error = message;
  return code;
}

constexpr int kPipelineGatherCtas = 64;  // the fetch's grid cap when pipelined

size_t align256(size_t x) { return (x + 255) & ~size_t(255); }

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

int make_plan(const kvc_kcache_decode_args* a, KCachePlan* p) {
  if (!a) return fail(KVC_ERR_ARGUMENT, "kcache_decode: args is NULL");
  if (a->batch < 1 || a->query_heads < 1 || a->kv_heads < 1 || a->head_dim < 1)
    return fail(KVC_ERR_ARGUMENT, "kcache_decode: batch, heads and head_dim must be >= 1");
  if (a->query_heads % a->kv_heads)
    return fail(KVC_ERR_ARGUMENT, "kcache_decode: query_heads must be a multiple of kv_heads");
  if (a->past_len < 1) return fail(KVC_ERR_ARGUMENT, "kcache_decode: past_len must be >= 1 (prefill has no selection)");
  if (a->tokens < 1) return fail(KVC_ERR_ARGUMENT, "kcache_decode: tokens must be >= 1");
  if (a->topn < 1) return fail(KVC_ERR_ARGUMENT, "kcache_decode: topn must be >= 1");
  if (!(a->softcap >= 0.f) || isinf(a->softcap)) return fail(KVC_ERR_ARGUMENT, "kcache_decode: softcap must be finite and >= 0");
  if (a->select != KVC_SELECT_HEAD && a->select != KVC_SELECT_LAYER)
    return fail(KVC_ERR_ARGUMENT, "kcache_decode: select must be KVC_SELECT_HEAD or KVC_SELECT_LAYER");
  if (a->dtype != KVC_DTYPE_F32 && a->dtype != KVC_DTYPE_F16 && a->dtype != KVC_DTYPE_BF16)
    return fail(KVC_ERR_ARGUMENT, "kcache_decode: dtype must be KVC_DTYPE_F32, _F16 or _BF16");
  const int elem = a->dtype == KVC_DTYPE_F32 ? 4 : 2;
  if ((a->head_dim * elem) % 16 || a->head_dim > 512)
    return fail(KVC_ERR_ARGUMENT, "kcache_decode: head_dim * element size must be a multiple of 16 bytes, head_dim <= 512");
  const void* ptrs[] = {a->query, a->key, a->value, a->key_cache, a->value_host, a->out};
  for (const void* ptr : ptrs)
    if (!ptr || !aligned16(ptr)) return fail(KVC_ERR_ARGUMENT, "kcache_decode: tensor pointers must be non-NULL and 16-byte aligned");
  if (!a->attn_bias) return fail(KVC_ERR_ARGUMENT, "kcache_decode: attn_bias is NULL");
  const int64_t strides[] = {a->query_stride_b, a->query_stride_h, a->query_stride_t,
                             a->key_stride_b, a->key_stride_h, a->key_stride_t,
                             a->value_stride_b, a->value_stride_h, a->value_stride_t,
                             a->key_cache_stride_b, a->key_cache_stride_h, a->key_cache_stride_p,
                             a->value_host_stride_b, a->value_host_stride_p};
  for (int64_t s : strides)
    if ((s * elem) % 16) return fail(KVC_ERR_ARGUMENT, "kcache_decode: strides must be multiples of 16 bytes");

  KCachePlan& q = *p;
  q.B = a->batch; q.Hq = a->query_heads; q.Hkv = a->kv_heads; q.P = a->past_len;
  q.T = a->tokens; q.S = q.P + q.T; q.D = a->head_dim; q.G = q.Hq / q.Hkv;
  q.QR = q.Hq * q.T; q.GR = q.G * q.T;
  q.N = a->topn < q.S ? a->topn : q.S;
  q.elem_bytes = elem;
  const bool layer = a->select == KVC_SELECT_LAYER;
  q.select_rows = layer ? 1 : q.Hkv;
  q.heads_per_select = layer ? q.Hq : q.G;
  q.rows_per_select = q.heads_per_select * q.T;
  // Tensor cores take 8 query heads per mma (fewer are zero-padded: the bytes of K, not the
  // arithmetic, set the time); fp32 keeps exact fp32 products on the FMA kernel.
  q.mma_scores = elem == 2 && q.D <= 256;
  q.group_tile = q.mma_scores ? 8 : q.GR <= 1 ? 1 : q.GR <= 2 ? 2 : q.GR <= 4 ? 4 : 8;
  q.head_tiles = (q.GR + q.group_tile - 1) / q.group_tile;
  // 8 loads in flight per lane (3 CTAs per SM): the faster of the two in bench_kcache_op.py
  // --score-sweep on the H200. Keys per CTA: 2048 was the fastest of 1024 / 2048 / 4096 at 32K,
  // B=8 (156.8 µs against 163.8-195.1), but that grid is 2.6 waves of the GPU's CTA slots with
  // its last wave part-full, and one sequence's grid is a fraction of one wave:
  // choose_score_tile fits the tile to the GPU's slots (bench/bench_score_tiles.py).
  // Tuning knobs of the tensor-core score pass, read for the benchmark's sweep
  // ($KVC_SCORE_LOADS: 8 or 16; $KVC_SCORE_TILE: keys per CTA, a multiple of 256).
  q.score_loads = 8;
  if (const char* v = getenv("KVC_SCORE_LOADS")) q.score_loads = atoi(v) >= 16 ? 16 : 8;
  q.row_elems = layer ? q.Hkv * q.D : q.D;
  const int row_bytes = q.row_elems * elem;
  // The fetch is bound by the host link, not by SMs: a few dozen CTAs keep enough loads in
  // flight. Capping its grid leaves the other SMs to a concurrent stream's kernels (another
  // micro-batch's score pass and GEMMs, runtime/microbatch.py); uncapped, its thousands of
  // CTAs hold every SM for the whole fetch. $KVC_GATHER_CTAS sets the cap (0: none).
  q.gather_ctas = 0;
  if (const char* v = getenv("KVC_GATHER_CTAS")) q.gather_ctas = atoi(v) > 0 ? atoi(v) : 0;
  // Batch slices pipelined inside the op (kvc_kcache_decode): a slice's fetch runs while the
  // next slice's scores read K. Each slice adds its own latency-bound stages (top-N, launch
  // gaps: ~20-50 µs on the H200), so two slices pay only when both the K pass and the fetch
  // are long: measured at 32K (B=8, N=512: 0.36 vs 0.37-0.39 ms; the 8B model's B=30, N=512
  // layers: 1.12x the step) and not at 8K or for N <= 128 (docs/BENCHMARKS.md).
  // $KVC_PIPELINE_PARTS overrides (1: off).
  const double k_bytes = (double)q.B * q.Hkv * q.S * q.D * elem;
  const double fetch_bytes = (double)q.B * q.select_rows * q.N * q.row_elems * elem;
  const int rule_parts = q.B >= 2 && k_bytes >= 256e6 && fetch_bytes >= 8e6 ? 2 : 1;
  q.pipeline_parts = rule_parts;
  if (const char* v = getenv("KVC_PIPELINE_PARTS"); v && *v) q.pipeline_parts = atoi(v) > 1 ? atoi(v) : 1;
  if (q.pipeline_parts > q.B) q.pipeline_parts = q.B;
  // A pipelined fetch needs few CTAs (it waits on the link); uncapped, its grid would hold the
  // SMs the next slice's score pass needs. $KVC_GATHER_CTAS still overrides.
  if (q.pipeline_parts > 1 && !q.gather_ctas) q.gather_ctas = kPipelineGatherCtas;
  // The score tile is fitted to the grid one launch scores: the larger slice of the rule's
  // (a B=30 call in two slices scores 15 sequences a launch: 2560 keys, where B=30's own fit,
  // 4096, costs a 15-sequence launch 8%). Every slice shares the tile (the workspace holds
  // their tile statistics), and $KVC_PIPELINE_PARTS does not move it, so an overridden
  // slicing stays bit-identical to one call.
  const int64_t launch_batch = (q.B + rule_parts - 1) / rule_parts;
  q.score_tile = q.mma_scores ? choose_score_tile(launch_batch * q.Hkv * q.head_tiles, q.S,
                                                  score_slots(q.D, q.score_loads))
                              : 512;
  if (const char* v = getenv("KVC_SCORE_TILE"); v && q.mma_scores) {
    const int tile = atoi(v);
    if (tile >= 256 && tile % 256 == 0) q.score_tile = tile;
  }
  q.score_tiles = (q.S + q.score_tile - 1) / q.score_tile;
  // Kept rows per gather item: 16 KiB. A capped fetch grid (pipelined: a few dozen CTAs)
  // needs that many loads in flight per CTA; elsewhere it costs nothing measurable. Measured
  // on the H200 (op, graph ms at 8 / 16 KiB items, docs/BENCHMARKS.md, ninth session): the 8B
  // model's B=30, 32K, N=512 "layer" in 2 slices 1.040 / 1.006, 4 slices 1.087 / 0.983, one
  // 1.241 / 1.231; B=8 (8K and 32K, N = 64-512, both modes) within 1% either way except 8K
  // N=512 "layer" 0.254 / 0.249 and 32K N=512 "head" in 2 slices 0.356 / 0.361. One size for
  // every call keeps pipelined slices bit-identical to one call (same chunks, same sums).
  // Fewer rows when the probabilities of many query rows (T > 1) must share the CTA's shared
  // memory. $KVC_GATHER_BYTES overrides (1-48 KiB), for the benchmark's sweep.
  int item_bytes = 16384;
  if (const char* v = getenv("KVC_GATHER_BYTES"); v && *v) {
    item_bytes = atoi(v);
    item_bytes = item_bytes < 1024 ? 1024 : item_bytes > 49152 ? 49152 : item_bytes;
  }
  q.gather_rows = item_bytes / row_bytes;
  q.gather_rows = q.gather_rows < 1 ? 1 : q.gather_rows > 256 ? 256 : q.gather_rows;
  while (q.gather_rows > 1 && gather_smem_bytes(q) > 48 * 1024) --q.gather_rows;
  q.gather_chunks = (q.N + q.gather_rows - 1) / q.gather_rows;
  if (gather_smem_bytes(q) > 48 * 1024)
    return fail(KVC_ERR_ARGUMENT, "kcache_decode: a fetched row and the probabilities of its query rows (heads x tokens) are too wide for one CTA");
  if ((int64_t)q.B * q.Hkv * q.head_tiles > 65535 || (int64_t)q.B * q.select_rows > 65535)
    return fail(KVC_ERR_ARGUMENT, "kcache_decode: too many batch rows for one launch");

  const size_t BH = (size_t)q.B * q.QR;  // query rows of the batch
  size_t off = 0;
  q.off_logits = off;     off += align256(BH * q.S * sizeof(float));
  q.off_tile_stats = off; off += align256(BH * q.score_tiles * sizeof(MaxSum));
  q.off_stats = off;      off += align256(BH * sizeof(MaxSum));
  q.off_select = off;     off += align256((size_t)q.B * q.select_rows * q.S * sizeof(float));
  q.off_index = off;      off += align256((size_t)q.B * q.select_rows * q.N * sizeof(int32_t));
  q.off_partial = off;    off += align256(BH * q.gather_chunks * q.D * sizeof(float));
  q.off_mass = off;       off += align256(BH * q.gather_chunks * sizeof(float));
  q.workspace_bytes = off;
  return KVC_OK;
}

int cuda_fail(cudaError_t err, const char* stage) {
  return fail(KVC_ERR_CUDA, std::string("kcache_decode: ") + stage + ": " + cudaGetErrorString(err));
}

// The workspace's arrays; every one is indexed by sequence first.
struct Workspace {
  float* logits;
  MaxSum* tile_stats;
  MaxSum* stats;
  float* select;
  int32_t* index;
  float* partial;
  float* mass;
};

Workspace carve(const KCachePlan& p, char* ws) {
  return Workspace{reinterpret_cast<float*>(ws + p.off_logits),
                   reinterpret_cast<MaxSum*>(ws + p.off_tile_stats),
                   reinterpret_cast<MaxSum*>(ws + p.off_stats),
                   reinterpret_cast<float*>(ws + p.off_select),
                   reinterpret_cast<int32_t*>(ws + p.off_index),
                   reinterpret_cast<float*>(ws + p.off_partial),
                   reinterpret_cast<float*>(ws + p.off_mass)};
}

// Sequences [b0, b0 + nb) as a call of their own: tensor pointers moved to sequence b0, the
// workspace's arrays to its rows, the plan's batch set to nb. Returns the host values' device
// alias for the slice.
const void* slice(const kvc_kcache_decode_args& a, const KCachePlan& p, const Workspace& w,
                  const void* host, int b0, int nb, kvc_kcache_decode_args* sa, KCachePlan* sp,
                  Workspace* sw) {
  const int64_t e = p.elem_bytes;
  auto at = [&](const void* ptr, int64_t stride_b) {
    return static_cast<const void*>(static_cast<const char*>(ptr) + b0 * stride_b * e);
  };
  *sa = a;
  sa->batch = nb;
  sa->query = at(a.query, a.query_stride_b);
  sa->key = at(a.key, a.key_stride_b);
  sa->value = at(a.value, a.value_stride_b);
  sa->key_cache = at(a.key_cache, a.key_cache_stride_b);
  sa->value_host = at(a.value_host, a.value_host_stride_b);
  sa->attn_bias = a.attn_bias + b0 * a.attn_bias_stride_b;
  sa->out = static_cast<char*>(a.out) + (int64_t)b0 * p.QR * p.D * e;
  *sp = p;
  sp->B = nb;
  const int64_t qr = (int64_t)b0 * p.QR, sel = (int64_t)b0 * p.select_rows;
  *sw = Workspace{w.logits + qr * p.S,
                  w.tile_stats + qr * p.score_tiles,
                  w.stats + qr,
                  w.select + sel * p.S,
                  w.index + sel * p.N,
                  w.partial + qr * p.gather_chunks * p.D,
                  w.mass + qr * p.gather_chunks};
  return at(host, a.value_host_stride_b);
}

// The side stream of the pipelined op and its fork / join events, one set per (host thread,
// device) so that threads never re-record each other's events between a record and its wait;
// made on first use (non-blocking, so the legacy default stream does not serialise it; under
// CUDA-graph capture the fork and join bring its work into the graph).
struct SideStream {
  cudaStream_t stream = nullptr;
  cudaEvent_t fork = nullptr, join = nullptr;
};

SideStream* side_stream() {
  thread_local SideStream streams[64];
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device >= 64) return nullptr;
  SideStream& s = streams[device];
  if (!s.stream) {
    int least = 0, greatest = 0;
    cudaError_t err = cudaDeviceGetStreamPriorityRange(&least, &greatest);
    if (!err) err = cudaEventCreateWithFlags(&s.fork, cudaEventDisableTiming);
    if (!err) err = cudaEventCreateWithFlags(&s.join, cudaEventDisableTiming);
    if (!err) err = cudaStreamCreateWithPriority(&s.stream, cudaStreamNonBlocking, greatest);
    if (err) {
      last_error = cudaGetErrorString(err);
      s.stream = nullptr;
      return nullptr;
    }
  }
  return &s;
}

// The six stages of one slice: scores to top-N on `stream`, the fetch and the weighted sum on
// the side stream when there is one (forked after the top-N), else on `stream` too.
int enqueue_slice(const kvc_kcache_decode_args& a, const KCachePlan& p, const Workspace& w,
                  const void* host, cudaStream_t stream, const SideStream* side) {
  cudaError_t err;
  if ((err = launch_scores(a, p, w.logits, w.tile_stats, stream))) return cuda_fail(err, "scores");
  if ((err = launch_softmax_stats(p, w.tile_stats, a.sinks, w.stats, stream))) return cuda_fail(err, "softmax stats");
  if ((err = launch_selection_scores(p, w.logits, w.stats, w.select, stream))) return cuda_fail(err, "selection scores");
  if ((err = launch_topn_select(p, w.select, w.index, stream))) return cuda_fail(err, "top-n select");
  const cudaStream_t fetch_stream = side ? side->stream : stream;
  if (side && ((err = cudaEventRecord(side->fork, stream)) || (err = cudaStreamWaitEvent(fetch_stream, side->fork, 0))))
    return cuda_fail(err, "pipeline fork");
  if ((err = launch_gather(a, p, host, w.logits, w.stats, w.index, w.partial, w.mass, fetch_stream)))
    return cuda_fail(err, "gather");
  if ((err = launch_finalize(a, p, w.partial, w.mass, fetch_stream))) return cuda_fail(err, "finalize");
  return KVC_OK;
}

}  // namespace
}  // namespace kvc

extern "C" {

int kvc_abi_version(void) { return KVC_ABI_VERSION; }

const char* kvc_last_error(void) { return kvc::last_error.c_str(); }

int kvc_kcache_decode_workspace_size(const kvc_kcache_decode_args* args, size_t* bytes) {
  kvc::KCachePlan plan;
  if (int rc = kvc::make_plan(args, &plan)) return rc;
  *bytes = plan.workspace_bytes;
  return KVC_OK;
}

int kvc_kcache_decode_describe(const kvc_kcache_decode_args* args, kvc_kcache_decode_plan* plan) {
  kvc::KCachePlan p;
  if (int rc = kvc::make_plan(args, &p)) return rc;
  if (!plan) return kvc::fail(KVC_ERR_ARGUMENT, "kcache_decode_describe: plan is NULL");
  *plan = kvc_kcache_decode_plan{p.score_tile, p.score_tiles, p.gather_rows, p.gather_chunks,
                                 p.pipeline_parts, p.gather_ctas, p.workspace_bytes};
  return KVC_OK;
}

int kvc_kcache_decode(const kvc_kcache_decode_args* args, void* workspace, size_t workspace_bytes,
                      void* stream_handle) {
  using namespace kvc;
  KCachePlan p;
  if (int rc = make_plan(args, &p)) return rc;
  if (!workspace || workspace_bytes < p.workspace_bytes || !aligned16(workspace))
    return fail(KVC_ERR_WORKSPACE, "kcache_decode: workspace missing, too small or misaligned (ask kvc_kcache_decode_workspace_size)");

  // value_host must be page-locked and mapped: the gather reads it over the host link directly.
  cudaPointerAttributes attr;
  cudaError_t err = cudaPointerGetAttributes(&attr, args->value_host);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error so later launches are not blamed
    return fail(KVC_ERR_ARGUMENT, std::string("kcache_decode: value_host is not CUDA-visible memory: ") + cudaGetErrorString(err));
  }
  if (attr.type != cudaMemoryTypeHost || !attr.devicePointer)
    return fail(KVC_ERR_ARGUMENT, "kcache_decode: value_host must be pinned (page-locked, mapped) host memory");

  cudaStream_t stream = static_cast<cudaStream_t>(stream_handle);
  const Workspace w = carve(p, static_cast<char*>(workspace));
  if (p.pipeline_parts == 1)
    return enqueue_slice(*args, p, w, attr.devicePointer, stream, nullptr);

  // Pipelined: the batch in slices; a slice's fetch and weighted sum run on a side stream
  // (higher priority, so its few CTAs are scheduled ahead of the score pass's) while the
  // main stream scores the next slice: the host link and HBM are busy at once. Every stage
  // works per sequence, so each slice is the same computation as in one call.
  SideStream* side = side_stream();
  if (!side) return fail(KVC_ERR_CUDA, "kcache_decode: could not create the pipeline's side stream: " + last_error);
  const int parts = p.pipeline_parts;
  for (int i = 0, b0 = 0; i < parts; ++i) {
    const int nb = p.B / parts + (i < p.B % parts ? 1 : 0);
    kvc_kcache_decode_args sa;
    KCachePlan sp;
    Workspace sw;
    const void* host = slice(*args, p, w, attr.devicePointer, b0, nb, &sa, &sp, &sw);
    if (int rc = enqueue_slice(sa, sp, sw, host, stream, side)) return rc;
    b0 += nb;
  }
  if ((err = cudaEventRecord(side->join, side->stream)) || (err = cudaStreamWaitEvent(stream, side->join, 0)))
    return cuda_fail(err, "pipeline join");
  return KVC_OK;
}

}  // extern "C"
