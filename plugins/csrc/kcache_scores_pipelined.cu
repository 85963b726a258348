// Stage 1 of a KCache decode step, fast path: q·k over every key with K streamed through a
// cp.async pipeline (kScoreStages stages of kScoreStageBytes in flight per CTA), so HBM stays
// busy while the dots of the previous stage are computed. The generic kernel in
// kcache_scores.cu loads into registers and stalls between loads and use; this one does not.
#include "kcache_internal.h"

namespace kvc {
namespace {

constexpr int kThreads = 256;

__device__ inline void cp_async16(void* smem_dst, const void* global_src) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(global_src));
}
__device__ inline void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int Pending>
__device__ inline void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(Pending)); }

__device__ inline void online_update(MaxSum& st, float x) {
  // running softmax statistics with one exp per element
  if (x > st.max) {
    st.sum = st.sum * __expf(st.max - x) + 1.f;
    st.max = x;
  } else if (st.max != -INFINITY) {
    st.sum += __expf(x - st.max);
  }
}

// One CTA: `score_tile` positions of one (b, KV head) for up to GT query heads of its group.
// A K row is spread over `lanes` = row_vecs lanes, one 16-byte vector each, so each lane's
// slice of q is fixed and lives in registers. After the cross-lane reduction every lane of a
// row holds all GT dots; lane `sub` writes heads g ≡ sub (mod lanes) and keeps their running
// softmax statistics, so logits leave registers once and coalesce 8 rows per store.
template <typename T, int GT>
__global__ void __launch_bounds__(kThreads, 2)
score_pipelined_kernel(kvc_kcache_decode_args a, KCachePlan p, float* __restrict__ logits,
                       MaxSum* __restrict__ tile_stats) {
  constexpr int VE = Vec<T>::n;
  extern __shared__ __align__(16) unsigned char stages[];  // [kScoreStages][kScoreStageBytes]
  __shared__ MaxSum warp_stats[kThreads / 32][GT];

  const int tile = blockIdx.x;
  const int kv = blockIdx.y / p.head_tiles;
  const int g0 = (blockIdx.y % p.head_tiles) * GT;
  const int b = blockIdx.z;
  const int gcount = min(GT, p.G - g0);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int row_vecs = p.D / VE;  // = lanes per row (power of two ≤ 32)
  const int lanes = row_vecs;
  const int sub = lane % lanes;
  const int rows_per_pass = (32 / lanes) * (kThreads / 32);

  const int tile_start = tile * p.score_tile;
  const int tile_rows = min(p.score_tile, p.S - tile_start);
  const int stage_rows = p.stage_rows;
  const int stage_count = (tile_rows + stage_rows - 1) / stage_rows;

  const T* past_keys = static_cast<const T*>(a.key_cache) + b * a.key_cache_stride_b +
                       kv * a.key_cache_stride_h;
  const T* new_key = static_cast<const T*>(a.key) + b * a.key_stride_b + kv * a.key_stride_h;
  const float* bias = a.attn_bias + b * a.attn_bias_stride_b + tile_start;
  float* head_logits = logits + ((int64_t)b * p.Hq + kv * p.G + g0) * p.S + tile_start;

  auto issue = [&](int stage) {
    if (stage < stage_count) {
      unsigned char* buffer = stages + (stage % kScoreStages) * kScoreStageBytes;
      const int first = stage * stage_rows;
      const int rows = min(stage_rows, tile_rows - first);
      for (int i = tid; i < rows * row_vecs; i += kThreads) {
        const int r = i / row_vecs, c = i % row_vecs;
        const int pos = tile_start + first + r;
        const T* row = pos < p.P ? past_keys + (int64_t)pos * a.key_cache_stride_p : new_key;
        cp_async16(buffer + (size_t)i * 16, row + c * VE);
      }
    }
    cp_async_commit();  // an empty group past the end keeps the wait count uniform
  };

  // This lane's slice of q for each head of the tile (zero for heads past the group).
  float q[GT][VE];
  {
    const T* query = static_cast<const T*>(a.query) + b * a.query_stride_b;
#pragma unroll
    for (int g = 0; g < GT; ++g) {
      const int hq = kv * p.G + g0 + min(g, gcount - 1);
      const uint4 raw = *reinterpret_cast<const uint4*>(query + (int64_t)hq * a.query_stride_h + sub * VE);
      Vec<T>::to_float(raw, q[g]);
#pragma unroll
      for (int e = 0; e < VE; ++e) q[g][e] = g < gcount ? q[g][e] * a.scale : 0.f;
    }
  }
  MaxSum stats[GT];
#pragma unroll
  for (int g = 0; g < GT; ++g) stats[g] = MaxSum{-INFINITY, 0.f};

#pragma unroll
  for (int s = 0; s < kScoreStages - 1; ++s) issue(s);

  for (int stage = 0; stage < stage_count; ++stage) {
    issue(stage + kScoreStages - 1);
    cp_async_wait<kScoreStages - 1>();  // this stage's group has landed
    __syncthreads();
    const unsigned char* buffer = stages + (stage % kScoreStages) * kScoreStageBytes;
    const int first = stage * stage_rows;
    const int rows = min(stage_rows, tile_rows - first);
    for (int r = warp * (32 / lanes) + lane / lanes; r - lane / lanes < rows; r += rows_per_pass) {
      float acc[GT];
#pragma unroll
      for (int g = 0; g < GT; ++g) acc[g] = 0.f;
      if (r < rows) {
        float k[VE];
        Vec<T>::to_float(*reinterpret_cast<const uint4*>(buffer + ((size_t)r * row_vecs + sub) * 16), k);
#pragma unroll
        for (int g = 0; g < GT; ++g)
#pragma unroll
          for (int e = 0; e < VE; ++e) acc[g] = fmaf(q[g][e], k[e], acc[g]);
      }
#pragma unroll
      for (int g = 0; g < GT; ++g)
        for (int off = lanes >> 1; off > 0; off >>= 1) acc[g] += __shfl_xor_sync(0xffffffffu, acc[g], off);
      if (r < rows) {
        const int pos = first + r;  // within the tile
        const float bias_r = bias[pos];
#pragma unroll
        for (int g = 0; g < GT; ++g) {
          if (g % lanes == sub && g < gcount) {
            const float x = acc[g] + bias_r;
            head_logits[(int64_t)g * p.S + pos] = x;
            online_update(stats[g], x);
          }
        }
      }
    }
    __syncthreads();  // the buffer is refilled by the next iteration's issue
  }
  cp_async_wait<0>();

  // Fold each head's statistics over the CTA: lanes, then warps.
#pragma unroll
  for (int g = 0; g < GT; ++g) {
    MaxSum st = stats[g];
    for (int off = 16; off > 0; off >>= 1) {
      const MaxSum other{__shfl_xor_sync(0xffffffffu, st.max, off), __shfl_xor_sync(0xffffffffu, st.sum, off)};
      st = combine(st, other);
    }
    if (lane == 0) warp_stats[warp][g] = st;
  }
  __syncthreads();
  if (tid < gcount) {
    MaxSum st{-INFINITY, 0.f};
    for (int w = 0; w < kThreads / 32; ++w) st = combine(st, warp_stats[w][tid]);
    const int hq = kv * p.G + g0 + tid;
    tile_stats[((int64_t)b * p.Hq + hq) * p.score_tiles + tile] = st;
  }
}

template <typename T, int GT>
cudaError_t launch_t(const kvc_kcache_decode_args& a, const KCachePlan& p, float* logits,
                     MaxSum* tile_stats, cudaStream_t stream) {
  const dim3 grid(p.score_tiles, p.Hkv * p.head_tiles, p.B);
  const size_t smem = (size_t)kScoreStages * kScoreStageBytes;
  score_pipelined_kernel<T, GT><<<grid, kThreads, smem, stream>>>(a, p, logits, tile_stats);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_dtype(const kvc_kcache_decode_args& a, const KCachePlan& p, float* logits,
                         MaxSum* tile_stats, cudaStream_t stream) {
  switch (p.group_tile) {
    case 1: return launch_t<T, 1>(a, p, logits, tile_stats, stream);
    case 2: return launch_t<T, 2>(a, p, logits, tile_stats, stream);
    case 4: return launch_t<T, 4>(a, p, logits, tile_stats, stream);
    default: return launch_t<T, 8>(a, p, logits, tile_stats, stream);
  }
}

}  // namespace

cudaError_t launch_scores_pipelined(const kvc_kcache_decode_args& a, const KCachePlan& p,
                                    float* logits, MaxSum* tile_stats, cudaStream_t stream) {
  switch (a.dtype) {
    case KVC_DTYPE_F32: return launch_dtype<float>(a, p, logits, tile_stats, stream);
    case KVC_DTYPE_F16: return launch_dtype<__half>(a, p, logits, tile_stats, stream);
    default: return launch_dtype<__nv_bfloat16>(a, p, logits, tile_stats, stream);
  }
}

}  // namespace kvc
