// Generic IPluginV3 for every kvexport op (see kvx_plugin.h) + the library entry points.
#include "kvx_plugin.h"

#include <dlfcn.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>

using namespace nvinfer1;

extern "C" char const* kvx_last_error();  // plugins/common/kvx_errors.cu
extern "C" int32_t kvx_num_splits(int32_t batch, int32_t kvHeads, int32_t tokens, int32_t headDim,
                                  int32_t sms);  // plugins/common/kvx_splits.cu

namespace kvx {
namespace trt {

#include "kvx_trt_ops.inc"

OpDef const* opTable(int32_t& count) {
  count = static_cast<int32_t>(sizeof(kOps) / sizeof(kOps[0]));
  return kOps;
}

template <typename T, size_t N>
constexpr int32_t countOf(T const (&)[N]) { return static_cast<int32_t>(N); }

KernelTables const& kernelTables() {
  static KernelTables const t{kKernelChoices, countOf(kKernelChoices), kKernelSpans, countOf(kKernelSpans),
                              kKernelCombos, countOf(kKernelCombos), kKernelDerived, countOf(kKernelDerived)};
  return t;
}

namespace {

ILoggerFinder* gLoggerFinder = nullptr;

// Multiprocessor count no GPU reaches: kvx_num_splits then returns its token bound, the most
// splits any device can get (sizes the workspace at build time, when the device is unknown).
constexpr int32_t kANY_SMS = 1 << 20;
constexpr int32_t kMAX_CONST_INPUTS = 32;
constexpr size_t kALIGN = 256;

size_t alignUp(size_t n) { return (n + kALIGN - 1) / kALIGN * kALIGN; }

size_t elemSize(DataType t) {
  switch (t) {
    case DataType::kFLOAT: case DataType::kINT32: return 4;
    case DataType::kHALF: case DataType::kBF16: return 2;
    case DataType::kINT64: return 8;
    default: return 1;
  }
}

int32_t actCode(DataType t) { return t == DataType::kHALF ? 0 : t == DataType::kBF16 ? 1 : 2; }

int64_t volume(Dims const& d, int32_t from = 0) {
  int64_t v = 1;
  for (int32_t i = from; i < d.nbDims; ++i) v *= d.d[i];
  return v;
}

// Byte strides of a contiguous (B, H, T, ...) tensor.
KvxField field(void const* ptr, Dims const& d, DataType t) {
  KvxField f{};
  f.ptr = const_cast<void*>(ptr);
  f.sT = volume(d, 3) * static_cast<int64_t>(elemSize(t));
  f.sH = d.d[2] * f.sT;
  f.sB = d.d[1] * f.sH;
  return f;
}

int32_t splitsFor(int64_t batch, int64_t kvHeads, int64_t tokens, int64_t headDim, int32_t sms) {
  return kvx_num_splits(static_cast<int32_t>(batch), static_cast<int32_t>(kvHeads), static_cast<int32_t>(tokens),
                        static_cast<int32_t>(headDim), sms);
}

// fp32 decode workspace of one launch: the kernels' q + partials, then the codec's extra
// floats per (row, q head); bytes, aligned.
size_t decodeBytes(CodecImpl const& c, Attrs const& a, int64_t rows, int64_t hq, int64_t D, int32_t splits) {
  int64_t const extra = c.decodeExtraFloats ? c.decodeExtraFloats(a, D) : 0;
  return alignUp(decodeWorkspaceBytes(rows, hq, D, splits) + sizeof(float) * static_cast<size_t>(rows * hq * extra));
}

}  // namespace

void logError(std::string const& msg) {
  std::string const full = "kvexport plugin: " + msg;
  ILogger* logger = gLoggerFinder ? gLoggerFinder->findLogger() : nullptr;
  if (logger) logger->log(ILogger::Severity::kERROR, full.c_str());
  else std::fprintf(stderr, "[E] %s\n", full.c_str());
}

// ---------------------------------------------------------------- Attrs
bool Attrs::has(char const* name) const {
  return std::any_of(mValues.begin(), mValues.end(), [&](AttrValue const& v) { return v.name == name; });
}

int32_t Attrs::getInt(char const* name, int32_t dflt) const {
  for (auto const& v : mValues)
    if (v.name == name) return v.type == AttrType::kFLOAT ? static_cast<int32_t>(v.floats.at(0)) : v.ints.at(0);
  return dflt;
}

float Attrs::getFloat(char const* name, float dflt) const {
  for (auto const& v : mValues)
    if (v.name == name) return v.type == AttrType::kFLOAT ? v.floats.at(0) : static_cast<float>(v.ints.at(0));
  return dflt;
}

void Attrs::set(AttrValue v) {
  for (auto& o : mValues)
    if (o.name == v.name) { o = std::move(v); return; }
  mValues.push_back(std::move(v));
}

// ---------------------------------------------------------------- plugin
KvxPlugin::KvxPlugin(OpDef const& op, CodecImpl const& codec, Attrs attrs)
    : mOp(op), mCodec(codec), mAttrs(std::move(attrs)) {}

IPluginCapability* KvxPlugin::getCapabilityInterface(PluginCapabilityType type) noexcept {
  switch (type) {
    case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuildV2*>(this);
    case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
    case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
  }
  return nullptr;
}

IPluginV3* KvxPlugin::clone() noexcept {
  try {
    auto* p = new KvxPlugin(mOp, mCodec, mAttrs);
    p->mSmCount = mSmCount;
    p->mNbInputs = mNbInputs;
    return p;
  } catch (...) {
    return nullptr;
  }
}

bool KvxPlugin::hasWindow(int32_t nbInputs) const noexcept {
  // Absent optional window inputs are dropped from the node (kvexport.trt.parse).
  return mOp.kind == OpKind::kATTENTION && nbInputs == 1 + mOp.nbKeyFields + mOp.nbValueFields + 2 + mOp.nbConsts;
}

int32_t KvxPlugin::inputRole(int32_t pos, int32_t nbInputs, int32_t& index) const noexcept {
  if (pos == 0) { index = 0; return 0; }
  if (mOp.kind == OpKind::kENCODE) { index = pos - 1; return 4; }
  int32_t p = pos - 1;
  if (p < mOp.nbKeyFields) { index = p; return 1; }
  p -= mOp.nbKeyFields;
  if (p < mOp.nbValueFields) { index = p; return 2; }
  p -= mOp.nbValueFields;
  if (hasWindow(nbInputs)) {
    if (p < 2) { index = p; return 3; }
    p -= 2;
  }
  index = p;
  return 4;
}

DataType KvxPlugin::fieldType(TensorDef const& t, DataType act) const noexcept {
  switch (t.type) {
    case TType::kHALF: return DataType::kHALF;
    case TType::kUINT8: return DataType::kINT8;  // TensorRT has no uint8 intermediates: same bytes as int8
    case TType::kINT64: return DataType::kINT64;
    default: return act;
  }
}

int32_t KvxPlugin::getOutputDataTypes(DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes,
                                      int32_t nbInputs) const noexcept {
  if (nbOutputs != mOp.nbOutputs || nbInputs < 1) return -1;
  for (int32_t i = 0; i < nbOutputs; ++i) outputTypes[i] = fieldType(mOp.outputs[i], inputTypes[0]);
  return 0;
}

int32_t KvxPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const*, int32_t,
                                   DimsExprs* outputs, int32_t nbOutputs, IExprBuilder& eb) noexcept {
  int32_t const expected = mOp.kind == OpKind::kENCODE ? 1 + mOp.nbConsts
                                                       : 1 + mOp.nbKeyFields + mOp.nbValueFields + mOp.nbConsts;
  if ((nbInputs != expected && !(mOp.kind == OpKind::kATTENTION && nbInputs == expected + 2)) ||
      nbOutputs != mOp.nbOutputs || inputs[0].nbDims != 4) {
    logError(std::string(mOp.name) + ": expected " + std::to_string(expected) + " inputs (" +
             std::to_string(expected + 2) + " with the fp16 window) and a rank-4 first input, got " +
             std::to_string(nbInputs));
    return -1;
  }
  if (mOp.kind == OpKind::kATTENTION) {
    outputs[0] = inputs[0];
    return 0;
  }
  if (!inputs[0].d[3]->isConstant()) {
    logError(std::string(mOp.name) + ": head_dim (axis 3 of x) must be static");
    return -1;
  }
  int64_t const D = inputs[0].d[3]->getConstantValue();
  IDimensionExpr const* T = inputs[0].d[2];
  for (int32_t i = 0; i < nbOutputs; ++i) {
    FieldShape f;
    std::string err;
    if (!mCodec.fieldShape(mAttrs, mOp.role, i, D, f, err)) {
      logError(std::string(mOp.name) + ": " + err);
      return -1;
    }
    // Token-group rows: floor(T / g) groups, their floor(T / g)·g tokens, the T mod g residual.
    IDimensionExpr const* rows = T;
    if (f.rows != Rows::kTOKENS) {
      IDimensionExpr const* g = eb.constant(f.group);
      IDimensionExpr const* groups = eb.operation(DimensionOperation::kFLOOR_DIV, *T, *g);
      IDimensionExpr const* grouped = eb.operation(DimensionOperation::kPROD, *groups, *g);
      rows = f.rows == Rows::kGROUPS ? groups : f.rows == Rows::kGROUPED ? grouped
                                                : eb.operation(DimensionOperation::kSUB, *T, *grouped);
    }
    outputs[i].nbDims = 3 + f.nbTrail;
    outputs[i].d[0] = inputs[0].d[0];
    outputs[i].d[1] = inputs[0].d[1];
    outputs[i].d[2] = rows;
    for (int32_t k = 0; k < f.nbTrail; ++k) outputs[i].d[3 + k] = eb.constant(f.trail[k]);
  }
  return 0;
}

bool KvxPlugin::supportsFormatCombination(int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
                                          int32_t nbOutputs) noexcept {
  PluginTensorDesc const& d = inOut[pos].desc;
  if (d.format != TensorFormat::kLINEAR) return false;
  DataType const act = inOut[0].desc.type;
  if (pos == 0) return act == DataType::kFLOAT || act == DataType::kHALF || act == DataType::kBF16;
  if (pos >= nbInputs) return d.type == fieldType(mOp.outputs[pos - nbInputs], act);
  int32_t idx = 0;
  switch (inputRole(pos, nbInputs, idx)) {
    case 1: return d.type == fieldType(mOp.inputs[1 + idx], act);
    case 2: return d.type == fieldType(mOp.inputs[1 + mOp.nbKeyFields + idx], act);
    case 3: return d.type == DataType::kHALF;
    default: return d.type == DataType::kFLOAT;  // codec constants
  }
}

int32_t KvxPlugin::configurePlugin(DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const*,
                                   int32_t) noexcept {
  mNbInputs = nbInputs;
  int64_t const D = in[0].desc.dims.d[3];
  if (D != 64 && D != 128 && D != 256) {
    logError(std::string(mOp.name) + ": head_dim " + std::to_string(D) +
             " not supported by the kernels (64, 128, 256)");
    return -1;
  }
  if (mOp.kind == OpKind::kATTENTION) {
    int64_t const hq = in[0].desc.dims.d[1], hkv = in[1].desc.dims.d[1];
    if (hq > 0 && hkv > 0 && (hq % hkv || hq / hkv > 16)) {
      logError(std::string(mOp.name) + ": q heads " + std::to_string(hq) + " must be a multiple (<= 16x) of kv heads " +
               std::to_string(hkv));
      return -1;
    }
  }
  return 0;
}

size_t KvxPlugin::getWorkspaceSize(DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const*,
                                   int32_t) const noexcept {
  Dims const& x = in[0].max;
  int64_t const B = x.d[0], D = x.d[3];
  size_t const pack = mCodec.packFloats ? alignUp(sizeof(float) * mCodec.packFloats(mAttrs, D)) : 0;
  if (mOp.kind == OpKind::kENCODE) {
    // lens, the constants' packing, and the kernels' (g, D) fp16 residual ring per (b, h).
    int32_t group = 0;
    size_t const ring = residualField(D, group) >= 0
                            ? alignUp(2 * static_cast<size_t>(B * x.d[1] * group * D)) : 0;
    return alignUp(static_cast<size_t>(B) * sizeof(int32_t)) + pack + ring;
  }
  int64_t const hq = x.d[1], tq = x.d[2];
  // A launch has at most B·Tq query rows (B sequences × Tq, or Tq per sequence) and max(B, Tq)
  // lengths (see enqueueAttention); splits are at most kvx_num_splits' token bound for the
  // profile's longest cache + window.
  int64_t const rows = std::max(B, tq);
  int32_t const firstV = 1 + mOp.nbKeyFields, afterV = firstV + mOp.nbValueFields;
  int64_t const tokens = in[firstV].max.d[2] + (hasWindow(nbInputs) ? in[afterV].max.d[2] : 0);
  size_t ws = decodeBytes(mCodec, mAttrs, B * tq, hq, D, splitsFor(rows, 1, tokens, D, kANY_SMS));
  ws += 2 * alignUp(sizeof(int32_t) * static_cast<size_t>(rows));
  if (in[0].desc.type == DataType::kFLOAT) ws += 2 * alignUp(2 * static_cast<size_t>(B * hq * tq * D));
  return ws + pack;
}

int32_t KvxPlugin::onShapeChange(PluginTensorDesc const*, int32_t nbInputs, PluginTensorDesc const*, int32_t) noexcept {
  mNbInputs = nbInputs;
  if (mSmCount == 0) {
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&mSmCount, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess)
      mSmCount = 1;
  }
  return 0;
}

IPluginV3* KvxPlugin::attachToContext(IPluginResourceContext*) noexcept { return clone(); }

PluginFieldCollection const* KvxPlugin::getFieldsToSerialize() noexcept {
  mSerialFields.clear();
  for (auto const& v : mAttrs.values()) {
    switch (v.type) {
      case AttrType::kFLOAT:
        mSerialFields.emplace_back(v.name.c_str(), v.floats.data(), PluginFieldType::kFLOAT32,
                                   static_cast<int32_t>(v.floats.size()));
        break;
      case AttrType::kSTR:
        mSerialFields.emplace_back(v.name.c_str(), v.str.c_str(), PluginFieldType::kCHAR,
                                   static_cast<int32_t>(v.str.size()));
        break;
      default:
        mSerialFields.emplace_back(v.name.c_str(), v.ints.data(), PluginFieldType::kINT32,
                                   static_cast<int32_t>(v.ints.size()));
    }
  }
  mSerialFc.nbFields = static_cast<int32_t>(mSerialFields.size());
  mSerialFc.fields = mSerialFields.data();
  return &mSerialFc;
}

int32_t KvxPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* outputDesc,
                           void const* const* inputs, void* const* outputs, void* workspace,
                           cudaStream_t stream) noexcept {
  return mOp.kind == OpKind::kENCODE ? enqueueEncode(inputDesc, outputDesc, inputs, outputs, workspace, stream)
                                     : enqueueAttention(inputDesc, outputDesc, inputs, outputs, workspace, stream);
}

bool KvxPlugin::constSlots(PluginTensorDesc const* desc, void const* const* in, int64_t D, float* ws,
                           float const** slots, cudaStream_t stream) const noexcept {
  if (!mCodec.pack) {
    for (int32_t i = 0; i < mOp.nbConsts && i < KVX_MAX_CONSTS; ++i) slots[i] = static_cast<float const*>(in[i]);
    return true;
  }
  int64_t counts[kMAX_CONST_INPUTS];  // enqueue allocates nothing, not even on the host
  if (mOp.nbConsts > kMAX_CONST_INPUTS) return false;
  for (int32_t i = 0; i < mOp.nbConsts; ++i) counts[i] = volume(desc[i].dims);
  if (mCodec.pack(mAttrs, reinterpret_cast<float const* const*>(in), counts, mOp.nbConsts, D, ws, slots, stream))
    return true;
  logError(std::string(mOp.name) + ": packing the codec constants failed");
  return false;
}

int32_t KvxPlugin::residualField(int64_t D, int32_t& group) const noexcept {
  int32_t const nKey = mOp.kind == OpKind::kENCODE ? (mOp.role == 0 ? mOp.nbOutputs : 0) : mOp.nbKeyFields;
  for (int32_t i = 0; i < nKey; ++i) {
    FieldShape f;
    std::string err;
    if (mCodec.fieldShape(mAttrs, 0, i, D, f, err) && f.rows == Rows::kREST) {
      group = f.group;
      return i;
    }
  }
  group = 0;
  return -1;
}

int32_t KvxPlugin::launched(int rc) const noexcept {
  if (rc == 0) return 0;
  logError(std::string(mOp.name) + ": kernel launch failed: " + kvx_last_error());
  return -1;
}

// Encode x (B, Hkv, T, D) into fresh packed buffers: the append kernel at lens = 0.  Grouped
// key layouts (kivi, ternary, qjl): x is the previous residual ++ the new tokens; the kernel
// writes the complete groups into the outputs and the newest T mod g keys into its (g, D)
// residual ring (row t mod g), here in the workspace; those rows 0 .. T mod g - 1 are then
// copied into the residual output (T mod g, D).
int32_t KvxPlugin::enqueueEncode(PluginTensorDesc const* inputDesc, PluginTensorDesc const* outputDesc,
                                 void const* const* inputs, void* const* outputs, void* workspace,
                                 cudaStream_t stream) noexcept {
  Dims const& x = inputDesc[0].dims;
  if (volume(x) == 0) return 0;
  int64_t const D = x.d[3];
  auto* base = static_cast<char*>(workspace);
  auto* lens = reinterpret_cast<int32_t*>(base);
  size_t off = alignUp(sizeof(int32_t) * x.d[0]);
  if (cudaMemsetAsync(lens, 0, sizeof(int32_t) * x.d[0], stream) != cudaSuccess) return -1;
  float* packWs = reinterpret_cast<float*>(base + off);
  off += mCodec.packFloats ? alignUp(sizeof(float) * mCodec.packFloats(mAttrs, D)) : 0;
  int32_t group = 0;
  int32_t const res = residualField(D, group);
  KvxAppendArgs a{};
  a.batch = static_cast<int32_t>(x.d[0]);
  a.kv_heads = static_cast<int32_t>(x.d[1]);
  a.n_new = static_cast<int32_t>(x.d[2]);
  a.head_dim = static_cast<int32_t>(x.d[3]);
  a.x_dtype = actCode(inputDesc[0].type);
  a.x = inputs[0];
  a.x_sT = x.d[3];
  a.x_sH = x.d[2] * a.x_sT;
  a.x_sB = x.d[1] * a.x_sH;
  a.lens = lens;
  a.max_len = 0;            // fresh buffers: every sequence starts at 0 ...
  a.capacity = a.n_new;     // ... and the outputs hold exactly the T new tokens
  a.role = mOp.role;
  for (int32_t i = 0; i < mOp.nbOutputs && i < KVX_MAX_FIELDS; ++i)
    a.f[i] = field(outputs[i], outputDesc[i].dims, outputDesc[i].type);
  void* ring = base + off;
  if (res >= 0) {  // the kernel's ring: (B, H, g, D) fp16
    a.f[res].ptr = ring;
    a.f[res].sT = 2 * D;
    a.f[res].sH = group * a.f[res].sT;
    a.f[res].sB = x.d[1] * a.f[res].sH;
  }
  if (!constSlots(inputDesc + 1, inputs + 1, D, packWs, a.consts, stream)) return -1;
  KernelParams const p = mCodec.params(mAttrs, D);
  a.bits = p.bits; a.group = p.group; a.value_group = p.valueGroup; a.block = p.block;
  if (launched(mCodec.append(&a, stream)) != 0) return -1;
  int64_t const rest = res >= 0 ? outputDesc[res].dims.d[2] : 0;
  if (rest > 0 && cudaMemcpy2DAsync(outputs[res], 2 * rest * D, ring, 2 * group * D, 2 * rest * D, x.d[0] * x.d[1],
                                    cudaMemcpyDeviceToDevice, stream) != cudaSuccess) {
    logError(std::string(mOp.name) + ": copying the residual failed");
    return -1;
  }
  return 0;
}

// Attention of q (B, Hq, Tq, D) over the packed cache (Tc tokens) + optional fp16 window (W tokens);
// query i sits at position Tc + W - Tq + i.  Decode (Tq = 1) and causal prompts are one launch:
// KvxDecodeArgs.q_tokens = Tq, every sequence at its full length, the kernels mask each query
// causally.  A non-causal prompt (every query sees everything) is one launch per sequence b whose
// "batch" rows are its Tq queries over the same cache (cache strides sB = 0).  Tc is the value
// fields' token count (values are per token in every codec); grouped key layouts hold
// floor(Tc/g)·g grouped keys + the Tc mod g residual, which the kernels read at row t mod g (the
// split point is floor(len/g)·g of the length passed, always Tc here): the ONNX residual tensor is
// passed as it comes.
int32_t KvxPlugin::enqueueAttention(PluginTensorDesc const* inputDesc, PluginTensorDesc const* outputDesc,
                                    void const* const* inputs, void* const* outputs, void* workspace,
                                    cudaStream_t stream) noexcept {
  Dims const& q = inputDesc[0].dims;
  int64_t const B = q.d[0], hq = q.d[1], tq = q.d[2], D = q.d[3];
  if (B * hq * tq == 0) return 0;
  int32_t const firstK = 1, firstV = 1 + mOp.nbKeyFields, afterV = firstV + mOp.nbValueFields;
  bool const window = hasWindow(mNbInputs);
  int32_t const firstC = afterV + (window ? 2 : 0);
  int64_t const tc = inputDesc[firstV].dims.d[2];
  int64_t const W = window ? inputDesc[afterV].dims.d[2] : 0;
  bool const causal = mAttrs.getInt("causal") != 0;
  bool const perSequence = tq > 1 && !causal;  // one launch per sequence, Tq rows
  int64_t const rows = perSequence ? tq : B;    // kernel batch (lengths entries)
  int32_t const hkv = static_cast<int32_t>(inputDesc[firstK].dims.d[1]);
  // Query rows of a kv head are G·Tq, in tiles of 16 (as kvexport.kernels.decode_attention).
  int64_t const rowTiles = perSequence ? 1 : (hq / std::max(hkv, 1) * tq + 15) / 16;
  int32_t const splits = splitsFor(rows, hkv * rowTiles, tc + W, D, mSmCount);

  auto* base = static_cast<char*>(workspace);
  size_t off = decodeBytes(mCodec, mAttrs, perSequence ? tq : B * tq, hq, D, splits);
  auto* ws = reinterpret_cast<float*>(base);
  auto* lens = reinterpret_cast<int32_t*>(base + off);
  off += alignUp(sizeof(int32_t) * rows);
  auto* winLens = reinterpret_cast<int32_t*>(base + off);
  off += alignUp(sizeof(int32_t) * rows);
  void const* qPtr = inputs[0];
  void* oPtr = outputs[0];
  int32_t qCode = actCode(inputDesc[0].type);
  if (inputDesc[0].type == DataType::kFLOAT) {  // kernels read fp16/bf16 queries: stage fp32 through fp16
    void* q16 = base + off;
    off += alignUp(2 * static_cast<size_t>(B * hq * tq * D));
    oPtr = base + off;
    off += alignUp(2 * static_cast<size_t>(B * hq * tq * D));
    if (castFloatToHalf(inputs[0], q16, B * hq * tq * D, stream) != cudaSuccess) return -1;
    qPtr = q16;
    qCode = 0;
  }
  // Every launch row sees the whole cache and window (causality, if any, is the kernels' q_tokens mask).
  if (fillVisibleLens(lens, winLens, static_cast<int32_t>(rows), static_cast<int32_t>(tc), static_cast<int32_t>(W),
                      static_cast<int32_t>(tq), false, false, stream) != cudaSuccess)
    return -1;

  KvxDecodeArgs a{};
  a.q_heads = static_cast<int32_t>(hq);
  a.kv_heads = hkv;
  a.head_dim = static_cast<int32_t>(D);
  a.q_dtype = qCode;
  a.lens = lens;
  a.max_len = static_cast<int32_t>(tc);
  a.capacity = static_cast<int32_t>(tc);  // the packed inputs hold Tc tokens
  a.win_lens = winLens;
  a.win_max = static_cast<int32_t>(W);
  float* packWs = reinterpret_cast<float*>(base + off);
  if (!constSlots(inputDesc + firstC, inputs + firstC, D, packWs, a.consts, stream)) return -1;
  KernelParams const p = mCodec.params(mAttrs, D);
  a.bits = p.bits; a.group = p.group; a.value_group = p.valueGroup; a.block = p.block;
  a.scale = 1.0f / std::sqrt(static_cast<float>(D));
  a.softcap = mAttrs.getFloat("softcap");
  a.sliding_window = mAttrs.getInt("sliding_window");
  a.workspace = ws;
  size_t const actBytes = qCode == 2 ? 4 : 2;

  KvxField kf[KVX_MAX_FIELDS]{}, vf[KVX_MAX_FIELDS]{};
  for (int32_t i = 0; i < mOp.nbKeyFields; ++i)
    kf[i] = field(inputs[firstK + i], inputDesc[firstK + i].dims, inputDesc[firstK + i].type);
  for (int32_t i = 0; i < mOp.nbValueFields; ++i)
    vf[i] = field(inputs[firstV + i], inputDesc[firstV + i].dims, inputDesc[firstV + i].type);
  Dims const wd = window ? inputDesc[afterV].dims : Dims{};
  int64_t const wsT = window ? wd.d[3] : 0, wsH = window ? wd.d[2] * wsT : 0, wsB = window ? wd.d[1] * wsH : 0;

  if (!perSequence) {
    a.batch = static_cast<int32_t>(B);
    a.q_tokens = static_cast<int32_t>(tq);
    a.q = qPtr; a.q_sB = hq * tq * D; a.q_sH = tq * D; a.q_sT = D;
    a.out = oPtr; a.o_sB = hq * tq * D; a.o_sH = tq * D; a.o_sT = D;
    std::copy(kf, kf + KVX_MAX_FIELDS, a.k);
    std::copy(vf, vf + KVX_MAX_FIELDS, a.v);
    if (window) { a.win_k = inputs[afterV]; a.win_v = inputs[afterV + 1]; a.w_sB = wsB; a.w_sH = wsH; a.w_sT = wsT; }
    a.num_splits = splits;
    if (launched(mCodec.decode(&a, stream)) != 0) return -1;
  } else {
    a.batch = static_cast<int32_t>(tq);
    a.q_sB = D; a.q_sH = tq * D;
    a.o_sB = D; a.o_sH = tq * D;
    a.num_splits = splits;
    for (int64_t b = 0; b < B; ++b) {
      a.q = static_cast<char const*>(qPtr) + b * hq * tq * D * actBytes;
      a.out = static_cast<char*>(oPtr) + b * hq * tq * D * actBytes;
      for (int32_t i = 0; i < mOp.nbKeyFields; ++i) {
        a.k[i] = kf[i];
        a.k[i].ptr = static_cast<char*>(kf[i].ptr) + b * kf[i].sB;
        a.k[i].sB = 0;
      }
      for (int32_t i = 0; i < mOp.nbValueFields; ++i) {
        a.v[i] = vf[i];
        a.v[i].ptr = static_cast<char*>(vf[i].ptr) + b * vf[i].sB;
        a.v[i].sB = 0;
      }
      if (window) {
        a.win_k = static_cast<char const*>(inputs[afterV]) + b * wsB * 2;
        a.win_v = static_cast<char const*>(inputs[afterV + 1]) + b * wsB * 2;
        a.w_sB = 0; a.w_sH = wsH; a.w_sT = wsT;
      }
      if (launched(mCodec.decode(&a, stream)) != 0) return -1;
    }
  }
  if (inputDesc[0].type == DataType::kFLOAT &&
      castHalfToFloat(oPtr, outputs[0], B * hq * tq * D, stream) != cudaSuccess)
    return -1;
  return 0;
}

// ---------------------------------------------------------------- creator
KvxPluginCreator::KvxPluginCreator(OpDef const& op, CodecImpl const& codec) : mOp(op), mCodec(codec) {
  for (int32_t i = 0; i < op.nbAttrs; ++i) {
    AttrDef const& a = op.attrs[i];
    PluginFieldType t = a.type == AttrType::kFLOAT ? PluginFieldType::kFLOAT32
                        : a.type == AttrType::kSTR ? PluginFieldType::kCHAR : PluginFieldType::kINT32;
    mFields.emplace_back(a.name, nullptr, t, a.type == AttrType::kINTS ? 0 : 1);
  }
  mFc.nbFields = static_cast<int32_t>(mFields.size());
  mFc.fields = mFields.data();
}

IPluginV3* KvxPluginCreator::createPlugin(char const* name, PluginFieldCollection const* fc, TensorRTPhase) noexcept {
  try {
    Attrs attrs;
    for (int32_t i = 0; fc && i < fc->nbFields; ++i) {
      PluginField const& f = fc->fields[i];
      AttrDef const* def = nullptr;
      for (int32_t j = 0; j < mOp.nbAttrs; ++j)
        if (std::strcmp(mOp.attrs[j].name, f.name) == 0) def = &mOp.attrs[j];
      if (!def) {
        logError(std::string(mOp.name) + ": unknown field '" + f.name + "'");
        return nullptr;
      }
      AttrValue v;
      v.name = f.name;
      v.type = def->type;
      if (def->type == AttrType::kSTR) {
        if (f.type != PluginFieldType::kCHAR) {
          logError(std::string(mOp.name) + "." + f.name + ": expected a string");
          return nullptr;
        }
        v.str.assign(static_cast<char const*>(f.data), static_cast<char const*>(f.data) + f.length);
        while (!v.str.empty() && v.str.back() == '\0') v.str.pop_back();
      } else {
        if (f.length < 0 || (def->type != AttrType::kINTS && f.length != 1)) {
          logError(std::string(mOp.name) + "." + f.name + ": expected one value, got " + std::to_string(f.length));
          return nullptr;
        }
        for (int32_t k = 0; k < f.length; ++k) {
          double x = 0;
          switch (f.type) {
            case PluginFieldType::kINT32: x = static_cast<int32_t const*>(f.data)[k]; break;
            case PluginFieldType::kINT64: x = static_cast<double>(static_cast<int64_t const*>(f.data)[k]); break;
            case PluginFieldType::kFLOAT32: x = static_cast<float const*>(f.data)[k]; break;
            case PluginFieldType::kFLOAT64: x = static_cast<double const*>(f.data)[k]; break;
            case PluginFieldType::kINT8: x = static_cast<int8_t const*>(f.data)[k]; break;
            default:
              logError(std::string(mOp.name) + "." + f.name + ": unsupported field type " +
                       std::to_string(static_cast<int>(f.type)));
              return nullptr;
          }
          if (def->type == AttrType::kFLOAT) v.floats.push_back(static_cast<float>(x));
          else v.ints.push_back(static_cast<int32_t>(x));
        }
      }
      attrs.set(std::move(v));
    }
    // No silent defaults: the exporter writes every field the registry gives a default, so a
    // node without one is not ours (or from another format version) and is refused by name.
    std::string missing;
    for (int32_t j = 0; j < mOp.nbAttrs; ++j)
      if (mOp.attrs[j].required && !attrs.has(mOp.attrs[j].name))
        missing += std::string(missing.empty() ? "" : ", ") + "'" + mOp.attrs[j].name + "'";
    if (!missing.empty()) {
      logError(std::string(mOp.name) + " v" + mOp.version + ": missing required field(s) " + missing +
               " (re-export the model with this kvexport)");
      return nullptr;
    }
    std::string err;
    if (!mCodec.check(attrs, err)) {
      logError(std::string(mOp.name) + " (" + (name ? name : "") + "): " + err);
      return nullptr;
    }
    return new KvxPlugin(mOp, mCodec, std::move(attrs));
  } catch (std::exception const& e) {
    logError(std::string(mOp.name) + ": " + e.what());
    return nullptr;
  }
}

namespace {

struct Registry {
  std::vector<std::unique_ptr<KvxPluginCreator>> creators;
  std::vector<IPluginCreatorInterface*> ptrs;
  Registry() {
    int32_t n = 0;
    OpDef const* ops = opTable(n);
    for (int32_t i = 0; i < n; ++i)
      if (CodecImpl const* c = findCodec(ops[i].codec)) {
        creators.emplace_back(new KvxPluginCreator(ops[i], *c));
        ptrs.push_back(creators.back().get());
      }
  }
};

Registry& registry() {
  static Registry r;
  return r;
}

// Self-registration for hosts that only dlopen the library (trtexec --staticPlugins,
// Polygraphy --plugins, ctypes.CDLL, LD_PRELOAD): when full TensorRT (libnvinfer) is already
// loaded, hand it our creators.  IPluginRegistry::loadLibrary (trtexec --dynamicPlugins,
// tensorrt(_rtx).get_plugin_registry().load_library) uses getCreators() instead.
// TensorRT-RTX is left alone here: its IPluginRegistry is not laid out like the TensorRT 10
// headers we compile against (calling it through them crashes), so with TensorRT-RTX load
// the library through loadLibrary.
using GetRegistryFn = IPluginRegistry* (*)();

bool fromNvinfer(void* sym) {
  Dl_info info{};
  return sym && dladdr(sym, &info) && info.dli_fname && std::strstr(info.dli_fname, "libnvinfer.so");
}

__attribute__((constructor)) void selfRegister() {
  if (char const* e = std::getenv("KVEXPORT_TRT_NO_SELF_REGISTER"); e && *e && *e != '0') return;
  void* fn = dlsym(RTLD_DEFAULT, "getPluginRegistry");
  if (!fromNvinfer(fn)) fn = nullptr;
  for (char const* lib : {"libnvinfer.so.10", "libnvinfer.so"}) {
    if (fn) break;
    if (void* h = dlopen(lib, RTLD_LAZY | RTLD_NOLOAD)) fn = dlsym(h, "getPluginRegistry");
  }
  if (!fn) return;
  IPluginRegistry* reg = reinterpret_cast<GetRegistryFn>(fn)();
  if (!reg) return;
  for (IPluginCreatorInterface* c : registry().ptrs) {
    auto* v3 = static_cast<KvxPluginCreator*>(c);
    bool already = false;
    int32_t n = 0;
    IPluginCreatorInterface* const* all = reg->getAllCreators(&n);
    for (int32_t i = 0; all && i < n; ++i) {
      if (!all[i] || std::strcmp(all[i]->getInterfaceInfo().kind, "PLUGIN CREATOR_V3ONE") != 0) continue;
      auto* o = static_cast<IPluginCreatorV3One*>(all[i]);
      already |= std::strcmp(o->getPluginName(), v3->getPluginName()) == 0 &&
                 std::strcmp(o->getPluginNamespace(), "kvexport") == 0 &&
                 std::strcmp(o->getPluginVersion(), v3->getPluginVersion()) == 0;
    }
    if (!already) reg->registerCreator(*c, "kvexport");
  }
}

}  // namespace

}  // namespace trt
}  // namespace kvx

#ifndef KVX_TRT_ARCHS
#define KVX_TRT_ARCHS ""
#endif

extern "C" {

// CUDA architectures the kernels of this library were compiled for, e.g. "80;86;89;90".
__attribute__((visibility("default"))) char const* kvx_trt_archs() { return KVX_TRT_ARCHS; }

__attribute__((visibility("default"))) void setLoggerFinder(nvinfer1::ILoggerFinder* finder) {
  kvx::trt::gLoggerFinder = finder;
}

__attribute__((visibility("default"))) nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) {
  auto& r = kvx::trt::registry();
  nbCreators = static_cast<int32_t>(r.ptrs.size());
  return r.ptrs.data();
}

}  // extern "C"
