// float16 / bfloat16 attention biases to float32: the kernel library reads float32 biases, while
// a half-precision graph feeds its bias in the activations' type.
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

namespace kvcompile {
namespace tensorrt {

// dst[i] = float(src[i]) for i < count; src_dtype is a KVC_DTYPE_* code. Enqueued on `stream`.
cudaError_t bias_to_float(void const* src, int32_t src_dtype, float* dst, int64_t count, cudaStream_t stream);

}  // namespace tensorrt
}  // namespace kvcompile
