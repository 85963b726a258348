// kvc_kv_decode, kernel v2: the same bitstream, output bits and per-chunk status as v1
// (kv_decode.cu), with three changes where v1 loses time:
//
// - Words are staged, not read one by one from global memory. v1's thread reads its own stream's
//   16-bit words, so the 32 loads of a warp hit 32 far-apart places. Here each stream owns a ring
//   of kRing words in shared memory, and before every batch of kBatchSymbols symbols the warp
//   tops up the rings that could run dry, kFills streams a round: for each, the 32 lanes copy up
//   to 32 consecutive words of it (one coalesced load). A symbol consumes at most one word,
//   so a ring holding min(kBatchSymbols, words left) words never runs dry inside a batch.
// - The symbol of a slot is found by a bucket lookup (slot >> kBucketShift gives the first
//   symbol that can hold it) and a short upward walk over packed (start, stop - 1) ranges, in
//   place of v1's binary search: one or two dependent shared-memory loads instead of six or seven.
// - Dequantisation reads (q - half) / half from a table the block builds with the same IEEE
//   division v1 does per symbol, and the batch's scales are loaded before its symbols decode.
//
// The tables a block needs (the bank rows of the one or two (side, layer)s its 128 streams span)
// are built in shared memory at the block's start. A block whose streams span more (side, layer)s
// or whose rows do not fit decodes with v1's binary search over the bank in global memory, still
// with staged words ("slow" below). Every bound v1 checks is checked here in the same order, so a
// corrupt chunk reports the same KVC_DECODE_* code; every shared-memory index is bounded by the
// alphabet or the ring, every global read by the chunk, every write by the cache.
#include "kv_decode_common.h"

namespace kvc_codec {
namespace {

constexpr int kBlock = 128;              // streams (threads) per block: a chunk of an 8B model spans 128 SMs
constexpr int kRing = 32;                // staged words per stream; a power of two
constexpr int kRingStride = kBlock + 2;  // uint16s per ring row: each row starts one bank later
constexpr int kFills = 4;                // streams whose rings one round of the warp tops up
constexpr int kBatchSymbols = 16;        // symbols between top-ups; <= kRing / 2 keeps refills >= 16 words
constexpr int kBucketShift = 8;          // 256 buckets of 256 slots per table: walks of one step or none
                                         // (H200, 2026-11-29: 10 -> 8 took G = 8 from 402 to 475 GB/s)
constexpr int kBuckets = 65536 >> kBucketShift;
constexpr int kUnitRows = 2;             // (side, layer)s one fast block may span
constexpr size_t kTableBudget = 48 * 1024;  // shared bytes for ranges + buckets: two (side, layer)s of 64 shapes

static_assert((kRing & (kRing - 1)) == 0 && kBatchSymbols * 2 <= kRing && kRing <= 32, "ring sizes");

template <typename T, int G>
__device__ inline void store_group(T* dst, const float* v, bool vector_ok) {
  constexpr int bytes = G * (int)sizeof(T);
  alignas(16) T packed[G];
#pragma unroll
  for (int g = 0; g < G; ++g) packed[g] = to_cache<T>(v[g]);
  if (vector_ok && bytes == 4) {
    *reinterpret_cast<uint32_t*>(dst) = *reinterpret_cast<const uint32_t*>(packed);
  } else if (vector_ok && bytes == 8) {
    *reinterpret_cast<uint2*>(dst) = *reinterpret_cast<const uint2*>(packed);
  } else if (vector_ok && bytes % 16 == 0) {
#pragma unroll
    for (int i = 0; i < bytes / 16; ++i) reinterpret_cast<uint4*>(dst)[i] = reinterpret_cast<const uint4*>(packed)[i];
  } else {
#pragma unroll
    for (int g = 0; g < G; ++g) dst[g] = packed[g];
  }
}

// Decodes one symbol of a table: (symbol, start, frequency) of the slot.
template <bool Fast>
__device__ inline int find_symbol(uint32_t slot, int alphabet, const uint32_t* range, const uint8_t* bucket,
                                  const uint16_t* cdf, uint32_t& start, uint32_t& freq) {
  if (Fast) {
    int s = min((int)bucket[slot >> kBucketShift], alphabet - 1);
    uint32_t r = range[s];
    while ((r >> 16) < slot && s + 1 < alphabet) r = range[++s];  // stop - 1 < slot: the slot is further up
    start = r & 0xFFFFu;
    freq = (s + 1 < alphabet ? (r >> 16) + 1 : 65536u) - start;
    return s;
  }
  int lo = 0, hi = alphabet;  // v1's search, on the bank in global memory
  while (hi - lo > 1) {
    const int mid = (lo + hi) >> 1;
    if (cdf[mid] <= slot) lo = mid; else hi = mid;
  }
  start = cdf[lo];
  freq = (lo + 1 < alphabet ? (uint32_t)cdf[lo + 1] : 65536u) - start;
  return lo;
}

// Everything one thread needs to decode its stream; built by the kernel, then run fast or slow.
// Kept small (32-bit offsets, centre and row packed) so G = 8 fits the register budget.
template <int G>
struct Work {
  const uint16_t* word;           // the chunk's words
  uint32_t state, cursor, filled, end;
  bool ok;                        // false: nothing to decode (no stream, or it failed a check)
  bool vector_ok;                 // the group is one aligned vector of the cache
  int alphabet;
  // G <= 4: row << 8 | centre a channel, row in the block's window (fast) or in bank_cdf (slow);
  // G = 8: two channels' shape << 8 | centre a word, 16 bits each, the row being row0 + shape (with
  // 32-bit entries G = 8 spilled inside the symbol loop; packed, G <= 4 did: nvdisasm, sm_90)
  static constexpr bool kPacked = G >= 8;
  uint32_t table[kPacked ? (G + 1) / 2 : G];
  int row0;                       // G = 8: the (side, layer)'s first bank row, in the window (fast) or bank_cdf
  int unit_at;                    // fast: (q - half) / half of this (side, layer) at units[unit_at + q]
  float top;                      // log scales: the (side, layer)'s maximum
  const uint8_t* scales;          // log scales: a u8 code per token; else a float32 scale per token
  void* dst;                      // (layer, head, first token, dim) of the group in keys or values
  int channel0;
};

template <typename T, int G, bool Fast>
__device__ __forceinline__ void decode_stream(const kvc_kv_decode_args& a, Work<G>& w, int tokens,
                                              const uint32_t* ranges, const uint8_t* buckets, const float* units,
                                              const float* steps, uint16_t* ring) {
  constexpr int kTokens = G >= 4 ? kBatchSymbols / G : 4;  // tokens per batch, <= kBatchSymbols symbols
  const int lane = threadIdx.x & 31, warp0 = threadIdx.x & ~31;
  const int width = a.bank_width, alphabet = w.alphabet;
  bool ok = w.ok;
  uint32_t state = w.state, cursor = w.cursor, filled = w.filled;
  const uint32_t end = w.end;
  for (int t0 = 0; t0 < tokens; t0 += kTokens) {  // the same count on every lane of the warp
    // Top up the rings that hold fewer than a batch's worst case (and have words left).
    __syncwarp();  // every lane has read the words about to be overwritten
    const bool wants = ok && filled < end && filled - cursor < (uint32_t)kBatchSymbols;
    const uint32_t target = !wants ? filled : end - cursor > (uint32_t)kRing ? cursor + kRing : end;
    uint32_t need = __ballot_sync(0xFFFFFFFFu, wants);
    while (need) {  // kFills streams per round, their loads in flight together
      int j[kFills];
      uint32_t at[kFills], to[kFills];
      uint16_t got[kFills];
#pragma unroll
      for (int k = 0; k < kFills; ++k) {
        j[k] = need ? __ffs(need) - 1 : 0;
        const uint32_t from = __shfl_sync(0xFFFFFFFFu, filled, j[k]);
        const uint32_t upto = __shfl_sync(0xFFFFFFFFu, target, j[k]);  // upto - from <= kRing
        at[k] = from + lane;
        to[k] = need ? upto : 0;
        need &= need - 1;
      }
#pragma unroll
      for (int k = 0; k < kFills; ++k) got[k] = at[k] < to[k] ? w.word[at[k]] : 0;
#pragma unroll
      for (int k = 0; k < kFills; ++k)
        if (at[k] < to[k]) ring[(at[k] & (kRing - 1)) * kRingStride + warp0 + j[k]] = got[k];
    }
    filled = target;
    __syncwarp();
    if (!ok) continue;

    float scale[kTokens];
#pragma unroll
    for (int i = 0; i < kTokens; ++i) {
      const int t = min(t0 + i, tokens - 1);
      if (a.log_scales) {
        scale[i] = __fmul_rn(w.top, steps[w.scales[t]]);
      } else {
        scale[i] = reinterpret_cast<const float*>(w.scales)[t];
        if (!(scale[i] >= 0.f && scale[i] <= cache_max<T>())) ok = false;  // v1 calls it a bad stream too
      }
    }
#pragma unroll
    for (int i = 0; i < kTokens; ++i) {
      if (!ok || t0 + i >= tokens) break;
      float v[G];
#pragma unroll
      for (int g = 0; g < G; ++g) {
        const uint32_t slot = state & 0xFFFFu;
        const uint32_t entry = Work<G>::kPacked ? (w.table[g >> 1] >> ((g & 1) * 16)) & 0xFFFFu : w.table[g];
        const int row = (Work<G>::kPacked ? w.row0 : 0) + (int)(entry >> 8), centre = (int)(entry & 0xFFu);
        uint32_t start, freq;
        const int s = find_symbol<Fast>(slot, alphabet, ranges + row * width, buckets + row * kBuckets,
                                        a.bank_cdf + (int64_t)row * width, start, freq);
        state = freq * (state >> 16) + slot - start;
        if (state < kStateLow) {
          if (cursor >= end) { ok = false; break; }
          state = (state << 16) | ring[(cursor & (kRing - 1)) * kRingStride + threadIdx.x];  // cursor < filled
          ++cursor;
        }
        int q = s + centre;
        q = q >= alphabet ? q - alphabet : q;
        const int half = alphabet >> 1;
        const float unit = Fast ? units[w.unit_at + q] : __fdiv_rn((float)(q - half), (float)half);
        v[g] = __fmul_rn(unit, scale[i]);  // v1's rounding: (q - half) / half, then times the scale
      }
      if (!ok) break;
      T* const dst = static_cast<T*>(w.dst) + (int64_t)(t0 + i) * a.head_dim;
      const int dim = w.channel0 % a.head_dim;
      if (dim + G <= a.head_dim) {
        store_group<T, G>(dst, v, w.vector_ok);
      } else {  // the group straddles heads (head_dim not a multiple of G)
#pragma unroll
        for (int g = 0; g < G; ++g) {
          const int c = w.channel0 + g;
          dst[((int64_t)(c / a.head_dim) - w.channel0 / a.head_dim) * a.capacity * a.head_dim + c % a.head_dim - dim] =
              to_cache<T>(v[g]);
        }
      }
    }
  }
  if (w.ok && (!ok || cursor != end || state != kStateLow)) fail(a.status, blockIdx.y, KVC_DECODE_BAD_STREAM);
}

template <typename T, int G>
__global__ void __launch_bounds__(kBlock, 8) decode_kernel_v2(kvc_kv_decode_args a, int max_rows) {
  extern __shared__ __align__(16) uint8_t shared[];
  const int width = a.bank_width;
  uint32_t* ranges = reinterpret_cast<uint32_t*>(shared);  // [max_rows, width]: start | (stop - 1) << 16
  float* units = reinterpret_cast<float*>(ranges + max_rows * width);  // [kUnitRows, width]
  float* steps = units + kUnitRows * width;                              // [256] scale steps
  uint16_t* ring = reinterpret_cast<uint16_t*>(steps + 256);             // [kRing, kRingStride]
  uint8_t* buckets = reinterpret_cast<uint8_t*>(ring + kRing * kRingStride);  // [max_rows, kBuckets]

  const int chunk = blockIdx.y;
  const int L = a.layers, C = a.kv_heads * a.head_dim, S = C / G;
  const int streams = 2 * L * S;
  const int first_stream = blockIdx.x * kBlock;
  const int stream = first_stream + threadIdx.x;

  // The block's (side, layer)s and the bank rows their tables lie in: fast when that window fits.
  const int sl0 = first_stream / S, sl1 = (int)(min((int64_t)first_stream + kBlock, (int64_t)streams) - 1) / S;
  bool fast = sl1 - sl0 < kUnitRows;
  int64_t window = 0, rows = 0;
  if (fast) {
    const int64_t b0 = a.table_base[sl0], b1 = a.table_base[sl1];
    window = min(b0, b1);
    rows = max(b0, b1) + a.bank_shapes - window;
    fast = window >= 0 && window + rows <= a.bank_rows && rows <= max_rows;
  }
  for (int i = threadIdx.x; i < 256; i += kBlock) steps[i] = a.scale_steps[i];
  if (fast) {
    for (int i = threadIdx.x; i < rows * kBuckets; i += kBlock) buckets[i] = 0;
    for (int i = threadIdx.x; i < kUnitRows * width; i += kBlock) {
      const int sl = sl0 + i / width, q = i % width;
      if (sl <= sl1) {
        const int half = a.halves[sl];
        units[i] = __fdiv_rn((float)(q - half), (float)half);  // v1's expression, bit for bit
      }
    }
  }
  __syncthreads();
  if (fast) {
    for (int i = threadIdx.x; i < rows * width; i += kBlock) {
      const int r = i / width, s = i % width;
      const uint16_t* cdf = a.bank_cdf + (window + r) * width;
      const uint32_t start = cdf[s];
      const uint32_t next = s + 1 < width ? cdf[s + 1] : 0u;
      const uint32_t stop = next ? next : 65536u;  // the row's end, 65536, is 0 as uint16
      ranges[i] = start | ((stop - 1) << 16);
      if (s == 0 || start != 0) {  // a symbol of the row's alphabet (past it the CDF stays at 65536 = 0)
        for (uint32_t b = (start + (1u << kBucketShift) - 1) >> kBucketShift; b < (uint32_t)kBuckets && (b << kBucketShift) < stop; ++b)
          buckets[r * kBuckets + b] = (uint8_t)s;
      }
    }
  }
  __syncthreads();

  // The chunk: where it is, how many tokens, where they go (a whole block agrees).
  ChunkView view;
  if (!view_chunk(a, chunk, L, C, streams, &view)) {
    if (threadIdx.x == 0) fail(a.status, chunk, KVC_DECODE_BAD_CHUNK);
    return;
  }
  const int tokens = view.tokens, first = view.first;
  const uint8_t* base = view.base;

  // This thread's stream, checked as v1 checks it; a lane without one still joins the warp's staging.
  Work<G> w;
  w.word = reinterpret_cast<const uint16_t*>(base + view.words_at);
  w.ok = stream < streams;
  w.vector_ok = false;
  w.state = kStateLow;
  w.cursor = w.filled = w.end = 0;
  w.alphabet = 1;
  w.unit_at = 0;
  w.top = 0.f;
  w.scales = base;
  w.dst = a.keys;
  w.channel0 = 0;
#pragma unroll
  for (int g = 0; g < (Work<G>::kPacked ? (G + 1) / 2 : G); ++g) w.table[g] = 0;
  w.row0 = 0;
  if (w.ok) {
    int code = KVC_DECODE_OK;
    const int side = stream / (L * S), layer = (stream / S) % L, sl = side * L + layer;
    w.channel0 = (stream % S) * G;
    w.alphabet = 2 * a.halves[sl] + 1;
    int64_t begin = 0, end = 0;
    const uint8_t *centres = base, *shapes = base;
    if (!stream_span(view, stream, &begin, &end) || w.alphabet > a.bank_width) code = KVC_DECODE_BAD_STREAM;
    else if (!layer_tables(a, view, sl, L, C, &centres, &shapes)) code = KVC_DECODE_BAD_TABLE;
    for (int g = 0; g < G && code == KVC_DECODE_OK; ++g) {
      const int centre = centres[w.channel0 + g];
      const int shape = shapes[w.channel0 + g];
      const int row = a.table_base[sl] + shape;
      if (centre >= w.alphabet || shape >= a.bank_shapes || row < 0 || row >= a.bank_rows) code = KVC_DECODE_BAD_TABLE;
      // fast: row is in [table_base[sl], + bank_shapes), inside the window by its construction
      if (Work<G>::kPacked) w.table[g >> 1] |= (uint32_t)(shape << 8 | centre) << ((g & 1) * 16);  // both < 256
      else w.table[g] = (fast ? (int)(row - window) : row) << 8 | centre;
    }
    const float top = a.log_scales ? reinterpret_cast<const float*>(base)[sl] : 0.f;
    if (code == KVC_DECODE_OK && a.log_scales && !(top >= 0.f && top <= cache_max<T>())) code = KVC_DECODE_BAD_SCALE;
    if (code == KVC_DECODE_OK) {
      w.top = top;
      w.row0 = fast ? (int)(a.table_base[sl] - window) : a.table_base[sl];  // read at G = 8
      w.unit_at = fast ? (sl - sl0) * width : 0;
      w.scales = a.log_scales ? base + 8LL * L + (int64_t)sl * tokens : base + 4LL * sl * tokens;
      w.end = (uint32_t)end;
      w.cursor = w.filled = (uint32_t)begin + 2;
      w.state = ((uint32_t)w.word[begin] << 16) | w.word[begin + 1];
      T* cache = static_cast<T*>(side ? a.values : a.keys);
      const int head = w.channel0 / a.head_dim, dim = w.channel0 % a.head_dim;
      w.dst = cache + (((int64_t)layer * a.kv_heads + head) * a.capacity + first) * a.head_dim + dim;
      // G channels of one head, aligned to their size (head_dim % G == 0): one vector store a token
      const uintptr_t align = G * sizeof(T) < 16 ? G * sizeof(T) : 16;
      w.vector_ok = a.head_dim % G == 0 && (reinterpret_cast<uintptr_t>(cache) & (align - 1)) == 0;
    } else {
      fail(a.status, chunk, code);
      w.ok = false;
    }
  }
  if (fast) decode_stream<T, G, true>(a, w, tokens, ranges, buckets, units, steps, ring);
  else decode_stream<T, G, false>(a, w, tokens, ranges, buckets, units, steps, ring);
}

template <typename T, int G>
cudaError_t launch(const kvc_kv_decode_args& a, int max_rows, size_t shared, cudaStream_t stream) {
  if (shared > 48 * 1024) {
    cudaError_t err = cudaFuncSetAttribute(decode_kernel_v2<T, G>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)shared);
    if (err != cudaSuccess) return err;
  }
  const int streams = 2 * a.layers * (a.kv_heads * a.head_dim / G);
  dim3 grid((streams + kBlock - 1) / kBlock, a.chunks);
  decode_kernel_v2<T, G><<<grid, kBlock, shared, stream>>>(a, max_rows);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_group(const kvc_kv_decode_args& a, int max_rows, size_t shared, cudaStream_t stream) {
  switch (a.group) {
    case 1: return launch<T, 1>(a, max_rows, shared, stream);
    case 2: return launch<T, 2>(a, max_rows, shared, stream);
    case 4: return launch<T, 4>(a, max_rows, shared, stream);
    default: return launch<T, 8>(a, max_rows, shared, stream);
  }
}

}  // namespace

bool launch_v2(const kvc_kv_decode_args& a, cudaStream_t stream, cudaError_t* err) {
  const size_t per_row = (size_t)a.bank_width * 4 + kBuckets;
  // The rows of the (side, layer)s one block spans: one when whole blocks tile each (side, layer)'s
  // streams (so a block's tables, 384 bytes a row, leave room for six blocks an SM), else two.
  const int per_unit = a.kv_heads * a.head_dim / a.group;
  int64_t max_rows = (per_unit % kBlock == 0 ? 1LL : 2LL) * a.bank_shapes;
  if (max_rows > a.bank_rows) max_rows = a.bank_rows;
  if (max_rows > (int64_t)(kTableBudget / per_row)) max_rows = (int64_t)(kTableBudget / per_row);
  if (max_rows < a.bank_shapes) return false;  // not even one (side, layer)'s tables fit: v1
  const size_t shared = (size_t)max_rows * per_row + (size_t)kUnitRows * a.bank_width * 4 + 256 * 4 +
                        (size_t)kRing * kRingStride * 2;
  switch (a.dtype) {
    case KVC_DTYPE_F32: *err = launch_group<float>(a, (int)max_rows, shared, stream); break;
    case KVC_DTYPE_F16: *err = launch_group<__half>(a, (int)max_rows, shared, stream); break;
    default: *err = launch_group<__nv_bfloat16>(a, (int)max_rows, shared, stream); break;
  }
  return true;
}

}  // namespace kvc_codec
