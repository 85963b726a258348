// kvcompile::rerotate_keys plugin (see the header for inputs, output and field).
#include "rerotate_keys_plugin.h"

namespace kvcompile {
namespace tensorrt {
namespace {
enum Input { kKeys = 0, kDelta, kInvFreq };
}  // namespace

std::vector<FieldSpec> const& RerotateKeysPlugin::field_specs() {
  static std::vector<FieldSpec> const specs = {{"interleaved", PluginFieldType::kINT32, 1}};
  return specs;
}

nvinfer1::IPluginV3* RerotateKeysPlugin::create(std::string const& name, FieldReader const& fields,
                                                nvinfer1::TensorRTPhase) {
  int32_t const interleaved = fields.get_int("interleaved", 0);
  if (interleaved != 0 && interleaved != 1) {
    report_for(name, "interleaved must be 0 or 1, got " + std::to_string(interleaved));
    return nullptr;
  }
  auto* plugin = new RerotateKeysPlugin(name);
  plugin->interleaved_ = interleaved;
  return plugin;
}

int32_t RerotateKeysPlugin::configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
                                            nvinfer1::DynamicPluginTensorDesc const*, int32_t nbOutputs) noexcept {
  if (nbInputs != kInputs || nbOutputs != 1) return -1;
  nvinfer1::Dims const& keys = in[kKeys].desc.dims;
  if (keys.nbDims != 4 || in[kDelta].desc.dims.nbDims != 2 || in[kInvFreq].desc.dims.nbDims != 1) {
    report("keys must be [B, Hkv, T, D], delta [B, T], inv_freq [R/2]");
    return -1;
  }
  int64_t const D = keys.d[3], half = in[kInvFreq].desc.dims.d[0];
  if (D > 0 && half > 0 && 2 * half > D) {
    report(std::to_string(2 * half) + " rotated dims exceed head dim " + std::to_string(D));
    return -1;
  }
  return 0;
}

bool RerotateKeysPlugin::supports_type(int32_t pos, DataType type,
                                       nvinfer1::DynamicPluginTensorDesc const* inOut) const noexcept {
  switch (pos) {
    case kKeys: return is_float_type(type);
    case kDelta: return type == DataType::kINT64;
    case kInvFreq: return type == DataType::kFLOAT;
    default: return type == inOut[kKeys].desc.type;  // the output
  }
}

int32_t RerotateKeysPlugin::enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const*,
                                    void const* const* inputs, void* const* outputs, void*,
                                    cudaStream_t stream) noexcept {
  nvinfer1::Dims const& keys = inputDesc[kKeys].dims;
  int64_t const B = keys.d[0], H = keys.d[1], T = keys.d[2], D = keys.d[3];
  int64_t const half = inputDesc[kInvFreq].dims.d[0];
  if (B * T >= (int64_t(1) << 31) || H >= (int64_t(1) << 31) || 2 * half > D) {
    report("shapes out of the kernel's range");
    return KVC_ERR_ARGUMENT;
  }
  kvc_rerotate_args a{};
  a.batch = static_cast<int32_t>(B);
  a.kv_heads = static_cast<int32_t>(H);
  a.tokens = static_cast<int32_t>(T);
  a.head_dim = static_cast<int32_t>(D);
  a.rotary_dims = static_cast<int32_t>(2 * half);
  a.interleaved = interleaved_;
  a.dtype = kernel_dtype(inputDesc[kKeys].type);
  a.keys = inputs[kKeys];
  a.keys_stride_b = H * T * D;
  a.keys_stride_h = T * D;
  a.keys_stride_t = D;
  a.delta = static_cast<int64_t const*>(inputs[kDelta]);
  a.delta_stride_b = T;
  a.delta_stride_t = 1;
  a.inv_freq = static_cast<float const*>(inputs[kInvFreq]);
  a.out = outputs[0];
  int rc = kvc_rerotate_keys(&a, stream);
  if (rc != KVC_OK) report("kvc_rerotate_keys failed with code " + std::to_string(rc));
  return rc;
}

PluginFieldCollection const* RerotateKeysPlugin::getFieldsToSerialize() noexcept {
  writer_.clear();
  writer_.add_int("interleaved", &interleaved_);
  return writer_.collection();
}

}  // namespace tensorrt
}  // namespace kvcompile
