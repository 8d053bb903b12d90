// TensorRT IPluginV3 shells for the kvexport ops.
//
// One generic plugin class serves every op: its fields are the op's registry
// attributes (the table kvx_trt_ops.inc is generated from kvexport/ops/registry.py
// at build time), and a small per-codec CodecImpl (kvx_codecs.cpp) says how to
// size the packed fields and which extern "C" kernel launchers of plugins/<codec>/
// run them.  Ops whose codec has no CodecImpl are left out of getCreators().
#ifndef KVX_TRT_PLUGIN_H
#define KVX_TRT_PLUGIN_H

#include <NvInferRuntime.h>

#include <cstdint>
#include <string>
#include <vector>

#include "kvx_api.h"
#include "kvx_trt_util.h"

namespace kvx {
namespace trt {

enum class AttrType : int32_t { kINT = 0, kFLOAT = 1, kINTS = 2, kSTR = 3 };
enum class OpKind : int32_t { kENCODE = 0, kATTENTION = 1 };
// Tensor dtypes of the registry: "float" follows the activation type.
enum class TType : int32_t { kACT = 0, kHALF = 1, kUINT8 = 2, kINT64 = 3 };

struct AttrDef {
  char const* name;
  AttrType type;
  bool required;  // the registry has a default, so the exporter always writes it: refused when absent
};

struct TensorDef {
  char const* name;
  TType type;
  bool optional;
  bool tokenAxis;  // axis 2 is tokens (else token groups)
};

struct OpDef {
  char const* name;
  char const* version;
  char const* codec;
  OpKind kind;
  int32_t role;  // encode: 0 key, 1 value; attention: -1
  AttrDef const* attrs;
  int32_t nbAttrs;
  TensorDef const* inputs;  // registry inputs (constants excluded)
  int32_t nbInputs;
  TensorDef const* outputs;
  int32_t nbOutputs;
  int32_t nbKeyFields;    // attention: packed key fields among the inputs
  int32_t nbValueFields;  // attention: packed value fields
  int32_t nbConsts;       // codec constants fed as trailing fp32 inputs
};

// The kernel dispatch declaration (kvexport/kernels/support.py), generated into kvx_trt_ops.inc.
struct KernelChoice {  // integer field `param` of `codec`: only values[0 .. n) are compiled
  char const* codec;
  char const* param;
  int32_t n;
  int32_t values[8];
};
struct KernelSpan {  // integer (or each entry of an ints) field within [lo, hi], a multiple of multipleOf
  char const* codec;
  char const* param;
  int32_t lo, hi, multipleOf;
};
struct KernelCombo {  // one compiled pair (a, b) = (va, vb)
  char const* codec;
  char const* a;
  char const* b;
  int32_t va, vb;
};
struct KernelDerived {  // kernel parameter `name` = `derived` where field `source` = value (at headDim; 0 = any)
  char const* codec;
  char const* source;
  double value;
  int32_t headDim;
  char const* name;
  int32_t derived;
};
struct KernelTables {
  KernelChoice const* choices;
  int32_t nbChoices;
  KernelSpan const* spans;
  int32_t nbSpans;
  KernelCombo const* combos;
  int32_t nbCombos;
  KernelDerived const* derived;
  int32_t nbDerived;
};
KernelTables const& kernelTables();

// One attribute value as carried by a PluginField.
struct AttrValue {
  std::string name;
  AttrType type{AttrType::kINT};
  std::vector<int32_t> ints;
  std::vector<float> floats;
  std::string str;
};

class Attrs {
 public:
  bool has(char const* name) const;
  int32_t getInt(char const* name, int32_t dflt) const;
  float getFloat(char const* name, float dflt) const;
  // Required fields (present: createPlugin refuses a collection without them).
  int32_t getInt(char const* name) const { return getInt(name, 0); }
  float getFloat(char const* name) const { return getFloat(name, 0.f); }
  std::vector<AttrValue> const& values() const { return mValues; }
  void set(AttrValue v);

 private:
  std::vector<AttrValue> mValues;
};

// Kernel integer parameters (KvxDecodeArgs/KvxAppendArgs bits, group, value_group, block).
struct KernelParams {
  int32_t bits{0}, group{0}, valueGroup{0}, block{0};
};

// Rows (axis 2) of a packed field for T tokens: every token, the tokens of complete groups
// (floor(T/g)·g), one row per complete group (floor(T/g)), or the fp16 residual of the
// incomplete group (T mod g; the kernels keep it as a (g, D) ring, row t mod g).
enum class Rows : int32_t { kTOKENS = 0, kGROUPED = 1, kGROUPS = 2, kREST = 3 };

// Shape of packed field (B, H, rows, trail...) as the codec's Python ``layout``.
struct FieldShape {
  Rows rows{Rows::kTOKENS};
  int32_t group{1};    // g of kGROUPED / kGROUPS / kREST
  int32_t nbTrail{1};  // 0 (e.g. qjl norm (B, H, T)), 1 or 2 trailing dims
  int64_t trail[2]{0, 0};
};

// What a codec with CUDA kernels provides.  fieldShape: shape of packed field `field` of
// `role` for head_dim D.  Returns false and fills `err` when the attributes are out of the
// kernels' range.
struct CodecImpl {
  char const* codec;
  bool (*check)(Attrs const& a, std::string& err);
  bool (*fieldShape)(Attrs const& a, int32_t role, int32_t field, int64_t D, FieldShape& s, std::string& err);
  KernelParams (*params)(Attrs const& a, int64_t D);
  int (*append)(KvxAppendArgs const* args, cudaStream_t s);
  int (*decode)(KvxDecodeArgs const* args, cudaStream_t s);
  // Optional: the kernels' constant slots built from the ONNX constant inputs (null: input i
  // is slot i).  packFloats = fp32 workspace the packing needs; pack fills `slots` on `s`
  // (device-to-device copies / transposes) and returns false on inputs it cannot use.
  size_t (*packFloats)(Attrs const& a, int64_t D);
  bool (*pack)(Attrs const& a, float const* const* in, int64_t const* counts, int32_t n, int64_t D, float* ws,
               float const** slots, cudaStream_t s);
  // Optional: fp32 decode workspace per (query row, q head) after the kernels' partials (qjl: S q).
  int64_t (*decodeExtraFloats)(Attrs const& a, int64_t D);
};

CodecImpl const* findCodec(char const* codec);
OpDef const* opTable(int32_t& count);
void logError(std::string const& msg);

class KvxPlugin : public nvinfer1::IPluginV3,
                  public nvinfer1::IPluginV3OneCore,
                  public nvinfer1::IPluginV3OneBuildV2,
                  public nvinfer1::IPluginV3OneRuntime {
 public:
  KvxPlugin(OpDef const& op, CodecImpl const& codec, Attrs attrs);
  ~KvxPlugin() override = default;

  // IPluginV3
  nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
  nvinfer1::IPluginV3* clone() noexcept override;

  // IPluginV3OneCore
  char const* getPluginName() const noexcept override { return mOp.name; }
  char const* getPluginVersion() const noexcept override { return mOp.version; }
  char const* getPluginNamespace() const noexcept override { return "kvexport"; }

  // IPluginV3OneBuild(V2)
  int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
                          nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
  int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
                             nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;
  int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const* shapeInputs,
                          int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
                          nvinfer1::IExprBuilder& exprBuilder) noexcept override;
  bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
                                 int32_t nbOutputs) noexcept override;
  int32_t getNbOutputs() const noexcept override { return mOp.nbOutputs; }
  size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
                          nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;
  int32_t getAliasedInput(int32_t outputIndex) noexcept override { return -1; }

  // IPluginV3OneRuntime
  int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, nvinfer1::PluginTensorDesc const* out,
                        int32_t nbOutputs) noexcept override;
  int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
                  void const* const* inputs, void* const* outputs, void* workspace,
                  cudaStream_t stream) noexcept override;
  nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
  nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

 private:
  // Role of input `pos` in the node: 0 activation, 1 packed field k, 2 packed field v,
  // 3 window, 4 constant; `index` is the position inside its group.
  int32_t inputRole(int32_t pos, int32_t nbInputs, int32_t& index) const noexcept;
  bool hasWindow(int32_t nbInputs) const noexcept;
  nvinfer1::DataType fieldType(TensorDef const& t, nvinfer1::DataType act) const noexcept;
  int32_t enqueueEncode(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
                        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept;
  int32_t enqueueAttention(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
                           void const* const* inputs, void* const* outputs, void* workspace,
                           cudaStream_t stream) noexcept;

  int32_t launched(int rc) const noexcept;  // logs the kernels' last error message
  bool constSlots(nvinfer1::PluginTensorDesc const* desc, void const* const* in, int64_t D, float* ws,
                  float const** slots, cudaStream_t stream) const noexcept;
  // The key field holding the fp16 residual of an incomplete token group (-1: none) and its group.
  int32_t residualField(int64_t D, int32_t& group) const noexcept;

  OpDef const& mOp;
  CodecImpl const& mCodec;
  Attrs mAttrs;
  int32_t mSmCount{0};
  int32_t mNbInputs{0};
  std::vector<nvinfer1::PluginField> mSerialFields;
  nvinfer1::PluginFieldCollection mSerialFc{};
};

class KvxPluginCreator : public nvinfer1::IPluginCreatorV3One {
 public:
  KvxPluginCreator(OpDef const& op, CodecImpl const& codec);
  nvinfer1::IPluginV3* createPlugin(char const* name, nvinfer1::PluginFieldCollection const* fc,
                                    nvinfer1::TensorRTPhase phase) noexcept override;
  nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override { return &mFc; }
  char const* getPluginName() const noexcept override { return mOp.name; }
  char const* getPluginVersion() const noexcept override { return mOp.version; }
  char const* getPluginNamespace() const noexcept override { return "kvexport"; }

 private:
  OpDef const& mOp;
  CodecImpl const& mCodec;
  std::vector<nvinfer1::PluginField> mFields;
  nvinfer1::PluginFieldCollection mFc{};
};

}  // namespace trt
}  // namespace kvx

#endif  // KVX_TRT_PLUGIN_H
