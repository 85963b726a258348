// Stages 3 and 4 of a KCache decode step: the selection score of every position (softmax
// probabilities summed over a KV head's query heads, or over the whole layer) and a GPU radix
// select of the top N. Probabilities are ≥ 0, so their float bits order like unsigned ints.
#include "kcache_internal.h"

namespace kvc {
namespace {

constexpr int kSelectThreads = 1024;  // one CTA per selection row; 32 warps
constexpr int kScoreBlock = 256;
constexpr int kBatch = 8;  // elements each thread loads before using them

__global__ void selection_score_kernel(KCachePlan p, const float* __restrict__ logits,
                                       const MaxSum* __restrict__ stats,
                                       float* __restrict__ select) {
  const int s = blockIdx.x * blockDim.x + threadIdx.x;
  const int row = blockIdx.y;  // b * select_rows + r
  if (s >= p.S) return;
  const int b = row / p.select_rows;
  const int h0 = (row % p.select_rows) * p.heads_per_select;
  float acc = 0.f;
  for (int h = 0; h < p.heads_per_select; ++h) {
    const int head = b * p.Hq + h0 + h;
    const MaxSum st = stats[head];  // st.sum holds 1 / Σ exp
    acc += __expf(logits[(int64_t)head * p.S + s] - st.max) * st.sum;
  }
  select[(int64_t)row * p.S + s] = acc;
}

__device__ inline uint32_t warp_inclusive_scan(uint32_t x, int lane) {
  for (int off = 1; off < 32; off <<= 1) {
    const uint32_t t = __shfl_up_sync(0xffffffffu, x, off);
    if (lane >= off) x += t;
  }
  return x;
}

// Radix select over 8-bit digits from the top: after 4 passes `prefix` is the bit pattern of
// the N-th largest score and `remaining` how many values equal to it still belong to the top N.
// Then an ordered compaction writes the positions above it, followed by the first `remaining`
// equal ones, so the result is deterministic. The row is staged in shared memory when it fits
// (five passes read it); otherwise the passes read it from global memory (L2).
__global__ void __launch_bounds__(kSelectThreads)
topn_select_kernel(KCachePlan p, const float* __restrict__ select, int32_t* __restrict__ index,
                   int staged_in_shared) {
  extern __shared__ uint32_t staged[];
  const int row = blockIdx.x;
  const uint32_t* row_bits = reinterpret_cast<const uint32_t*>(select + (int64_t)row * p.S);
  int32_t* out = index + (int64_t)row * p.N;
  const int S = p.S, N = p.N;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  if (N >= S) {
    for (int i = tid; i < S; i += blockDim.x) out[i] = i;
    return;
  }
  const uint32_t* x = row_bits;
  if (staged_in_shared) {
    for (int base = tid; base < S; base += kSelectThreads * kBatch) {
      uint32_t v[kBatch];
#pragma unroll
      for (int k = 0; k < kBatch; ++k) {
        const int i = base + k * kSelectThreads;
        v[k] = i < S ? row_bits[i] : 0u;
      }
#pragma unroll
      for (int k = 0; k < kBatch; ++k) {
        const int i = base + k * kSelectThreads;
        if (i < S) staged[i] = v[k];
      }
    }
    __syncthreads();
    x = staged;
  }

  __shared__ uint32_t hist[256];
  __shared__ uint32_t chosen_digit, chosen_remaining;
  uint32_t prefix = 0, mask = 0, remaining = N;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = tid; i < 256; i += blockDim.x) hist[i] = 0;
    __syncthreads();
    for (int base = 0; base < S; base += kSelectThreads * kBatch) {
      uint32_t v[kBatch];
#pragma unroll
      for (int k = 0; k < kBatch; ++k) {  // all loads first: latency overlaps
        const int i = base + k * kSelectThreads + tid;
        v[k] = i < S ? x[i] : 0u;
      }
#pragma unroll
      for (int k = 0; k < kBatch; ++k) {
        const int i = base + k * kSelectThreads + tid;
        const bool match = i < S && (v[k] & mask) == prefix;
        const uint32_t digit = (v[k] >> shift) & 0xffu;
        // Probabilities crowd into few exponent digits: aggregate equal digits per warp first.
        const uint32_t peers = __match_any_sync(0xffffffffu, match ? digit : 0x100u);
        if (match && lane == __ffs(peers) - 1) atomicAdd(&hist[digit], (uint32_t)__popc(peers));
      }
    }
    __syncthreads();
    if (warp == 0) {  // lane l owns bins 255-8l down to 248-8l
      uint32_t count[8], local = 0;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        count[j] = hist[255 - 8 * lane - j];
        local += count[j];
      }
      const uint32_t inclusive = warp_inclusive_scan(local, lane);
      uint32_t above = inclusive - local;
      if (above < remaining && remaining <= inclusive) {
        for (int j = 0; j < 8; ++j) {
          if (above + count[j] >= remaining) {
            chosen_digit = 255 - 8 * lane - j;
            chosen_remaining = remaining - above;
            break;
          }
          above += count[j];
        }
      }
    }
    __syncthreads();
    prefix |= chosen_digit << shift;
    mask |= 0xffu << shift;
    remaining = chosen_remaining;
  }

  const uint32_t threshold = prefix;
  const uint32_t take_equal = remaining;
  const uint32_t greater_total = N - remaining;
  __shared__ uint32_t warp_greater[32], warp_equal[32], tile_greater, tile_equal;
  uint32_t run_greater = 0, run_equal = 0;
  const uint32_t lanes_below = (1u << lane) - 1u;
  for (int base = 0; base < S; base += blockDim.x) {
    const int i = base + tid;
    const uint32_t v = i < S ? x[i] : 0u;
    const bool greater = i < S && v > threshold;
    const bool equal = i < S && v == threshold;
    const uint32_t greater_bits = __ballot_sync(0xffffffffu, greater);
    const uint32_t equal_bits = __ballot_sync(0xffffffffu, equal);
    if (lane == 0) {
      warp_greater[warp] = __popc(greater_bits);
      warp_equal[warp] = __popc(equal_bits);
    }
    __syncthreads();
    if (warp == 0) {
      const uint32_t g = warp_greater[lane], e = warp_equal[lane];
      const uint32_t g_incl = warp_inclusive_scan(g, lane), e_incl = warp_inclusive_scan(e, lane);
      warp_greater[lane] = g_incl - g;
      warp_equal[lane] = e_incl - e;
      if (lane == 31) {
        tile_greater = g_incl;
        tile_equal = e_incl;
      }
    }
    __syncthreads();
    if (greater) out[run_greater + warp_greater[warp] + __popc(greater_bits & lanes_below)] = i;
    const uint32_t equal_rank = run_equal + warp_equal[warp] + __popc(equal_bits & lanes_below);
    if (equal && equal_rank < take_equal) out[greater_total + equal_rank] = i;
    run_greater += tile_greater;
    run_equal += tile_equal;
    __syncthreads();
  }
}

}  // namespace

cudaError_t launch_selection_scores(const KCachePlan& p, const float* logits, const MaxSum* stats,
                                    float* select, cudaStream_t stream) {
  const dim3 grid((p.S + kScoreBlock - 1) / kScoreBlock, p.B * p.select_rows);
  selection_score_kernel<<<grid, kScoreBlock, 0, stream>>>(p, logits, stats, select);
  return cudaGetLastError();
}

cudaError_t launch_topn_select(const KCachePlan& p, const float* select, int32_t* index,
                               cudaStream_t stream) {
  // Stage the row in shared memory when this GPU's opt-in limit allows it.
  int device = 0, optin = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess)
    err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) return err;
  const size_t row_bytes = sizeof(float) * p.S;
  const size_t static_bytes = 2048;  // histogram and scan scratch
  const bool staged = p.N < p.S && row_bytes + static_bytes <= (size_t)optin;
  const size_t smem = staged ? row_bytes : 0;
  if (staged && smem > 48 * 1024) {
    err = cudaFuncSetAttribute(topn_select_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (err != cudaSuccess) return err;
  }
  topn_select_kernel<<<p.B * p.select_rows, kSelectThreads, smem, stream>>>(p, select, index, staged);
  return cudaGetLastError();
}

}  // namespace kvc
