// kvc_rerotate_keys: cached RoPE keys moved from position p to p + delta (KV fusion).
//
// One thread per (b, t, work item); a work item is one rotated pair (i < R/2) or one
// pass-through dim (R + j). The angle delta[b, t] * inv_freq[i] and its sin / cos are computed
// once in double (exact for any |delta| < 2^31; float would be off by up to half an ulp of
// the angle, 0.004 rad at 128K) and applied to the pair in every KV head, so the double math
// is amortised over Hkv heads. Pair arithmetic is float32 with one rounding per operation
// (no FMA contraction), which is what the torch reference computes.
// Keys may have any B / H / T strides (last dim contiguous); out is contiguous.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "kvcompile_kernels.h"

namespace kvc_rerotate {
namespace {

template <typename T> __device__ inline float load(const T* p);
template <> __device__ inline float load(const float* p) { return *p; }
template <> __device__ inline float load(const __half* p) { return __half2float(*p); }
template <> __device__ inline float load(const __nv_bfloat16* p) { return __bfloat162float(*p); }

template <typename T> __device__ inline void store(T* p, float x);
template <> __device__ inline void store(float* p, float x) { *p = x; }
template <> __device__ inline void store(__half* p, float x) { *p = __float2half_rn(x); }
template <> __device__ inline void store(__nv_bfloat16* p, float x) { *p = __float2bfloat16_rn(x); }

template <typename T>
__global__ void rerotate_kernel(kvc_rerotate_args a, int work, int64_t total) {
  const int half = a.rotary_dims / 2;
  const int D = a.head_dim, H = a.kv_heads, T_ = a.tokens;
  const T* keys = static_cast<const T*>(a.keys);
  T* out = static_cast<T*>(a.out);
  const int64_t out_stride_h = (int64_t)T_ * D;
  for (int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
       idx += (int64_t)gridDim.x * blockDim.x) {
    const int k = (int)(idx % work);
    const int64_t bt = idx / work;
    const int t = (int)(bt % T_);
    const int b = (int)(bt / T_);
    const T* src = keys + b * a.keys_stride_b + t * a.keys_stride_t;
    T* dst = out + ((int64_t)b * H * T_ + t) * D;
    if (k < half) {
      const double angle = (double)a.delta[b * a.delta_stride_b + t * a.delta_stride_t] * (double)a.inv_freq[k];
      double s, c;
      sincos(angle, &s, &c);
      const float cf = (float)c, sf = (float)s;
      const int d1 = a.interleaved ? 2 * k : k;
      const int d2 = a.interleaved ? 2 * k + 1 : k + half;
      for (int h = 0; h < H; ++h) {
        const T* x = src + h * a.keys_stride_h;
        const float x1 = load(x + d1), x2 = load(x + d2);
        T* y = dst + h * out_stride_h;
        store(y + d1, __fsub_rn(__fmul_rn(x1, cf), __fmul_rn(x2, sf)));
        store(y + d2, __fadd_rn(__fmul_rn(x2, cf), __fmul_rn(x1, sf)));
      }
    } else {
      const int d = a.rotary_dims + (k - half);
      for (int h = 0; h < H; ++h) dst[h * out_stride_h + d] = src[h * a.keys_stride_h + d];
    }
  }
}

template <typename T>
cudaError_t launch(const kvc_rerotate_args& a, cudaStream_t stream) {
  const int work = a.rotary_dims / 2 + (a.head_dim - a.rotary_dims);
  const int64_t total = (int64_t)a.batch * a.tokens * work;
  const int threads = 256;
  int64_t blocks = (total + threads - 1) / threads;
  if (blocks > (1 << 20)) blocks = 1 << 20;  // grid-stride loop covers the rest
  rerotate_kernel<T><<<(unsigned)blocks, threads, 0, stream>>>(a, work, total);
  return cudaGetLastError();
}

}  // namespace
}  // namespace kvc_rerotate

extern "C" int kvc_rerotate_keys(const kvc_rerotate_args* args, void* stream_handle) {
  using namespace kvc_rerotate;
  if (!args) return KVC_ERR_ARGUMENT;
  const kvc_rerotate_args& a = *args;
  if (a.batch < 0 || a.kv_heads < 0 || a.tokens < 0 || a.head_dim < 1) return KVC_ERR_ARGUMENT;
  if (a.rotary_dims < 0 || a.rotary_dims % 2 || a.rotary_dims > a.head_dim) return KVC_ERR_ARGUMENT;
  if ((int64_t)a.batch * a.tokens * a.kv_heads == 0) return KVC_OK;  // nothing to do
  if (!a.keys || !a.out || !a.delta || (a.rotary_dims > 0 && !a.inv_freq)) return KVC_ERR_ARGUMENT;
  cudaStream_t stream = static_cast<cudaStream_t>(stream_handle);
  cudaError_t err;
  switch (a.dtype) {
    case KVC_DTYPE_F32: err = launch<float>(a, stream); break;
    case KVC_DTYPE_F16: err = launch<__half>(a, stream); break;
    case KVC_DTYPE_BF16: err = launch<__nv_bfloat16>(a, stream); break;
    default: return KVC_ERR_ARGUMENT;
  }
  return err == cudaSuccess ? KVC_OK : KVC_ERR_CUDA;
}
