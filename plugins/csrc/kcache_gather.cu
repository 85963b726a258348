// Stages 5 and 6 of a KCache decode step: read only the kept value rows — past ones straight
// from pinned host memory over the host link (zero-copy, no staging copy), the new token's
// from the device — and form the probability-weighted sum.
#include "kcache_internal.h"

namespace kvc {
namespace {

constexpr int kGatherThreads = 256;
constexpr int kLoadsInFlight = 8;  // host-link latency is microseconds: keep many loads in flight

// One work item: `gather_rows` kept positions of one selection row; a CTA takes items
// blockIdx.x, + gridDim.x, ... (the grid may be capped: p.gather_ctas). Writes partial sums per
// chunk so the result does not depend on atomics' ordering.
template <typename T>
__global__ void __launch_bounds__(kGatherThreads)
gather_kernel(kvc_kcache_decode_args a, KCachePlan p, const T* __restrict__ value_host,
              const float* __restrict__ logits, const MaxSum* __restrict__ stats,
              const int32_t* __restrict__ index, float* __restrict__ partial,
              float* __restrict__ mass) {
  constexpr int VE = Vec<T>::n;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  // Hs query rows (heads x new tokens) share the selection row; row h is head (h0 + h) / T.
  const int R = p.gather_rows, W = p.row_elems, Hs = p.rows_per_select, D = p.D;
  T* rows = reinterpret_cast<T*>(smem_raw);                                  // [R, W]
  float* probs = reinterpret_cast<float*>(smem_raw + sizeof(T) * R * W);     // [Hs, R]
  int32_t* positions = reinterpret_cast<int32_t*>(probs + Hs * R);           // [R]

  const int items = p.gather_chunks * p.B * p.select_rows;
  for (int item = blockIdx.x; item < items; item += gridDim.x) {
    const int chunk = item % p.gather_chunks, select_row = item / p.gather_chunks;
    const int b = select_row / p.select_rows;
    const int h0 = (select_row % p.select_rows) * Hs;  // first query row served
    const int kv0 = p.select_rows == 1 ? 0 : select_row % p.select_rows;  // first KV head in a row
    const int first = chunk * R;
    const int count = min(R, p.N - first);
    const int tid = threadIdx.x;

    for (int i = tid; i < count; i += blockDim.x)
      positions[i] = index[(int64_t)select_row * p.N + first + i];
    __syncthreads();

    const T* value = static_cast<const T*>(a.value) + b * a.value_stride_b;
    const T* host = value_host + b * a.value_host_stride_b;
    const int row_vecs = W / VE;
    const int total = count * row_vecs;
    // Vectors base, base + blockDim.x, ... (kLoadsInFlight of them) of the item's kept rows:
    // loaded together into registers, then stored to shared memory.
    auto load_round = [&](int base, uint4 (&buf)[kLoadsInFlight]) {
#pragma unroll
      for (int k = 0; k < kLoadsInFlight; ++k) {
        const int i = base + k * blockDim.x;
        if (i < total) {
          const int r = i / row_vecs, col = (i % row_vecs) * VE;
          const int pos = positions[r], head = kv0 + col / D, d = col % D;
          const T* src = pos < p.P ? host + (int64_t)pos * a.value_host_stride_p + head * D + d
                                   : value + head * a.value_stride_h + (int64_t)(pos - p.P) * a.value_stride_t + d;
          buf[k] = *reinterpret_cast<const uint4*>(src);
        }
      }
    };
    auto store_round = [&](int base, const uint4 (&buf)[kLoadsInFlight]) {
#pragma unroll
      for (int k = 0; k < kLoadsInFlight; ++k) {
        const int i = base + k * blockDim.x;
        if (i < total) {
          const int r = i / row_vecs, col = (i % row_vecs) * VE;
          *reinterpret_cast<uint4*>(rows + r * W + col) = buf[k];
        }
      }
    };
    // The first round goes out before the probabilities are formed: its host-link latency
    // (microseconds) then hides their logit loads instead of following them.
    uint4 buf[kLoadsInFlight];
    load_round(tid, buf);

    for (int i = tid; i < Hs * R; i += blockDim.x) {
      const int h = i / R, r = i % R;
      float pr = 0.f;
      if (r < count) {
        const int head = b * p.QR + h0 + h;
        const MaxSum st = stats[head];
        pr = __expf(logits[(int64_t)head * p.S + positions[r]] - st.max) * st.sum;
      }
      probs[i] = pr;
    }

    store_round(tid, buf);
    for (int base = tid + blockDim.x * kLoadsInFlight; base < total; base += blockDim.x * kLoadsInFlight) {
      load_round(base, buf);
      store_round(base, buf);
    }
    __syncthreads();

    for (int o = tid; o < Hs * D; o += blockDim.x) {
      const int h = o / D, d = o % D;
      const int col = ((h0 + h) / p.T / p.G - kv0) * D + d;
      float acc = 0.f;
      for (int r = 0; r < count; ++r) acc = fmaf(probs[h * R + r], to_float(rows[r * W + col]), acc);
      partial[((int64_t)(b * p.QR + h0 + h) * p.gather_chunks + chunk) * D + d] = acc;
    }
    for (int h = tid; h < Hs; h += blockDim.x) {
      float m = 0.f;
      for (int r = 0; r < count; ++r) m += probs[h * R + r];
      mass[(int64_t)(b * p.QR + h0 + h) * p.gather_chunks + chunk] = m;
    }
    __syncthreads();  // the next item overwrites the shared rows, probabilities and positions
  }
}

// One CTA per (b, query row): sum the chunks in a fixed order, renormalise, cast.
template <typename T>
__global__ void finalize_kernel(KCachePlan p, int renormalize, const float* __restrict__ partial,
                                const float* __restrict__ mass, T* __restrict__ out) {
  const int head = blockIdx.x;
  const int C = p.gather_chunks;
  float scale = 1.f;
  if (renormalize) {
    float total = 0.f;
    for (int c = 0; c < C; ++c) total += mass[(int64_t)head * C + c];
    scale = 1.f / total;
  }
  for (int d = threadIdx.x; d < p.D; d += blockDim.x) {
    float acc = 0.f;
    for (int c = 0; c < C; ++c) acc += partial[((int64_t)head * C + c) * p.D + d];
    out[(int64_t)head * p.D + d] = from_float<T>(acc * scale);
  }
}

template <typename T>
cudaError_t launch_gather_t(const kvc_kcache_decode_args& a, const KCachePlan& p,
                            const void* value_host_device, const float* logits,
                            const MaxSum* stats, const int32_t* index, float* partial,
                            float* mass, cudaStream_t stream) {
  const int items = p.gather_chunks * p.B * p.select_rows;
  const dim3 grid(p.gather_ctas > 0 && p.gather_ctas < items ? p.gather_ctas : items);
  const size_t smem = gather_smem_bytes(p);
  gather_kernel<T><<<grid, kGatherThreads, smem, stream>>>(
      a, p, static_cast<const T*>(value_host_device), logits, stats, index, partial, mass);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_finalize_t(const kvc_kcache_decode_args& a, const KCachePlan& p,
                              const float* partial, const float* mass, cudaStream_t stream) {
  const int threads = p.D < 128 ? 64 : 128;
  finalize_kernel<T><<<p.B * p.QR, threads, 0, stream>>>(p, a.renormalize, partial, mass,
                                                         static_cast<T*>(a.out));
  return cudaGetLastError();
}

}  // namespace

size_t gather_smem_bytes(const KCachePlan& p) {
  return (size_t)p.elem_bytes * p.gather_rows * p.row_elems +
         sizeof(float) * p.rows_per_select * p.gather_rows + sizeof(int32_t) * p.gather_rows;
}

cudaError_t launch_gather(const kvc_kcache_decode_args& a, const KCachePlan& p,
                          const void* value_host_device, const float* logits, const MaxSum* stats,
                          const int32_t* index, float* partial, float* mass, cudaStream_t stream) {
  switch (a.dtype) {
    case KVC_DTYPE_F32:
      return launch_gather_t<float>(a, p, value_host_device, logits, stats, index, partial, mass, stream);
    case KVC_DTYPE_F16:
      return launch_gather_t<__half>(a, p, value_host_device, logits, stats, index, partial, mass, stream);
    default:
      return launch_gather_t<__nv_bfloat16>(a, p, value_host_device, logits, stats, index, partial, mass, stream);
  }
}

cudaError_t launch_finalize(const kvc_kcache_decode_args& a, const KCachePlan& p,
                            const float* partial, const float* mass, cudaStream_t stream) {
  switch (a.dtype) {
    case KVC_DTYPE_F32: return launch_finalize_t<float>(a, p, partial, mass, stream);
    case KVC_DTYPE_F16: return launch_finalize_t<__half>(a, p, partial, mass, stream);
    default: return launch_finalize_t<__nv_bfloat16>(a, p, partial, mass, stream);
  }
}

}  // namespace kvc
