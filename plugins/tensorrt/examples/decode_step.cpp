// A C++ runtime for a kvcompile TensorRT artifact: loads the plugin library, deserialises the
// decode engine, binds every input (past values of kcache layers in pinned, mapped host memory,
// everything else on the device) and runs one decode step over a past of P positions.
//
//   kvcompile_trt_decode ARTIFACT/engines/decode.plan ARTIFACT/io_layout.txt libkvcompile_trt_plugins.so [P]
//
// io_layout.txt (written by `kvcompile export --target tensorrt`) has one line per graph
// tensor: `input|output NAME DTYPE MEMORY AXES`, AXES comma-separated sizes or the names
// batch, tokens, past, context (= past + tokens). The caches here are filled with zeros: a real
// server keeps them from step to step (kvcompile/runtime/cache.py is the reference manager).
#include <cuda_runtime_api.h>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "NvInferRuntime.h"

namespace {

class Logger : public nvinfer1::ILogger {
  void log(Severity severity, char const* message) noexcept override {
    if (severity <= Severity::kWARNING) std::cerr << message << "\n";
  }
} logger;

struct Slot {
  std::string role, name, dtype, memory;
  std::vector<std::string> axes;
};

std::vector<Slot> read_layout(std::string const& path) {
  std::vector<Slot> slots;
  std::ifstream in(path);
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty() || line[0] == '#') continue;
    std::istringstream fields(line);
    Slot slot;
    std::string axes;
    fields >> slot.role >> slot.name >> slot.dtype >> slot.memory >> axes;
    std::stringstream split(axes);
    for (std::string axis; std::getline(split, axis, ',');) slot.axes.push_back(axis);
    slots.push_back(slot);
  }
  return slots;
}

size_t element_bytes(std::string const& dtype) {
  if (dtype == "int64") return 8;
  if (dtype == "float32" || dtype == "int32") return 4;
  return 2;  // float16, bfloat16
}

bool ok(cudaError_t err, char const* what) {
  if (err != cudaSuccess) std::cerr << what << ": " << cudaGetErrorString(err) << "\n";
  return err == cudaSuccess;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 4) {
    std::cerr << "usage: " << argv[0] << " decode.plan io_layout.txt libkvcompile_trt_plugins.so [past]\n";
    return 2;
  }
  int64_t const past = argc > 4 ? std::stoll(argv[4]) : 16;
  std::map<std::string, int64_t> const sizes = {{"batch", 1}, {"tokens", 1}, {"past", past}, {"context", past + 1}};

  std::unique_ptr<nvinfer1::IRuntime> runtime{nvinfer1::createInferRuntime(logger)};
  // Registers the kvcompile creators (getCreators) with this runtime's plugin registry.
  if (!runtime || !runtime->getPluginRegistry().loadLibrary(argv[3])) {
    std::cerr << "could not load the plugin library " << argv[3] << "\n";
    return 1;
  }
  std::ifstream file(argv[1], std::ios::binary);
  std::vector<char> plan((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  std::unique_ptr<nvinfer1::ICudaEngine> engine{runtime->deserializeCudaEngine(plan.data(), plan.size())};
  if (!engine) return 1;
  std::unique_ptr<nvinfer1::IExecutionContext> context{engine->createExecutionContext()};

  std::vector<void*> device_buffers, host_buffers;
  void* logits = nullptr;
  size_t logits_bytes = 0;
  for (Slot const& slot : read_layout(argv[2])) {
    nvinfer1::Dims dims{};
    dims.nbDims = static_cast<int32_t>(slot.axes.size());
    size_t count = 1;
    for (size_t i = 0; i < slot.axes.size(); ++i) {
      auto named = sizes.find(slot.axes[i]);
      dims.d[i] = named != sizes.end() ? named->second : std::stoll(slot.axes[i]);
      count *= static_cast<size_t>(dims.d[i]);
    }
    size_t const bytes = count * element_bytes(slot.dtype);
    void* address = nullptr;
    if (slot.memory == "host") {
      // Pinned and mapped: the kcache plugin reads only the chosen rows over the host link.
      if (!ok(cudaHostAlloc(&address, bytes ? bytes : 16, cudaHostAllocMapped), "cudaHostAlloc")) return 1;
      std::memset(address, 0, bytes);
      host_buffers.push_back(address);
    } else {
      if (!ok(cudaMalloc(&address, bytes ? bytes : 16), "cudaMalloc")) return 1;
      if (!ok(cudaMemset(address, 0, bytes), "cudaMemset")) return 1;
      device_buffers.push_back(address);
    }
    if (slot.role == "input") context->setInputShape(slot.name.c_str(), dims);
    if (slot.name == "logits") {
      logits = address;
      logits_bytes = bytes;
    }
    context->setTensorAddress(slot.name.c_str(), address);
  }
  cudaStream_t stream;
  if (!ok(cudaStreamCreate(&stream), "cudaStreamCreate")) return 1;
  bool const ran = context->enqueueV3(stream);
  if (!ran || !ok(cudaStreamSynchronize(stream), "decode step")) return 1;
  std::vector<float> host_logits(logits_bytes / sizeof(float));
  if (logits && logits_bytes % sizeof(float) == 0)
    cudaMemcpy(host_logits.data(), logits, logits_bytes, cudaMemcpyDeviceToHost);
  size_t best = 0;
  for (size_t i = 1; i < host_logits.size(); ++i)
    if (host_logits[i] > host_logits[best]) best = i;
  std::printf("decode step over %lld past positions ran; argmax token %zu\n", static_cast<long long>(past), best);
  for (void* p : device_buffers) cudaFree(p);
  for (void* p : host_buffers) cudaFreeHost(p);
  cudaStreamDestroy(stream);
  return 0;
}
