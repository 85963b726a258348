// Stages 3 and 4 of a KCache decode step: the selection score of every position (softmax
// probabilities summed over a KV head's query rows (heads x new tokens), or over the layer's) and a GPU radix
// select of the top N (no sort); on sm_90 a row is split over a thread-block cluster.
#include <cooperative_groups.h>
#include <cstdlib>

#include "kcache_internal.h"

namespace kvc {
namespace {

constexpr int kSelectThreads = 1024;  // one CTA per selection row; 32 warps
constexpr int kScoreBlock = 256;

__global__ void selection_score_kernel(KCachePlan p, const float* __restrict__ logits,
                                       const MaxSum* __restrict__ stats,
                                       float* __restrict__ select) {
  const int s = blockIdx.x * blockDim.x + threadIdx.x;
  const int row = blockIdx.y;  // b * select_rows + r
  if (s >= p.S) return;
  const int b = row / p.select_rows;
  const int h0 = (row % p.select_rows) * p.rows_per_select;  // the row's query rows are contiguous
  float acc = 0.f;
  for (int h = 0; h < p.rows_per_select; ++h) {
    const int head = b * p.QR + h0 + h;
    const MaxSum st = stats[head];  // st.sum holds 1 / Σ exp
    acc += __expf(logits[(int64_t)head * p.S + s] - st.max) * st.sum;
  }
  select[(int64_t)row * p.S + s] = acc;
}

constexpr int kBins = 2048;          // 11-bit digits: bits 31..21, 20..10, 9..0
constexpr int kSubHistograms = 8;    // warps spread their atomics over 8 copies (hot bins contend)
constexpr int kCandidates = 4096;    // boundary-bin positions kept in shared memory
constexpr size_t kSelectSmem = sizeof(uint32_t) * (kSubHistograms * kBins + 2 * kCandidates);

struct DigitChoice {
  uint32_t digit, remaining, in_bin;  // chosen bin, how many of it to take, its size
};

struct SelectShared {
  unsigned long long scan[33];
  DigitChoice choice;
  unsigned long long split_counts;  // this CTA's kept counts in ordered_split (class 1 << 32 | class 2)
};

// The CTAs that share one selection row, each taking a contiguous chunk of it. On sm_90 they
// are a thread-block cluster: radix histograms and split counts are summed through distributed
// shared memory, so a long row is read by up to 4 SMs (topn_cluster_size). Elsewhere a row is
// one CTA.
struct RowCluster {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  __device__ unsigned rank() const { return cooperative_groups::this_cluster().block_rank(); }
  __device__ unsigned size() const { return cooperative_groups::this_cluster().num_blocks(); }
  __device__ void sync() const { cooperative_groups::this_cluster().sync(); }
  // `local` (a shared-memory address of this CTA) as the same variable of CTA `r`.
  template <typename T> __device__ T* at(T* local, unsigned r) const {
    return cooperative_groups::this_cluster().map_shared_rank(local, r);
  }
#else
  __device__ unsigned rank() const { return 0; }
  __device__ unsigned size() const { return 1; }
  __device__ void sync() const { __syncthreads(); }
  template <typename T> __device__ T* at(T* local, unsigned) const { return local; }
#endif
};

// Exclusive prefix sum over the block in thread order; `total` gets the sum of all.
__device__ unsigned long long block_exclusive_scan(unsigned long long x, unsigned long long* total,
                                                   SelectShared& sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  unsigned long long inclusive = x;
  for (int off = 1; off < 32; off <<= 1) {
    const unsigned long long t = __shfl_up_sync(0xffffffffu, inclusive, off);
    if (lane >= off) inclusive += t;
  }
  if (lane == 31) sh.scan[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    const unsigned long long w = lane < warps ? sh.scan[lane] : 0ull;
    unsigned long long wi = w;
    for (int off = 1; off < 32; off <<= 1) {
      const unsigned long long t = __shfl_up_sync(0xffffffffu, wi, off);
      if (lane >= off) wi += t;
    }
    sh.scan[lane] = wi - w;
    if (lane == 31) sh.scan[32] = wi;
  }
  __syncthreads();
  const unsigned long long exclusive = sh.scan[warp] + inclusive - x;
  *total = sh.scan[32];
  __syncthreads();  // scan[] is reused by the next call
  return exclusive;
}

// One radix digit: histogram of bits [shift, shift+bits) over the n values whose bits above
// match `prefix` under `mask`, then the bin holding the `remaining`-th largest. kAcross: the
// values are this CTA's chunk of a row split over the cluster; the bins are summed over its
// CTAs, so every CTA makes the same choice.
template <bool kAcross>
__device__ DigitChoice choose_digit(const uint32_t* values, int n, uint32_t mask, uint32_t prefix,
                                    int shift, int bits, uint32_t remaining, uint32_t* hist,
                                    SelectShared& sh, const RowCluster& cluster) {
  static_assert(kSelectThreads * 2 == kBins, "each thread owns two bins");
  const int tid = threadIdx.x, warp = tid >> 5;
  const uint32_t digit_mask = (1u << bits) - 1u;
  for (int i = tid; i < kSubHistograms * kBins; i += blockDim.x) hist[i] = 0;
  __syncthreads();
  uint32_t* my_hist = hist + (warp % kSubHistograms) * kBins;
  constexpr int kBatch = 8;  // loads in flight per thread
  for (int base = tid; base < n; base += blockDim.x * kBatch) {
    uint32_t v[kBatch];
#pragma unroll
    for (int k = 0; k < kBatch; ++k) {
      const int i = base + k * blockDim.x;
      v[k] = i < n ? values[i] : 0u;
    }
#pragma unroll
    for (int k = 0; k < kBatch; ++k) {
      const int i = base + k * blockDim.x;
      if (i < n && (v[k] & mask) == prefix) atomicAdd(&my_hist[(v[k] >> shift) & digit_mask], 1u);
    }
  }
  __syncthreads();
  // Thread t owns bins 2047-2t and 2046-2t, so thread order is descending bin order.
  const int bin_hi = kBins - 1 - 2 * tid, bin_lo = bin_hi - 1;
  uint32_t c_hi = 0, c_lo = 0;
  for (int h = 0; h < kSubHistograms; ++h) {
    c_hi += hist[h * kBins + bin_hi];
    c_lo += hist[h * kBins + bin_lo];
  }
  if (kAcross) {
    // The sub-histograms folded into the first (only this thread touches its two bins), then
    // the CTAs' first histograms summed.
    hist[bin_hi] = c_hi;
    hist[bin_lo] = c_lo;
    cluster.sync();
    c_hi = c_lo = 0;
    for (unsigned r = 0; r < cluster.size(); ++r) {
      const uint32_t* h = cluster.at(hist, r);
      c_hi += h[bin_hi];
      c_lo += h[bin_lo];
    }
  }
  unsigned long long total;
  const uint32_t above = (uint32_t)block_exclusive_scan(c_hi + c_lo, &total, sh);
  if (above < remaining && remaining <= above + c_hi + c_lo) {
    if (above + c_hi >= remaining) sh.choice = DigitChoice{(uint32_t)bin_hi, remaining - above, c_hi};
    else sh.choice = DigitChoice{(uint32_t)bin_lo, remaining - above - c_hi, c_lo};
  }
  __syncthreads();
  const DigitChoice choice = sh.choice;
  if (kAcross) cluster.sync();  // no CTA clears its histogram while another still reads it
  else __syncthreads();
  return choice;
}

// Ordered split of values[0, n) into two kept classes: classify(v) gives 0 (drop), 1 or 2, and
// emit(i, v, cls, rank) receives every kept element with its rank among its class in position
// order. Warp w owns positions [w * seg, (w + 1) * seg) and reads them 32 at a time, lane l
// element base + l, so every load is coalesced; ranks come from a scan over the warps' counts
// and ballots inside a warp. (A contiguous segment per thread made each warp load touch 32
// cache lines: the select of a 32K row took 40.8 µs on the H200, 20.7 µs with this.)
constexpr int kSplitUnroll = 8;  // 32-element steps whose loads are issued together

// Element base + 32 k + lane of each of the next kSplitUnroll 32-element steps (0 at or past
// hi): one warp's loads for those steps, issued together.
__device__ inline void load_steps(const uint32_t* values, int base, int hi, int lane,
                                  uint32_t (&v)[kSplitUnroll]) {
#pragma unroll
  for (int k = 0; k < kSplitUnroll; ++k) {
    const int i = base + 32 * k + lane;
    v[k] = i < hi ? values[i] : 0u;
  }
}

// kAcross: values[0, n) is this CTA's chunk of a row split over the cluster, and ranks count
// the kept elements of the chunks before it too (their counts read from the other CTAs).
template <bool kAcross, typename Classify, typename Emit>
__device__ void ordered_split(const uint32_t* values, int n, Classify classify, Emit emit,
                              SelectShared& sh, const RowCluster& cluster) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int seg = ((n + warps - 1) / warps + 31) & ~31;
  const int lo = min(n, warp * seg), hi = min(n, lo + seg);
  uint32_t count1 = 0, count2 = 0;  // this lane's, summed over the warp below
  for (int base = lo; base < hi; base += 32 * kSplitUnroll) {
    uint32_t v[kSplitUnroll];
    load_steps(values, base, hi, lane, v);
#pragma unroll
    for (int k = 0; k < kSplitUnroll; ++k) {
      const int cls = base + 32 * k + lane < hi ? classify(v[k]) : 0;
      count1 += cls == 1;
      count2 += cls == 2;
    }
  }
  count1 = __reduce_add_sync(0xffffffffu, count1);
  count2 = __reduce_add_sync(0xffffffffu, count2);
  unsigned long long total;
  unsigned long long before =
      block_exclusive_scan(lane == 0 ? ((unsigned long long)count1 << 32) | count2 : 0ull, &total, sh);
  if (kAcross) {
    if (threadIdx.x == 0) sh.split_counts = total;
    cluster.sync();
    if (lane == 0)
      for (unsigned r = 0; r < cluster.rank(); ++r) before += *cluster.at(&sh.split_counts, r);
  }
  before = __shfl_sync(0xffffffffu, before, 0);
  uint32_t rank1 = (uint32_t)(before >> 32), rank2 = (uint32_t)before;
  const uint32_t lower_lanes = (1u << lane) - 1u;
  for (int base = lo; base < hi; base += 32 * kSplitUnroll) {
    uint32_t v[kSplitUnroll];
    load_steps(values, base, hi, lane, v);
#pragma unroll
    for (int k = 0; k < kSplitUnroll; ++k) {
      const int i = base + 32 * k + lane;
      const int cls = i < hi ? classify(v[k]) : 0;
      if (!__any_sync(0xffffffffu, cls != 0)) continue;  // most steps keep nothing (N << S)
      const uint32_t ballot1 = __ballot_sync(0xffffffffu, cls == 1);
      const uint32_t ballot2 = __ballot_sync(0xffffffffu, cls == 2);
      if (cls == 1) emit(i, v[k], 1, rank1 + __popc(ballot1 & lower_lanes));
      if (cls == 2) emit(i, v[k], 2, rank2 + __popc(ballot2 & lower_lanes));
      rank1 += __popc(ballot1);
      rank2 += __popc(ballot2);
    }
  }
}

// Ordered compaction of values[0, n) (positions = index[i], or first + i when index is NULL):
// those above `threshold` go to out_greater[0..), the first `take_equal` equal to it to
// out_equal[0..).
template <bool kAcross>
__device__ void compact(const uint32_t* values, const int32_t* index, int first, int n,
                        uint32_t threshold, uint32_t take_equal, int32_t* out_greater,
                        int32_t* out_equal, SelectShared& sh, const RowCluster& cluster) {
  ordered_split<kAcross>(
      values, n, [&](uint32_t v) { return v > threshold ? 1 : v == threshold ? 2 : 0; },
      [&](int i, uint32_t, int cls, uint32_t rank) {
        const int32_t position = index ? index[i] : first + i;
        if (cls == 1) out_greater[rank] = position;
        else if (rank < take_equal) out_equal[rank] = position;
      },
      sh, cluster);
}

// Top-N positions of one selection row, in position order within each of three groups.
// Probabilities are ≥ 0, so their float bits order like unsigned ints: an 11-bit radix digit
// from the top finds the bin of the N-th largest. Positions in higher bins are taken outright;
// the bin itself usually holds few positions, which are copied to the shared memory of the
// cluster's first CTA and finished there (two more digits). A crowded bin falls back to
// finishing over the whole row. The row is split over the cluster's CTAs in contiguous chunks,
// and ranks run over the whole row, so the output is the same for every cluster size.
__global__ void __launch_bounds__(kSelectThreads)
topn_select_kernel(KCachePlan p, const float* __restrict__ select, int32_t* __restrict__ index) {
  extern __shared__ __align__(16) uint32_t select_smem[];
  __shared__ SelectShared sh;
  const RowCluster cluster{};
  uint32_t* hist = select_smem;                                   // [kSubHistograms][kBins]
  uint32_t* candidate_bits = hist + kSubHistograms * kBins;       // [kCandidates]
  int32_t* candidate_pos = reinterpret_cast<int32_t*>(candidate_bits + kCandidates);
  const unsigned rank = cluster.rank(), ranks = cluster.size();
  const int row = blockIdx.x / ranks;
  const int S = p.S, N = p.N;
  const int chunk = ((S + (int)ranks - 1) / (int)ranks + 31) & ~31;  // 128-byte aligned chunks
  const int first = min(S, (int)rank * chunk), n = min(S, first + chunk) - first;
  const uint32_t* bits = reinterpret_cast<const uint32_t*>(select + (int64_t)row * S) + first;
  int32_t* out = index + (int64_t)row * N;
  if (N >= S) {
    for (int i = threadIdx.x; i < n; i += blockDim.x) out[first + i] = first + i;
    return;
  }

  const DigitChoice top = choose_digit<true>(bits, n, 0u, 0u, 21, 11, N, hist, sh, cluster);
  const uint32_t top_mask = 0x7ffu << 21, top_prefix = top.digit << 21;
  const uint32_t above_bin = N - top.remaining;  // positions in higher bins, all kept

  if (top.in_bin <= kCandidates) {
    // One split: higher bins straight to the output, the boundary bin to the first CTA.
    uint32_t* first_bits = cluster.at(candidate_bits, 0);
    int32_t* first_pos = cluster.at(candidate_pos, 0);
    ordered_split<true>(
        bits, n, [&](uint32_t v) { return (v >> 21) > top.digit ? 1 : (v >> 21) == top.digit ? 2 : 0; },
        [&](int i, uint32_t v, int cls, uint32_t rank) {
          if (cls == 1) {
            out[rank] = first + i;
          } else {
            first_bits[rank] = v;
            first_pos[rank] = first + i;
          }
        },
        sh, cluster);
    cluster.sync();  // the candidates are in place; no CTA reads another's memory after this
    if (rank != 0) return;
    const int m = (int)top.in_bin;
    const DigitChoice mid = choose_digit<false>(candidate_bits, m, top_mask, top_prefix, 10, 11,
                                                top.remaining, hist, sh, cluster);
    const uint32_t mid_mask = top_mask | (0x7ffu << 10), mid_prefix = top_prefix | (mid.digit << 10);
    const DigitChoice low = choose_digit<false>(candidate_bits, m, mid_mask, mid_prefix, 0, 10,
                                                mid.remaining, hist, sh, cluster);
    const uint32_t threshold = mid_prefix | low.digit;
    const uint32_t greater_in_bin = top.remaining - low.remaining;
    compact<false>(candidate_bits, candidate_pos, 0, m, threshold, low.remaining, out + above_bin,
                   out + above_bin + greater_in_bin, sh, cluster);
  } else {
    const DigitChoice mid = choose_digit<true>(bits, n, top_mask, top_prefix, 10, 11, top.remaining,
                                               hist, sh, cluster);
    const uint32_t mid_mask = top_mask | (0x7ffu << 10), mid_prefix = top_prefix | (mid.digit << 10);
    const DigitChoice low = choose_digit<true>(bits, n, mid_mask, mid_prefix, 0, 10, mid.remaining,
                                               hist, sh, cluster);
    const uint32_t threshold = mid_prefix | low.digit;
    compact<true>(bits, nullptr, first, n, threshold, low.remaining, out, out + (N - low.remaining),
                  sh, cluster);
    cluster.sync();  // no CTA leaves while another may still read its split counts
  }
}

}  // namespace

cudaError_t launch_selection_scores(const KCachePlan& p, const float* logits, const MaxSum* stats,
                                    float* select, cudaStream_t stream) {
  const dim3 grid((p.S + kScoreBlock - 1) / kScoreBlock, p.B * p.select_rows);
  selection_score_kernel<<<grid, kScoreBlock, 0, stream>>>(p, logits, stats, select);
  return cudaGetLastError();
}

// CTAs per selection row: on sm_90 the largest power of two up to 4 that keeps the grid in one
// wave (`slots` CTAs resident at once) and every chunk at least 8192 positions; 1 before sm_90
// (no clusters). Measured on the H200 (B=8, docs/BENCHMARKS.md): a CTA costs ~14 µs whatever
// its chunk, so splits pay only on long rows (32K "layer": 21.5 µs alone, 16.8 / 15.6 / 19.4
// over 2 / 4 / 8 CTAs; 8K: 14.0 alone, no faster split). $KVC_TOPN_CLUSTER (1, 2, 4 or 8)
// overrides on sm_90, for the benchmark's sweep.
int topn_cluster_size(const KCachePlan& p, int cc_major, int slots) {
  if (cc_major < 9) return 1;
  if (const char* v = getenv("KVC_TOPN_CLUSTER"); v && *v) {
    const int c = atoi(v);
    return c >= 8 ? 8 : c >= 4 ? 4 : c >= 2 ? 2 : 1;
  }
  const int64_t rows = (int64_t)p.B * p.select_rows;
  int c = 1;
  while (c < 4 && rows * c * 2 <= slots && p.S / (c * 2) >= 8192) c *= 2;
  return c;
}

struct DeviceTraits {
  bool ready = false;  // set up once per device: the 96 KiB shared-memory opt-in, the traits below
  int cc_major = 0, slots = 0;  // compute capability, select CTAs resident at once
};

cudaError_t launch_topn_select(const KCachePlan& p, const float* select, int32_t* index,
                               cudaStream_t stream) {
  static DeviceTraits traits[64];
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  DeviceTraits local;
  DeviceTraits& t = device < 64 ? traits[device] : local;
  if (!t.ready) {
    int sms = 0, per_sm = 0;
    if ((err = cudaFuncSetAttribute(topn_select_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)kSelectSmem)) ||
        (err = cudaDeviceGetAttribute(&t.cc_major, cudaDevAttrComputeCapabilityMajor, device)) ||
        (err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device)) ||
        (err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, topn_select_kernel, kSelectThreads, kSelectSmem)))
      return err;
    t.slots = sms * (per_sm > 0 ? per_sm : 1);
    t.ready = true;
  }
  const int cluster = topn_cluster_size(p, t.cc_major, t.slots);
  cudaLaunchAttribute attr;
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim.x = cluster;
  attr.val.clusterDim.y = 1;
  attr.val.clusterDim.z = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(p.B * p.select_rows * cluster);
  config.blockDim = dim3(kSelectThreads);
  config.dynamicSmemBytes = kSelectSmem;
  config.stream = stream;
  config.attrs = &attr;
  config.numAttrs = t.cc_major >= 9 ? 1 : 0;  // no cluster attribute before sm_90
  return cudaLaunchKernelEx(&config, topn_select_kernel, p, select, index);
}

}  // namespace kvc
