// Stage 1 and 2 of a KCache decode step: q·k over every key (the only pass over K, so it sets
// the step's HBM floor) and the softmax statistics of each query head.
// 16-bit keys (bf16, fp16) with head_dim <= 256 take the tensor-core kernel: a KV head's query
// group is the N side (8 columns) of one mma.m16n8k16 per 16 keys x 16 dims, the keys the M
// side, loaded straight from global memory as 16-byte vectors (the dims inside a 32-dim block
// are permuted identically for keys and queries, which a dot product does not notice). On the
// H100 the FMA kernel below reached 2.05 TB/s: 80 registers, 0.53 instructions per cycle,
// half the stalls on K loads, i.e. too many instructions per byte (docs/BENCHMARKS.md).
// fp32 keys and wider heads keep that FMA kernel.
#include "kcache_internal.h"

namespace kvc {
namespace {

constexpr int kScoreThreads = 256;
constexpr int kRowsInFlight = 4;  // independent rows each lane loads before using them

// The end of every score CTA: a coalesced write of its tile of logits (query rows g0.. of KV
// head kv, `stride` floats apart in shared memory), then one warp per row folds the tile's
// softmax statistics.
__device__ void finish_tile(const KCachePlan& p, const float* tile_logits, int stride, int b,
                            int kv, int g0, int gcount, int tile, int tile_start, int tile_len,
                            float* __restrict__ logits, MaxSum* __restrict__ tile_stats) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int i = threadIdx.x; i < gcount * tile_len; i += blockDim.x) {
    const int g = i / tile_len, r = i % tile_len;
    const int row = kv * p.GR + g0 + g;
    logits[((int64_t)b * p.QR + row) * p.S + tile_start + r] = tile_logits[g * stride + r];
  }
  for (int g = warp; g < gcount; g += blockDim.x / 32) {
    const float* x = tile_logits + g * stride;
    float m = -INFINITY;
    for (int r = lane; r < tile_len; r += 32) m = fmaxf(m, x[r]);
    for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
    float s = 0.f;
    if (m != -INFINITY)
      for (int r = lane; r < tile_len; r += 32) s += __expf(x[r] - m);
    for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    if (lane == 0) {
      const int row = kv * p.GR + g0 + g;
      tile_stats[((int64_t)b * p.QR + row) * p.score_tiles + tile] = MaxSum{m, s};
    }
  }
}

// logit = capped(dot * scale) + bias: soft-capping precedes the mask.
__device__ inline float finish_logit(const kvc_kcache_decode_args& a, float dot, float bias) {
  float x = dot * a.scale;
  if (a.softcap > 0.f) x = a.softcap * tanhf(x / a.softcap);
  return x + bias;
}

// ---- tensor-core score kernel (bf16 / fp16, head_dim <= 32 * NB) ------------------------
template <typename T> struct Mma16;
template <> struct Mma16<__nv_bfloat16> {
  __device__ static void run(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};
template <> struct Mma16<__half> {
  __device__ static void run(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

// Each lane loads 16 bytes (8 dims) of two keys per 32-dim block: dims 8t..8t+7 (t = lane % 4)
// of keys lane/4 and lane/4 + 8 of a 16-key M tile. mma j (0, 1) of the block takes words
// {2j, 2j+1} of each vector as its A fragment, so logical k = 2t+e maps to dim 8t+4j+e and
// k = 2t+8+e to dim 8t+4j+2+e; the query fragment (B, 8 columns = query heads) is read from
// the same dims, so each mma sums exactly the products of 16 dims. The accumulator holds
// keys (lane/4, lane/4 + 8) x heads (2t, 2t+1).
// Logits go straight to global memory from the accumulators (8 consecutive keys of one head
// per 4 lanes: whole 32-byte sectors) and each lane folds the softmax statistics of its two
// heads online, so the tile needs no shared-memory staging and no second pass: the CTA is
// loading K for all but its short epilogue.
__device__ inline void fold_online(MaxSum& st, float x) {
  if (x > st.max) {
    st.sum = st.sum * __expf(st.max - x) + 1.f;  // st.max = -inf: 0 * 0 + 1
    st.max = x;
  } else if (x != -INFINITY) {
    st.sum += __expf(x - st.max);
  }
}

// 32-dim blocks of the tensor-core kernel's instance for a head_dim (NB): 2, 4 or 8. The launch
// and score_slots (which asks that instance's occupancy) both pick by it.
__host__ __device__ constexpr int mma_dim_blocks(int head_dim) { return head_dim <= 64 ? 2 : head_dim <= 128 ? 4 : 8; }

// 16-key tiles per warp step: LOADS 16-byte vectors per lane (2 keys x NB dim blocks each).
__host__ __device__ constexpr int score_m_tiles(int NB, int LOADS) { return LOADS / 2 / NB > 0 ? LOADS / 2 / NB : 1; }
// CTAs per SM the register budget is set for: 16 loads in flight fit 2, 8 fit 3 unspilled.
__host__ __device__ constexpr int score_ctas(int NB, int LOADS) { return 2 * NB * score_m_tiles(NB, LOADS) >= 16 ? 2 : 3; }

template <typename T, int NB, int LOADS>
__global__ void __launch_bounds__(kScoreThreads, score_ctas(NB, LOADS))
score_mma_kernel(kvc_kcache_decode_args a, KCachePlan p, float* __restrict__ logits,
                 MaxSum* __restrict__ tile_stats) {
  constexpr int MT = score_m_tiles(NB, LOADS);
  constexpr int kQStride = 32 * NB + 8;  // halves per query row in shared memory (+16 B: banks)
  constexpr int kWarps = kScoreThreads / 32;
  __shared__ __align__(16) T q_s[8 * kQStride];
  __shared__ MaxSum warp_stats[kWarps][8];

  const int tile = blockIdx.x;
  const int kv = blockIdx.y / p.head_tiles;
  const int g0 = (blockIdx.y % p.head_tiles) * 8;
  const int b = blockIdx.z;
  const int gcount = min(8, p.GR - g0);
  const int D = p.D;

  // Query rows g0.. of the KV head, zero-padded to 8 rows and to 32 * NB dims.
  for (int i = threadIdx.x; i < 8 * 32 * NB; i += blockDim.x) {
    const int g = i / (32 * NB), d = i % (32 * NB);
    q_s[g * kQStride + d] = (g < gcount && d < D) ? query_row<T>(a, p, b, kv, g0 + g)[d] : from_float<T>(0.f);
  }
  __syncthreads();

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int t4 = lane & 3, row_in_tile = lane >> 2;
  uint4 qf[NB];  // this lane's query fragment: head row_in_tile, dims 8*t4.. of each block
#pragma unroll
  for (int blk = 0; blk < NB; ++blk)
    qf[blk] = *reinterpret_cast<const uint4*>(&q_s[row_in_tile * kQStride + blk * 32 + 8 * t4]);

  const int tile_start = tile * p.score_tile;
  const int tile_len = min(p.score_tile, p.S - tile_start);
  const T* past_keys = static_cast<const T*>(a.key_cache) + b * a.key_cache_stride_b +
                       kv * a.key_cache_stride_h;
  const T* new_key = static_cast<const T*>(a.key) + b * a.key_stride_b + kv * a.key_stride_h;
  // This lane's two query rows (2 t4, 2 t4 + 1): bias rows, logit rows, running statistics.
  const float* bias_row[2];
  float* logit_row[2];
  MaxSum st[2] = {{-INFINITY, 0.f}, {-INFINITY, 0.f}};
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    const int g = 2 * t4 + e;
    bias_row[e] = a.attn_bias + b * a.attn_bias_stride_b + (int64_t)((g0 + g) % p.T) * a.attn_bias_stride_t + tile_start;
    logit_row[e] = logits + ((int64_t)b * p.QR + kv * p.GR + min(g0 + g, p.GR - 1)) * p.S + tile_start;
  }
  const bool row_valid[2] = {2 * t4 < gcount, 2 * t4 + 1 < gcount};

  for (int base = warp * 16 * MT; base < tile_len; base += kWarps * 16 * MT) {
    uint4 raw[MT][NB][2];
    // The bias of the step's logits is loaded with its keys: loaded after the mma, its latency
    // stalled every step.
    float bias[MT][2][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int r = base + mt * 16 + row_in_tile + 8 * half;
#pragma unroll
        for (int e = 0; e < 2; ++e) bias[mt][half][e] = r < tile_len && row_valid[e] ? __ldg(bias_row[e] + r) : 0.f;
        const int pos = tile_start + r;
        const T* row = r < tile_len ? (pos < p.P ? past_keys + (int64_t)pos * a.key_cache_stride_p
                                                 : new_key + (int64_t)(pos - p.P) * a.key_stride_t)
                                    : nullptr;
#pragma unroll
        for (int blk = 0; blk < NB; ++blk) {
          const int col = blk * 32 + 8 * t4;
          raw[mt][blk][half] = (row != nullptr && col < D)
              ? __ldg(reinterpret_cast<const uint4*>(row + col)) : make_uint4(0, 0, 0, 0);
        }
      }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int blk = 0; blk < NB; ++blk) {
        const uint4 k0 = raw[mt][blk][0], k1 = raw[mt][blk][1];
        const uint32_t a0[4] = {k0.x, k1.x, k0.y, k1.y};
        Mma16<T>::run(acc, a0, qf[blk].x, qf[blk].y);
        const uint32_t a1[4] = {k0.z, k1.z, k0.w, k1.w};
        Mma16<T>::run(acc, a1, qf[blk].z, qf[blk].w);
      }
      // acc: keys (row_in_tile, row_in_tile + 8) x query rows (2 t4, 2 t4 + 1)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int r = base + mt * 16 + row_in_tile + 8 * half;
        if (r < tile_len) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            if (!row_valid[e]) continue;
            const float x = finish_logit(a, acc[2 * half + e], bias[mt][half][e]);
            logit_row[e][r] = x;
            fold_online(st[e], x);
          }
        }
      }
    }
  }
  // Fold the 8 lanes that share t4 (lane bits 2..4), then the warps through shared memory.
#pragma unroll
  for (int e = 0; e < 2; ++e)
#pragma unroll
    for (int off = 4; off < 32; off <<= 1) {
      const MaxSum other{__shfl_xor_sync(0xffffffffu, st[e].max, off), __shfl_xor_sync(0xffffffffu, st[e].sum, off)};
      st[e] = combine(st[e], other);
    }
  if (row_in_tile == 0) {
    warp_stats[warp][2 * t4] = st[0];
    warp_stats[warp][2 * t4 + 1] = st[1];
  }
  __syncthreads();
  if (threadIdx.x < gcount) {
    MaxSum total{-INFINITY, 0.f};
    for (int w = 0; w < kWarps; ++w) total = combine(total, warp_stats[w][threadIdx.x]);
    const int row = kv * p.GR + g0 + threadIdx.x;
    tile_stats[((int64_t)b * p.QR + row) * p.score_tiles + tile] = total;
  }
}

// ---- FMA score kernel (any dtype, any head_dim) ---------------------------------------------

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
  const int gcount = min(GT, p.GR - g0);
  const int D = p.D;

  // Rows past the KV head's end get zero queries; their dots are computed and dropped.
  for (int i = threadIdx.x; i < GT * D; i += blockDim.x) {
    const int g = i / D, d = i % D;
    q_s[i] = g < gcount ? to_float(query_row<T>(a, p, b, kv, g0 + g)[d]) : 0.f;
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
          const T* row = pos < p.P ? past_keys + (int64_t)pos * a.key_cache_stride_p
                                   : new_key + (int64_t)(pos - p.P) * a.key_stride_t;
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
#pragma unroll
        for (int g = 0; g < GT; ++g) {  // query row g0 + g: its token's bias row
          const float bias_r = bias[(int64_t)((g0 + g) % p.T) * a.attn_bias_stride_t + tile_start + r];
          tile_logits[g * p.score_tile + r] = finish_logit(a, acc[u][g], bias_r);
        }
      }
    }
  }
  __syncthreads();

  finish_tile(p, tile_logits, p.score_tile, b, kv, g0, gcount, tile, tile_start, tile_len,
              logits, tile_stats);
}

// One warp per (b, query row): fold the per-tile statistics and its head's sink logit (a
// softmax column with no value: it only enlarges the denominator); store (max, 1 / sum).
__global__ void softmax_stats_kernel(KCachePlan p, const MaxSum* __restrict__ tile_stats,
                                     const float* __restrict__ sinks, MaxSum* __restrict__ stats) {
  const int head = blockIdx.x;  // b * QR + hq * T + t
  const MaxSum* t = tile_stats + (int64_t)head * p.score_tiles;
  MaxSum acc{-INFINITY, 0.f};
  for (int i = threadIdx.x; i < p.score_tiles; i += 32) acc = combine(acc, t[i]);
  for (int off = 16; off > 0; off >>= 1) {
    MaxSum other{__shfl_xor_sync(0xffffffffu, acc.max, off), __shfl_xor_sync(0xffffffffu, acc.sum, off)};
    acc = combine(acc, other);
  }
  if (sinks != nullptr) acc = combine(acc, MaxSum{sinks[(head % p.QR) / p.T], 1.f});
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

template <typename T, int NB, int LOADS>
cudaError_t launch_scores_mma(const kvc_kcache_decode_args& a, const KCachePlan& p, float* logits,
                              MaxSum* tile_stats, cudaStream_t stream) {
  const dim3 grid(p.score_tiles, p.Hkv * p.head_tiles, p.B);
  score_mma_kernel<T, NB, LOADS><<<grid, kScoreThreads, 0, stream>>>(a, p, logits, tile_stats);
  return cudaGetLastError();
}

template <typename T, int NB>
cudaError_t launch_scores_mma_loads(const kvc_kcache_decode_args& a, const KCachePlan& p, float* logits,
                                    MaxSum* tile_stats, cudaStream_t stream) {
  if (p.score_loads >= 16) return launch_scores_mma<T, NB, 16>(a, p, logits, tile_stats, stream);
  return launch_scores_mma<T, NB, 8>(a, p, logits, tile_stats, stream);
}

template <typename T>
cudaError_t launch_scores_dtype(const kvc_kcache_decode_args& a, const KCachePlan& p,
                                float* logits, MaxSum* tile_stats, cudaStream_t stream) {
  if constexpr (sizeof(T) == 2) {
    if (p.mma_scores) {
      switch (mma_dim_blocks(p.D)) {
        case 2: return launch_scores_mma_loads<T, 2>(a, p, logits, tile_stats, stream);
        case 4: return launch_scores_mma_loads<T, 4>(a, p, logits, tile_stats, stream);
        default: return launch_scores_mma_loads<T, 8>(a, p, logits, tile_stats, stream);
      }
    }
  }
  switch (p.group_tile) {
    case 1: return launch_scores_t<T, 1>(a, p, logits, tile_stats, stream);
    case 2: return launch_scores_t<T, 2>(a, p, logits, tile_stats, stream);
    case 4: return launch_scores_t<T, 4>(a, p, logits, tile_stats, stream);
    default: return launch_scores_t<T, 8>(a, p, logits, tile_stats, stream);
  }
}

template <int NB, int LOADS>
int mma_ctas_per_sm() {
  int per_sm = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, score_mma_kernel<__nv_bfloat16, NB, LOADS>,
                                                    kScoreThreads, 0) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return per_sm;
}

}  // namespace

int score_slots(int head_dim, int loads) {
  struct Traits {
    bool ready = false;
    int sms = 0, per_sm[3][2] = {};  // [mma_dim_blocks 2 / 4 / 8][8 / 16 loads]
  };
  static Traits traits[64];
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device >= 64) {
    cudaGetLastError();
    return 0;
  }
  Traits& t = traits[device];
  if (!t.ready) {
    if (cudaDeviceGetAttribute(&t.sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
      cudaGetLastError();
      return 0;
    }
    t.per_sm[0][0] = mma_ctas_per_sm<2, 8>();
    t.per_sm[0][1] = mma_ctas_per_sm<2, 16>();
    t.per_sm[1][0] = mma_ctas_per_sm<4, 8>();
    t.per_sm[1][1] = mma_ctas_per_sm<4, 16>();
    t.per_sm[2][0] = mma_ctas_per_sm<8, 8>();
    t.per_sm[2][1] = mma_ctas_per_sm<8, 16>();
    t.ready = true;
  }
  return t.sms * t.per_sm[mma_dim_blocks(head_dim) / 4][loads >= 16 ? 1 : 0];  // 2, 4, 8 -> 0, 1, 2
}

cudaError_t launch_scores(const kvc_kcache_decode_args& a, const KCachePlan& p, float* logits,
                          MaxSum* tile_stats, cudaStream_t stream) {
  switch (a.dtype) {
    case KVC_DTYPE_F32: return launch_scores_dtype<float>(a, p, logits, tile_stats, stream);  // never mma
    case KVC_DTYPE_F16: return launch_scores_dtype<__half>(a, p, logits, tile_stats, stream);
    default: return launch_scores_dtype<__nv_bfloat16>(a, p, logits, tile_stats, stream);
  }
}

cudaError_t launch_softmax_stats(const KCachePlan& p, const MaxSum* tile_stats, const float* sinks,
                                 MaxSum* stats, cudaStream_t stream) {
  softmax_stats_kernel<<<p.B * p.QR, 32, 0, stream>>>(p, tile_stats, sinks, stats);
  return cudaGetLastError();
}

}  // namespace kvc
