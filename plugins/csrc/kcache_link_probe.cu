// The host-link floor of KCache's value fetch, measured rather than typed: a zero-copy gather
// of rows from pinned host memory into device memory, the access pattern of the decode step's
// gather stage (kcache_gather.cu) without its arithmetic. bench/floors.py times it per row size.
#include <string>

#include "kcache_internal.h"

namespace kvc {
namespace {

constexpr int kProbeThreads = 256;
constexpr int kProbeLoads = 8;     // 16-byte loads in flight per thread, as in the gather stage
constexpr int kProbeCtaBytes = 8192;

// One CTA copies ~8 KiB of rows: rows[first .. first + per_cta) of the index list.
__global__ void __launch_bounds__(kProbeThreads)
host_row_gather_kernel(const uint4* __restrict__ host, int64_t row_vecs, const int32_t* __restrict__ rows,
                       int32_t count, int32_t per_cta, uint4* __restrict__ out) {
  const int first = blockIdx.x * per_cta;
  const int n = min(per_cta, count - first);
  const int64_t total = (int64_t)n * row_vecs;
  for (int64_t base = threadIdx.x; base < total; base += (int64_t)blockDim.x * kProbeLoads) {
    uint4 buf[kProbeLoads];
#pragma unroll
    for (int k = 0; k < kProbeLoads; ++k) {
      const int64_t i = base + (int64_t)k * blockDim.x;
      if (i < total) buf[k] = host[(int64_t)rows[first + i / row_vecs] * row_vecs + i % row_vecs];
    }
#pragma unroll
    for (int k = 0; k < kProbeLoads; ++k) {
      const int64_t i = base + (int64_t)k * blockDim.x;
      if (i < total) out[(int64_t)first * row_vecs + i] = buf[k];
    }
  }
}

thread_local std::string probe_error;

int probe_fail(int code, const std::string& message) {
  probe_error = message;
  return code;
}

}  // namespace
}  // namespace kvc

extern "C" int kvc_host_row_gather(const void* host, int64_t row_bytes, const int32_t* rows,
                                   int32_t count, void* out, void* stream_handle) {
  using namespace kvc;
  if (!host || !rows || !out || count < 1 || row_bytes < 16 || row_bytes % 16 ||
      (reinterpret_cast<uintptr_t>(host) & 15u) || (reinterpret_cast<uintptr_t>(out) & 15u))
    return probe_fail(KVC_ERR_ARGUMENT, "host_row_gather: NULL, misaligned or empty arguments (rows of a multiple of 16 bytes)");
  cudaPointerAttributes attr;
  cudaError_t err = cudaPointerGetAttributes(&attr, host);
  if (err != cudaSuccess || attr.type != cudaMemoryTypeHost || !attr.devicePointer) {
    cudaGetLastError();
    return probe_fail(KVC_ERR_ARGUMENT, "host_row_gather: host must be pinned (page-locked, mapped) host memory");
  }
  const int64_t row_vecs = row_bytes / 16;
  int32_t per_cta = (int32_t)(kProbeCtaBytes / row_bytes);
  per_cta = per_cta < 1 ? 1 : per_cta;
  const int blocks = (count + per_cta - 1) / per_cta;
  host_row_gather_kernel<<<blocks, kProbeThreads, 0, static_cast<cudaStream_t>(stream_handle)>>>(
      static_cast<const uint4*>(attr.devicePointer), row_vecs, rows, count, per_cta,
      static_cast<uint4*>(out));
  err = cudaGetLastError();
  if (err != cudaSuccess) return probe_fail(KVC_ERR_CUDA, std::string("host_row_gather: ") + cudaGetErrorString(err));
  return KVC_OK;
}

extern "C" const char* kvc_host_row_gather_error(void) { return kvc::probe_error.c_str(); }
