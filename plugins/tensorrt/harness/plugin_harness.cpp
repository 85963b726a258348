// Drives every kvcompile plugin through its whole IPluginV3 life cycle, the way TensorRT does,
// without a TensorRT library: getCreators -> createPlugin from fields (build phase) ->
// capabilities -> output types and shapes (test expression builder) -> format combinations ->
// configurePlugin -> workspace -> serialise fields -> createPlugin (runtime phase) -> clone ->
// attachToContext -> enqueue on real GPU buffers (when a GPU is present).
//
//   kvcompile_plugin_harness [DUMP_DIR [KV_INPUT_DIR]]
//
// KV_INPUT_DIR adds a kv_decode case over a real codec bitstream (check_against_torch.py
// --write-kv-inputs writes it). With DUMP_DIR, each case's inputs and output are written there (raw little-endian arrays and
// a JSON description) for plugins/tensorrt/harness/check_against_torch.py, which compares them
// with the torch ops. Exit status: the number of failed checks.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>
#include <functional>
#include <string>
#include <vector>

#include "plugin_common.h"
#include "test_expr_builder.h"

extern "C" nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators);

namespace {

using nvinfer1::DataType;
using nvinfer1::PluginField;
using nvinfer1::PluginFieldType;

int failures = 0;

void check(bool ok, std::string const& what) {
  std::printf("%s %s\n", ok ? "PASS" : "FAIL", what.c_str());
  if (!ok) ++failures;
}

size_t element_bytes(DataType t) {
  switch (t) {
    case DataType::kFLOAT: case DataType::kINT32: return 4;
    case DataType::kHALF: case DataType::kBF16: return 2;
    case DataType::kINT64: return 8;
    default: return 1;
  }
}

char const* type_name(DataType t) {
  switch (t) {
    case DataType::kFLOAT: return "float32";
    case DataType::kHALF: return "float16";
    case DataType::kBF16: return "bfloat16";
    case DataType::kINT64: return "int64";
    case DataType::kINT32: return "int32";
    case DataType::kUINT8: return "uint8";
    default: return "other";
  }
}

struct Tensor {
  Tensor() = default;
  Tensor(std::string name_, std::vector<int64_t> shape_, DataType type_, bool host_mapped_ = false)
      : name(std::move(name_)), shape(std::move(shape_)), type(type_), host_mapped(host_mapped_) {}
  std::string name;
  std::vector<int64_t> shape;
  DataType type = DataType::kFLOAT;
  bool host_mapped = false;  // value_host: pinned, mapped host memory
  std::vector<unsigned char> bytes;

  int64_t count() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  }
  nvinfer1::Dims dims() const {
    nvinfer1::Dims d{};
    d.nbDims = static_cast<int32_t>(shape.size());
    for (size_t i = 0; i < shape.size(); ++i) d.d[i] = shape[i];
    return d;
  }
  // Values given as floats (or integers for int64), stored in the tensor's type.
  void fill(std::function<double(int64_t)> const& value) {
    bytes.assign(count() * element_bytes(type), 0);
    for (int64_t i = 0; i < count(); ++i) {
      double v = value(i);
      switch (type) {
        case DataType::kFLOAT: { float f = static_cast<float>(v); std::memcpy(&bytes[i * 4], &f, 4); break; }
        case DataType::kHALF: { __half h = __float2half(static_cast<float>(v)); std::memcpy(&bytes[i * 2], &h, 2); break; }
        case DataType::kBF16: { __nv_bfloat16 h = __float2bfloat16(static_cast<float>(v)); std::memcpy(&bytes[i * 2], &h, 2); break; }
        case DataType::kINT64: { int64_t x = static_cast<int64_t>(v); std::memcpy(&bytes[i * 8], &x, 8); break; }
        case DataType::kINT32: { int32_t x = static_cast<int32_t>(v); std::memcpy(&bytes[i * 4], &x, 4); break; }
        case DataType::kUINT8: bytes[i] = static_cast<unsigned char>(v); break;
        default: break;
      }
    }
  }
};

// Fields with their own storage (PluginField only points).
struct Fields {
  std::vector<std::vector<unsigned char>> storage;
  std::vector<std::string> names;
  std::vector<PluginField> list;
  void add(std::string const& name, PluginFieldType type, void const* data, int32_t length, size_t bytes) {
    names.push_back(name);
    types.push_back(type);
    lengths.push_back(length);
    storage.emplace_back(static_cast<unsigned char const*>(data), static_cast<unsigned char const*>(data) + bytes);
  }
  void add_int(std::string const& name, int32_t v) { add(name, PluginFieldType::kINT32, &v, 1, 4); }
  void add_float(std::string const& name, float v) { add(name, PluginFieldType::kFLOAT32, &v, 1, 4); }
  void add_floats(std::string const& name, std::vector<float> const& v) {
    add(name, PluginFieldType::kFLOAT32, v.data(), static_cast<int32_t>(v.size()), v.size() * 4);
  }
  // Pointers into this object's own storage (taken afresh: a copied Fields must not point
  // into the original).
  nvinfer1::PluginFieldCollection collection() {
    list.clear();
    for (size_t i = 0; i < names.size(); ++i) list.emplace_back(names[i].c_str(), storage[i].data(), types[i], lengths[i]);
    return {static_cast<int32_t>(list.size()), list.data()};
  }
  size_t size() const { return names.size(); }
  static Fields copy_of(nvinfer1::PluginFieldCollection const* fc) {
    Fields f;
    for (int32_t i = 0; i < fc->nbFields; ++i) {
      PluginField const& p = fc->fields[i];
      size_t const size = p.type == PluginFieldType::kINT64 ? 8 : 4;
      f.add(p.name, p.type, p.data, p.length, size * p.length);
    }
    return f;
  }
  std::string json() const {
    std::string out = "{";
    for (size_t i = 0; i < names.size(); ++i) {
      out += (i ? ", \"" : "\"") + names[i] + "\": [";
      for (int32_t k = 0; k < lengths[i]; ++k) {
        char buffer[64];
        if (types[i] == PluginFieldType::kFLOAT32) {
          float v;
          std::memcpy(&v, &storage[i][k * 4], 4);
          std::snprintf(buffer, sizeof buffer, std::isinf(v) ? (v < 0 ? "\"-inf\"" : "\"inf\"") : "%.9g", v);
        } else {
          int32_t v;
          std::memcpy(&v, &storage[i][k * 4], 4);
          std::snprintf(buffer, sizeof buffer, "%d", v);
        }
        out += (k ? ", " : "") + std::string(buffer);
      }
      out += "]";
    }
    return out + "}";
  }

 private:
  std::vector<PluginFieldType> types;
  std::vector<int32_t> lengths;
};

struct Case {
  std::string name, plugin;
  Fields fields;
  std::vector<Tensor> inputs;
  Tensor output;
  std::vector<int> dynamic_batch_inputs;  // inputs whose dim 0 is a symbol in the shape check
  // the output's shape expressions, given the inputs' (default: input 0's, the same objects)
  std::function<bool(std::vector<nvinfer1::DimsExprs> const&, nvinfer1::DimsExprs const&)> shape_ok;
  bool compare_with_torch = true;  // false: inputs not meaningful to a reference (enqueue still runs)
  std::function<void(std::vector<nvinfer1::DynamicPluginTensorDesc>&)> refused_config;  // a shape it must refuse
  std::function<void(std::vector<nvinfer1::DynamicPluginTensorDesc>&)> refused_format;  // a type/format combination it must refuse
};

uint64_t lcg_state = 12345;
double uniform() {  // deterministic values in [-1, 1)
  lcg_state = lcg_state * 6364136223846793005ULL + 1442695040888963407ULL;
  return static_cast<double>(lcg_state >> 11) / static_cast<double>(1ULL << 53) * 2.0 - 1.0;
}

Case kcache_case(std::string const& name, DataType type, DataType bias_type, int select_layer, int topn, int numerator,
                 int denominator, int renormalize, float softcap, bool sinks) {
  int64_t const B = 2, Hq = 8, Hkv = 2, P = 300, D = 64;
  Case c;
  c.name = name;
  c.plugin = "kcache_attention";
  c.fields.add_float("scale", 0.125f);
  c.fields.add_int("topn", topn);
  c.fields.add_int("topn_numerator", numerator);
  c.fields.add_int("topn_denominator", denominator);
  c.fields.add_int("select_layer", select_layer);
  c.fields.add_int("renormalize", renormalize);
  c.fields.add_float("softcap", softcap);
  std::vector<float> sink_logits(1, -INFINITY);
  if (sinks) {
    sink_logits.clear();
    for (int64_t h = 0; h < Hq; ++h) sink_logits.push_back(0.5f * static_cast<float>(h) - 1.f);
  }
  c.fields.add_floats("sinks", sink_logits);
  auto random = [](int64_t) { return uniform() * 2.0; };
  c.inputs = {{"query", {B, Hq, 1, D}, type}, {"key", {B, Hkv, 1, D}, type}, {"value", {B, Hkv, 1, D}, type},
              {"key_cache", {B, Hkv, P, D}, type}, {"value_host", {B, P, Hkv, D}, type, true},
              {"attn_bias", {B, 1, 1, P + 1}, bias_type}};
  for (int i = 0; i < 5; ++i) c.inputs[i].fill(random);
  // batch row 1 hides its first 40 positions (left padding)
  c.inputs[5].fill([P](int64_t i) { return (i / (P + 1) == 1 && i % (P + 1) < 40) ? -65504.0 : 0.0; });
  c.output = {"output", {B, Hq, 1, D}, type};
  c.dynamic_batch_inputs = {0, 1, 2, 3, 4, 5};
  c.refused_config = [](std::vector<nvinfer1::DynamicPluginTensorDesc>& in) { in[0].max.d[2] = 4; };  // prefill
  c.refused_format = [type](std::vector<nvinfer1::DynamicPluginTensorDesc>& io) {
    io[1].desc.type = type == DataType::kFLOAT ? DataType::kHALF : DataType::kFLOAT;  // key unlike query
  };
  return c;
}

Case rerotate_case(std::string const& name, DataType type, int interleaved, int64_t rotary) {
  int64_t const B = 2, H = 4, T = 37, D = 64;
  Case c;
  c.name = name;
  c.plugin = "rerotate_keys";
  c.fields.add_int("interleaved", interleaved);
  c.inputs = {{"keys", {B, H, T, D}, type}, {"delta", {B, T}, DataType::kINT64}, {"inv_freq", {rotary / 2}, DataType::kFLOAT}};
  c.inputs[0].fill([](int64_t) { return uniform() * 3.0; });
  c.inputs[1].fill([](int64_t i) { return static_cast<double>((i * 7919) % 131072 - 2000); });
  c.inputs[2].fill([rotary](int64_t i) { return std::pow(10000.0, -2.0 * static_cast<double>(i) / static_cast<double>(rotary)); });
  c.output = {"output", {B, H, T, D}, type};
  c.dynamic_batch_inputs = {0, 1};
  c.refused_config = [](std::vector<nvinfer1::DynamicPluginTensorDesc>& in) {
    in[2].desc.dims.d[0] = in[2].min.d[0] = in[2].max.d[0] = in[2].opt.d[0] = 33;  // 66 rotated dims > 64
  };
  c.refused_format = [](std::vector<nvinfer1::DynamicPluginTensorDesc>& io) { io[1].desc.type = DataType::kINT32; };
  return c;
}

// The codec level's shapes with stand-in bytes: every life-cycle step, and an enqueue the
// kernel must survive (it checks every offset on the device; the rows are then undefined).
Case kv_decode_synthetic_case() {
  int32_t const layers = 2, heads = 2, dim = 8, tokens = 4, chunks = 2;
  Case c;
  c.name = "kv_decode_stand_in_bytes";
  c.plugin = "kv_decode";
  for (auto const& [name, value] : std::vector<std::pair<std::string, int32_t>>{
           {"layers", layers}, {"kv_heads", heads}, {"head_dim", dim}, {"tokens", tokens}, {"group", 4},
           {"log_scales", 1}, {"onnx_dtype", 10}})
    c.fields.add_int(name, value);
  c.inputs = {{"data", {64}, DataType::kUINT8}, {"chunk_offsets", {chunks}, DataType::kINT64},
              {"bank_cdf", {3, 5}, DataType::kINT32}, {"halves", {2 * layers}, DataType::kINT64},
              {"table_base", {2 * layers}, DataType::kINT64}, {"scale_steps", {256}, DataType::kFLOAT}};
  c.inputs[0].fill([](int64_t i) { return static_cast<double>((i * 37) % 256); });
  c.inputs[1].fill([](int64_t i) { return static_cast<double>(32 * i); });
  c.inputs[2].fill([](int64_t i) { return static_cast<double>((i % 5) * 16384); });
  c.inputs[3].fill([](int64_t) { return 2.0; });
  c.inputs[4].fill([](int64_t i) { return static_cast<double>(i % 3); });
  c.inputs[5].fill([](int64_t i) { return std::pow(2.0, -static_cast<double>(i) / 16.0); });
  c.output = {"output", {2, layers, heads, chunks * tokens, dim}, DataType::kHALF};
  c.dynamic_batch_inputs = {0, 1};  // data bytes and chunk count are dynamic
  c.shape_ok = [layers, heads, dim](std::vector<nvinfer1::DimsExprs> const& in, nvinfer1::DimsExprs const& out) {
    auto is = [](nvinfer1::IDimensionExpr const* e, int64_t v) { return e && e->isConstant() && e->getConstantValue() == v; };
    return out.nbDims == 5 && is(out.d[0], 2) && is(out.d[1], layers) && is(out.d[2], heads) && is(out.d[4], dim) &&
           !out.d[3]->isConstant() && out.d[3] != in[1].d[0];  // chunks (symbolic) * tokens
  };
  c.refused_config = [](std::vector<nvinfer1::DynamicPluginTensorDesc>& in) {
    in[3].desc.dims.d[0] = in[3].min.d[0] = in[3].max.d[0] = in[3].opt.d[0] = 3;  // halves of 3 entries
  };
  c.refused_format = [](std::vector<nvinfer1::DynamicPluginTensorDesc>& io) { io[1].desc.type = DataType::kINT32; };
  c.compare_with_torch = false;
  return c;
}

// A real bitstream's inputs, written by check_against_torch.py --write-kv-inputs DIR: DIR/kv_decode.txt
// holds `field NAME VALUE` and `input NAME DTYPE DIM...` lines, DIR/kv_input.NAME.bin the bytes.
bool kv_decode_case_from(std::string const& dir, Case& c) {
  std::ifstream in(dir + "/kv_decode.txt");
  if (!in) return false;
  c.name = "kv_decode_codec_bitstream";
  c.plugin = "kv_decode";
  int32_t onnx_dtype = 1;
  int64_t layers = 0, heads = 0, dim = 0, tokens = 0, chunks = 0;
  std::string kind;
  while (in >> kind) {
    std::string name, line;
    in >> name;
    std::getline(in, line);
    std::istringstream rest(line);
    if (kind == "field") {
      int32_t value = 0;
      rest >> value;
      c.fields.add_int(name, value);
      if (name == "onnx_dtype") onnx_dtype = value;
      if (name == "layers") layers = value;
      if (name == "kv_heads") heads = value;
      if (name == "head_dim") dim = value;
      if (name == "tokens") tokens = value;
    } else {
      std::string dtype;
      rest >> dtype;
      std::vector<int64_t> shape;
      for (int64_t d; rest >> d;) shape.push_back(d);
      DataType const type = dtype == "uint8" ? DataType::kUINT8 : dtype == "int64" ? DataType::kINT64
                          : dtype == "int32" ? DataType::kINT32 : DataType::kFLOAT;
      Tensor t(name, shape, type);
      std::ifstream bin(dir + "/kv_input." + name + ".bin", std::ios::binary);
      t.bytes.assign(std::istreambuf_iterator<char>(bin), std::istreambuf_iterator<char>());
      if (t.bytes.size() != static_cast<size_t>(t.count()) * element_bytes(type)) return false;
      if (name == "chunk_offsets") chunks = shape[0];
      c.inputs.push_back(std::move(t));
    }
  }
  DataType const out_type = onnx_dtype == 10 ? DataType::kHALF : onnx_dtype == 16 ? DataType::kBF16 : DataType::kFLOAT;
  c.output = {"output", {2, layers, heads, chunks * tokens, dim}, out_type};
  Case synthetic = kv_decode_synthetic_case();
  c.dynamic_batch_inputs = synthetic.dynamic_batch_inputs;
  c.refused_config = synthetic.refused_config;
  c.refused_format = synthetic.refused_format;
  c.shape_ok = [](std::vector<nvinfer1::DimsExprs> const&, nvinfer1::DimsExprs const& out) { return out.nbDims == 5; };
  return c.inputs.size() == 6;
}

nvinfer1::IPluginCreatorV3One* find_creator(std::string const& name) {
  int32_t count = 0;
  nvinfer1::IPluginCreatorInterface* const* creators = getCreators(count);
  for (int32_t i = 0; i < count; ++i) {
    auto* creator = static_cast<nvinfer1::IPluginCreatorV3One*>(creators[i]);
    if (std::strcmp(creators[i]->getInterfaceInfo().kind, "PLUGIN CREATOR_V3ONE") == 0 && name == creator->getPluginName())
      return creator;
  }
  return nullptr;
}

std::vector<nvinfer1::DynamicPluginTensorDesc> descriptors(Case const& c) {
  std::vector<nvinfer1::DynamicPluginTensorDesc> io;
  for (Tensor const* t : [&] { std::vector<Tensor const*> all; for (auto const& i : c.inputs) all.push_back(&i); all.push_back(&c.output); return all; }()) {
    nvinfer1::DynamicPluginTensorDesc d{};
    d.desc.dims = d.min = d.max = d.opt = t->dims();
    d.desc.type = t->type;
    d.desc.format = nvinfer1::TensorFormat::kLINEAR;
    io.push_back(d);
  }
  return io;
}

void write_file(std::string const& path, void const* data, size_t bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(static_cast<char const*>(data), static_cast<std::streamsize>(bytes));
}

std::string tensor_json(Tensor const& t, std::string const& file) {
  std::string shape;
  for (size_t i = 0; i < t.shape.size(); ++i) shape += (i ? ", " : "") + std::to_string(t.shape[i]);
  return "{\"name\": \"" + t.name + "\", \"shape\": [" + shape + "], \"dtype\": \"" + type_name(t.type) +
         "\", \"file\": \"" + file + "\"}";
}

// enqueue on real buffers; returns the output bytes (empty on failure)
std::vector<unsigned char> run_on_gpu(Case const& c, nvinfer1::IPluginV3OneRuntime* runtime, size_t workspace_bytes) {
  std::vector<void*> device(c.inputs.size(), nullptr), host_mapped(c.inputs.size(), nullptr);
  std::vector<nvinfer1::PluginTensorDesc> in_desc;
  bool ok = true;
  for (size_t i = 0; i < c.inputs.size(); ++i) {
    Tensor const& t = c.inputs[i];
    if (t.host_mapped) {
      ok &= cudaHostAlloc(&host_mapped[i], t.bytes.size(), cudaHostAllocMapped) == cudaSuccess;
      if (ok) std::memcpy(host_mapped[i], t.bytes.data(), t.bytes.size());
      device[i] = host_mapped[i];  // unified addressing: the host pointer is what TensorRT passes on
    } else {
      ok &= cudaMalloc(&device[i], t.bytes.size()) == cudaSuccess;
      if (ok) ok &= cudaMemcpy(device[i], t.bytes.data(), t.bytes.size(), cudaMemcpyHostToDevice) == cudaSuccess;
    }
    nvinfer1::PluginTensorDesc d{};
    d.dims = t.dims();
    d.type = t.type;
    d.format = nvinfer1::TensorFormat::kLINEAR;
    in_desc.push_back(d);
  }
  nvinfer1::PluginTensorDesc out_desc{};
  out_desc.dims = c.output.dims();
  out_desc.type = c.output.type;
  out_desc.format = nvinfer1::TensorFormat::kLINEAR;
  size_t const out_bytes = c.output.count() * element_bytes(c.output.type);
  void* out = nullptr;
  void* workspace = nullptr;
  cudaStream_t stream = nullptr;
  ok &= cudaMalloc(&out, out_bytes) == cudaSuccess;
  ok &= cudaMalloc(&workspace, workspace_bytes ? workspace_bytes : 256) == cudaSuccess;
  ok &= cudaStreamCreate(&stream) == cudaSuccess;
  std::vector<unsigned char> result;
  if (ok) {
    int32_t rc = runtime->onShapeChange(in_desc.data(), static_cast<int32_t>(in_desc.size()), &out_desc, 1);
    check(rc == 0, c.name + ": onShapeChange");
    rc = runtime->enqueue(in_desc.data(), &out_desc, const_cast<void const* const*>(device.data()), &out, workspace, stream);
    check(rc == 0, c.name + ": enqueue returns 0");
    cudaError_t err = cudaStreamSynchronize(stream);
    check(err == cudaSuccess, c.name + ": stream completes (" + cudaGetErrorString(err) + ")");
    if (rc == 0 && err == cudaSuccess) {
      result.resize(out_bytes);
      cudaMemcpy(result.data(), out, out_bytes, cudaMemcpyDeviceToHost);
    }
  } else {
    check(false, c.name + ": GPU buffers allocated");
  }
  for (size_t i = 0; i < c.inputs.size(); ++i) c.inputs[i].host_mapped ? cudaFreeHost(host_mapped[i]) : cudaFree(device[i]);
  cudaFree(out);
  cudaFree(workspace);
  if (stream) cudaStreamDestroy(stream);
  return result;
}

void run_case(Case& c, std::string const& dump_dir, bool gpu) {
  std::printf("== %s (%s)\n", c.name.c_str(), c.plugin.c_str());
  nvinfer1::IPluginCreatorV3One* creator = find_creator(c.plugin);
  check(creator != nullptr, c.name + ": getCreators lists " + c.plugin);
  if (!creator) return;
  check(std::string(creator->getPluginNamespace()) == "kvcompile" && std::string(creator->getPluginVersion()) == "1",
        c.name + ": creator namespace kvcompile, version 1");
  nvinfer1::PluginFieldCollection const* declared = creator->getFieldNames();
  check(declared && declared->nbFields == static_cast<int32_t>(c.fields.size()), c.name + ": creator declares every field");

  nvinfer1::PluginFieldCollection fc = c.fields.collection();
  nvinfer1::IPluginV3* plugin = creator->createPlugin(c.name.c_str(), &fc, nvinfer1::TensorRTPhase::kBUILD);
  check(plugin != nullptr, c.name + ": createPlugin (build phase) from fields");
  if (!plugin) return;
  auto* core = static_cast<nvinfer1::IPluginV3OneCore*>(plugin->getCapabilityInterface(nvinfer1::PluginCapabilityType::kCORE));
  auto* build = static_cast<nvinfer1::IPluginV3OneBuild*>(plugin->getCapabilityInterface(nvinfer1::PluginCapabilityType::kBUILD));
  check(core && build && plugin->getCapabilityInterface(nvinfer1::PluginCapabilityType::kRUNTIME), c.name + ": core, build and runtime capabilities");
  check(core && c.plugin == core->getPluginName() && std::string(core->getPluginNamespace()) == "kvcompile",
        c.name + ": core names the plugin and its namespace");

  int32_t const n_in = static_cast<int32_t>(c.inputs.size());
  check(build->getNbOutputs() == 1, c.name + ": one output");
  std::vector<DataType> in_types;
  for (auto const& t : c.inputs) in_types.push_back(t.type);
  DataType out_type{};
  check(build->getOutputDataTypes(&out_type, 1, in_types.data(), n_in) == 0 && out_type == c.output.type,
        c.name + ": output type " + type_name(c.output.type));

  kvcompile::harness::TestExprBuilder builder;
  nvinfer1::IDimensionExpr const* batch = builder.symbol("batch");
  std::vector<nvinfer1::DimsExprs> in_exprs(c.inputs.size());
  for (size_t i = 0; i < c.inputs.size(); ++i) {
    in_exprs[i].nbDims = static_cast<int32_t>(c.inputs[i].shape.size());
    for (size_t k = 0; k < c.inputs[i].shape.size(); ++k) in_exprs[i].d[k] = builder.constant(c.inputs[i].shape[k]);
  }
  for (int i : c.dynamic_batch_inputs) in_exprs[i].d[0] = batch;
  nvinfer1::DimsExprs out_exprs{};
  int32_t rc = build->getOutputShapes(in_exprs.data(), n_in, nullptr, 0, &out_exprs, 1, builder);
  bool same = rc == 0;
  if (c.shape_ok) {
    same = same && c.shape_ok(in_exprs, out_exprs);
  } else {
    same = same && out_exprs.nbDims == in_exprs[0].nbDims;
    for (int32_t k = 0; same && k < out_exprs.nbDims; ++k) same = out_exprs.d[k] == in_exprs[0].d[k];
  }
  std::string dims;
  for (int32_t k = 0; rc == 0 && k < out_exprs.nbDims; ++k)
    dims += (k ? ", " : "") + kvcompile::harness::TestExprBuilder::describe(out_exprs.d[k]);
  check(same, c.name + ": output shape expressions [" + dims + "]");

  std::vector<nvinfer1::DynamicPluginTensorDesc> io = descriptors(c);
  bool all = true;
  for (int32_t pos = 0; pos <= n_in; ++pos) all &= build->supportsFormatCombination(pos, io.data(), n_in, 1);
  check(all, c.name + ": supportsFormatCombination accepts the case's types, linear");
  auto wrong = io;
  wrong[0].desc.format = nvinfer1::TensorFormat::kHWC8;
  check(!build->supportsFormatCombination(0, wrong.data(), n_in, 1), c.name + ": refuses a non-linear format");
  wrong = io;
  c.refused_format(wrong);
  check(!build->supportsFormatCombination(1, wrong.data(), n_in, 1), c.name + ": refuses a type it has no kernel for");

  check(build->configurePlugin(io.data(), n_in, &io[n_in], 1) == 0, c.name + ": configurePlugin");
  auto refused = io;
  c.refused_config(refused);
  check(build->configurePlugin(refused.data(), n_in, &refused[n_in], 1) != 0, c.name + ": configurePlugin refuses a shape it cannot run");
  size_t const workspace = build->getWorkspaceSize(io.data(), n_in, &io[n_in], 1);
  std::printf("   workspace %zu bytes\n", workspace);

  auto* runtime_caps = static_cast<nvinfer1::IPluginV3OneRuntime*>(plugin->getCapabilityInterface(nvinfer1::PluginCapabilityType::kRUNTIME));
  Fields serialised = Fields::copy_of(runtime_caps->getFieldsToSerialize());
  check(serialised.json() == c.fields.json(), c.name + ": serialised fields equal the creating fields " + serialised.json());
  nvinfer1::PluginFieldCollection sfc = serialised.collection();
  nvinfer1::IPluginV3* restored = creator->createPlugin(c.name.c_str(), &sfc, nvinfer1::TensorRTPhase::kRUNTIME);
  check(restored != nullptr, c.name + ": createPlugin (runtime phase) from the serialised fields");
  nvinfer1::IPluginV3* cloned = restored ? restored->clone() : nullptr;
  check(cloned != nullptr, c.name + ": clone");
  auto* cloned_runtime = cloned ? static_cast<nvinfer1::IPluginV3OneRuntime*>(cloned->getCapabilityInterface(nvinfer1::PluginCapabilityType::kRUNTIME)) : nullptr;
  nvinfer1::IPluginV3* attached = nullptr;
  if (cloned_runtime) {
    check(Fields::copy_of(cloned_runtime->getFieldsToSerialize()).json() == c.fields.json(), c.name + ": the clone serialises the same fields");
    if (gpu) attached = cloned_runtime->attachToContext(nullptr);  // uploads device state (sinks)
  }
  if (gpu && attached) {
    auto* runtime = static_cast<nvinfer1::IPluginV3OneRuntime*>(attached->getCapabilityInterface(nvinfer1::PluginCapabilityType::kRUNTIME));
    std::vector<unsigned char> result = run_on_gpu(c, runtime, workspace);
    if (!dump_dir.empty() && !result.empty() && c.compare_with_torch) {
      std::string json = "{\"case\": \"" + c.name + "\", \"plugin\": \"" + c.plugin + "\", \"fields\": " + c.fields.json() + ", \"inputs\": [";
      for (size_t i = 0; i < c.inputs.size(); ++i) {
        std::string file = c.name + "." + c.inputs[i].name + ".bin";
        write_file(dump_dir + "/" + file, c.inputs[i].bytes.data(), c.inputs[i].bytes.size());
        json += (i ? ", " : "") + tensor_json(c.inputs[i], file);
      }
      std::string file = c.name + ".output.bin";
      write_file(dump_dir + "/" + file, result.data(), result.size());
      json += "], \"output\": " + tensor_json(c.output, file) + "}\n";
      std::ofstream(dump_dir + "/" + c.name + ".json") << json;
    }
  } else if (gpu) {
    check(false, c.name + ": attachToContext");
  }
  delete attached;
  delete cloned;
  delete restored;
  delete plugin;
}

}  // namespace

int main(int argc, char** argv) {
  std::string const dump_dir = argc > 1 ? argv[1] : "";
  int devices = 0;
  bool const gpu = cudaGetDeviceCount(&devices) == cudaSuccess && devices > 0;
  std::printf("GPU: %s\n", gpu ? "yes (enqueue runs)" : "no (every step but enqueue)");
  std::printf("(stderr lines 'kvcompile plugin: ...' are the plugins refusing what the harness asks them to refuse)\n");
  std::string const kv_inputs = argc > 2 ? argv[2] : "";
  std::vector<Case> cases = {
      kcache_case("kcache_f32_head_top64", DataType::kFLOAT, DataType::kFLOAT, 0, 64, 0, 0, 1, 0.f, false),
      kcache_case("kcache_bf16_layer_top32", DataType::kBF16, DataType::kFLOAT, 1, 32, 0, 0, 0, 0.f, false),
      kcache_case("kcache_f16_quarter_softcap_sinks", DataType::kHALF, DataType::kHALF, 0, 0, 1, 4, 1, 30.f, true),
      kcache_case("kcache_f32_all_positions", DataType::kFLOAT, DataType::kFLOAT, 0, 1000, 0, 0, 1, 0.f, false),
      rerotate_case("rerotate_f32_half_split", DataType::kFLOAT, 0, 64),
      rerotate_case("rerotate_bf16_interleaved_partial", DataType::kBF16, 1, 32),
      kv_decode_synthetic_case(),
  };
  Case from_bitstream;
  if (!kv_inputs.empty()) {
    if (kv_decode_case_from(kv_inputs, from_bitstream)) {
      cases.push_back(from_bitstream);
    } else {
      check(false, "kv_decode inputs readable from " + kv_inputs);
    }
  }
  for (Case& c : cases) run_case(c, dump_dir, gpu);
  std::printf("%d check(s) failed\n", failures);
  return failures;
}
