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

#define KVC_ABI_VERSION 4  /* 2: softcap and sinks; 3: T new tokens per call (chunked prefill);
                              4: kvc_kcache_decode_describe */

enum { KVC_OK = 0, KVC_ERR_ARGUMENT = 1, KVC_ERR_CUDA = 2, KVC_ERR_WORKSPACE = 3 };
enum { KVC_DTYPE_F32 = 0, KVC_DTYPE_F16 = 1, KVC_DTYPE_BF16 = 2 };
/* kvcompile.core.modes.SelectMode.code: a test holds the two equal. */
enum { KVC_SELECT_HEAD = 0, KVC_SELECT_LAYER = 1 };

/* One KCache step of one layer over P > 0 cached positions: T == 1 is a decode step, T > 1 a
 * chunk of a chunked prefill (causality comes from attn_bias). Strides are in elements; the
 * last dimension of every tensor is contiguous, every pointer and stride 16-byte aligned. */
typedef struct {
  int32_t batch, query_heads, kv_heads, past_len, head_dim;
  int32_t tokens;      /* T >= 1 new tokens */
  int32_t topn;        /* ≥ 1; min(topn, past_len + 1) positions are kept */
  int32_t select;      /* KVC_SELECT_HEAD or KVC_SELECT_LAYER */
  int32_t renormalize; /* divide by the kept probability mass */
  int32_t dtype;       /* KVC_DTYPE_* of query/key/value/key_cache/value_host/out */
  float scale;
  float softcap;       /* 0 = none, else each logit q·k·scale becomes softcap * tanh(logit / softcap) */
  const float* sinks;  /* NULL, or [Hq] fp32 device logits that join each head's softmax denominator */
  const void* query;     int64_t query_stride_b, query_stride_h, query_stride_t;  /* [B, Hq, T, D] */
  const void* key;       int64_t key_stride_b, key_stride_h, key_stride_t;        /* [B, Hkv, T, D] */
  const void* value;     int64_t value_stride_b, value_stride_h, value_stride_t;  /* [B, Hkv, T, D] */
  const void* key_cache; int64_t key_cache_stride_b, key_cache_stride_h,
                                 key_cache_stride_p;                       /* [B, Hkv, P, D] */
  /* [B, P, Hkv, D] in pinned (page-locked, mapped) host memory; (Hkv, D) contiguous so one
   * position is one row of Hkv*D elements. The host address is given; the library maps it. */
  const void* value_host; int64_t value_host_stride_b, value_host_stride_p;
  const float* attn_bias; int64_t attn_bias_stride_b, attn_bias_stride_t;  /* [B, T, P+T] fp32 */
  void* out;                                                               /* [B, Hq, T, D] contiguous */
} kvc_kcache_decode_args;

int kvc_abi_version(void);
const char* kvc_last_error(void);

/* Device workspace (bytes) kvc_kcache_decode needs for these arguments' sizes. */
int kvc_kcache_decode_workspace_size(const kvc_kcache_decode_args* args, size_t* bytes);

/* The plan kvc_kcache_decode would run for these arguments on the current device (its rules and
 * $KVC_* overrides applied), for benchmarks to record what ran. */
typedef struct {
  int32_t score_tile;      /* keys per score CTA */
  int32_t score_tiles;     /* score CTAs per (sequence, KV head, head tile) */
  int32_t gather_rows;     /* kept positions per fetch work item */
  int32_t gather_chunks;   /* fetch work items per selection row */
  int32_t pipeline_parts;  /* batch slices (1: one call) */
  int32_t gather_ctas;     /* the fetch's grid cap (0: one CTA per item) */
  size_t workspace_bytes;
} kvc_kcache_decode_plan;
int kvc_kcache_decode_describe(const kvc_kcache_decode_args* args, kvc_kcache_decode_plan* plan);

/* Scores over all keys, softmax statistics, top-N select (per KV head or layer, summed over
 * its query heads and the T rows), zero-copy gather of the kept value rows from host memory,
 * weighted sum. Enqueued on `stream` (a cudaStream_t; NULL = default). Large calls (a long K
 * pass and a large fetch, or $KVC_PIPELINE_PARTS > 1) run in batch slices whose fetch goes on
 * an internal side stream forked from `stream` and joined back before the call returns, so
 * `stream` (and a CUDA graph captured from it) still orders all of the call's work. */
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

/* Floor probe (bench/floors.py): copies rows[0..count) of a pinned host buffer of rows of
 * `row_bytes` (a multiple of 16) into `out` (device, count * row_bytes), reading the host
 * memory zero-copy as the KCache gather does. kvc_host_row_gather_error() explains a failure. */
int kvc_host_row_gather(const void* host, int64_t row_bytes, const int32_t* rows, int32_t count,
                        void* out, void* stream);
const char* kvc_host_row_gather_error(void);

/* kv_decode: the KV codec's GPU decoder (plugins/csrc/kv_decode.cu; bitstream in docs/CODEC.md).
 * Decodes `chunks` chunks of one bitstream in one launch, dequantised, into keys / values
 * [layers, kv_heads, capacity, head_dim] (contiguous, `dtype`) at each chunk's first token.
 * Every offset, length, table id and stream end in the data is checked on the device; a chunk
 * that fails leaves status[chunk] > 0 (KVC_DECODE_*) and its tokens' cache rows undefined, and
 * nothing is read or written out of bounds. The caller zeroes `status` and reads it after the
 * stream completes. The bank, halves and scale steps come from kvcompile/codec (host-built). */
enum { KVC_DECODE_OK = 0, KVC_DECODE_BAD_CHUNK = 1, KVC_DECODE_BAD_STREAM = 2, KVC_DECODE_BAD_TABLE = 3,
       KVC_DECODE_BAD_SCALE = 4 };
typedef struct {
  int32_t layers, kv_heads, head_dim;
  int32_t capacity;     /* tokens the caches hold */
  int32_t group;        /* channels per rANS stream: 1, 2, 4 or 8 */
  int32_t dtype;        /* KVC_DTYPE_* of keys / values */
  int32_t log_scales;   /* 1: f32 maxima + u8 codes (lossy levels); 0: f32 per token (level 0) */
  int32_t chunks;
  const uint8_t* data; int64_t data_bytes;  /* device, 4-byte aligned: the chunks' bytes */
  const int64_t* chunk_table;  /* device [chunks, 4]: byte offset (multiple of 4), bytes, tokens, first token */
  const int32_t* halves;       /* device [2, layers]: levels each side of zero (alphabet 2*half+1) */
  const int32_t* table_base;   /* device [2, layers]: the layer's first row in bank_cdf */
  const uint16_t* bank_cdf;    /* device [bank_rows, bank_width]: cumulative frequencies, row[0] = 0 */
  int32_t bank_rows, bank_width, bank_shapes;
  const float* scale_steps;    /* device [256]: 2^(-code/16), code 255 = 0 */
  void* keys; void* values;
  int32_t* status;             /* device [chunks] */
  int32_t version;             /* the chunks' bitstream format: 3, or 2 (0 also reads as 2: a zeroed struct) */
  const uint8_t* channel_tables;  /* format 3: device [2, 2, layers, C]: the header's centres, then shapes */
} kvc_kv_decode_args;

int kvc_kv_decode(const kvc_kv_decode_args* args, void* stream);
/* The same with the kernel named: v1 (a thread per rANS stream, binary search, words read from
 * global memory) or v2 (words staged warp by warp in shared memory, bucket lookup of the symbol;
 * v1 where v2's tables exceed its shared memory). DEFAULT is v2 unless
 * $KVCOMPILE_KV_DECODE_KERNEL=v1. Same output bits and status either way. */
enum { KVC_KV_DECODE_DEFAULT = 0, KVC_KV_DECODE_V1 = 1, KVC_KV_DECODE_V2 = 2 };
int kvc_kv_decode_with(const kvc_kv_decode_args* args, void* stream, int kernel);

/* The full cache's decode step: merges the new token into an attention over the past that a
 * fused kernel computed with its log-sum-exp (natural log). Strides are in elements. */
typedef struct {
  int32_t batch, query_heads, kv_heads, head_dim;
  int32_t dtype;       /* KVC_DTYPE_* of query, key, value, past_out, out */
  int32_t bias_dtype;  /* KVC_DTYPE_* of new_bias */
  float scale;
  const float* sinks;  /* NULL, or [Hq] fp32 device sink logits */
  const void* query;    int64_t query_stride_b, query_stride_h;        /* [B, Hq, 1, D] */
  const void* key;      int64_t key_stride_b, key_stride_h;            /* [B, Hkv, 1, D] the new token */
  const void* value;    int64_t value_stride_b, value_stride_h;        /* [B, Hkv, 1, D] */
  const void* past_out; int64_t past_out_stride_b, past_out_stride_h;  /* [B, Hq, D] attention over the past */
  const float* past_lse; int64_t past_lse_stride_b, past_lse_stride_h; /* [B, Hq] its log-sum-exp */
  const void* new_bias; int64_t new_bias_stride_b;                     /* [B] the new token's bias */
  void* out;                                                           /* [B, Hq, 1, D] contiguous */
} kvc_decode_merge_args;

/* Enqueued on `stream`; kvc_decode_merge_error() explains a failure. */
int kvc_decode_merge(const kvc_decode_merge_args* args, void* stream);
const char* kvc_decode_merge_error(void);

#ifdef __cplusplus
}
#endif
#endif /* KVCOMPILE_KERNELS_H */
