// See kv_decode_prepare.h.
#include "kv_decode_prepare.h"

namespace kvcompile {
namespace tensorrt {
namespace {

__global__ void prepare_kernel(int64_t const* __restrict__ offsets, int32_t chunks, int64_t data_bytes,
                               int32_t tokens, int32_t const* __restrict__ cdf, int32_t rows, int32_t width,
                               int64_t const* __restrict__ halves, int64_t const* __restrict__ table_base,
                               int32_t sides_layers, KvDecodeScratch s) {
  int64_t const total = (int64_t)rows * width;
  int64_t const stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += stride) {
    int64_t const row = i / width, column = i % width;
    s.bank_cdf[i] = static_cast<uint16_t>(cdf[row * (width + 1) + column] & 0xFFFF);  // 65536 -> 0, as the torch op
  }
  for (int64_t n = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; n < chunks; n += stride) {
    int64_t const begin = offsets[n], end = n + 1 < chunks ? offsets[n + 1] : data_bytes;
    s.chunk_table[4 * n + 0] = begin;
    s.chunk_table[4 * n + 1] = end - begin;  // the kernel refuses (status) a chunk outside the data
    s.chunk_table[4 * n + 2] = tokens;
    s.chunk_table[4 * n + 3] = n * tokens;
    s.status[n] = 0;
  }
  for (int64_t j = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; j < sides_layers; j += stride) {
    s.halves[j] = static_cast<int32_t>(halves[j]);
    s.table_base[j] = static_cast<int32_t>(table_base[j]);
  }
}

}  // namespace

cudaError_t kv_decode_prepare(int64_t const* offsets, int32_t chunks, int64_t data_bytes, int32_t tokens,
                              int32_t const* cdf, int32_t rows, int32_t width, int64_t const* halves,
                              int64_t const* table_base, int32_t sides_layers, KvDecodeScratch scratch,
                              cudaStream_t stream) {
  int64_t work = (int64_t)rows * width;
  if (chunks > work) work = chunks;
  if (sides_layers > work) work = sides_layers;
  int64_t blocks = (work + 255) / 256;
  if (blocks < 1) blocks = 1;
  if (blocks > 1024) blocks = 1024;
  prepare_kernel<<<static_cast<unsigned>(blocks), 256, 0, stream>>>(offsets, chunks, data_bytes, tokens, cdf, rows,
                                                                    width, halves, table_base, sides_layers, scratch);
  return cudaGetLastError();
}

}  // namespace tensorrt
}  // namespace kvcompile
