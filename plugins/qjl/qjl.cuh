// qjl (Zandieh, Daliri, Han, arXiv:2406.03482): keys are the sign bits of a Gaussian
// sketch S k (m rows) plus an fp16 RMS; per group of `group` tokens the `o` outlier
// channels are sketched apart with S_o (m_o rows).  Score (paper Def. 3.1 / Lemma 3.2,
// docs/formats/qjl.md "Scores"):
//   c/m·‖k_in‖·<Sq_in, sign(S k_in)> + c/m_o·‖k_out‖·<Sq_out, sign(S_o k_out)>,  c = √(π/2),
//   Sq_in = S q − S[:, I] q[I],  Sq_out = S_o[:, I] q[I]   (I = the group's outlier channels).
// The last len % group keys stay fp16 in `residual` and score exactly.  Values: kivi's
// per-token integers (KiviValueReader / kvxKiviAppendValue).
//
// Key fields: 0 bits (T, m/8), 1 norm (T,), 2 outlier_bits (T, m_o/8), 3 outlier_norm (T,),
// 4 outlier_idx (T/group, o), 5 residual (group, D) fp16 (o = 0: fields 0, 1 only).
// Consts: 0 = Sᵀ (D, m), 1 = S_oᵀ (D, m_o), fp32 (transposed: a column of S is contiguous).
// Args: bits = value_bits | o << 8, group, value_group, block = m | m_o << 16.
//
// Decode (qjl_decode.cuh): a prologue computes S q once per query row (head, token;
// workspace, after the partials), then a split kernel scores the sign bits on the tensor
// cores with the bits expanded to ±1 fp16 MMA fragments in registers.
#ifndef KVX_QJL_CUH
#define KVX_QJL_CUH

#include "../common/decode_attention.cuh"
#include "../kivi/kivi.cuh"

namespace kvx {

constexpr float kSQRT_HALF_PI = 1.2533141373155003f;
constexpr int kQJL_WARP_TOKENS_ALIGN = 128;  // split chunk multiple: warp ranges of 32k tokens

// S q of every (batch, q head, query token): fp32 into the workspace after the partials.
// Grid (B, Hq, Tq), 128 threads.
template <int D>
__global__ void kvxQjlSketchQ(const KvxDecodeArgs a, size_t sqOff) {
  __shared__ float qs[D];
  const int b = blockIdx.x, hq = blockIdx.y;
  const size_t row = ((size_t)b * a.q_heads + hq) * gridDim.z + blockIdx.z;
  const int m = a.block & 0xffff;
  const float* q = a.workspace + row * D;
  for (int i = threadIdx.x; i < D; i += blockDim.x) qs[i] = q[i];
  __syncthreads();
  float* sq = a.workspace + sqOff + row * m;
  for (int j = threadIdx.x; j < m; j += blockDim.x) {
    float r = 0.f;
    for (int i = 0; i < D; ++i) r = fmaf(a.consts[0][(size_t)i * m + j], qs[i], r);
    sq[j] = r;
  }
}

// ---- append (keys) -----------------------------------------------------------------

// Encode one key held in xs (D fp32, shared) at sketched row t: norm, sign bits of S·k_in;
// with outliers (sel[c] marks the group's channels, oid lists them ascending) also
// outlier_norm and the sign bits of S_o·k_out.  Whole block (D threads, D >= 64).
__device__ void qjlEncodeKey(const KvxAppendArgs& a, int b, int h, int t, const float* xs, const uint8_t* sel,
                             const uint8_t* oid, int o, int m, int mo, double* red) {
  const int tid = threadIdx.x, D = a.head_dim, lane = tid & 31, wp = tid >> 5;
  const float xin = o && sel[tid] ? 0.f : xs[tid];
  const double sIn = blockSum((double)xin * xin, red);
  if (tid == 0) *fieldPtr<__half>(a.f[1], b, h, t) = toFp16((float)sqrt(sIn / D));
  // m fp32 dot products over D (outlier channels are zero: skipping them adds exact zeros).
  uint8_t* row = fieldPtr<uint8_t>(a.f[0], b, h, t);
  for (int j0 = 0; j0 < m; j0 += D) {
    const int j = j0 + tid;
    float r = 0.f;
    if (j < m) {  // outlier channels enter as exact zeros (r + 0·s = r), as k_in @ S.T sums them
#pragma unroll 8
      for (int i = 0; i < D; ++i) r = fmaf(o && sel[i] ? 0.f : xs[i], __ldg(a.consts[0] + (size_t)i * m + j), r);
    }
    const uint32_t w = __ballot_sync(0xffffffffu, j < m && r >= 0.f);
    if (lane < 4 && j0 + wp * 32 + 8 * lane < m) row[(j0 + wp * 32) / 8 + lane] = (uint8_t)(w >> (8 * lane));
  }
  if (!o) return;
  const float xo = sel[tid] ? xs[tid] : 0.f;
  const double sOut = blockSum((double)xo * xo, red);
  if (tid == 0) *fieldPtr<__half>(a.f[3], b, h, t) = toFp16((float)sqrt(sOut / o));
  uint8_t* orow = fieldPtr<uint8_t>(a.f[2], b, h, t);
  for (int j0 = 0; j0 < mo; j0 += D) {
    const int j = j0 + tid;
    float r = 0.f;
    if (j < mo)
      for (int c = 0; c < o; ++c) r = fmaf(xs[oid[c]], a.consts[1][(size_t)oid[c] * mo + j], r);
    const uint32_t w = __ballot_sync(0xffffffffu, j < mo && r >= 0.f);
    if (lane < 4 && j0 + wp * 32 + 8 * lane < mo) orow[(j0 + wp * 32) / 8 + lane] = (uint8_t)(w >> (8 * lane));
  }
}

// o = 0: one block per (new token, head, batch), D threads.
__global__ void kvxQjlAppendKeyFlat(const KvxAppendArgs a) {
  __shared__ float xs[256];
  __shared__ double red[32];
  const int i = blockIdx.x, h = blockIdx.y, b = blockIdx.z, j = threadIdx.x;
  xs[j] = sanitize(loadAct(a.x, b * a.x_sB + h * a.x_sH + (int64_t)i * a.x_sT + j, a.x_dtype));
  __syncthreads();
  qjlEncodeKey(a, b, h, a.lens[b] + i, xs, nullptr, nullptr, 0, a.block & 0xffff, 0, red);
}

// o > 0: one block per (head, batch), D threads, new tokens in order.  Each goes to the fp16
// residual (row t mod group); a token that completes a group selects the group's outlier
// channels and sketches its keys, reading this call's tokens from x unrounded (as
// QjlCodec.append re-encodes residual ++ x).
__global__ void kvxQjlAppendKeyGrouped(const KvxAppendArgs a) {
  __shared__ float xs[256], en[256];
  __shared__ uint8_t sel[256], oid[256];
  __shared__ double red[32];
  const int h = blockIdx.x, b = blockIdx.y, j = threadIdx.x, D = a.head_dim;
  const int len = a.lens[b], G = a.group, o = (a.bits >> 8) & 0xff;
  const int m = a.block & 0xffff, mo = (a.block >> 16) & 0xffff;
  auto xAt = [&](int q) {
    return sanitize(loadAct(a.x, b * a.x_sB + h * a.x_sH + (int64_t)(q - len) * a.x_sT + j, a.x_dtype));
  };
  for (int i = 0; i < a.n_new; ++i) {
    const int p = len + i, gi = p / G, r = p - gi * G;
    fieldPtr<__half>(a.f[5], b, h, r)[j] = toFp16(xAt(p));
    if (r != G - 1) continue;
    auto val = [&](int rr) {
      const int q = gi * G + rr;
      return q >= len ? xAt(q) : __half2float(fieldPtr<const __half>(a.f[5], b, h, rr)[j]);
    };
    float e = 0.f;  // channel energy over the group, fp32 in token order
    for (int rr = 0; rr < G; ++rr) { const float v = val(rr); e = __fadd_rn(e, __fmul_rn(v, v)); }  // pow(2).sum()
    en[j] = e;
    __syncthreads();
    int rank = 0;  // descending energy, ties to the lower channel
    for (int c = 0; c < D; ++c) rank += (en[c] > e) || (en[c] == e && c < j);
    sel[j] = rank < o;
    __syncthreads();
    if (sel[j]) {
      int pos = 0;
      for (int c = 0; c < j; ++c) pos += sel[c];
      oid[pos] = (uint8_t)j;
      fieldPtr<uint8_t>(a.f[4], b, h, gi)[pos] = (uint8_t)j;
    }
    __syncthreads();
    for (int rr = 0; rr < G; ++rr) {
      xs[j] = val(rr);
      __syncthreads();
      qjlEncodeKey(a, b, h, gi * G + rr, xs, sel, oid, o, m, mo, red);
      __syncthreads();
    }
  }
}

}  // namespace kvx

#endif  // KVX_QJL_CUH
