// See test_expr_builder.h.
#include "test_expr_builder.h"

namespace kvcompile {
namespace harness {

namespace {

class ExprValue : public nvinfer1::apiv::VDimensionExpr {
 public:
  ExprValue(bool constant, int64_t value, std::string name) : constant_(constant), value_(value), name_(std::move(name)) {}
  bool isConstant() const override { return constant_; }
  int64_t getConstantValue() const override { return constant_ ? value_ : -1; }
  bool isSizeTensor() const override { return false; }
  std::string const& name() const { return name_; }

 private:
  bool constant_;
  int64_t value_;
  std::string name_;
};

}  // namespace

class TestExpr : public nvinfer1::IDimensionExpr {
 public:
  explicit TestExpr(ExprValue* value) : value_(value) { mImpl = value; }
  ~TestExpr() override = default;
  ExprValue const& value() const { return *value_; }

 private:
  std::unique_ptr<ExprValue> value_;
};

class TestExprBuilder::Impl : public nvinfer1::apiv::VExprBuilder {
 public:
  nvinfer1::IDimensionExpr const* make(bool constant, int64_t value, std::string name) {
    exprs.push_back(std::make_unique<TestExpr>(new ExprValue(constant, value, std::move(name))));
    return exprs.back().get();
  }
  nvinfer1::IDimensionExpr const* constant(int64_t value) override {
    return make(true, value, std::to_string(value));
  }
  nvinfer1::IDimensionExpr const* operation(nvinfer1::DimensionOperation op, nvinfer1::IDimensionExpr const& a,
                                            nvinfer1::IDimensionExpr const& b) override {
    if (a.isConstant() && b.isConstant()) {
      int64_t x = a.getConstantValue(), y = b.getConstantValue(), r = 0;
      switch (op) {
        case nvinfer1::DimensionOperation::kSUM: r = x + y; break;
        case nvinfer1::DimensionOperation::kPROD: r = x * y; break;
        case nvinfer1::DimensionOperation::kMAX: r = x > y ? x : y; break;
        case nvinfer1::DimensionOperation::kMIN: r = x < y ? x : y; break;
        case nvinfer1::DimensionOperation::kSUB: r = x - y; break;
        case nvinfer1::DimensionOperation::kEQUAL: r = x == y; break;
        case nvinfer1::DimensionOperation::kLESS: r = x < y; break;
        case nvinfer1::DimensionOperation::kFLOOR_DIV: r = y ? x / y : 0; break;
        case nvinfer1::DimensionOperation::kCEIL_DIV: r = y ? (x + y - 1) / y : 0; break;
      }
      return constant(r);
    }
    return make(false, -1, "(" + describe(&a) + " op" + std::to_string(static_cast<int>(op)) + " " + describe(&b) + ")");
  }
  nvinfer1::IDimensionExpr const* declareSizeTensor(int32_t, nvinfer1::IDimensionExpr const&,
                                                    nvinfer1::IDimensionExpr const&) override {
    return nullptr;  // no kvcompile plugin has data-dependent output shapes
  }
  std::vector<std::unique_ptr<TestExpr>> exprs;
};

TestExprBuilder::TestExprBuilder() : impl_(new Impl) { mImpl = impl_.get(); }
TestExprBuilder::~TestExprBuilder() = default;

nvinfer1::IDimensionExpr const* TestExprBuilder::symbol(std::string const& name) { return impl_->make(false, -1, name); }

std::string TestExprBuilder::describe(nvinfer1::IDimensionExpr const* expr) {
  if (!expr) return "null";
  return static_cast<TestExpr const*>(expr)->value().name();
}

}  // namespace harness
}  // namespace kvcompile
