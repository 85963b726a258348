// kvcompile::kv_decode as a TensorRT IPluginV3: KV codec chunks (docs/CODEC.md) decoded into a
// KV cache by the kernel library's kvc_kv_decode (all chunks in one launch), on TensorRT's stream.
//
// Inputs (kvcompile/ops/kv_decode/onnx_function.py), linear formats:
//   0 data           [B] uint8       the chunks' bytes, chunk n from chunk_offsets[n] to the next
//   1 chunk_offsets  [N] int64
//   2 bank_cdf       [R, W+1] int32  the codec level's table bank as CDFs (level_tables)
//   3 halves         [2L] int64
//   4 table_base     [2L] int64
//   5 scale_steps    [256] float32
// Output 0: [2, L, Hkv, N * tokens, D] in the type onnx_dtype names (keys, then values).
// Fields: layers, kv_heads, head_dim, tokens, group, log_scales, onnx_dtype.
// Like the node's ONNX body, the plugin trusts the bytes: the kernel checks every offset and
// length on the device and never reads or writes out of bounds, but a chunk that fails to decode
// leaves its rows undefined without an error (enqueue cannot wait for the per-chunk status; the
// torch op is the path that validates and raises).
#pragma once

#include "plugin_common.h"

namespace kvcompile {
namespace tensorrt {

class KvDecodePlugin : public PluginBase<KvDecodePlugin> {
 public:
  static constexpr char const* kName = "kv_decode";
  static constexpr int32_t kInputs = 6;
  // kvcompile.codec.tables.SHAPES: distribution shapes per alphabet in the codec's table bank
  // (a test holds the two equal).
  static constexpr int32_t kBankShapes = 64;
  static std::vector<FieldSpec> const& field_specs();
  static nvinfer1::IPluginV3* create(std::string const& name, FieldReader const& fields, nvinfer1::TensorRTPhase phase);

  KvDecodePlugin(KvDecodePlugin const& other) = default;

  int32_t getOutputDataTypes(DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes,
                             int32_t nbInputs) const noexcept override;
  int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const* shapeInputs,
                          int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
                          nvinfer1::IExprBuilder& exprBuilder) noexcept override;
  int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
                          nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
  // Whether tensor `pos` (an input, or kInputs: the output) may have `type` (PluginBase's
  // supportsFormatCombination has checked the counts and the linear format).
  bool supports_type(int32_t pos, DataType type, nvinfer1::DynamicPluginTensorDesc const* inOut) const noexcept;
  size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
                          nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;
  int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
                  void const* const* inputs, void* const* outputs, void* workspace,
                  cudaStream_t stream) noexcept override;
  PluginFieldCollection const* getFieldsToSerialize() noexcept override;

 private:
  explicit KvDecodePlugin(std::string name) : PluginBase(std::move(name)) {}
  DataType output_type() const noexcept;

  int32_t layers_ = 0, kv_heads_ = 0, head_dim_ = 0, tokens_ = 0, group_ = 0, log_scales_ = 0, onnx_dtype_ = 1;
};

}  // namespace tensorrt
}  // namespace kvcompile
