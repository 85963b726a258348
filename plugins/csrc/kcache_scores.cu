// Stage 1 and 2 of a KCache decode step: q·k over every key (the only pass over K, so it sets
// the step's HBM floor) and the softmax statistics of each query head.
// Measured on H100 (docs/BENCHMARKS.md): 2.05 TB/s at 32K, 1.45x the K floor. Nsight Compute
// (bench/ncu_kcache_op.sh, bf16, 4 query heads per CTA): 80 registers cap it at 3 CTAs per SM,
// 0.53 instructions issued per scheduler cycle, half the stalls waiting on K loads. Two things
// did not help: a cp.async pipeline (8 KiB stages, 3.7x slower) and issuing 8 instead of 4
// loads per lane before use (same time; forcing 4 CTAs per SM spills). The next step is fewer
// instructions per byte: q·K on tensor cores (mma over the query group) instead of FMAs.
#include "kcache_internal.h"

namespace kvc {
namespace {

constexpr int kScoreThreads = 256;
constexpr int kRowsInFlight = 4;  // independent rows each lane loads before using them

// One CTA: `score_tile` positions of one (b, KV head) for up to GT query heads of its group.
// A row of K is split over `lanes` (≤ 4) lanes, each reading 16-byte vectors: few lanes per
// row keep the cross-lane reduction short, and 8 rows per warp keep every sector fully used.
template <typename T, int GT>
__global__ void __launch_bounds__(kScoreThreads)
score_kernel(kvc_kcache_decode_args a, KCachePlan p, float* __restrict__ logits,
             MaxSum* __restrict__ tile_stats) {
  constexpr int VE = Vec<T>::n;
  extern __shared__ __align__(16) float smem[];
  float* q_s = smem;                        // [GT, D]
  float* tile_logits = smem + GT * p.D;     // [GT, score_tile]

  const int tile = blockIdx.x;
  const int kv = blockIdx.y / p.head_tiles;
  const int g0 = (blockIdx.y % p.head_tiles) * GT;
  const int b = blockIdx.z;
  const int gcount = min(GT, p.G - g0);
  const int D = p.D;

  // Heads past the group's end get zero queries; their dots are computed and dropped.
  const T* q = static_cast<const T*>(a.query) + b * a.query_stride_b;
  for (int i = threadIdx.x; i < GT * D; i += blockDim.x) {
    const int g = i / D, d = i % D;
    q_s[i] = g < gcount ? to_float(q[(int64_t)(kv * p.G + g0 + g) * a.query_stride_h + d]) : 0.f;
  }
  __syncthreads();

  const int row_vecs = D / VE;
  int lanes = 4;
  while (row_vecs % lanes) lanes >>= 1;
  const int vecs_per_lane = row_vecs / lanes;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int sub = lane % lanes;
  const int rows_per_step = (32 / lanes) * (blockDim.x / 32);
  const int tile_start = tile * p.score_tile;
  const int tile_len = min(p.score_tile, p.S - tile_start);

  const T* past_keys = static_cast<const T*>(a.key_cache) + b * a.key_cache_stride_b +
                       kv * a.key_cache_stride_h;
  const T* new_key = static_cast<const T*>(a.key) + b * a.key_stride_b + kv * a.key_stride_h;
  const float* bias = a.attn_bias + b * a.attn_bias_stride_b;

  for (int r0 = warp * (32 / lanes) + lane / lanes; r0 - lane / lanes < tile_len;
       r0 += rows_per_step * kRowsInFlight) {
    float acc[kRowsInFlight][GT];
#pragma unroll
    for (int u = 0; u < kRowsInFlight; ++u)
#pragma unroll
      for (int g = 0; g < GT; ++g) acc[u][g] = 0.f;

    for (int v = 0; v < vecs_per_lane; ++v) {
      const int col = (sub + v * lanes) * VE;
      uint4 raw[kRowsInFlight];
#pragma unroll
      for (int u = 0; u < kRowsInFlight; ++u) {
        const int r = r0 + u * rows_per_step;
        const int pos = tile_start + r;
        raw[u] = make_uint4(0, 0, 0, 0);
        if (r < tile_len) {
          const T* row = pos < p.P ? past_keys + (int64_t)pos * a.key_cache_stride_p : new_key;
          raw[u] = __ldg(reinterpret_cast<const uint4*>(row + col));
        }
      }
      float qv[GT][VE];
#pragma unroll
      for (int g = 0; g < GT; ++g)
#pragma unroll
        for (int e = 0; e < VE; e += 4) {
          const float4 f = *reinterpret_cast<const float4*>(&q_s[g * D + col + e]);
          qv[g][e] = f.x; qv[g][e + 1] = f.y; qv[g][e + 2] = f.z; qv[g][e + 3] = f.w;
        }
#pragma unroll
      for (int u = 0; u < kRowsInFlight; ++u) {
        float kf[VE];
        Vec<T>::to_float(raw[u], kf);
#pragma unroll
        for (int g = 0; g < GT; ++g)
#pragma unroll
          for (int e = 0; e < VE; ++e) acc[u][g] = fmaf(qv[g][e], kf[e], acc[u][g]);
      }
    }
#pragma unroll
    for (int u = 0; u < kRowsInFlight; ++u) {
#pragma unroll
      for (int g = 0; g < GT; ++g)
        for (int off = lanes >> 1; off > 0; off >>= 1)
          acc[u][g] += __shfl_xor_sync(0xffffffffu, acc[u][g], off);
      const int r = r0 + u * rows_per_step;
      if (sub == 0 && r < tile_len) {
        const float bias_r = bias[tile_start + r];
#pragma unroll
        for (int g = 0; g < GT; ++g) {
          float x = acc[u][g] * a.scale;
          if (a.softcap > 0.f) x = a.softcap * tanhf(x / a.softcap);  // soft-capping precedes the mask
          tile_logits[g * p.score_tile + r] = x + bias_r;
        }
      }
    }
  }
  __syncthreads();

  // Coalesced write of the tile's logits, then one warp per head folds its softmax statistics.
  for (int i = threadIdx.x; i < gcount * tile_len; i += blockDim.x) {
    const int g = i / tile_len, r = i % tile_len;
    const int hq = kv * p.G + g0 + g;
    logits[((int64_t)b * p.Hq + hq) * p.S + tile_start + r] = tile_logits[g * p.score_tile + r];
  }
  for (int g = warp; g < gcount; g += blockDim.x / 32) {
    const float* x = tile_logits + g * p.score_tile;
    float m = -INFINITY;
    for (int r = lane; r < tile_len; r += 32) m = fmaxf(m, x[r]);
    for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
    float s = 0.f;
    if (m != -INFINITY)
      for (int r = lane; r < tile_len; r += 32) s += __expf(x[r] - m);
    for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    if (lane == 0) {
      const int hq = kv * p.G + g0 + g;
      tile_stats[((int64_t)b * p.Hq + hq) * p.score_tiles + tile] = MaxSum{m, s};
    }
  }
}

// One warp per (b, query head): fold the per-tile statistics and the head's sink logit (a
// softmax column with no value: it only enlarges the denominator); store (max, 1 / sum).
__global__ void softmax_stats_kernel(KCachePlan p, const MaxSum* __restrict__ tile_stats,
                                     const float* __restrict__ sinks, MaxSum* __restrict__ stats) {
  const int head = blockIdx.x;  // b * Hq + hq
  const MaxSum* t = tile_stats + (int64_t)head * p.score_tiles;
  MaxSum acc{-INFINITY, 0.f};
  for (int i = threadIdx.x; i < p.score_tiles; i += 32) acc = combine(acc, t[i]);
  for (int off = 16; off > 0; off >>= 1) {
    MaxSum other{__shfl_xor_sync(0xffffffffu, acc.max, off), __shfl_xor_sync(0xffffffffu, acc.sum, off)};
    acc = combine(acc, other);
  }
  if (sinks != nullptr) acc = combine(acc, MaxSum{sinks[head % p.Hq], 1.f});
  if (threadIdx.x == 0) stats[head] = MaxSum{acc.max, 1.f / acc.sum};
}

template <typename T, int GT>
cudaError_t launch_scores_t(const kvc_kcache_decode_args& a, const KCachePlan& p, float* logits,
                            MaxSum* tile_stats, cudaStream_t stream) {
  const dim3 grid(p.score_tiles, p.Hkv * p.head_tiles, p.B);
  const size_t smem = sizeof(float) * GT * (p.D + p.score_tile);
  score_kernel<T, GT><<<grid, kScoreThreads, smem, stream>>>(a, p, logits, tile_stats);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_scores_dtype(const kvc_kcache_decode_args& a, const KCachePlan& p,
                                float* logits, MaxSum* tile_stats, cudaStream_t stream) {
  switch (p.group_tile) {
    case 1: return launch_scores_t<T, 1>(a, p, logits, tile_stats, stream);
    case 2: return launch_scores_t<T, 2>(a, p, logits, tile_stats, stream);
    case 4: return launch_scores_t<T, 4>(a, p, logits, tile_stats, stream);
    default: return launch_scores_t<T, 8>(a, p, logits, tile_stats, stream);
  }
}

}  // namespace

cudaError_t launch_scores(const kvc_kcache_decode_args& a, const KCachePlan& p, float* logits,
                          MaxSum* tile_stats, cudaStream_t stream) {
  switch (a.dtype) {
    case KVC_DTYPE_F32: return launch_scores_dtype<float>(a, p, logits, tile_stats, stream);
    case KVC_DTYPE_F16: return launch_scores_dtype<__half>(a, p, logits, tile_stats, stream);
    default: return launch_scores_dtype<__nv_bfloat16>(a, p, logits, tile_stats, stream);
  }
}

cudaError_t launch_softmax_stats(const KCachePlan& p, const MaxSum* tile_stats, const float* sinks,
                                 MaxSum* stats, cudaStream_t stream) {
  softmax_stats_kernel<<<p.B * p.Hq, 32, 0, stream>>>(p, tile_stats, sinks, stats);
  return cudaGetLastError();
}

}  // namespace kvc
