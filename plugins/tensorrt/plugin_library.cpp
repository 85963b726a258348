// The plugin library's entry points (what `trtexec --dynamicPlugins`, Triton's
// LD_PRELOAD / --backend-config plugins and IPluginRegistry::loadLibrary look for): the
// creators of every kvcompile plugin and the logger hook; plus the field helpers and logging
// every plugin shares.
#include <atomic>
#include <cstdio>

#include "kcache_attention_plugin.h"
#include "kv_decode_plugin.h"
#include "plugin_common.h"
#include "rerotate_keys_plugin.h"

namespace kvcompile {
namespace tensorrt {
namespace {

std::atomic<nvinfer1::ILoggerFinder*> logger_finder{nullptr};

char const* type_name(PluginFieldType type) {
  switch (type) {
    case PluginFieldType::kFLOAT32: return "float32";
    case PluginFieldType::kINT32: return "int32";
    case PluginFieldType::kINT64: return "int64";
    case PluginFieldType::kCHAR: return "char";
    default: return "another type";
  }
}

}  // namespace

void set_logger_finder(nvinfer1::ILoggerFinder* finder) noexcept { logger_finder.store(finder); }

void log_message(nvinfer1::ILogger::Severity severity, std::string const& message) noexcept {
  nvinfer1::ILoggerFinder* finder = logger_finder.load();
  nvinfer1::ILogger* logger = finder ? finder->findLogger() : nullptr;
  std::string const line = "kvcompile plugin: " + message;
  if (logger) {
    logger->log(severity, line.c_str());
  } else if (severity <= nvinfer1::ILogger::Severity::kWARNING) {
    fprintf(stderr, "%s\n", line.c_str());  // no logger handed over (e.g. a bare harness)
  }
}

FieldReader::FieldReader(PluginFieldCollection const* fields, std::vector<FieldSpec> const& specs,
                         char const* plugin) {
  if (fields && fields->nbFields > 0 && fields->fields) fields_.assign(fields->fields, fields->fields + fields->nbFields);
  for (FieldSpec const& spec : specs) {
    PluginField const* field = find(spec.name);
    if (!field) continue;  // the creator's default applies
    bool int_like = spec.type == PluginFieldType::kINT32 &&
                    (field->type == PluginFieldType::kINT32 || field->type == PluginFieldType::kINT64);
    if (field->type != spec.type && !int_like) {
      error_ = std::string(plugin) + ": field " + spec.name + " is " + type_name(field->type) + ", expected " +
               type_name(spec.type);
      return;
    }
    if (!field->data || field->length < 1 || (spec.length > 0 && field->length != spec.length)) {
      error_ = std::string(plugin) + ": field " + spec.name + " has " + std::to_string(field->length) +
               " values, expected " + (spec.length > 0 ? std::to_string(spec.length) : std::string("at least 1"));
      return;
    }
  }
}

PluginField const* FieldReader::find(char const* name) const {
  for (PluginField const& field : fields_)
    if (field.name && std::strcmp(field.name, name) == 0) return &field;
  return nullptr;
}

float FieldReader::get_float(char const* name, float fallback) const {
  PluginField const* field = find(name);
  return field ? *static_cast<float const*>(field->data) : fallback;
}

int32_t FieldReader::get_int(char const* name, int32_t fallback) const {
  PluginField const* field = find(name);
  if (!field) return fallback;
  if (field->type == PluginFieldType::kINT64) return static_cast<int32_t>(*static_cast<int64_t const*>(field->data));
  return *static_cast<int32_t const*>(field->data);
}

std::vector<float> FieldReader::get_floats(char const* name, std::vector<float> const& fallback) const {
  PluginField const* field = find(name);
  if (!field) return fallback;
  auto const* data = static_cast<float const*>(field->data);
  return std::vector<float>(data, data + field->length);
}

}  // namespace tensorrt
}  // namespace kvcompile

namespace {
kvcompile::tensorrt::Creator<kvcompile::tensorrt::KCacheAttentionPlugin> kcache_attention_creator;
kvcompile::tensorrt::Creator<kvcompile::tensorrt::RerotateKeysPlugin> rerotate_keys_creator;
kvcompile::tensorrt::Creator<kvcompile::tensorrt::KvDecodePlugin> kv_decode_creator;
nvinfer1::IPluginCreatorInterface* const creators[] = {&kcache_attention_creator, &rerotate_keys_creator,
                                                       &kv_decode_creator};
}  // namespace

// TENSORRTAPI exports only while TensorRT builds itself; the library's entry points must be
// visible whatever the build's default visibility.
#define KVCOMPILE_PLUGIN_API __attribute__((visibility("default")))

extern "C" KVCOMPILE_PLUGIN_API void setLoggerFinder(nvinfer1::ILoggerFinder* finder) {
  kvcompile::tensorrt::set_logger_finder(finder);
}

extern "C" KVCOMPILE_PLUGIN_API nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) {
  nbCreators = static_cast<int32_t>(sizeof(creators) / sizeof(creators[0]));
  return creators;
}

#ifdef KVCOMPILE_STATIC_REGISTRATION
// Registration when the library is merely loaded (LD_PRELOAD, e.g. Triton's documented way):
// needs libnvinfer's getPluginRegistry at load time (CMake option KVCOMPILE_STATIC_REGISTRATION).
namespace {
struct StaticRegistration {
  StaticRegistration() {
    for (nvinfer1::IPluginCreatorInterface* creator : creators)
      getPluginRegistry()->registerCreator(*creator, kvcompile::tensorrt::kPluginNamespace);
  }
} static_registration;
}  // namespace
#endif
