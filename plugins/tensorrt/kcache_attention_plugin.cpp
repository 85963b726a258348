// kvcompile::kcache_attention plugin (see the header for inputs, output and fields).
#include "kcache_attention_plugin.h"

#include <cmath>

#include "bias_convert.h"

namespace kvcompile {
namespace tensorrt {
namespace {

enum Input { kQuery = 0, kKey, kValue, kKeyCache, kValueHost, kAttnBias };

// The kernel library's argument struct for these shapes (strides of contiguous tensors, in
// elements). Pointers are left NULL; the workspace query fills in stand-ins.
kvc_kcache_decode_args shape_args(int64_t B, int64_t Hq, int64_t Hkv, int64_t P, int64_t D, int32_t dtype) {
  kvc_kcache_decode_args a{};
  a.batch = static_cast<int32_t>(B);
  a.query_heads = static_cast<int32_t>(Hq);
  a.kv_heads = static_cast<int32_t>(Hkv);
  a.past_len = static_cast<int32_t>(P);
  a.head_dim = static_cast<int32_t>(D);
  a.dtype = dtype;
  a.query_stride_b = Hq * D;       a.query_stride_h = D;
  a.key_stride_b = Hkv * D;        a.key_stride_h = D;
  a.value_stride_b = Hkv * D;      a.value_stride_h = D;
  a.key_cache_stride_b = Hkv * P * D; a.key_cache_stride_h = P * D; a.key_cache_stride_p = D;
  a.value_host_stride_b = P * Hkv * D; a.value_host_stride_p = Hkv * D;
  a.attn_bias_stride_b = P + 1;
#if KVC_ABI_VERSION >= 3
  // ABI 3 takes T new tokens per call; a decode step is T == 1 (each tensor's T stride is one row).
  a.tokens = 1;
  a.query_stride_t = a.key_stride_t = a.value_stride_t = D;
  a.attn_bias_stride_t = P + 1;
#endif
  return a;
}

}  // namespace

std::vector<FieldSpec> const& KCacheAttentionPlugin::field_specs() {
  static std::vector<FieldSpec> const specs = {
      {"scale", PluginFieldType::kFLOAT32, 1},
      {"topn", PluginFieldType::kINT32, 1},
      {"topn_numerator", PluginFieldType::kINT32, 1},
      {"topn_denominator", PluginFieldType::kINT32, 1},
      {"select_layer", PluginFieldType::kINT32, 1},
      {"renormalize", PluginFieldType::kINT32, 1},
      {"softcap", PluginFieldType::kFLOAT32, 1},
      {"sinks", PluginFieldType::kFLOAT32, 0},
  };
  return specs;
}

KCacheAttentionPlugin::KCacheAttentionPlugin(std::string name) : PluginBase(std::move(name)) {}

KCacheAttentionPlugin::KCacheAttentionPlugin(KCacheAttentionPlugin const& other)
    : PluginBase(other.name_),
      scale_(other.scale_), topn_(other.topn_), topn_numerator_(other.topn_numerator_),
      topn_denominator_(other.topn_denominator_), select_layer_(other.select_layer_),
      renormalize_(other.renormalize_), softcap_(other.softcap_), sinks_(other.sinks_) {}

KCacheAttentionPlugin::~KCacheAttentionPlugin() {
  if (device_sinks_) cudaFree(device_sinks_);
}

nvinfer1::IPluginV3* KCacheAttentionPlugin::create(std::string const& name, FieldReader const& fields,
                                                   nvinfer1::TensorRTPhase) {
  if (!has_fields(fields, {"scale", "topn", "topn_numerator", "topn_denominator", "select_layer", "renormalize"}, name))
    return nullptr;
  auto* plugin = new KCacheAttentionPlugin(name);
  plugin->scale_ = fields.get_float("scale", 1.f);
  plugin->topn_ = fields.get_int("topn", 0);
  plugin->topn_numerator_ = fields.get_int("topn_numerator", 0);
  plugin->topn_denominator_ = fields.get_int("topn_denominator", 0);
  plugin->select_layer_ = fields.get_int("select_layer", 0);
  plugin->renormalize_ = fields.get_int("renormalize", 0);
  plugin->softcap_ = fields.get_float("softcap", 0.f);
  plugin->sinks_ = fields.get_floats("sinks", {-INFINITY});
  std::string problem;
  if (!std::isfinite(plugin->scale_)) problem = "scale must be finite";
  else if (plugin->topn_denominator_ < 0 || plugin->topn_numerator_ < 0) problem = "topn_numerator/denominator must be >= 0";
  else if (plugin->topn_denominator_ == 0 && plugin->topn_ < 1) problem = "topn must be >= 1 when topn_denominator is 0";
  else if (plugin->select_layer_ != KVC_SELECT_HEAD && plugin->select_layer_ != KVC_SELECT_LAYER) problem = "select_layer must be 0 or 1";
  else if (plugin->renormalize_ != 0 && plugin->renormalize_ != 1) problem = "renormalize must be 0 or 1";
  else if (!(plugin->softcap_ >= 0.f) || std::isinf(plugin->softcap_)) problem = "softcap must be finite and >= 0";
  return unless_problem(plugin, problem);
}

bool KCacheAttentionPlugin::has_sinks() const noexcept {
  // kvcompile.ops.onnx_domain.NO_SINK: one -inf logit stands for "no sinks"
  return !(sinks_.size() == 1 && std::isinf(sinks_[0]) && sinks_[0] < 0);
}

int32_t KCacheAttentionPlugin::kept_positions(int64_t context) const noexcept {
  int64_t wanted = topn_;
  if (topn_denominator_ > 0) {
    wanted = (context * topn_numerator_ + topn_denominator_ / 2) / topn_denominator_;
    if (wanted < 1) wanted = 1;
  }
  return static_cast<int32_t>(wanted < context ? wanted : context);
}

int32_t KCacheAttentionPlugin::configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
                                               nvinfer1::DynamicPluginTensorDesc const*, int32_t nbOutputs) noexcept {
  if (nbInputs != kInputs || nbOutputs != 1) return -1;
  int32_t const ranks[kInputs] = {4, 4, 4, 4, 4, 4};
  if (!inputs_have_ranks(in, ranks)) return -1;
  // The kernels serve decode steps only: the decode graph fixes tokens to 1, and prefill
  // graphs keep this node's local function (docs/TENSORRT.md).
  if (in[kQuery].max.d[2] != 1) {
    report("the plugin runs decode steps (tokens == 1); build the "
           "prefill graph without the plugin library so its nodes inline their ONNX function");
    return -1;
  }
  int64_t const D = in[kQuery].desc.dims.d[3];
  int64_t const Hq = in[kQuery].desc.dims.d[1], Hkv = in[kKey].desc.dims.d[1];
  int64_t const element_bytes = in[kQuery].desc.type == DataType::kFLOAT ? 4 : 2;
  if (D > 0 && (D > 512 || (D * element_bytes) % 16)) {
    report("head_dim " + std::to_string(D) +
           " must be <= 512 and its rows a multiple of 16 bytes (the kernels' vector loads)");
    return -1;
  }
  if (Hq > 0 && Hkv > 0 && Hq % Hkv) {
    report("query heads must be a multiple of KV heads");
    return -1;
  }
  if (has_sinks() && Hq > 0 && static_cast<int64_t>(sinks_.size()) != Hq) {
    report(std::to_string(sinks_.size()) + " sink logits for " + std::to_string(Hq) + " query heads");
    return -1;
  }
  return 0;
}

bool KCacheAttentionPlugin::supports_type(int32_t pos, DataType type,
                                          nvinfer1::DynamicPluginTensorDesc const* inOut) const noexcept {
  if (!is_float_type(type)) return false;
  if (pos == kAttnBias) return true;  // any float type: converted to float32 in enqueue
  return pos == kQuery || type == inOut[kQuery].desc.type;
}

size_t KCacheAttentionPlugin::getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
                                               nvinfer1::DynamicPluginTensorDesc const*, int32_t) const noexcept {
  if (nbInputs != kInputs) return 0;
  // The kernels' workspace grows with batch, past length and kept positions: the profile's
  // largest shapes bound every call.
  int64_t const B = in[kQuery].max.d[0], Hq = in[kQuery].max.d[1], D = in[kQuery].max.d[3];
  int64_t const Hkv = in[kKey].max.d[1];
  int64_t const P = in[kKeyCache].max.d[2] < 1 ? 1 : in[kKeyCache].max.d[2];
  int32_t const dtype = kernel_dtype(in[kQuery].desc.type) < 0 ? KVC_DTYPE_F32 : kernel_dtype(in[kQuery].desc.type);
  kvc_kcache_decode_args a = shape_args(B, Hq, Hkv, P, D, dtype);
  a.topn = kept_positions(P + 1);
  a.select = select_layer_;
  a.scale = scale_;
  a.softcap = softcap_;
  // make_plan checks pointers: 16-byte aligned stand-ins (never dereferenced by the query)
  void* const stand_in = reinterpret_cast<void*>(uintptr_t(256));
  a.query = a.key = a.value = a.key_cache = a.value_host = stand_in;
  a.attn_bias = static_cast<float const*>(stand_in);
  a.out = stand_in;
  size_t kernel_bytes = 0;
  if (kvc_kcache_decode_workspace_size(&a, &kernel_bytes) != KVC_OK) {
    report(kvc_last_error());
    return 0;
  }
  size_t const bias_bytes = in[kAttnBias].desc.type == DataType::kFLOAT ? 0 : align256(B * (P + 1) * sizeof(float));
  return bias_bytes + kernel_bytes + 256;
}

int32_t KCacheAttentionPlugin::upload_sinks() noexcept {
  if (!has_sinks() || device_sinks_) return 0;
  size_t const bytes = sinks_.size() * sizeof(float);
  if (cudaMalloc(reinterpret_cast<void**>(&device_sinks_), bytes) != cudaSuccess ||
      cudaMemcpy(device_sinks_, sinks_.data(), bytes, cudaMemcpyHostToDevice) != cudaSuccess) {
    report("could not upload the sink logits");
    return -1;
  }
  return 0;
}

nvinfer1::IPluginV3* KCacheAttentionPlugin::attachToContext(nvinfer1::IPluginResourceContext*) noexcept {
  // The context's copy owns its device sinks, uploaded here rather than in enqueue so that
  // enqueue allocates nothing (and can be captured in a CUDA graph).
  auto* copy = static_cast<KCacheAttentionPlugin*>(clone());
  if (copy && copy->upload_sinks() != 0) {
    delete copy;
    return nullptr;
  }
  return copy;
}

int32_t KCacheAttentionPlugin::enqueue(nvinfer1::PluginTensorDesc const* inputDesc,
                                       nvinfer1::PluginTensorDesc const* outputDesc, void const* const* inputs,
                                       void* const* outputs, void* workspace, cudaStream_t stream) noexcept {
  nvinfer1::Dims const& q = inputDesc[kQuery].dims;
  int64_t const B = q.d[0], Hq = q.d[1], T = q.d[2], D = q.d[3];
  int64_t const Hkv = inputDesc[kKey].dims.d[1], P = inputDesc[kKeyCache].dims.d[2];
  if (T != 1 || P < 1) {
    report("enqueue needs tokens == 1 and past >= 1, got tokens " + std::to_string(T) + ", past " +
           std::to_string(P));
    return KVC_ERR_ARGUMENT;
  }
  if (upload_sinks() != 0) return KVC_ERR_CUDA;
  kvc_kcache_decode_args a = shape_args(B, Hq, Hkv, P, D, kernel_dtype(inputDesc[kQuery].type));
  a.topn = kept_positions(P + 1);
  a.select = select_layer_;
  a.renormalize = renormalize_;
  a.scale = scale_;
  a.softcap = softcap_;
  a.sinks = has_sinks() ? device_sinks_ : nullptr;
  a.query = inputs[kQuery];
  a.key = inputs[kKey];
  a.value = inputs[kValue];
  a.key_cache = inputs[kKeyCache];
  a.value_host = inputs[kValueHost];
  a.out = outputs[0];
  (void)outputDesc;

  char* ws = static_cast<char*>(workspace);
  size_t used = 0;
  if (inputDesc[kAttnBias].type == DataType::kFLOAT) {
    a.attn_bias = static_cast<float const*>(inputs[kAttnBias]);
  } else {
    auto* converted = reinterpret_cast<float*>(ws);
    int64_t const count = B * (P + 1);
    cudaError_t err = bias_to_float(inputs[kAttnBias], kernel_dtype(inputDesc[kAttnBias].type), converted, count, stream);
    if (err != cudaSuccess) {
      report(std::string("bias conversion: ") + cudaGetErrorString(err));
      return KVC_ERR_CUDA;
    }
    a.attn_bias = converted;
    used = align256(count * sizeof(float));
  }
  size_t kernel_bytes = 0;
  if (kvc_kcache_decode_workspace_size(&a, &kernel_bytes) != KVC_OK) {
    report(kvc_last_error());
    return KVC_ERR_ARGUMENT;
  }
  int rc = kvc_kcache_decode(&a, ws + used, kernel_bytes, stream);
  if (rc != KVC_OK) report(kvc_last_error());
  return rc;
}

PluginFieldCollection const* KCacheAttentionPlugin::getFieldsToSerialize() noexcept {
  writer_.clear();
  writer_.add_float("scale", &scale_);
  writer_.add_int("topn", &topn_);
  writer_.add_int("topn_numerator", &topn_numerator_);
  writer_.add_int("topn_denominator", &topn_denominator_);
  writer_.add_int("select_layer", &select_layer_);
  writer_.add_int("renormalize", &renormalize_);
  writer_.add_float("softcap", &softcap_);
  writer_.add_floats("sinks", sinks_);
  return writer_.collection();
}

}  // namespace tensorrt
}  // namespace kvcompile
