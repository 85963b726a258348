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
  // 8 loads in flight per lane (3 CTAs per SM) over 2048 keys per CTA: the fastest of the six
  // variants bench_kcache_op.py --score-sweep timed on the H200 (156.8 µs at 32K, 3.42 TB/s,
  // against 163.8-195.1 µs for 1024/4096 keys and 16 loads).
  q.score_tile = q.mma_scores ? 2048 : 512;
  // Tuning knobs of the tensor-core score pass, read for the benchmark's sweep
  // ($KVC_SCORE_LOADS: 8 or 16; $KVC_SCORE_TILE: keys per CTA, a multiple of 256).
  q.score_loads = 8;
  if (const char* v = getenv("KVC_SCORE_LOADS")) q.score_loads = atoi(v) >= 16 ? 16 : 8;
  if (const char* v = getenv("KVC_SCORE_TILE"); v && q.mma_scores) {
    const int tile = atoi(v);
    if (tile >= 256 && tile % 256 == 0) q.score_tile = tile;
  }
  q.score_tiles = (q.S + q.score_tile - 1) / q.score_tile;
  q.row_elems = layer ? q.Hkv * q.D : q.D;
  const int row_bytes = q.row_elems * elem;
  // ~8 KiB of rows per gather CTA: enough loads in flight per CTA, and enough CTAs; fewer
  // when the probabilities of many query rows (T > 1) must share the CTA's shared memory.
  q.gather_rows = 8192 / row_bytes;
  q.gather_rows = q.gather_rows < 1 ? 1 : q.gather_rows > 64 ? 64 : q.gather_rows;
  while (q.gather_rows > 1 && gather_smem_bytes(q) > 48 * 1024) --q.gather_rows;
  q.gather_chunks = (q.N + q.gather_rows - 1) / q.gather_rows;
  // The fetch is bound by the host link, not by SMs: a few dozen CTAs keep enough loads in
  // flight. Capping its grid leaves the other SMs to a concurrent stream's kernels (another
  // micro-batch's score pass and GEMMs, runtime/microbatch.py); uncapped, its thousands of
  // CTAs hold every SM for the whole fetch. $KVC_GATHER_CTAS sets the cap (0: none).
  q.gather_ctas = 0;
  if (const char* v = getenv("KVC_GATHER_CTAS")) q.gather_ctas = atoi(v) > 0 ? atoi(v) : 0;
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

  char* ws = static_cast<char*>(workspace);
  float* logits = reinterpret_cast<float*>(ws + p.off_logits);
  MaxSum* tile_stats = reinterpret_cast<MaxSum*>(ws + p.off_tile_stats);
  MaxSum* stats = reinterpret_cast<MaxSum*>(ws + p.off_stats);
  float* select = reinterpret_cast<float*>(ws + p.off_select);
  int32_t* index = reinterpret_cast<int32_t*>(ws + p.off_index);
  float* partial = reinterpret_cast<float*>(ws + p.off_partial);
  float* mass = reinterpret_cast<float*>(ws + p.off_mass);
  cudaStream_t stream = static_cast<cudaStream_t>(stream_handle);

  if ((err = launch_scores(*args, p, logits, tile_stats, stream))) return cuda_fail(err, "scores");
  if ((err = launch_softmax_stats(p, tile_stats, args->sinks, stats, stream))) return cuda_fail(err, "softmax stats");
  if ((err = launch_selection_scores(p, logits, stats, select, stream))) return cuda_fail(err, "selection scores");
  if ((err = launch_topn_select(p, select, index, stream))) return cuda_fail(err, "top-n select");
  if ((err = launch_gather(*args, p, attr.devicePointer, logits, stats, index, partial, mass, stream)))
    return cuda_fail(err, "gather");
  if ((err = launch_finalize(*args, p, partial, mass, stream))) return cuda_fail(err, "finalize");
  return KVC_OK;
}

}  // extern "C"
