/* kvcompile kernel library: C ABI shared by the torch ops (through ctypes) and the TensorRT
 * plugins. Every entry point returns 0 on success or a KVC_ERR_* code; kvc_last_error() then
 * holds a message for the calling thread. Nothing here synchronises the stream. */
#ifndef KVCOMPILE_KERNELS_H
#define KVCOMPILE_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define KVC_ABI_VERSION 2  /* 2: softcap and sinks */

enum { KVC_OK = 0, KVC_ERR_ARGUMENT = 1, KVC_ERR_CUDA = 2, KVC_ERR_WORKSPACE = 3 };
enum { KVC_DTYPE_F32 = 0, KVC_DTYPE_F16 = 1, KVC_DTYPE_BF16 = 2 };
/* kvcompile.core.modes.SelectMode.code: a test holds the two equal. */
enum { KVC_SELECT_HEAD = 0, KVC_SELECT_LAYER = 1 };

/* One KCache decode step (T == 1, P > 0) of one layer. Strides are in elements; the last
 * dimension of every tensor is contiguous, every pointer and stride 16-byte aligned. */
typedef struct {
  int32_t batch, query_heads, kv_heads, past_len, head_dim;
  int32_t topn;        /* ≥ 1; min(topn, past_len + 1) positions are kept */
  int32_t select;      /* KVC_SELECT_HEAD or KVC_SELECT_LAYER */
  int32_t renormalize; /* divide by the kept probability mass */
  int32_t dtype;       /* KVC_DTYPE_* of query/key/value/key_cache/value_host/out */
  float scale;
  float softcap;       /* 0 = none, else each logit q·k·scale becomes softcap * tanh(logit / softcap) */
  const float* sinks;  /* NULL, or [Hq] fp32 device logits that join each head's softmax denominator */
  const void* query;     int64_t query_stride_b, query_stride_h;           /* [B, Hq, 1, D] */
  const void* key;       int64_t key_stride_b, key_stride_h;               /* [B, Hkv, 1, D] */
  const void* value;     int64_t value_stride_b, value_stride_h;           /* [B, Hkv, 1, D] */
  const void* key_cache; int64_t key_cache_stride_b, key_cache_stride_h,
                                 key_cache_stride_p;                       /* [B, Hkv, P, D] */
  /* [B, P, Hkv, D] in pinned (page-locked, mapped) host memory; (Hkv, D) contiguous so one
   * position is one row of Hkv*D elements. The host address is given; the library maps it. */
  const void* value_host; int64_t value_host_stride_b, value_host_stride_p;
  const float* attn_bias; int64_t attn_bias_stride_b;                      /* [B, P+1] fp32 */
  void* out;                                                               /* [B, Hq, 1, D] contiguous */
} kvc_kcache_decode_args;

int kvc_abi_version(void);
const char* kvc_last_error(void);

/* Device workspace (bytes) kvc_kcache_decode needs for these arguments' sizes. */
int kvc_kcache_decode_workspace_size(const kvc_kcache_decode_args* args, size_t* bytes);

/* Scores over all keys, softmax statistics, top-N select, zero-copy gather of the kept value
 * rows from host memory, weighted sum. Enqueued on `stream` (a cudaStream_t; NULL = default). */
int kvc_kcache_decode(const kvc_kcache_decode_args* args, void* workspace, size_t workspace_bytes,
                      void* stream);

/* rerotate_keys: cached RoPE keys moved from position p to p + delta (KV fusion). Each rotated
 * pair (x1, x2) becomes (x1 cos a - x2 sin a, x2 cos a + x1 sin a), a = delta * inv_freq[i]
 * formed and its cos / sin taken in double; pairs are (x[i], x[i + R/2]) (half-split) or
 * (x[2i], x[2i+1]) (interleaved); dims R.. are copied. Strides are in elements. */
typedef struct {
  int32_t batch, kv_heads, tokens, head_dim;
  int32_t rotary_dims;  /* R: even, <= head_dim; the first R dims rotate */
  int32_t interleaved;  /* 0 = half-split pairs, 1 = adjacent pairs */
  int32_t dtype;        /* KVC_DTYPE_* of keys and out */
  const void* keys; int64_t keys_stride_b, keys_stride_h, keys_stride_t;   /* [B, Hkv, T, D], last dim contiguous */
  const int64_t* delta; int64_t delta_stride_b, delta_stride_t;            /* [B, T] position shifts */
  const float* inv_freq;                                                   /* [R/2] contiguous */
  void* out;                                                               /* [B, Hkv, T, D] contiguous, not aliasing keys */
} kvc_rerotate_args;

/* Enqueued on `stream` (a cudaStream_t; NULL = default). */
int kvc_rerotate_keys(const kvc_rerotate_args* args, void* stream);

#ifdef __cplusplus
}
#endif
#endif /* KVCOMPILE_KERNELS_H */
