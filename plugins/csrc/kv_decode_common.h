// Shared by the KV codec's two GPU decoders (kv_decode.cu: v1, kv_decode_v2.cu: v2): the cache
// element conversions, the per-chunk status and the one v2 entry point the dispatcher calls.
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

// Enqueues the v2 decoder (kv_decode_v2.cu) for arguments the dispatcher already checked.
// Returns false, launching nothing, when its tables would not fit its shared-memory budget
// (the caller then runs v1).
bool launch_v2(const kvc_kv_decode_args& a, cudaStream_t stream, cudaError_t* err);

}  // namespace kvc_codec

#endif  // KVCOMPILE_KV_DECODE_COMMON_H
