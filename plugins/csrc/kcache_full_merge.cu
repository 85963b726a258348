// The full cache's decode step, second half: the past was attended by a fused library kernel
// (cuDNN, flash or memory-efficient attention, which also return the log-sum-exp); this merges
// the one new token in, in one launch instead of the eight tensor ops it took in torch (whose
// launches cost as much as the attention itself at 8K: docs/BENCHMARKS.md).
#include <string>

#include "kcache_internal.h"

namespace kvc {
namespace {

thread_local std::string merge_error;

int merge_fail(int code, const std::string& message) {
  merge_error = message;
  return code;
}

template <typename T>
__device__ inline float load_as_float(const void* base, int64_t index) {
  return to_float(static_cast<const T*>(base)[index]);
}

__device__ inline float load_any(const void* base, int64_t index, int dtype) {
  if (dtype == KVC_DTYPE_F32) return load_as_float<float>(base, index);
  if (dtype == KVC_DTYPE_F16) return load_as_float<__half>(base, index);
  return load_as_float<__nv_bfloat16>(base, index);
}

// One warp per (b, query head): logit of the new key, then
//   lse = logaddexp(lse_past, logit); out = past * e^(lse_past - lse) + v * e^(logit - lse)
// and with a sink z, out *= sigmoid(lse - z) (the sink only enlarges the denominator).
// Every load the warp needs (its PER_LANE dims of q, k, past and v, the bias, lse_past, the
// sink) is issued before any is used: the kernel is a few microseconds of latency, and loading
// past and v only after the dot product and lse_past only after its reduction made that three
// rounds of global-memory latency instead of one.
template <typename T, int PER_LANE>
__global__ void decode_merge_kernel(kvc_decode_merge_args a) {
  const int warps_per_block = blockDim.x / 32;
  const int head = blockIdx.x * warps_per_block + threadIdx.x / 32;  // b * Hq + hq
  const int lane = threadIdx.x & 31;
  if (head >= a.batch * a.query_heads) return;
  const int b = head / a.query_heads, hq = head % a.query_heads;
  const int kv = hq / (a.query_heads / a.kv_heads);
  const T* q = static_cast<const T*>(a.query) + b * a.query_stride_b + hq * a.query_stride_h;
  const T* k = static_cast<const T*>(a.key) + b * a.key_stride_b + kv * a.key_stride_h;
  const T* v = static_cast<const T*>(a.value) + b * a.value_stride_b + kv * a.value_stride_h;
  const T* past = static_cast<const T*>(a.past_out) + b * a.past_out_stride_b + hq * a.past_out_stride_h;
  const float bias = load_any(a.new_bias, b * a.new_bias_stride_b, a.bias_dtype);
  const float lse_past = a.past_lse[b * a.past_lse_stride_b + hq * a.past_lse_stride_h];
  const float sink = a.sinks != nullptr ? a.sinks[hq] : 0.f;
  float qd[PER_LANE], kd[PER_LANE], pd[PER_LANE], vd[PER_LANE];
#pragma unroll
  for (int i = 0; i < PER_LANE; ++i) {
    const int d = lane + 32 * i;
    const bool in = d < a.head_dim;
    qd[i] = in ? to_float(q[d]) : 0.f;
    kd[i] = in ? to_float(k[d]) : 0.f;
    pd[i] = in ? to_float(past[d]) : 0.f;
    vd[i] = in ? to_float(v[d]) : 0.f;
  }
  float dot = 0.f;
#pragma unroll
  for (int i = 0; i < PER_LANE; ++i) dot = fmaf(qd[i], kd[i], dot);
  for (int off = 16; off > 0; off >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, off);
  const float logit = dot * a.scale + bias;
  const float m = fmaxf(lse_past, logit);
  const float lse = m + logf(expf(lse_past - m) + expf(logit - m));
  float w_past = expf(lse_past - lse), w_new = expf(logit - lse);
  if (a.sinks != nullptr) {
    const float keep = 1.f / (1.f + expf(sink - lse));
    w_past *= keep;
    w_new *= keep;
  }
  T* out = static_cast<T*>(a.out) + (int64_t)head * a.head_dim;
#pragma unroll
  for (int i = 0; i < PER_LANE; ++i) {
    const int d = lane + 32 * i;
    if (d < a.head_dim) out[d] = from_float<T>(fmaf(pd[i], w_past, vd[i] * w_new));
  }
}

template <typename T>
void launch_decode_merge(const kvc_decode_merge_args& a, int blocks, int threads, cudaStream_t stream) {
  if (a.head_dim <= 64) decode_merge_kernel<T, 2><<<blocks, threads, 0, stream>>>(a);
  else if (a.head_dim <= 128) decode_merge_kernel<T, 4><<<blocks, threads, 0, stream>>>(a);
  else if (a.head_dim <= 256) decode_merge_kernel<T, 8><<<blocks, threads, 0, stream>>>(a);
  else decode_merge_kernel<T, 16><<<blocks, threads, 0, stream>>>(a);
}

}  // namespace
}  // namespace kvc

extern "C" int kvc_decode_merge(const kvc_decode_merge_args* a, void* stream_handle) {
  using namespace kvc;
  if (!a || a->batch < 1 || a->query_heads < 1 || a->kv_heads < 1 || a->head_dim < 1 ||
      a->query_heads % a->kv_heads)
    return merge_fail(KVC_ERR_ARGUMENT, "decode_merge: sizes must be >= 1 and query_heads a multiple of kv_heads");
  if (!a->query || !a->key || !a->value || !a->past_out || !a->past_lse || !a->new_bias || !a->out)
    return merge_fail(KVC_ERR_ARGUMENT, "decode_merge: a tensor pointer is NULL");
  if (a->head_dim > 512)
    return merge_fail(KVC_ERR_ARGUMENT, "decode_merge: head_dim must be <= 512");
  if (a->dtype < KVC_DTYPE_F32 || a->dtype > KVC_DTYPE_BF16 || a->bias_dtype < KVC_DTYPE_F32 || a->bias_dtype > KVC_DTYPE_BF16)
    return merge_fail(KVC_ERR_ARGUMENT, "decode_merge: dtype and bias_dtype must be KVC_DTYPE_*");
  constexpr int kThreads = 128;  // 4 warps, one (b, head) each
  const int heads = a->batch * a->query_heads;
  const int blocks = (heads + kThreads / 32 - 1) / (kThreads / 32);
  cudaStream_t stream = static_cast<cudaStream_t>(stream_handle);
  if (a->dtype == KVC_DTYPE_F32) launch_decode_merge<float>(*a, blocks, kThreads, stream);
  else if (a->dtype == KVC_DTYPE_F16) launch_decode_merge<__half>(*a, blocks, kThreads, stream);
  else launch_decode_merge<__nv_bfloat16>(*a, blocks, kThreads, stream);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return merge_fail(KVC_ERR_CUDA, std::string("decode_merge: ") + cudaGetErrorString(err));
  return KVC_OK;
}

extern "C" const char* kvc_decode_merge_error(void) { return kvc::merge_error.c_str(); }
