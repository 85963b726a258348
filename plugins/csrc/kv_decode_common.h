// Shared by the KV codec's two GPU decoders (kv_decode.cu: v1, kv_decode_v2.cu: v2): the cache
// element conversions, the per-chunk status, reading a chunk's place and layout, and the one v2
// entry point the dispatcher calls.
#ifndef KVCOMPILE_KV_DECODE_COMMON_H
#define KVCOMPILE_KV_DECODE_COMMON_H

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "kvcompile_kernels.h"

namespace kvc_codec {

constexpr uint32_t kStateLow = 1u << 16;

template <typename T> __device__ inline T to_cache(float x);
template <> __device__ inline float to_cache(float x) { return x; }
template <> __device__ inline __half to_cache(float x) { return __float2half_rn(x); }
template <> __device__ inline __nv_bfloat16 to_cache(float x) { return __float2bfloat16_rn(x); }

// The largest scale a cache of T can hold (codec/chunk.py DTYPE_MAX): a larger one cannot come from
// real K/V of that dtype and would decode to inf, so both decoders refuse it as the CPU one does.
template <typename T> __device__ inline float cache_max();
template <> __device__ inline float cache_max<float>() { return 3.402823466e38f; }
template <> __device__ inline float cache_max<__half>() { return 65504.f; }
template <> __device__ inline float cache_max<__nv_bfloat16>() { return 3.3895313892515355e38f; }

__device__ inline uint32_t load_u32(const uint8_t* p) {  // 4-byte aligned by the layout checks
  return *reinterpret_cast<const uint32_t*>(p);
}

__device__ inline void fail(int32_t* status, int chunk, int code) { atomicMax(status + chunk, code); }

// Chunk `chunk` as the chunk table places it in the blob. Layout (kvcompile/codec/chunk.py,
// Layout.of), at these byte offsets from base: scales, then
//   format 2: centres u8 [2L, C] and shapes at tables_at, u32 cumulative stream ends at ends_at;
//   format 3: own-table flags u8 [2L] at own_at, the own (side, layer)s' centres and shapes at
//             tables_at, u32 starts (one per 32 streams) at ends_at, u16 lengths at lengths_at;
// then the words.
struct ChunkView {
  const uint8_t* base;
  int tokens, first;  // its token count, and the cache row its first token goes to
  bool v3;
  int64_t own_at, tables_at, ends_at, lengths_at, words_at;
  int64_t words;  // 16-bit words from words_at to the chunk's end
};

__device__ inline int64_t pad4(int64_t n) { return (n + 3) & ~(int64_t)3; }

// Fills `c` for `streams` streams over L layers of C channels; false when the table entry or the
// layout does not fit the blob or the cache (the chunk is then KVC_DECODE_BAD_CHUNK). Both decoders
// read a chunk through this, so they refuse exactly the same chunks.
__device__ __forceinline__ bool view_chunk(const kvc_kv_decode_args& a, int chunk, int L, int C, int streams,
                                           ChunkView* c) {
  const int64_t offset = a.chunk_table[4 * chunk + 0];
  const int64_t bytes = a.chunk_table[4 * chunk + 1];
  const int64_t tokens64 = a.chunk_table[4 * chunk + 2];
  const int64_t first64 = a.chunk_table[4 * chunk + 3];
  if (offset < 0 || bytes < 0 || offset > a.data_bytes || bytes > a.data_bytes - offset || (offset & 3) ||
      tokens64 < 1 || first64 < 0 || tokens64 > a.capacity || first64 > a.capacity - tokens64)
    return false;
  c->tokens = (int)tokens64;
  c->first = (int)first64;
  c->base = a.data + offset;
  c->v3 = a.version == 3;
  const int64_t scale_bytes =
      a.log_scales ? 8LL * L + ((2LL * L * c->tokens + 3) / 4) * 4 : 8LL * L * c->tokens;
  c->own_at = c->tables_at = scale_bytes;
  if (c->v3) {
    if (scale_bytes + 2LL * L > bytes) return false;
    int own = 0;  // (side, layer)s carrying their own tables: they size the tables part
    for (int sl = 0; sl < 2 * L; ++sl) own += c->base[c->own_at + sl] != 0;
    c->tables_at = c->own_at + pad4(2LL * L);
    c->ends_at = c->tables_at + pad4(2LL * C * own);
    c->lengths_at = c->ends_at + 4LL * ((streams + 31) / 32);
    c->words_at = c->lengths_at + pad4(2LL * streams);
  } else {
    c->ends_at = c->tables_at + 4LL * L * C;
    c->words_at = c->lengths_at = c->ends_at + 4LL * streams;
  }
  if (c->words_at > bytes || ((bytes - c->words_at) & 3)) return false;
  c->words = (bytes - c->words_at) / 2;
  // The words end where the last stream ends, then at most one zero word of padding: what the CPU
  // decoder requires, so a chunk with words to spare or a dirty pad is refused by both.
  int64_t used;
  if (c->v3) {
    const int last = (streams - 1) & ~31;
    const uint16_t* lengths = reinterpret_cast<const uint16_t*>(c->base + c->lengths_at);
    used = load_u32(c->base + c->ends_at + 4LL * (last >> 5));
    for (int j = last; j < streams; ++j) used += lengths[j];
  } else {
    used = load_u32(c->base + c->ends_at + 4LL * (streams - 1));
  }
  const uint16_t* words = reinterpret_cast<const uint16_t*>(c->base + c->words_at);
  return (used + 1) / 2 * 2 == c->words && (used == c->words || words[used] == 0);
}

// The words [begin, end) of `stream`, from the chunk's first word; false when the stream is
// shorter than its initial state or runs past the chunk (KVC_DECODE_BAD_STREAM). Format 3: its
// warp's start plus the lengths of the streams before it in the warp.
__device__ __forceinline__ bool stream_span(const ChunkView& c, int stream, int64_t* begin, int64_t* end) {
  if (c.v3) {
    const uint16_t* lengths = reinterpret_cast<const uint16_t*>(c.base + c.lengths_at);
    int64_t at = load_u32(c.base + c.ends_at + 4LL * (stream >> 5));
    if ((stream & 31) == 0) {  // a warp's start is the one before plus its lengths (0 for the first)
      int64_t want = stream ? load_u32(c.base + c.ends_at + 4LL * ((stream >> 5) - 1)) : 0;
      for (int j = stream - 32; j >= 0 && j < stream; ++j) want += lengths[j];
      if (at != want) return false;
    }
    for (int j = stream & ~31; j < stream; ++j) at += lengths[j];
    *begin = at;
    *end = at + lengths[stream];
  } else {
    *begin = stream ? load_u32(c.base + c.ends_at + 4LL * (stream - 1)) : 0;
    *end = load_u32(c.base + c.ends_at + 4LL * stream);
  }
  return *end - *begin >= 2 && *end <= c.words;
}

// The centres and shapes of (side, layer) `sl`'s C channels: the chunk's own (format 2, or a
// format-3 chunk whose flag says so) or the header's; false when a format-3 flag is neither 0
// nor 1 (KVC_DECODE_BAD_TABLE). The values still need checking against the alphabet and bank.
__device__ __forceinline__ bool layer_tables(const kvc_kv_decode_args& a, const ChunkView& c, int sl, int L, int C,
                                             const uint8_t** centres, const uint8_t** shapes) {
  if (!c.v3) {
    *centres = c.base + c.tables_at + (int64_t)sl * C;
    *shapes = *centres + 2LL * L * C;
    return true;
  }
  const uint8_t own = c.base[c.own_at + sl];
  if (own > 1) return false;
  if (own) {
    int before = 0;
    for (int j = 0; j < sl; ++j) before += c.base[c.own_at + j] != 0;
    *centres = c.base + c.tables_at + 2LL * C * before;
    *shapes = *centres + C;
  } else {
    *centres = a.channel_tables + (int64_t)sl * C;
    *shapes = *centres + 2LL * L * C;
  }
  return true;
}

// Enqueues the v2 decoder (kv_decode_v2.cu) for arguments the dispatcher already checked.
// Returns false, launching nothing, when its tables would not fit its shared-memory budget
// (the caller then runs v1).
bool launch_v2(const kvc_kv_decode_args& a, cudaStream_t stream, cudaError_t* err);

}  // namespace kvc_codec

#endif  // KVCOMPILE_KV_DECODE_COMMON_H
