// kvcompile::kv_decode plugin (see the header for inputs, output and fields).
#include "kv_decode_plugin.h"

#include "kv_decode_prepare.h"

namespace kvcompile {
namespace tensorrt {
namespace {

enum Input { kData = 0, kChunkOffsets, kBankCdf, kHalves, kTableBase, kScaleSteps };

// Workspace layout for these sizes (also what enqueue carves the workspace into).
struct Layout {
  size_t chunk_table, bank_cdf, halves, table_base, status, total;
};

Layout layout_for(int64_t chunks, int64_t rows, int64_t width, int64_t sides_layers) {
  Layout l{};
  l.chunk_table = 0;
  l.bank_cdf = l.chunk_table + align256(chunks * 4 * sizeof(int64_t));
  l.halves = l.bank_cdf + align256(rows * width * sizeof(uint16_t));
  l.table_base = l.halves + align256(sides_layers * sizeof(int32_t));
  l.status = l.table_base + align256(sides_layers * sizeof(int32_t));
  l.total = l.status + align256(chunks * sizeof(int32_t));
  return l;
}

}  // namespace

std::vector<FieldSpec> const& KvDecodePlugin::field_specs() {
  static std::vector<FieldSpec> const specs = {
      {"layers", PluginFieldType::kINT32, 1},   {"kv_heads", PluginFieldType::kINT32, 1},
      {"head_dim", PluginFieldType::kINT32, 1}, {"tokens", PluginFieldType::kINT32, 1},
      {"group", PluginFieldType::kINT32, 1},    {"log_scales", PluginFieldType::kINT32, 1},
      {"onnx_dtype", PluginFieldType::kINT32, 1},
  };
  return specs;
}

nvinfer1::IPluginV3* KvDecodePlugin::create(std::string const& name, FieldReader const& fields,
                                            nvinfer1::TensorRTPhase) {
  if (!has_fields(fields, field_specs(), name)) return nullptr;
  auto* plugin = new KvDecodePlugin(name);
  plugin->layers_ = fields.get_int("layers", 0);
  plugin->kv_heads_ = fields.get_int("kv_heads", 0);
  plugin->head_dim_ = fields.get_int("head_dim", 0);
  plugin->tokens_ = fields.get_int("tokens", 0);
  plugin->group_ = fields.get_int("group", 0);
  plugin->log_scales_ = fields.get_int("log_scales", 0);
  plugin->onnx_dtype_ = fields.get_int("onnx_dtype", 1);
  std::string problem;
  if (plugin->layers_ < 1 || plugin->kv_heads_ < 1 || plugin->head_dim_ < 1 || plugin->tokens_ < 1)
    problem = "layers, kv_heads, head_dim and tokens must be >= 1";
  else if (plugin->group_ != 1 && plugin->group_ != 2 && plugin->group_ != 4 && plugin->group_ != 8)
    problem = "group must be 1, 2, 4 or 8 (the kernel's stream widths)";
  else if ((plugin->kv_heads_ * plugin->head_dim_) % plugin->group_)
    problem = "group must divide kv_heads * head_dim";
  else if (plugin->log_scales_ != 0 && plugin->log_scales_ != 1)
    problem = "log_scales must be 0 or 1";
  else if (plugin->output_type() == DataType::kINT8)
    problem = "onnx_dtype must be 1 (float), 10 (float16) or 16 (bfloat16)";
  return unless_problem(plugin, problem);
}

DataType KvDecodePlugin::output_type() const noexcept {
  switch (onnx_dtype_) {  // TensorProto types (kvcompile/ops/kv_decode/onnx_function.py ONNX_DTYPES)
    case 1: return DataType::kFLOAT;
    case 10: return DataType::kHALF;
    case 16: return DataType::kBF16;
    default: return DataType::kINT8;  // no kernel: refused by create
  }
}

int32_t KvDecodePlugin::getOutputDataTypes(DataType* outputTypes, int32_t nbOutputs, DataType const*,
                                           int32_t nbInputs) const noexcept {
  if (nbOutputs != 1 || nbInputs != kInputs) return -1;
  outputTypes[0] = output_type();
  return 0;
}

int32_t KvDecodePlugin::getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs,
                                        nvinfer1::DimsExprs const*, int32_t, nvinfer1::DimsExprs* outputs,
                                        int32_t nbOutputs, nvinfer1::IExprBuilder& exprBuilder) noexcept {
  if (nbInputs != kInputs || nbOutputs != 1 || inputs[kChunkOffsets].nbDims != 1) return -1;
  // [2, L, Hkv, N * tokens, D]
  outputs[0].nbDims = 5;
  outputs[0].d[0] = exprBuilder.constant(2);
  outputs[0].d[1] = exprBuilder.constant(layers_);
  outputs[0].d[2] = exprBuilder.constant(kv_heads_);
  outputs[0].d[3] = exprBuilder.operation(nvinfer1::DimensionOperation::kPROD, *inputs[kChunkOffsets].d[0],
                                          *exprBuilder.constant(tokens_));
  outputs[0].d[4] = exprBuilder.constant(head_dim_);
  return 0;
}

bool KvDecodePlugin::supports_type(int32_t pos, DataType type, nvinfer1::DynamicPluginTensorDesc const*) const noexcept {
  switch (pos) {
    case kData: return type == DataType::kUINT8;
    case kChunkOffsets: case kHalves: case kTableBase: return type == DataType::kINT64;
    case kBankCdf: return type == DataType::kINT32;
    case kScaleSteps: return type == DataType::kFLOAT;
    default: return type == output_type();  // the output
  }
}

int32_t KvDecodePlugin::configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
                                        nvinfer1::DynamicPluginTensorDesc const*, int32_t nbOutputs) noexcept {
  if (nbInputs != kInputs || nbOutputs != 1) return -1;
  int32_t const ranks[kInputs] = {1, 1, 2, 1, 1, 1};
  if (!inputs_have_ranks(in, ranks)) return -1;
  int64_t const sides_layers = in[kHalves].desc.dims.d[0], width = in[kBankCdf].desc.dims.d[1] - 1;
  if ((sides_layers >= 0 && sides_layers != 2 * layers_) ||
      (in[kTableBase].desc.dims.d[0] >= 0 && in[kTableBase].desc.dims.d[0] != 2 * layers_)) {
    report("halves and table_base must have 2 * layers entries");
    return -1;
  }
  if (in[kBankCdf].desc.dims.d[1] >= 0 && (width < 1 || width > 256)) {
    report("bank_cdf rows of " + std::to_string(width) + " symbols; the kernel takes 1..256");
    return -1;
  }
  if (in[kScaleSteps].desc.dims.d[0] >= 0 && in[kScaleSteps].desc.dims.d[0] != 256) {
    report("scale_steps must have 256 entries");
    return -1;
  }
  return 0;
}

size_t KvDecodePlugin::getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
                                        nvinfer1::DynamicPluginTensorDesc const*, int32_t) const noexcept {
  if (nbInputs != kInputs) return 0;
  return layout_for(in[kChunkOffsets].max.d[0], in[kBankCdf].max.d[0], in[kBankCdf].max.d[1] - 1, 2 * layers_).total;
}

int32_t KvDecodePlugin::enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const*,
                                void const* const* inputs, void* const* outputs, void* workspace,
                                cudaStream_t stream) noexcept {
  int64_t const data_bytes = inputDesc[kData].dims.d[0], chunks = inputDesc[kChunkOffsets].dims.d[0];
  int64_t const rows = inputDesc[kBankCdf].dims.d[0], width = inputDesc[kBankCdf].dims.d[1] - 1;
  if (chunks < 1) return KVC_OK;  // nothing to decode: the output is empty
  if (chunks * tokens_ >= (int64_t(1) << 31)) {
    report("too many tokens for one call");
    return KVC_ERR_ARGUMENT;
  }
  Layout const l = layout_for(chunks, rows, width, 2 * layers_);
  char* ws = static_cast<char*>(workspace);
  KvDecodeScratch scratch{reinterpret_cast<int64_t*>(ws + l.chunk_table), reinterpret_cast<uint16_t*>(ws + l.bank_cdf),
                          reinterpret_cast<int32_t*>(ws + l.halves), reinterpret_cast<int32_t*>(ws + l.table_base),
                          reinterpret_cast<int32_t*>(ws + l.status)};
  cudaError_t err = kv_decode_prepare(static_cast<int64_t const*>(inputs[kChunkOffsets]), static_cast<int32_t>(chunks),
                                      data_bytes, tokens_, static_cast<int32_t const*>(inputs[kBankCdf]),
                                      static_cast<int32_t>(rows), static_cast<int32_t>(width),
                                      static_cast<int64_t const*>(inputs[kHalves]),
                                      static_cast<int64_t const*>(inputs[kTableBase]), 2 * layers_, scratch, stream);
  if (err != cudaSuccess) {
    report(std::string("preparing the arguments: ") + cudaGetErrorString(err));
    return KVC_ERR_CUDA;
  }
  int64_t const capacity = chunks * tokens_;
  size_t const side_bytes = static_cast<size_t>(layers_) * kv_heads_ * capacity * head_dim_ *
                            (output_type() == DataType::kFLOAT ? 4 : 2);
  kvc_kv_decode_args a{};
  a.layers = layers_;
  a.kv_heads = kv_heads_;
  a.head_dim = head_dim_;
  a.capacity = static_cast<int32_t>(capacity);
  a.group = group_;
  a.dtype = kernel_dtype(output_type());
  a.log_scales = log_scales_;
  a.chunks = static_cast<int32_t>(chunks);
  a.data = static_cast<uint8_t const*>(inputs[kData]);
  a.data_bytes = data_bytes;
  a.chunk_table = scratch.chunk_table;
  a.halves = scratch.halves;
  a.table_base = scratch.table_base;
  a.bank_cdf = scratch.bank_cdf;
  a.bank_rows = static_cast<int32_t>(rows);
  a.bank_width = static_cast<int32_t>(width);
  a.bank_shapes = kBankShapes;
  a.scale_steps = static_cast<float const*>(inputs[kScaleSteps]);
  a.keys = outputs[0];
  a.values = static_cast<char*>(outputs[0]) + side_bytes;
  a.status = scratch.status;
  int rc = kvc_kv_decode(&a, stream);
  if (rc != KVC_OK) report("kvc_kv_decode failed with code " + std::to_string(rc));
  return rc;
}

PluginFieldCollection const* KvDecodePlugin::getFieldsToSerialize() noexcept {
  writer_.clear();
  writer_.add_int("layers", &layers_);
  writer_.add_int("kv_heads", &kv_heads_);
  writer_.add_int("head_dim", &head_dim_);
  writer_.add_int("tokens", &tokens_);
  writer_.add_int("group", &group_);
  writer_.add_int("log_scales", &log_scales_);
  writer_.add_int("onnx_dtype", &onnx_dtype_);
  return writer_.collection();
}

}  // namespace tensorrt
}  // namespace kvcompile
