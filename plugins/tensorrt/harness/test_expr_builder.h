// A stand-in for TensorRT's expression builder, so a harness can call getOutputShapes without
// a TensorRT library: expressions are either constants or named symbols, and operations on
// two constants fold (anything else becomes a new symbol).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "NvInferRuntime.h"

namespace kvcompile {
namespace harness {

class TestExpr;

class TestExprBuilder : public nvinfer1::IExprBuilder {
 public:
  TestExprBuilder();
  ~TestExprBuilder() override;
  nvinfer1::IDimensionExpr const* symbol(std::string const& name);  // a dynamic axis
  static std::string describe(nvinfer1::IDimensionExpr const* expr);

 private:
  class Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace harness
}  // namespace kvcompile
