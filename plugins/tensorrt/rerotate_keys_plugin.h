// kvcompile::rerotate_keys as a TensorRT IPluginV3: cached RoPE keys moved from position p to
// p + delta (KV fusion) through the kernel library's kvc_rerotate_keys, on TensorRT's stream.
// TensorRT has no float64, so the node's ONNX body (which forms the angle in double) does not
// build there: this plugin is how an engine re-rotates keys.
//
// Inputs (kvcompile/ops/rerotate_keys/onnx_function.py), linear formats:
//   0 keys      [B, Hkv, T, D]  float32 / float16 / bfloat16
//   1 delta     [B, T]          int64 position shifts
//   2 inv_freq  [R/2]           float32 inverse frequencies; the first R dims rotate
// Output 0: [B, Hkv, T, D], keys' type. Field: interleaved (0 = half-split pairs, 1 = adjacent).
#pragma once

#include "plugin_common.h"

namespace kvcompile {
namespace tensorrt {

class RerotateKeysPlugin : public PluginBase<RerotateKeysPlugin> {
 public:
  static constexpr char const* kName = "rerotate_keys";
  static constexpr int32_t kInputs = 3;
  static std::vector<FieldSpec> const& field_specs();
  static nvinfer1::IPluginV3* create(std::string const& name, FieldReader const& fields, nvinfer1::TensorRTPhase phase);

  RerotateKeysPlugin(RerotateKeysPlugin const& other) = default;

  int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
                          nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
  // Whether tensor `pos` (an input, or kInputs: the output) may have `type` (PluginBase's
  // supportsFormatCombination has checked the counts and the linear format).
  bool supports_type(int32_t pos, DataType type, nvinfer1::DynamicPluginTensorDesc const* inOut) const noexcept;
  int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
                  void const* const* inputs, void* const* outputs, void* workspace,
                  cudaStream_t stream) noexcept override;
  PluginFieldCollection const* getFieldsToSerialize() noexcept override;

 private:
  explicit RerotateKeysPlugin(std::string name) : PluginBase(std::move(name)) {}
  int32_t interleaved_ = 0;
};

}  // namespace tensorrt
}  // namespace kvcompile
