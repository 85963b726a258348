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

// A 16-byte read-only load of K; HINT asks L2 to fetch the whole 256-byte block around it
// (a key row is 256 bytes at head_dim 128: its other lanes' loads then hit L2).
template <bool HINT>
__device__ inline uint4 load_key_vector(const void* ptr) {
  if constexpr (HINT) {
    uint4 v;
    asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(ptr));
    return v;
  } else {
    return __ldg(reinterpret_cast<const uint4*>(ptr));
  }
}

// What every tensor-core score CTA shares, whatever brings its keys in: the query fragments of
// its 8 query rows, this lane's two rows (2 t4, 2 t4 + 1) of bias and logits, their running
// statistics; `step` scores one 16-key M tile from its key vectors, `finish` folds the
// statistics of the CTA's warps.
template <typename T, int NB>
struct MmaScoreTile {
  static constexpr int kQStride = 32 * NB + 8;  // halves per query row in shared memory (+16 B: banks)
  static constexpr int kWarps = kScoreThreads / 32;
  struct Shared {
    __align__(16) T q[8 * kQStride];
    MaxSum warp_stats[kWarps][8];
  };

  int kv, g0, b, gcount, tile_start, tile_len, t4, row_in_tile;
  uint4 qf[NB];  // this lane's query fragment: head row_in_tile, dims 8*t4.. of each block
  const float* bias_row[2];
  float* logit_row[2];
  bool row_valid[2];
  MaxSum st[2];

  // Query rows g0.. of the KV head, zero-padded to 8 rows and to 32 * NB dims.
  __device__ void setup(const kvc_kcache_decode_args& a, const KCachePlan& p, float* logits, Shared& sh) {
    const int tile = blockIdx.x;
    kv = blockIdx.y / p.head_tiles;
    g0 = (blockIdx.y % p.head_tiles) * 8;
    b = blockIdx.z;
    gcount = min(8, p.GR - g0);
    for (int i = threadIdx.x; i < 8 * 32 * NB; i += blockDim.x) {
      const int g = i / (32 * NB), d = i % (32 * NB);
      sh.q[g * kQStride + d] = (g < gcount && d < p.D) ? query_row<T>(a, p, b, kv, g0 + g)[d] : from_float<T>(0.f);
    }
    __syncthreads();
    const int lane = threadIdx.x & 31;
    t4 = lane & 3;
    row_in_tile = lane >> 2;
#pragma unroll
    for (int blk = 0; blk < NB; ++blk)
      qf[blk] = *reinterpret_cast<const uint4*>(&sh.q[row_in_tile * kQStride + blk * 32 + 8 * t4]);
    tile_start = tile * p.score_tile;
    tile_len = min(p.score_tile, p.S - tile_start);
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int g = 2 * t4 + e;
      bias_row[e] = a.attn_bias + b * a.attn_bias_stride_b + (int64_t)((g0 + g) % p.T) * a.attn_bias_stride_t + tile_start;
      logit_row[e] = logits + ((int64_t)b * p.QR + kv * p.GR + min(g0 + g, p.GR - 1)) * p.S + tile_start;
      row_valid[e] = g < gcount;
      st[e] = MaxSum{-INFINITY, 0.f};
    }
  }

  // The bias of keys (first + row_in_tile, + 8) for this lane's two rows; loaded with (or
  // before) the keys: loaded after the mma, its latency stalled every step.
  __device__ void load_bias(int first, float (&bias)[2][2]) const {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = first + row_in_tile + 8 * half;
#pragma unroll
      for (int e = 0; e < 2; ++e) bias[half][e] = r < tile_len && row_valid[e] ? __ldg(bias_row[e] + r) : 0.f;
    }
  }

  // Keys first.. of the tile: raw[blk][half] is dims 32 blk + 8 t4.. of key first + row_in_tile
  // + 8 half. The accumulator holds keys (row_in_tile, + 8) x query rows (2 t4, 2 t4 + 1).
  __device__ void mma(const uint4 (&raw)[NB][2], float (&acc)[4]) const {
    acc[0] = acc[1] = acc[2] = acc[3] = 0.f;
#pragma unroll
    for (int blk = 0; blk < NB; ++blk) {
      const uint4 k0 = raw[blk][0], k1 = raw[blk][1];
      const uint32_t a0[4] = {k0.x, k1.x, k0.y, k1.y};
      Mma16<T>::run(acc, a0, qf[blk].x, qf[blk].y);
      const uint32_t a1[4] = {k0.z, k1.z, k0.w, k1.w};
      Mma16<T>::run(acc, a1, qf[blk].z, qf[blk].w);
    }
  }

  __device__ void emit(const kvc_kcache_decode_args& a, int first, const float (&acc)[4], const float (&bias)[2][2]) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = first + row_in_tile + 8 * half;
      if (r < tile_len) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          if (!row_valid[e]) continue;
          const float x = finish_logit(a, acc[2 * half + e], bias[half][e]);
          logit_row[e][r] = x;
          fold_online(st[e], x);
        }
      }
    }
  }

  // Fold the 8 lanes that share t4 (lane bits 2..4), then the warps through shared memory.
  __device__ void finish(const KCachePlan& p, MaxSum* __restrict__ tile_stats, Shared& sh) {
    const int warp = threadIdx.x >> 5;
#pragma unroll
    for (int e = 0; e < 2; ++e)
#pragma unroll
      for (int off = 4; off < 32; off <<= 1) {
        const MaxSum other{__shfl_xor_sync(0xffffffffu, st[e].max, off), __shfl_xor_sync(0xffffffffu, st[e].sum, off)};
        st[e] = combine(st[e], other);
      }
    if (row_in_tile == 0) {
      sh.warp_stats[warp][2 * t4] = st[0];
      sh.warp_stats[warp][2 * t4 + 1] = st[1];
    }
    __syncthreads();
    if (threadIdx.x < gcount) {
      MaxSum total{-INFINITY, 0.f};
      for (int w = 0; w < kWarps; ++w) total = combine(total, sh.warp_stats[w][threadIdx.x]);
      const int row = kv * p.GR + g0 + threadIdx.x;
      tile_stats[((int64_t)b * p.QR + row) * p.score_tiles + blockIdx.x] = total;
    }
  }

  // Key `pos` of the sequence: a cached key or one of the step's new keys.
  __device__ static const T* key_row(const kvc_kcache_decode_args& a, const KCachePlan& p, int b, int kv, int pos) {
    return pos < p.P ? static_cast<const T*>(a.key_cache) + b * a.key_cache_stride_b + kv * a.key_cache_stride_h +
                           (int64_t)pos * a.key_cache_stride_p
                     : static_cast<const T*>(a.key) + b * a.key_stride_b + kv * a.key_stride_h +
                           (int64_t)(pos - p.P) * a.key_stride_t;
  }
};

// Keys loaded straight from global memory into registers: LOADS 16-byte vectors per lane in
// flight (MT 16-key tiles per warp step).
template <typename T, int NB, int LOADS, bool HINT = false>
__global__ void __launch_bounds__(kScoreThreads, score_ctas(NB, LOADS))
score_mma_kernel(kvc_kcache_decode_args a, KCachePlan p, float* __restrict__ logits,
                 MaxSum* __restrict__ tile_stats) {
  using Tile = MmaScoreTile<T, NB>;
  constexpr int MT = score_m_tiles(NB, LOADS);
  __shared__ typename Tile::Shared sh;
  Tile t;
  t.setup(a, p, logits, sh);
  const int warp = threadIdx.x >> 5;
  for (int base = warp * 16 * MT; base < t.tile_len; base += Tile::kWarps * 16 * MT) {
    uint4 raw[MT][NB][2];
    float bias[MT][2][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      t.load_bias(base + mt * 16, bias[mt]);
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int r = base + mt * 16 + t.row_in_tile + 8 * half;
        const T* row = r < t.tile_len ? Tile::key_row(a, p, t.b, t.kv, t.tile_start + r) : nullptr;
#pragma unroll
        for (int blk = 0; blk < NB; ++blk) {
          const int col = blk * 32 + 8 * t.t4;
          raw[mt][blk][half] = (row != nullptr && col < p.D) ? load_key_vector<HINT>(row + col) : make_uint4(0, 0, 0, 0);
        }
      }
    }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      float acc[4];
      t.mma(raw[mt], acc);
      t.emit(a, base + mt * 16, acc, bias[mt]);
    }
  }
  t.finish(p, tile_stats, sh);
}

// Keys brought into shared memory by the copy engine of the SM (cp.async.bulk, sm_90): each
// warp keeps STAGES 16-key steps in flight in its own ring, refilling a stage as soon as its
// keys are in registers, so K keeps streaming while the warp computes, stores logits and waits;
// the global-load kernel above has loads in flight only between its issue and its mma. One
// bulk copy per step when its 16 keys are contiguous cached rows, else one per key.
template <typename T, int NB, int STAGES>
__global__ void __launch_bounds__(kScoreThreads)
score_bulk_kernel(kvc_kcache_decode_args a, KCachePlan p, float* __restrict__ logits,
                  MaxSum* __restrict__ tile_stats) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  using Tile = MmaScoreTile<T, NB>;
  constexpr int kKeys = 16;  // keys per stage
  extern __shared__ __align__(128) unsigned char key_ring[];
  __shared__ typename Tile::Shared sh;
  __shared__ uint64_t ready[Tile::kWarps][STAGES];
  Tile t;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0)
    for (int s = 0; s < STAGES; ++s)
      asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"((uint32_t)__cvta_generic_to_shared(&ready[warp][s])));
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  t.setup(a, p, logits, sh);  // its __syncthreads publishes the barriers too

  const int row_bytes = p.D * (int)sizeof(T);
  unsigned char* ring = key_ring + (size_t)warp * STAGES * kKeys * row_bytes;
  const int stride = Tile::kWarps * kKeys;  // keys between a warp's steps
  const int first0 = warp * kKeys;
  const int steps = t.tile_len > first0 ? (t.tile_len - first0 + stride - 1) / stride : 0;
  const bool contiguous = a.key_cache_stride_p == p.D;
  auto issue = [&](int i) {
    const int stage = i % STAGES, first = first0 + i * stride;
    const int n = min(kKeys, t.tile_len - first), pos = t.tile_start + first;
    unsigned char* dst = ring + stage * kKeys * row_bytes;
    const uint32_t bar = (uint32_t)__cvta_generic_to_shared(&ready[warp][stage]);
    if (lane == 0)
      asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(n * row_bytes) : "memory");
    __syncwarp();
    const bool one_copy = contiguous && pos + n <= p.P;
    if (one_copy ? lane == 0 : lane < n)
      asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                   ::"r"((uint32_t)__cvta_generic_to_shared(dst + (one_copy ? 0 : lane * row_bytes))),
                     "l"(Tile::key_row(a, p, t.b, t.kv, pos + (one_copy ? 0 : lane))),
                     "r"(one_copy ? n * row_bytes : row_bytes), "r"(bar)
                   : "memory");
  };
  for (int i = 0; i < STAGES && i < steps; ++i) issue(i);

  for (int i = 0; i < steps; ++i) {
    const int stage = i % STAGES, first = first0 + i * stride;
    float bias[2][2];
    t.load_bias(first, bias);
    const uint32_t bar = (uint32_t)__cvta_generic_to_shared(&ready[warp][stage]);
    asm volatile(
        "{\n .reg .pred done;\n WAIT_%=:\n mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
        " @!done bra WAIT_%=;\n}\n" ::"r"(bar), "r"((i / STAGES) & 1) : "memory");
    const unsigned char* buf = ring + stage * kKeys * row_bytes;
    uint4 raw[NB][2];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = t.row_in_tile + 8 * half;
#pragma unroll
      for (int blk = 0; blk < NB; ++blk) {
        const int col = blk * 32 + 8 * t.t4;
        raw[blk][half] = first + r < t.tile_len && col < p.D
            ? *reinterpret_cast<const uint4*>(buf + r * row_bytes + col * (int)sizeof(T)) : make_uint4(0, 0, 0, 0);
      }
    }
    float acc[4];
    t.mma(raw, acc);  // consumes the stage's keys: every lane's reads are done after the sync
    __syncwarp();
    if (i + STAGES < steps) issue(i + STAGES);
    t.emit(a, first, acc, bias);
  }
  t.finish(p, tile_stats, sh);
#endif
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

template <typename T, int NB, int LOADS, bool HINT>
cudaError_t launch_scores_mma(const kvc_kcache_decode_args& a, const KCachePlan& p, float* logits,
                              MaxSum* tile_stats, cudaStream_t stream) {
  const dim3 grid(p.score_tiles, p.Hkv * p.head_tiles, p.B);
  score_mma_kernel<T, NB, LOADS, HINT><<<grid, kScoreThreads, 0, stream>>>(a, p, logits, tile_stats);
  return cudaGetLastError();
}

// Dynamic shared memory of a bulk score CTA: every warp's ring of 16-key stages.
size_t bulk_ring_bytes(const KCachePlan& p, int stages) {
  return (size_t)(kScoreThreads / 32) * stages * 16 * p.D * p.elem_bytes;
}

template <typename T, int NB, int STAGES>
cudaError_t launch_scores_bulk(const kvc_kcache_decode_args& a, const KCachePlan& p, float* logits,
                               MaxSum* tile_stats, cudaStream_t stream) {
  static bool opted_in[64] = {};  // the > 48 KiB opt-in, once per device
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err) return err;
  const size_t smem = bulk_ring_bytes(p, STAGES);
  if (device >= 64 || !opted_in[device]) {
    if ((err = cudaFuncSetAttribute(score_bulk_kernel<T, NB, STAGES>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    (int)(kScoreThreads / 32 * STAGES * 16 * 32 * NB * sizeof(T)))))
      return err;
    if (device < 64) opted_in[device] = true;
  }
  const dim3 grid(p.score_tiles, p.Hkv * p.head_tiles, p.B);
  score_bulk_kernel<T, NB, STAGES><<<grid, kScoreThreads, smem, stream>>>(a, p, logits, tile_stats);
  return cudaGetLastError();
}

template <typename T, int NB>
cudaError_t launch_scores_mma_loads(const kvc_kcache_decode_args& a, const KCachePlan& p, float* logits,
                                    MaxSum* tile_stats, cudaStream_t stream) {
  if (p.score_kernel == kScoreBulk) {
    switch (p.score_stages) {
      case 2: return launch_scores_bulk<T, NB, 2>(a, p, logits, tile_stats, stream);
      case 4: return launch_scores_bulk<T, NB, 4>(a, p, logits, tile_stats, stream);
      default: return launch_scores_bulk<T, NB, 3>(a, p, logits, tile_stats, stream);
    }
  }
  if (p.score_kernel == kScoreLoadsHinted) return launch_scores_mma<T, NB, 8, true>(a, p, logits, tile_stats, stream);
  if (p.score_loads >= 16) return launch_scores_mma<T, NB, 16, false>(a, p, logits, tile_stats, stream);
  return launch_scores_mma<T, NB, 8, false>(a, p, logits, tile_stats, stream);
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
