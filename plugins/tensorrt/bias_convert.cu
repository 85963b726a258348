// See bias_convert.h.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "bias_convert.h"
#include "kvcompile_kernels.h"

namespace kvcompile {
namespace tensorrt {
namespace {

template <typename T>
__global__ void to_float_kernel(T const* __restrict__ src, float* __restrict__ dst, int64_t count) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < count; i += int64_t(gridDim.x) * blockDim.x)
    dst[i] = static_cast<float>(src[i]);
}

template <typename T>
cudaError_t launch(void const* src, float* dst, int64_t count, cudaStream_t stream) {
  int64_t blocks = (count + 255) / 256;
  if (blocks > 4096) blocks = 4096;  // the grid-stride loop covers the rest
  if (blocks < 1) return cudaSuccess;
  to_float_kernel<T><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(static_cast<T const*>(src), dst, count);
  return cudaGetLastError();
}

}  // namespace

cudaError_t bias_to_float(void const* src, int32_t src_dtype, float* dst, int64_t count, cudaStream_t stream) {
  switch (src_dtype) {
    case KVC_DTYPE_F32: return cudaMemcpyAsync(dst, src, count * sizeof(float), cudaMemcpyDeviceToDevice, stream);
    case KVC_DTYPE_F16: return launch<__half>(src, dst, count, stream);
    case KVC_DTYPE_BF16: return launch<__nv_bfloat16>(src, dst, count, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace tensorrt
}  // namespace kvcompile
