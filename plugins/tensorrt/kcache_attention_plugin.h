// kvcompile::kcache_attention as a TensorRT IPluginV3: one KCache decode step (T == 1, P >= 1)
// through the kernel library's kvc_kcache_decode, on TensorRT's stream.
//
// Inputs (the ONNX node's, kvcompile/ops/kcache_attention/onnx_function.py), linear formats:
//   0 query      [B, Hq, 1, D]     float32 / float16 / bfloat16
//   1 key        [B, Hkv, 1, D]    query's type
//   2 value      [B, Hkv, 1, D]    query's type
//   3 key_cache  [B, Hkv, P, D]    query's type, device memory
//   4 value_host [B, P, Hkv, D]    query's type; its address must be pinned, mapped host memory
//                                  (cudaHostAlloc(..., cudaHostAllocMapped)): bind the engine
//                                  input to that pointer and only the chosen rows cross the link
//   5 attn_bias  [B, 1, 1, P + 1]  any float type (converted to float32 in the workspace)
// Output 0: [B, Hq, 1, D], query's type.
// Fields: the node's attributes (scale, topn, topn_numerator, topn_denominator, select_layer,
// renormalize, softcap, sinks).
#pragma once

#include "plugin_common.h"

namespace kvcompile {
namespace tensorrt {

class KCacheAttentionPlugin : public PluginBase<KCacheAttentionPlugin> {
 public:
  static constexpr char const* kName = "kcache_attention";
  static constexpr int32_t kInputs = 6;
  static std::vector<FieldSpec> const& field_specs();
  static nvinfer1::IPluginV3* create(std::string const& name, FieldReader const& fields, nvinfer1::TensorRTPhase phase);

  KCacheAttentionPlugin(KCacheAttentionPlugin const& other);
  ~KCacheAttentionPlugin() override;

  // build
  int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
                          nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
  // Whether tensor `pos` (an input, or kInputs: the output) may have `type` (PluginBase's
  // supportsFormatCombination has checked the counts and the linear format).
  bool supports_type(int32_t pos, DataType type, nvinfer1::DynamicPluginTensorDesc const* inOut) const noexcept;
  size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
                          nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;
  // runtime
  nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
  int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
                  void const* const* inputs, void* const* outputs, void* workspace,
                  cudaStream_t stream) noexcept override;
  PluginFieldCollection const* getFieldsToSerialize() noexcept override;

  // Positions kept for a context of `context` positions: the ONNX body's arithmetic
  // (kvcompile.core.config.topn_for_context), at most `context`.
  int32_t kept_positions(int64_t context) const noexcept;

 private:
  explicit KCacheAttentionPlugin(std::string name);
  bool has_sinks() const noexcept;
  int32_t upload_sinks() noexcept;

  float scale_ = 1.f;
  int32_t topn_ = 0, topn_numerator_ = 0, topn_denominator_ = 0;
  int32_t select_layer_ = 0, renormalize_ = 0;
  float softcap_ = 0.f;
  std::vector<float> sinks_;
  float* device_sinks_ = nullptr;  // [Hq] on the device, owned by this instance (runtime only)
};

}  // namespace tensorrt
}  // namespace kvcompile
