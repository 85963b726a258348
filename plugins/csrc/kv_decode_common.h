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

__device__ inline uint32_t load_u32(const uint8_t* p) {  // 4-byte aligned by the layout checks
  return *reinterpret_cast<const uint32_t*>(p);
}

__device__ inline void fail(int32_t* status, int chunk, int code) { atomicMax(status + chunk, code); }

// Chunk `chunk` as the chunk table places it in the blob. Layout (kvcompile/codec/chunk.py,
// Layout.of): scales, then centres, shapes, stream ends and words at these byte offsets from base.
struct ChunkView {
  const uint8_t* base;
  int tokens, first;  // its token count, and the cache row its first token goes to
  int64_t centres_at, shapes_at, ends_at, words_at;
  int64_t words;  // 16-bit words from words_at to the chunk's end
};

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
  const int64_t scale_bytes =
      a.log_scales ? 8LL * L + ((2LL * L * c->tokens + 3) / 4) * 4 : 8LL * L * c->tokens;
  c->centres_at = scale_bytes;
  c->shapes_at = c->centres_at + 2LL * L * C;
  c->ends_at = c->shapes_at + 2LL * L * C;
  c->words_at = c->ends_at + 4LL * streams;
  if (c->words_at > bytes || ((bytes - c->words_at) & 3)) return false;
  c->words = (bytes - c->words_at) / 2;
  return true;
}

// Enqueues the v2 decoder (kv_decode_v2.cu) for arguments the dispatcher already checked.
// Returns false, launching nothing, when its tables would not fit its shared-memory budget
// (the caller then runs v1).
bool launch_v2(const kvc_kv_decode_args& a, cudaStream_t stream, cudaError_t* err);

}  // namespace kvc_codec

#endif  // KVCOMPILE_KV_DECODE_COMMON_H
