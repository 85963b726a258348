// The kv_decode plugin's input conversions, on the device: the ONNX node's inputs (those of the
// torch op) into the kernel library's kvc_kv_decode arguments.
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

namespace kvcompile {
namespace tensorrt {

struct KvDecodeScratch {
  int64_t* chunk_table;  // [chunks, 4]: byte offset, bytes, tokens, first token
  uint16_t* bank_cdf;    // [rows, width]: the int32 CDF without its last column, as uint16 bits
  int32_t* halves;       // [2 * layers]
  int32_t* table_base;   // [2 * layers]
  int32_t* status;       // [chunks], zeroed
};

// One launch: chunk n spans offsets[n] .. offsets[n + 1] (the last ends at data_bytes) and holds
// `tokens` tokens from token n * tokens; cdf [rows, width + 1] int32 -> [rows, width] uint16;
// halves / table_base int64 -> int32; status zeroed. Enqueued on `stream`.
cudaError_t kv_decode_prepare(int64_t const* offsets, int32_t chunks, int64_t data_bytes, int32_t tokens,
                              int32_t const* cdf, int32_t rows, int32_t width, int64_t const* halves,
                              int64_t const* table_base, int32_t sides_layers, KvDecodeScratch scratch,
                              cudaStream_t stream);

}  // namespace tensorrt
}  // namespace kvcompile
