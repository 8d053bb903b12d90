// Per-codec glue between the generic plugin and the kernel launchers of plugins/<codec>/:
// packed-field shapes (mirroring each codec's Python ``layout``), the kernels' integer
// parameters (kvexport/kernels/cache.py ``kernel_params``) and, where the kernels want them
// rearranged, their constant slots.  The supported parameter ranges and every parameter a
// codec derives (fibquant index bits, ternary planes, qjl sketch rows) come from the generated
// kernel tables (kvexport/kernels/support.py): nothing is re-derived here, and fields have no
// defaults here (createPlugin requires them).  A codec listed here has TensorRT plugins; any
// other codec's ops are left out of getCreators().
#include <algorithm>
#include <cmath>
#include <cstring>
#include <initializer_list>
#include <string>
#include <vector>

#include "kvx_plugin.h"

extern "C" {
int kvx_fp16_append(KvxAppendArgs const* a, cudaStream_t s);
int kvx_fp16_decode(KvxDecodeArgs const* a, cudaStream_t s);
int kvx_turbo_append(KvxAppendArgs const* a, cudaStream_t s);
int kvx_turbo_decode(KvxDecodeArgs const* a, cudaStream_t s);
int kvx_fibquant_append(KvxAppendArgs const* a, cudaStream_t s);
int kvx_fibquant_decode(KvxDecodeArgs const* a, cudaStream_t s);
int kvx_polar_append(KvxAppendArgs const* a, cudaStream_t s);
int kvx_polar_decode(KvxDecodeArgs const* a, cudaStream_t s);
int kvx_kivi_append(KvxAppendArgs const* a, cudaStream_t s);
int kvx_kivi_decode(KvxDecodeArgs const* a, cudaStream_t s);
int kvx_ternary_append(KvxAppendArgs const* a, cudaStream_t s);
int kvx_ternary_decode(KvxDecodeArgs const* a, cudaStream_t s);
int kvx_qjl_append(KvxAppendArgs const* a, cudaStream_t s);
int kvx_qjl_decode(KvxDecodeArgs const* a, cudaStream_t s);
}

namespace kvx {
namespace trt {
namespace {

int64_t packedBytes(int64_t n, int64_t bits) { return (n * bits + 7) / 8; }

// One field shape: rows, group, trailing dims.
FieldShape shape(Rows rows, int32_t group, std::initializer_list<int64_t> trail) {
  FieldShape f;
  f.rows = rows;
  f.group = group;
  f.nbTrail = static_cast<int32_t>(trail.size());
  int32_t i = 0;
  for (int64_t t : trail) f.trail[i++] = t;
  return f;
}
FieldShape perToken(int64_t width) { return shape(Rows::kTOKENS, 1, {width}); }

std::string strAttr(Attrs const& a, char const* name, char const* dflt) {
  for (auto const& v : a.values())
    if (v.name == name) return v.str;
  return dflt;
}

std::vector<int32_t> intsAttr(Attrs const& a, char const* name) {
  for (auto const& v : a.values())
    if (v.name == name) return v.ints;
  return {};
}

std::string join(int32_t const* v, int32_t n) {
  std::string s;
  for (int32_t i = 0; i < n; ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return s;
}

// The generated dispatch declaration for `codec`: compiled choices, spans and pairs of the
// fields the node carries.
bool checkDeclared(Attrs const& a, char const* codec, std::string& err) {
  KernelTables const& t = kernelTables();
  for (int32_t i = 0; i < t.nbChoices; ++i) {
    KernelChoice const& c = t.choices[i];
    if (std::strcmp(c.codec, codec) != 0 || !a.has(c.param)) continue;
    int32_t const v = a.getInt(c.param);
    if (std::find(c.values, c.values + c.n, v) == c.values + c.n) {
      err = std::string(codec) + "." + c.param + " must be one of " + join(c.values, c.n) +
            " for the CUDA kernels, got " + std::to_string(v);
      return false;
    }
  }
  for (int32_t i = 0; i < t.nbSpans; ++i) {
    KernelSpan const& s = t.spans[i];
    if (std::strcmp(s.codec, codec) != 0 || !a.has(s.param)) continue;
    std::vector<int32_t> vals = intsAttr(a, s.param);
    if (vals.empty()) vals.push_back(a.getInt(s.param));
    for (int32_t v : vals)
      if (v < s.lo || v > s.hi || v % s.multipleOf) {
        err = std::string(codec) + "." + s.param + " must be " +
              (s.multipleOf > 1 ? "a multiple of " + std::to_string(s.multipleOf) + " " : std::string()) + "in [" +
              std::to_string(s.lo) + ", " + std::to_string(s.hi) + "] for the CUDA kernels, got " + std::to_string(v);
        return false;
      }
  }
  std::string pairs, names;
  bool any = false, found = false;
  for (int32_t i = 0; i < t.nbCombos; ++i) {
    KernelCombo const& c = t.combos[i];
    if (std::strcmp(c.codec, codec) != 0 || !a.has(c.a) || !a.has(c.b)) continue;
    any = true;
    names = std::string(c.a) + "=" + std::to_string(a.getInt(c.a)) + ", " + c.b + "=" + std::to_string(a.getInt(c.b));
    pairs += " (" + std::to_string(c.va) + "," + std::to_string(c.vb) + ")";
    found |= a.getInt(c.a) == c.va && a.getInt(c.b) == c.vb;
  }
  if (any && !found) {
    err = std::string(codec) + " (" + names + ") has no CUDA kernel; must be one of" + pairs;
    return false;
  }
  return true;
}

// Kernel parameter `name` of `codec`: the field `name` if the node carries it, else the
// generated value for the node's source field (at head dim D); -1 where none is tabulated.
int32_t derived(Attrs const& a, char const* codec, char const* name, int64_t D, std::string& source) {
  if (a.has(name)) return a.getInt(name);
  KernelTables const& t = kernelTables();
  for (int32_t i = 0; i < t.nbDerived; ++i) {
    KernelDerived const& r = t.derived[i];
    if (std::strcmp(r.codec, codec) != 0 || std::strcmp(r.name, name) != 0) continue;
    source = r.source;
    if ((r.headDim != 0 && r.headDim != D) || !a.has(r.source)) continue;
    double const v = a.getFloat(r.source);
    if (std::fabs(v - r.value) <= 1e-5 * std::max(1.0, std::fabs(r.value))) return r.derived;
  }
  return -1;
}
int32_t derived(Attrs const& a, char const* codec, char const* name, int64_t D) {
  std::string source;
  return derived(a, codec, name, D, source);
}

// ---- fp16: field "x" (T, D) fp16.
bool fp16Check(Attrs const&, std::string&) { return true; }
bool fp16Shape(Attrs const&, int32_t, int32_t, int64_t D, FieldShape& s, std::string&) {
  s = perToken(D);
  return true;
}
KernelParams fp16Params(Attrs const&, int64_t) { return {16, 0, 0, 0}; }

// ---- turbo: "norm" (T, 1) fp16, "codes" (T, ceil(D·bits/8)) uint8.
bool turboCheck(Attrs const& a, std::string& err) { return checkDeclared(a, "turbo", err); }
bool turboShape(Attrs const& a, int32_t, int32_t field, int64_t D, FieldShape& s, std::string&) {
  s = perToken(field == 0 ? 1 : packedBytes(D, a.getInt("bits")));
  return true;
}
KernelParams turboParams(Attrs const& a, int64_t) { return {a.getInt("bits"), 0, 0, 0}; }

// ---- fibquant: "norm" (T, 1) fp16, "codes" (T, ceil((D/k)·log2 N / 8)) uint8.
int32_t fibIndexBits(Attrs const& a) { return derived(a, "fibquant", "index_bits", 0); }
bool fibCheck(Attrs const& a, std::string& err) {
  if (!checkDeclared(a, "fibquant", err)) return false;
  if (fibIndexBits(a) < 0) {
    err = "fibquant: the node carries no N the CUDA kernels are compiled for";
    return false;
  }
  return true;
}
bool fibShape(Attrs const& a, int32_t, int32_t field, int64_t D, FieldShape& s, std::string& err) {
  int32_t const k = a.getInt("k");
  if (k < 1 || D % k) {
    err = "fibquant.k (" + std::to_string(k) + ") must divide head_dim " + std::to_string(D);
    return false;
  }
  s = perToken(field == 0 ? 1 : packedBytes(D / k, fibIndexBits(a)));
  return true;
}
KernelParams fibParams(Attrs const& a, int64_t) { return {fibIndexBits(a), 0, 0, a.getInt("k")}; }

// ---- polar: "codes" (T, ceil(sum_l (D >> l)·b_l / 8)) uint8, "radius" (T, D / 2^L) fp16.
// Kernel slots (kvexport.kernels.cache.kernel_constants): 0 = rotation, 1 = per level cos_l
// then sin_l, 2 = boundaries_l of every level; level bits packed one nibble per level.
std::vector<int32_t> polarLevelBits(Attrs const& a) {
  for (auto const& v : a.values())
    if (v.name == "level_bits") return v.ints;
  return {};
}
bool polarCheck(Attrs const& a, std::string& err) {
  if (!checkDeclared(a, "polar", err)) return false;
  std::vector<int32_t> const lb = polarLevelBits(a);
  int32_t const levels = a.getInt("levels");
  if (static_cast<int32_t>(lb.size()) != levels) {
    err = "polar needs level_bits with one entry per level (levels=" + std::to_string(levels) + ", " +
          std::to_string(lb.size()) + " level_bits)";
    return false;
  }
  return true;
}
bool polarShape(Attrs const& a, int32_t, int32_t field, int64_t D, FieldShape& s, std::string& err) {
  std::vector<int32_t> const lb = polarLevelBits(a);
  int64_t const block = int64_t{1} << lb.size();
  if (D % block) {
    err = "polar: head_dim " + std::to_string(D) + " is not a multiple of the block " + std::to_string(block);
    return false;
  }
  int64_t bits = 0;
  for (size_t i = 0; i < lb.size(); ++i) bits += (D >> (i + 1)) * lb[i];
  s = perToken(field == 0 ? packedBytes(bits, 1) : D / block);
  return true;
}
KernelParams polarParams(Attrs const& a, int64_t) {
  std::vector<int32_t> const lb = polarLevelBits(a);
  int32_t nib = 0;
  for (size_t i = 0; i < lb.size(); ++i) nib |= lb[i] << (4 * i);
  return {nib, 0, 0, static_cast<int32_t>(lb.size())};
}
size_t polarPackFloats(Attrs const& a, int64_t) {
  size_t n = 0;
  for (int32_t b : polarLevelBits(a)) n += 3 * (size_t{1} << b) - 1;  // cos + sin + boundaries
  return n;
}
// ONNX constant inputs: rotation, then per level codebook, boundaries, cos, sin.
bool polarPack(Attrs const& a, float const* const* in, int64_t const* counts, int32_t n, int64_t D, float* ws,
               float const** slots, cudaStream_t s) {
  std::vector<int32_t> const lb = polarLevelBits(a);
  int32_t const L = static_cast<int32_t>(lb.size());
  if (n != 1 + 4 * L) return false;
  int64_t trig = 0, bnd = 0;
  for (int32_t l = 0; l < L; ++l) trig += counts[1 + 4 * l + 2] + counts[1 + 4 * l + 3], bnd += counts[1 + 4 * l + 1];
  float* t = ws;
  float* b = ws + trig;
  for (int32_t l = 0; l < L; ++l) {
    int64_t const nb = counts[1 + 4 * l + 1], nc = counts[1 + 4 * l + 2], ns = counts[1 + 4 * l + 3];
    if (cudaMemcpyAsync(t, in[1 + 4 * l + 2], nc * sizeof(float), cudaMemcpyDeviceToDevice, s) != cudaSuccess ||
        cudaMemcpyAsync(t + nc, in[1 + 4 * l + 3], ns * sizeof(float), cudaMemcpyDeviceToDevice, s) != cudaSuccess ||
        cudaMemcpyAsync(b, in[1 + 4 * l + 1], nb * sizeof(float), cudaMemcpyDeviceToDevice, s) != cudaSuccess)
      return false;
    t += nc + ns;
    b += nb;
  }
  slots[0] = in[0];
  slots[1] = ws;
  slots[2] = ws + trig;
  return static_cast<size_t>(trig + bnd) <= polarPackFloats(a, D);
}

// ---- kivi (kivi/codec.py layout).  Keys per channel over groups of `group` tokens:
// codes (floor(T/g)·g, ceil(D·b/8)) uint8, scale / zero (floor(T/g), D) fp16, residual
// (T mod g, D) fp16.  Values per token over `value_group` channels: codes (T, ceil(D·b/8)),
// scale / zero (T, D/vg).
bool kiviCheck(Attrs const& a, std::string& err) {
  if (!checkDeclared(a, "kivi", err)) return false;
  int32_t const g = a.getInt("group"), vg = a.getInt("value_group");
  if (g < 1 || vg < 1) {
    err = "kivi.group and kivi.value_group must be >= 1, got " + std::to_string(g) + " and " + std::to_string(vg);
    return false;
  }
  return true;
}
bool kiviShape(Attrs const& a, int32_t role, int32_t field, int64_t D, FieldShape& s, std::string& err) {
  int32_t const b = a.getInt("bits"), g = a.getInt("group"), vg = a.getInt("value_group");
  if (role == 0) {
    if (g * D > 48 * 1024) {
      err = "kivi.group (" + std::to_string(g) + ") x head_dim (" + std::to_string(D) +
            ") must be <= 49152 for the append kernel";
      return false;
    }
    s = field == 0 ? shape(Rows::kGROUPED, g, {packedBytes(D, b)})
        : field == 3 ? shape(Rows::kREST, g, {D}) : shape(Rows::kGROUPS, g, {D});
    return true;
  }
  if (D % vg) {
    err = "kivi.value_group (" + std::to_string(vg) + ") must divide head_dim " + std::to_string(D);
    return false;
  }
  s = perToken(field == 0 ? packedBytes(D, b) : D / vg);
  return true;
}
KernelParams kiviParams(Attrs const& a, int64_t) {
  return {a.getInt("bits"), a.getInt("group"), a.getInt("value_group"), 0};
}

// ---- ternary (ternary/codec.py layout), key_axis = "channel" (the ops' key layout): keys
// trits (floor(T/K)·K, Pk, ceil(D/5)) uint8, steps (floor(T/K), Pk, D) fp16, residual
// (T mod K, D) fp16 (K = key_group); values trits (T, Pv, ceil(D/5)), steps (T, Pv, D/group).
// Planes: key_planes / value_planes, else the codec's split of bits (generated table).
int32_t ternaryPlanes(Attrs const& a, bool key) {
  return derived(a, "ternary", key ? "key_planes" : "value_planes", 0);
}
bool ternaryCheck(Attrs const& a, std::string& err) {
  std::string const axis = strAttr(a, "key_axis", "");
  if (axis != "channel") {
    err = "ternary.key_axis must be 'channel' for the TensorRT plugins (the ops' key fields are the per-channel "
          "trits, steps, residual), got '" + axis + "'";
    return false;
  }
  if (!checkDeclared(a, "ternary", err)) return false;
  if (ternaryPlanes(a, true) < 1 || ternaryPlanes(a, false) < 1) {
    err = "ternary.bits (" + std::to_string(a.getFloat("bits")) + ") has no plane split for the CUDA kernels "
          "(and key_planes / value_planes are not given)";
    return false;
  }
  if (a.getInt("group") < 1 || a.getInt("key_group") < 1) {
    err = "ternary.group and ternary.key_group must be >= 1";
    return false;
  }
  return true;
}
bool ternaryShape(Attrs const& a, int32_t role, int32_t field, int64_t D, FieldShape& s, std::string& err) {
  int64_t const nb = (D + 4) / 5;
  if (role == 0) {
    int32_t const k = a.getInt("key_group"), p = ternaryPlanes(a, true);
    s = field == 0 ? shape(Rows::kGROUPED, k, {p, nb})
        : field == 1 ? shape(Rows::kGROUPS, k, {p, D}) : shape(Rows::kREST, k, {D});
    return true;
  }
  int32_t const g = a.getInt("group"), p = ternaryPlanes(a, false);
  if (D % g) {
    err = "ternary.group (" + std::to_string(g) + ") must divide head_dim " + std::to_string(D);
    return false;
  }
  s = field == 0 ? shape(Rows::kTOKENS, 1, {p, nb}) : shape(Rows::kTOKENS, 1, {p, D / g});
  return true;
}
KernelParams ternaryParams(Attrs const& a, int64_t) {
  return {ternaryPlanes(a, true) | ternaryPlanes(a, false) << 8, a.getInt("key_group"), a.getInt("group"), 0};
}

// ---- qjl (qjl/codec.py layout), outliers > 0 (the ops' key layout): keys over complete
// groups of `group` tokens: bits (·, m/8) uint8, norm (·) fp16, outlier_bits (·, m_o/8),
// outlier_norm (·), outlier_idx (floor(T/g), o) uint8, residual (T mod g, D) fp16; values
// kivi-style codes (T, ceil(D·vb/8)), scale / zero (T, D/vg).  m = qjl.m or bits·D.
// Kernel slots: Sᵀ (D, m) and S_oᵀ (D, m_o), transposed from the ONNX constants S, S_o.
bool qjlRows(Attrs const& a, int64_t D, int64_t& m, std::string& err) {
  m = derived(a, "qjl", "m", D);
  if (m < 0) {
    err = "qjl.bits (" + std::to_string(a.getFloat("bits")) + ") x head_dim " + std::to_string(D) +
          " is no sketch-row count the CUDA kernels take (give qjl.m)";
    return false;
  }
  return true;
}
bool qjlCheck(Attrs const& a, std::string& err) {
  int32_t const o = a.getInt("outliers");
  if (o < 1) {
    err = "qjl.outliers must be >= 1 for the TensorRT plugins (the ops' key fields include the outlier groups), got " +
          std::to_string(o);
    return false;
  }
  if (!checkDeclared(a, "qjl", err)) return false;
  if (a.getInt("group") < 1 || a.getInt("value_group") < 1) {
    err = "qjl.group and qjl.value_group must be >= 1";
    return false;
  }
  return true;
}
bool qjlShape(Attrs const& a, int32_t role, int32_t field, int64_t D, FieldShape& s, std::string& err) {
  if (role == 0) {
    int64_t m = 0;
    int32_t const o = a.getInt("outliers"), g = a.getInt("group");
    if (!qjlRows(a, D, m, err)) return false;
    if (o >= D) {
      err = "qjl.outliers (" + std::to_string(o) + ") must be < head_dim " + std::to_string(D);
      return false;
    }
    switch (field) {
      case 0: s = shape(Rows::kGROUPED, g, {m / 8}); break;
      case 2: s = shape(Rows::kGROUPED, g, {a.getInt("outlier_m") / 8}); break;
      case 1: case 3: s = shape(Rows::kGROUPED, g, {}); break;
      case 4: s = shape(Rows::kGROUPS, g, {o}); break;
      default: s = shape(Rows::kREST, g, {D});
    }
    return true;
  }
  int32_t const vg = a.getInt("value_group");
  if (D % vg) {
    err = "qjl.value_group (" + std::to_string(vg) + ") must divide head_dim " + std::to_string(D);
    return false;
  }
  s = perToken(field == 0 ? packedBytes(D, a.getInt("value_bits")) : D / vg);
  return true;
}
KernelParams qjlParams(Attrs const& a, int64_t D) {
  int64_t m = 0;
  std::string err;
  if (!qjlRows(a, D, m, err)) m = 0;  // the launchers refuse m = 0 by name
  return {a.getInt("value_bits") | a.getInt("outliers") << 8, a.getInt("group"), a.getInt("value_group"),
          static_cast<int32_t>(m) | a.getInt("outlier_m") << 16};
}
size_t qjlPackFloats(Attrs const& a, int64_t D) {
  int64_t m = 0;
  std::string err;
  if (!qjlRows(a, D, m, err)) return 0;
  return static_cast<size_t>(D * (m + a.getInt("outlier_m")));
}
// ONNX constant inputs: sketch S (m, D), outlier_sketch S_o (m_o, D).
bool qjlPack(Attrs const& a, float const* const* in, int64_t const* counts, int32_t n, int64_t D, float* ws,
             float const** slots, cudaStream_t s) {
  if (n != 2 || D <= 0 || counts[0] % D || counts[1] % D ||
      static_cast<size_t>(counts[0] + counts[1]) > qjlPackFloats(a, D))
    return false;
  if (transposeFloat(in[0], ws, counts[0] / D, D, s) != cudaSuccess ||
      transposeFloat(in[1], ws + counts[0], counts[1] / D, D, s) != cudaSuccess)
    return false;
  slots[0] = ws;
  slots[1] = ws + counts[0];
  return true;
}
int64_t qjlDecodeExtra(Attrs const& a, int64_t D) {
  int64_t m = 0;
  std::string err;
  return qjlRows(a, D, m, err) ? m : 0;
}

CodecImpl const kCodecs[] = {
    {"fp16", fp16Check, fp16Shape, fp16Params, kvx_fp16_append, kvx_fp16_decode, nullptr, nullptr, nullptr},
    {"turbo", turboCheck, turboShape, turboParams, kvx_turbo_append, kvx_turbo_decode, nullptr, nullptr, nullptr},
    {"fibquant", fibCheck, fibShape, fibParams, kvx_fibquant_append, kvx_fibquant_decode, nullptr, nullptr, nullptr},
    {"polar", polarCheck, polarShape, polarParams, kvx_polar_append, kvx_polar_decode, polarPackFloats, polarPack,
     nullptr},
    {"kivi", kiviCheck, kiviShape, kiviParams, kvx_kivi_append, kvx_kivi_decode, nullptr, nullptr, nullptr},
    {"ternary", ternaryCheck, ternaryShape, ternaryParams, kvx_ternary_append, kvx_ternary_decode, nullptr, nullptr,
     nullptr},
    {"qjl", qjlCheck, qjlShape, qjlParams, kvx_qjl_append, kvx_qjl_decode, qjlPackFloats, qjlPack, qjlDecodeExtra},
};

}  // namespace

CodecImpl const* findCodec(char const* codec) {
  for (auto const& c : kCodecs)
    if (std::strcmp(c.codec, codec) == 0) return &c;
  return nullptr;
}

}  // namespace trt
}  // namespace kvx
