// Internal to the kernel library: the launch plan of one KCache decode step and the stage
// launchers (one .cu file per stage). Not part of the C ABI.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "kcache_score_tile.h"
#include "kvcompile_kernels.h"

namespace kvc {

// Sizes, tilings and workspace offsets, derived once from the arguments (also by the
// workspace-size query, so both always agree).
struct KCachePlan {
  int B, Hq, Hkv, P, T, S, D, G, N;  // S = P + T positions, G = Hq / Hkv, N = min(topn, S)
  // A query row is one (query head, new token): row hq * T + t of QR = Hq * T per sequence, so
  // the GR = G * T rows of one KV head are contiguous (logits, stats, partial sums, out).
  int QR, GR;
  int select_rows;                // rows of the selection: Hkv ("head") or 1 ("layer")
  int heads_per_select;           // query heads scored into one selection row: G or Hq
  int rows_per_select;            // query rows summed into one selection row: heads_per_select * T
  int elem_bytes;
  int mma_scores;                 // 1: tensor-core score kernel (16-bit dtype, head_dim <= 256)
  int score_loads;                // its 16-byte K loads in flight per lane: 16 (2 CTAs/SM) or 8 (4)
  int group_tile;                 // query rows per score CTA (1, 2, 4 or 8; padded with zeros)
  int head_tiles;                 // ceil(GR / group_tile)
  int score_tile;                 // positions per score CTA
  int score_tiles;                // ceil(S / score_tile)
  int row_elems;                  // elements of one fetched value row: D or Hkv * D
  int gather_rows;                // kept positions per gather CTA
  int gather_chunks;              // ceil(N / gather_rows)
  int gather_ctas;                // gather grid cap (0: one CTA per item; 64 when pipelined), $KVC_GATHER_CTAS
  int pipeline_parts;             // batch slices whose fetch overlaps the next slice's scores
  size_t off_logits, off_tile_stats, off_stats, off_select, off_index, off_partial, off_mass;
  size_t workspace_bytes;
};

// Softmax statistics of one query head: running max and sum of exp(x - max).
struct MaxSum {
  float max, sum;
};

__device__ inline MaxSum combine(MaxSum a, MaxSum b) {
  float m = fmaxf(a.max, b.max);
  if (m == -INFINITY) return {m, 0.f};  // both empty: avoid (-inf) - (-inf)
  return {m, a.sum * __expf(a.max - m) + b.sum * __expf(b.max - m)};
}

// 16-byte vectors: every load of K and V moves 16 bytes, converted to float here.
template <typename T> struct Vec;
template <> struct Vec<float> {
  static constexpr int n = 4;
  __device__ static void to_float(const uint4& v, float* out) {
    out[0] = __uint_as_float(v.x); out[1] = __uint_as_float(v.y);
    out[2] = __uint_as_float(v.z); out[3] = __uint_as_float(v.w);
  }
};
template <> struct Vec<__half> {
  static constexpr int n = 8;
  __device__ static void to_float(const uint4& v, float* out) {
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float2 f = __half22float2(*reinterpret_cast<const __half2*>(&w[i]));
      out[2 * i] = f.x; out[2 * i + 1] = f.y;
    }
  }
};
template <> struct Vec<__nv_bfloat16> {
  static constexpr int n = 8;
  __device__ static void to_float(const uint4& v, float* out) {
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {  // bf16 is the top half of a float
      out[2 * i] = __uint_as_float(w[i] << 16);
      out[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  }
};

template <typename T> __device__ inline float to_float(T x);
template <> __device__ inline float to_float(float x) { return x; }
template <> __device__ inline float to_float(__half x) { return __half2float(x); }
template <> __device__ inline float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ inline T from_float(float x);
template <> __device__ inline float from_float(float x) { return x; }
template <> __device__ inline __half from_float(float x) { return __float2half_rn(x); }
template <> __device__ inline __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }

// Score CTAs resident at once on the current device (SMs x CTAs per SM) for the tensor-core
// score kernel of this head_dim and loads in flight; 0 when the device cannot be asked.
int score_slots(int head_dim, int loads);

// Stage launchers, in the order kvc_kcache_decode enqueues them.
// logits [B, QR, S] = capped(q·k·scale) + bias; tile_stats [B, QR, score_tiles] per score CTA.
cudaError_t launch_scores(const kvc_kcache_decode_args& a, const KCachePlan& p, float* logits,
                          MaxSum* tile_stats, cudaStream_t stream);
// stats [B, QR] = (max, 1 / sum) over all positions and the head's sink (sinks may be NULL).
cudaError_t launch_softmax_stats(const KCachePlan& p, const MaxSum* tile_stats, const float* sinks,
                                 MaxSum* stats, cudaStream_t stream);
// select [B, select_rows, S] = Σ over the row's query rows of softmax probabilities.
cudaError_t launch_selection_scores(const KCachePlan& p, const float* logits, const MaxSum* stats,
                                    float* select, cudaStream_t stream);
// index [B, select_rows, N]: the N positions of largest score (radix select, ordered compaction).
cudaError_t launch_topn_select(const KCachePlan& p, const float* select, int32_t* index,
                               cudaStream_t stream);
// partial [B, QR, chunks, D], mass [B, QR, chunks] from the kept rows (zero-copy host reads),
// then out [B, QR, D] (= [B, Hq, T, D]) = Σ partial (/ Σ mass).
cudaError_t launch_gather(const kvc_kcache_decode_args& a, const KCachePlan& p,
                          const void* value_host_device, const float* logits, const MaxSum* stats,
                          const int32_t* index, float* partial, float* mass, cudaStream_t stream);
// Dynamic shared memory of one gather CTA (≤ 48 KiB is required).
// Query pointer of row r of the GR rows of KV head kv: head kv * G + r / T, token r % T.
template <typename T>
__device__ inline const T* query_row(const kvc_kcache_decode_args& a, const KCachePlan& p, int b, int kv, int r) {
  return static_cast<const T*>(a.query) + b * a.query_stride_b +
         (int64_t)(kv * p.G + r / p.T) * a.query_stride_h + (int64_t)(r % p.T) * a.query_stride_t;
}
size_t gather_smem_bytes(const KCachePlan& p);
cudaError_t launch_finalize(const kvc_kcache_decode_args& a, const KCachePlan& p,
                            const float* partial, const float* mass, cudaStream_t stream);

}  // namespace kvc
