// What every kvcompile TensorRT plugin shares: the plugin namespace and version, reading and
// writing plugin fields, data-type codes of the kernel library, logging through TensorRT's
// logger, and one creator template.
//
// Names, versions and fields here must equal the op registry's (kvcompile/ops/<op>/
// onnx_function.py: the node's attributes are the plugin's fields, in the same order and of
// the kinds the ONNX parser passes: float -> kFLOAT32, int -> kINT32, floats -> kFLOAT32 with a
// length). tests/export/test_tensorrt_plugins.py reads this folder's sources and checks that.
#pragma once

#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <string>
#include <vector>

#include "NvInferRuntime.h"
#include "kvcompile_kernels.h"

namespace kvcompile {
namespace tensorrt {

// kvcompile.ops.onnx_domain.DOMAIN and DOMAIN_VERSION: the node's domain names the plugin
// namespace, and the version is the domain's.
constexpr char const* kPluginNamespace = "kvcompile";
constexpr char const* kPluginVersion = "1";

using nvinfer1::DataType;
using nvinfer1::PluginField;
using nvinfer1::PluginFieldCollection;
using nvinfer1::PluginFieldType;

void set_logger_finder(nvinfer1::ILoggerFinder* finder) noexcept;
void log_message(nvinfer1::ILogger::Severity severity, std::string const& message) noexcept;
inline void log_error(std::string const& message) noexcept {
  log_message(nvinfer1::ILogger::Severity::kERROR, message);
}

// KVC_DTYPE_* of a TensorRT type, or -1 when the kernel library has no kernels for it.
inline int32_t kernel_dtype(DataType type) noexcept {
  switch (type) {
    case DataType::kFLOAT: return KVC_DTYPE_F32;
    case DataType::kHALF: return KVC_DTYPE_F16;
    case DataType::kBF16: return KVC_DTYPE_BF16;
    default: return -1;
  }
}

inline bool is_float_type(DataType type) noexcept { return kernel_dtype(type) >= 0; }

// Workspace regions start on 256-byte boundaries (cudaMalloc's alignment), so every carved-out
// pointer is as aligned as a fresh allocation.
inline size_t align256(size_t bytes) noexcept { return (bytes + 255) & ~size_t(255); }

// One field a plugin declares: its name, the type it is passed as and how many values
// (0 = any number, at least one).
struct FieldSpec {
  char const* name;
  PluginFieldType type;
  int32_t length;
};

// The values read from a PluginFieldCollection, checked against the plugin's FieldSpecs.
// Fields a plugin does not declare (the parser never passes them; a Python plugin may) are
// ignored; a declared field of the wrong type or length is an error.
class FieldReader {
 public:
  FieldReader(PluginFieldCollection const* fields, std::vector<FieldSpec> const& specs, char const* plugin);
  bool ok() const noexcept { return error_.empty(); }
  bool has(char const* name) const noexcept { return find(name) != nullptr; }
  std::string const& error() const noexcept { return error_; }
  float get_float(char const* name, float fallback) const;
  int32_t get_int(char const* name, int32_t fallback) const;
  std::vector<float> get_floats(char const* name, std::vector<float> const& fallback) const;

 private:
  PluginField const* find(char const* name) const;
  std::vector<PluginField> fields_;
  std::string error_;
};

// The fields a plugin serialises, kept alive as long as the collection that points at them.
class FieldWriter {
 public:
  void add_float(char const* name, float const* value) { add(name, value, PluginFieldType::kFLOAT32, 1); }
  void add_int(char const* name, int32_t const* value) { add(name, value, PluginFieldType::kINT32, 1); }
  void add_floats(char const* name, std::vector<float> const& values) {
    add(name, values.data(), PluginFieldType::kFLOAT32, static_cast<int32_t>(values.size()));
  }
  PluginFieldCollection const* collection() noexcept {
    collection_.nbFields = static_cast<int32_t>(fields_.size());
    collection_.fields = fields_.data();
    return &collection_;
  }
  void clear() noexcept { fields_.clear(); }

 private:
  void add(char const* name, void const* data, PluginFieldType type, int32_t length) {
    fields_.emplace_back(name, data, type, length);
  }
  std::vector<PluginField> fields_;
  PluginFieldCollection collection_{};
};

// The creator of plugin class P: P provides kName, field_specs() and a static
// create(name, FieldReader const&, TensorRTPhase) returning nullptr (after logging) on bad fields.
template <typename P>
class Creator : public nvinfer1::IPluginCreatorV3One {
 public:
  Creator() {
    for (FieldSpec const& spec : P::field_specs())
      declared_.emplace_back(spec.name, nullptr, spec.type, spec.length);
    names_.nbFields = static_cast<int32_t>(declared_.size());
    names_.fields = declared_.data();
  }
  nvinfer1::IPluginV3* createPlugin(char const* name, PluginFieldCollection const* fields,
                                    nvinfer1::TensorRTPhase phase) noexcept override {
    try {
      FieldReader reader(fields, P::field_specs(), P::kName);
      if (!reader.ok()) {
        log_error(reader.error());
        return nullptr;
      }
      return P::create(name ? name : "", reader, phase);
    } catch (std::exception const& error) {
      log_error(std::string(P::kName) + ": " + error.what());
      return nullptr;
    }
  }
  PluginFieldCollection const* getFieldNames() noexcept override { return &names_; }
  char const* getPluginName() const noexcept override { return P::kName; }
  char const* getPluginVersion() const noexcept override { return kPluginVersion; }
  char const* getPluginNamespace() const noexcept override { return kPluginNamespace; }

 private:
  std::vector<PluginField> declared_;
  PluginFieldCollection names_{};
};

// The parts of IPluginV3 every kvcompile plugin implements alike: one object serves the three
// capabilities, names itself from P::kName, has one output and clones by copy (P's copy
// constructor must copy only its fields: device resources belong to one instance).
template <typename P>
class PluginBase : public nvinfer1::IPluginV3,
                   public nvinfer1::IPluginV3OneCore,
                   public nvinfer1::IPluginV3OneBuild,
                   public nvinfer1::IPluginV3OneRuntime {
 public:
  nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override {
    switch (type) {
      case nvinfer1::PluginCapabilityType::kCORE: return static_cast<nvinfer1::IPluginV3OneCore*>(this);
      case nvinfer1::PluginCapabilityType::kBUILD: return static_cast<nvinfer1::IPluginV3OneBuild*>(this);
      case nvinfer1::PluginCapabilityType::kRUNTIME: return static_cast<nvinfer1::IPluginV3OneRuntime*>(this);
    }
    return nullptr;
  }
  nvinfer1::IPluginV3* clone() noexcept override {
    try {
      return new P(static_cast<P const&>(*this));
    } catch (std::exception const& error) {
      log_error(std::string(P::kName) + ": clone failed: " + error.what());
      return nullptr;
    }
  }
  char const* getPluginName() const noexcept override { return P::kName; }
  char const* getPluginVersion() const noexcept override { return kPluginVersion; }
  char const* getPluginNamespace() const noexcept override { return kPluginNamespace; }
  int32_t getNbOutputs() const noexcept override { return 1; }
  int32_t onShapeChange(nvinfer1::PluginTensorDesc const*, int32_t, nvinfer1::PluginTensorDesc const*,
                        int32_t) noexcept override {
    return 0;  // enqueue reads every size from its descriptors
  }
  nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext*) noexcept override { return clone(); }
  // Every tensor in linear format; P::supports_type(pos, type, inOut) says which types.
  bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
                                 int32_t nbOutputs) noexcept override {
    if (nbInputs != P::kInputs || nbOutputs != 1 || pos < 0 || pos > P::kInputs) return false;
    nvinfer1::PluginTensorDesc const& desc = inOut[pos].desc;
    return desc.format == nvinfer1::TensorFormat::kLINEAR &&
           static_cast<P const*>(this)->supports_type(pos, desc.type, inOut);
  }
  // The output keeps input 0's type and shape (both ops return a tensor like their first input).
  int32_t getOutputDataTypes(DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes,
                             int32_t nbInputs) const noexcept override {
    if (nbOutputs != 1 || nbInputs != P::kInputs) return -1;
    outputTypes[0] = inputTypes[0];
    return 0;
  }
  int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const*,
                          int32_t, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
                          nvinfer1::IExprBuilder&) noexcept override {
    if (nbInputs != P::kInputs || nbOutputs != 1) return -1;
    outputs[0] = inputs[0];
    return 0;
  }

 protected:
  explicit PluginBase(std::string name) : name_(std::move(name)) {}

  // Every message names the op and the layer: "<op> <layer>: <problem>".
  static void report_for(std::string const& layer, std::string const& problem) noexcept {
    log_error(std::string(P::kName) + " " + layer + ": " + problem);
  }
  void report(std::string const& problem) const noexcept { report_for(name_, problem); }

  // True when `fields` hold every one of `required`; else logs the first missing one.
  static bool has_fields(FieldReader const& fields, std::vector<FieldSpec> const& required, std::string const& layer) {
    for (FieldSpec const& spec : required)
      if (!has_field(fields, spec.name, layer)) return false;
    return true;
  }
  static bool has_fields(FieldReader const& fields, std::initializer_list<char const*> required,
                         std::string const& layer) {
    for (char const* field : required)
      if (!has_field(fields, field, layer)) return false;
    return true;
  }

  // What create returns once it has read and checked the fields: the plugin, or nullptr (after
  // logging) when `problem` names what is wrong with them.
  static nvinfer1::IPluginV3* unless_problem(P* plugin, std::string const& problem) {
    if (problem.empty()) return plugin;
    plugin->report(problem);
    delete plugin;
    return nullptr;
  }

  // True when input i has rank ranks[i] for every input; else logs the first that has not.
  template <int32_t N>
  bool inputs_have_ranks(nvinfer1::DynamicPluginTensorDesc const* in, int32_t const (&ranks)[N]) const noexcept {
    for (int32_t i = 0; i < N; ++i) {
      if (in[i].desc.dims.nbDims != ranks[i]) {
        report("input " + std::to_string(i) + " must be " + std::to_string(ranks[i]) + "-D");
        return false;
      }
    }
    return true;
  }

  std::string name_;  // the layer's name, for messages
  FieldWriter writer_;

 private:
  static bool has_field(FieldReader const& fields, char const* field, std::string const& layer) {
    if (fields.has(field)) return true;
    report_for(layer, std::string("field ") + field + " is missing");
    return false;
  }
};

}  // namespace tensorrt
}  // namespace kvcompile
