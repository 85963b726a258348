// kvc_kv_decode: the KV codec's GPU decoder (kvcompile/codec; format in docs/CODEC.md).
//
// Many chunks per launch, one thread per rANS stream: stream (side, layer, s) of a chunk is
// channels s*G .. s*G+G-1 of that layer, token after token, channel after channel, each
// channel with its own table from the codec's fixed bank (staged in shared memory as 16-bit
// CDFs). A thread decodes a symbol (binary search of its slot in the CDF), undoes the centre
// shift, dequantises ((q - half) / half * scale, float32, one rounding each, like the CPU
// reference) and writes the value straight into the cache [L, H, capacity, D] at the chunk's
// first token; G channels of a token go out as one store when they are contiguous.
//
// Chunks of bitstream format 2 or 3 (args.version; format 3 takes the header's tables in
// args.channel_tables). Nothing is trusted: each chunk's offset and size are checked against the data buffer, its
// token range against the cache, every stream's word range against the chunk, every centre and
// table id against the bank; a stream that runs out of words, has words left over or ends in the
// wrong state marks its chunk's status. Reads stay inside the chunk, writes inside the cache,
// whatever the bytes say. Nothing here synchronises the stream; the caller reads `status`.
//
// This is kernel v1; kv_decode_v2.cu holds v2 (the default), and kvc_kv_decode_with picks one.
#include <stdlib.h>
#include <string.h>

#include "kv_decode_common.h"

namespace kvc_codec {
namespace {

constexpr int kThreads = 128;

template <typename T, int G>
__device__ inline void store_group(T* dst, const float* v, bool vector_ok) {
  if (G == 4 && sizeof(T) == 2 && vector_ok) {
    alignas(8) T packed[4] = {to_cache<T>(v[0]), to_cache<T>(v[1]), to_cache<T>(v[2]), to_cache<T>(v[3])};
    *reinterpret_cast<uint2*>(dst) = *reinterpret_cast<const uint2*>(packed);
  } else {
#pragma unroll
    for (int g = 0; g < G; ++g) dst[g] = to_cache<T>(v[g]);
  }
}

template <typename T, int G>
__global__ void __launch_bounds__(kThreads) decode_kernel(kvc_kv_decode_args a) {
  extern __shared__ uint16_t cdf[];  // [bank_rows, bank_width]: CDF of each table, cdf[row][0] = 0
  const int cells = a.bank_rows * a.bank_width;
  for (int i = threadIdx.x; i < cells; i += blockDim.x) cdf[i] = a.bank_cdf[i];
  __syncthreads();

  const int chunk = blockIdx.y;
  const int L = a.layers, C = a.kv_heads * a.head_dim, S = C / G;
  const int streams = 2 * L * S;
  const int stream = blockIdx.x * blockDim.x + threadIdx.x;
  if (stream >= streams) return;

  // The chunk: where it is, how many tokens, where they go.
  ChunkView view;
  if (!view_chunk(a, chunk, L, C, streams, &view)) {
    fail(a.status, chunk, KVC_DECODE_BAD_CHUNK);
    return;
  }
  const int tokens = view.tokens, first = view.first;
  const uint8_t* base = view.base;
  const uint16_t* word = reinterpret_cast<const uint16_t*>(base + view.words_at);

  const int side = stream / (L * S);
  const int layer = (stream / S) % L;
  const int channel0 = (stream % S) * G;
  const int half = a.halves[side * L + layer];
  const int alphabet = 2 * half + 1;
  int64_t begin, end;
  if (!stream_span(view, stream, &begin, &end) || alphabet > a.bank_width) {
    fail(a.status, chunk, KVC_DECODE_BAD_STREAM);
    return;
  }
  const uint8_t *centres, *shapes;
  if (!layer_tables(a, view, side * L + layer, L, C, &centres, &shapes)) {
    fail(a.status, chunk, KVC_DECODE_BAD_TABLE);
    return;
  }
  int centre[G];
  const uint16_t* table[G];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    centre[g] = centres[channel0 + g];
    const int shape = shapes[channel0 + g];
    const int row = a.table_base[side * L + layer] + shape;
    if (centre[g] >= alphabet || shape >= a.bank_shapes || row < 0 || row >= a.bank_rows) {
      fail(a.status, chunk, KVC_DECODE_BAD_TABLE);
      return;
    }
    table[g] = cdf + row * a.bank_width;
  }

  // Scales of this (side, layer): log-coded (max * steps[code]) or float32 per token.
  const float* maxima = reinterpret_cast<const float*>(base);
  const float top = a.log_scales ? maxima[side * L + layer] : 0.f;
  const uint8_t* codes = base + 8LL * L + (int64_t)(side * L + layer) * tokens;
  const float* token_scales = reinterpret_cast<const float*>(base) + (int64_t)(side * L + layer) * tokens;
  if (a.log_scales && !(top >= 0.f && top <= cache_max<T>())) {
    fail(a.status, chunk, KVC_DECODE_BAD_SCALE);
    return;
  }

  T* cache = static_cast<T*>(side ? a.values : a.keys);
  const int head = channel0 / a.head_dim, dim = channel0 % a.head_dim;
  // G = 4 channels of one head, 8-byte aligned (head_dim % 4 == 0 makes every offset a
  // multiple of 4 elements): one vector store per token
  const bool vector_ok = a.head_dim % 4 == 0 && (reinterpret_cast<uintptr_t>(cache) & 7) == 0;
  const float halff = (float)half;
  int64_t cursor = begin + 2;
  uint32_t state = ((uint32_t)word[begin] << 16) | word[begin + 1];
  bool ok = true;
  for (int t = 0; t < tokens && ok; ++t) {
    float scale;
    if (a.log_scales) {
      scale = __fmul_rn(top, a.scale_steps[codes[t]]);
    } else {
      scale = token_scales[t];
      if (!(scale >= 0.f && scale <= cache_max<T>())) { ok = false; break; }
    }
    float v[G];
#pragma unroll
    for (int g = 0; g < G; ++g) {
      const uint32_t slot = state & 0xFFFFu;
      // largest symbol whose CDF start is <= slot; cdf[0] = 0 and the row's end is 65536
      int lo = 0, hi = alphabet;
      while (hi - lo > 1) {
        const int mid = (lo + hi) >> 1;
        if (table[g][mid] <= slot) lo = mid; else hi = mid;
      }
      const uint32_t start = table[g][lo];
      const uint32_t stop = lo + 1 < alphabet ? table[g][lo + 1] : 65536u;
      state = (stop - start) * (state >> 16) + slot - start;
      if (state < kStateLow) {
        if (cursor >= end) { ok = false; break; }
        state = (state << 16) | word[cursor++];
      }
      int q = lo + centre[g];
      q = q >= alphabet ? q - alphabet : q;
      v[g] = __fmul_rn(__fdiv_rn((float)(q - half), halff), scale);
    }
    if (!ok) break;
    T* dst = cache + (((int64_t)layer * a.kv_heads + head) * a.capacity + first + t) * a.head_dim + dim;
    if (dim + G <= a.head_dim) {
      store_group<T, G>(dst, v, vector_ok);
    } else {  // the group straddles heads (head_dim not a multiple of G)
#pragma unroll
      for (int g = 0; g < G; ++g) {
        const int c = channel0 + g;
        cache[(((int64_t)layer * a.kv_heads + c / a.head_dim) * a.capacity + first + t) * a.head_dim + c % a.head_dim] =
            to_cache<T>(v[g]);
      }
    }
  }
  if (!ok) fail(a.status, chunk, KVC_DECODE_BAD_STREAM);
  else if (cursor != end || state != kStateLow) fail(a.status, chunk, KVC_DECODE_BAD_STREAM);
}

template <typename T, int G>
cudaError_t launch(const kvc_kv_decode_args& a, cudaStream_t stream) {
  const int streams = 2 * a.layers * (a.kv_heads * a.head_dim / G);
  const size_t shared = (size_t)a.bank_rows * a.bank_width * sizeof(uint16_t);
  if (shared > 48 * 1024) {
    cudaError_t err = cudaFuncSetAttribute(decode_kernel<T, G>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)shared);
    if (err != cudaSuccess) return err;
  }
  dim3 grid((streams + kThreads - 1) / kThreads, a.chunks);
  decode_kernel<T, G><<<grid, kThreads, shared, stream>>>(a);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_group(const kvc_kv_decode_args& a, cudaStream_t stream) {
  switch (a.group) {
    case 1: return launch<T, 1>(a, stream);
    case 2: return launch<T, 2>(a, stream);
    case 4: return launch<T, 4>(a, stream);
    default: return launch<T, 8>(a, stream);
  }
}

}  // namespace
}  // namespace kvc_codec

// KVC_KV_DECODE_DEFAULT: $KVCOMPILE_KV_DECODE_KERNEL=v1 picks v1, anything else v2.
static int default_kernel() {
  const char* name = getenv("KVCOMPILE_KV_DECODE_KERNEL");
  return name && strcmp(name, "v1") == 0 ? KVC_KV_DECODE_V1 : KVC_KV_DECODE_V2;
}

extern "C" int kvc_kv_decode(const kvc_kv_decode_args* args, void* stream_handle) {
  return kvc_kv_decode_with(args, stream_handle, KVC_KV_DECODE_DEFAULT);
}

extern "C" int kvc_kv_decode_with(const kvc_kv_decode_args* args, void* stream_handle, int kernel) {
  using namespace kvc_codec;
  if (kernel == KVC_KV_DECODE_DEFAULT) kernel = default_kernel();
  if (kernel != KVC_KV_DECODE_V1 && kernel != KVC_KV_DECODE_V2) return KVC_ERR_ARGUMENT;
  if (!args) return KVC_ERR_ARGUMENT;
  const kvc_kv_decode_args& a = *args;
  if (a.layers < 1 || a.kv_heads < 1 || a.head_dim < 1 || a.capacity < 0 || a.chunks < 0) return KVC_ERR_ARGUMENT;
  if (a.group != 1 && a.group != 2 && a.group != 4 && a.group != 8) return KVC_ERR_ARGUMENT;
  const int64_t channels = (int64_t)a.kv_heads * a.head_dim;
  if (channels % a.group || 2 * a.layers * channels >= (1LL << 31)) return KVC_ERR_ARGUMENT;
  if (a.chunks == 0) return KVC_OK;
  if (a.chunks > 65535) return KVC_ERR_ARGUMENT;  // grid.y
  if (!a.data || !a.chunk_table || !a.halves || !a.table_base || !a.bank_cdf || !a.scale_steps || !a.keys ||
      !a.values || !a.status || a.data_bytes < 0)
    return KVC_ERR_ARGUMENT;
  if (a.version != 0 && a.version != 2 && a.version != 3) return KVC_ERR_ARGUMENT;
  if (a.version == 3 && !a.channel_tables) return KVC_ERR_ARGUMENT;
  if (a.bank_rows < 1 || a.bank_width < 2 || a.bank_width > 256 || a.bank_shapes < 1 ||
      (size_t)a.bank_rows * a.bank_width * 2 > 96 * 1024)
    return KVC_ERR_ARGUMENT;
  if (reinterpret_cast<uintptr_t>(a.data) & 3) return KVC_ERR_ARGUMENT;
  cudaStream_t stream = static_cast<cudaStream_t>(stream_handle);
  cudaError_t err;
  if (a.dtype != KVC_DTYPE_F32 && a.dtype != KVC_DTYPE_F16 && a.dtype != KVC_DTYPE_BF16) return KVC_ERR_ARGUMENT;
  if (kernel == KVC_KV_DECODE_V2 && launch_v2(a, stream, &err)) return err == cudaSuccess ? KVC_OK : KVC_ERR_CUDA;
  switch (a.dtype) {
    case KVC_DTYPE_F32: err = launch_group<float>(a, stream); break;
    case KVC_DTYPE_F16: err = launch_group<__half>(a, stream); break;
    case KVC_DTYPE_BF16: err = launch_group<__nv_bfloat16>(a, stream); break;
    default: return KVC_ERR_ARGUMENT;
  }
  return err == cudaSuccess ? KVC_OK : KVC_ERR_CUDA;
}
