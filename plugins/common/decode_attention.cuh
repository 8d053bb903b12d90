// Fused split-K decode attention on a packed KV cache, generic over the codec,
// on tensor cores (mma.sync m16n8k16, fp16 operands, fp32 accumulation).
//
// Tq query tokens per sequence (a.q_tokens; 1 = decode).  The G·Tq query rows of a kv head
// (token-major: row r = t·G + g) are cut into tiles of 16, the rows of the MMA.  Block
// (split, kv head × row tile, batch) owns a token range; its 4 warps work independently on
// 16-token subtiles (warp w takes subtiles w, w + 4, ...): the codec's reader dequantizes
// the subtile's packed keys and values into a warp-private fp16 tile in shared memory
// (score domain: rotated for turbo / fibquant), then S = Q Kᵀ (q scaled by its max |q|
// into fp16) and O += P V run on the tensor cores with an online softmax in fp32 registers
// (FlashAttention-2 layout: the score accumulators are the A operand of P V).  Causal and
// sliding-window masks and the soft cap are applied at the score (kvxScore); subtiles
// wholly outside the tile's visible key range are skipped.  The split kernel is compiled
// twice: kGeneral = false for plain decode (q_tokens = 1, no window, no cap: every key of
// the range is visible to every row, no per-score work), true otherwise (no per-score mask
// on subtiles visible to every row); launchDecode picks one from the args.  Every warp
// writes its own partial (m, l, acc); kvxCombine merges splits × warps and rotates back.
//
// A reader R provides:
//   static constexpr bool kRotated;       score domain is x·Πᵀ (consts[0] = Π)
//   static constexpr int kTabWords;       shared-memory table size (32-bit words)
//   __device__ static void prepare(const KvxDecodeArgs&, uint32_t* tab);   // whole block
//   __device__ static void load(const KvxDecodeArgs&, const KvxField* f, int b, int h, int len,
//                               int t0, int n, __half* tile, const uint32_t* tab, int lane);
//     one warp: dequantize packed tokens t0..t0+n-1 (all < len, n <= 16) into fp16
//     tile rows 0..n-1 (row stride kLDH halves).
#ifndef KVX_DECODE_ATTENTION_CUH
#define KVX_DECODE_ATTENTION_CUH

#include <cmath>
#include <type_traits>

#include "kvx_common.cuh"

namespace kvx {

constexpr int kWARPS = kTHREADS / 32;  // independent warps per block (partials per split)
constexpr int kSUB = 16;               // tokens per warp subtile (MMA k of P V)
constexpr int kBLOCK_TOKENS = kWARPS * kSUB;

template <int D>
struct TileCfg {
  static constexpr int kLDH = D + 8;  // fp16 row stride: 16-byte rows, conflict-free ldmatrix
};

// Query tokens per sequence (ABI 4; a zero-initialised field of an older caller means 1).
__host__ __device__ __forceinline__ int qTokens(const KvxDecodeArgs& a) { return a.q_tokens > 0 ? a.q_tokens : 1; }

// Row tiles of 16 query rows per kv head: G heads × Tq tokens.
__host__ __device__ __forceinline__ int rowTiles(const KvxDecodeArgs& a) {
  return ceilDiv(a.q_heads / a.kv_heads * qTokens(a), 16);
}

// The score site of every split kernel.  v: score of key position j for the query at
// position p, scaled and in the log2 domain (v = log2(e)·scale·<q, k>).  Returns -inf where
// the key is masked (causal: j > p; sliding window w > 0: j <= p - w), else the soft-capped
// score cap·tanh(s / cap) (Gemma 2) in the log2 domain (capL2 = cap·log2 e, 0 = off).
__device__ __forceinline__ float kvxScore(float v, int j, int p, float capL2, int window) {
  if (j > p || (window > 0 && j <= p - window)) return -INFINITY;
  return capL2 > 0.f ? capL2 * tanhf(v / capL2) : v;
}

// Keys [lo, hi) that any query row in [r0, r0 + 16) can see; query row r = t·G + g sits at
// position total - Tq + t.
__device__ __forceinline__ void visibleKeys(const KvxDecodeArgs& a, int G, int r0, int total, int& lo, int& hi) {
  const int Tq = qTokens(a), rows = G * Tq;
  const int pLo = total - Tq + r0 / G, pHi = total - Tq + (min(rows, r0 + 16) - 1) / G;
  lo = a.sliding_window > 0 ? max(0, pLo - a.sliding_window + 1) : 0;
  hi = min(total, pHi + 1);
}

// Workspace: q in the score domain (B, Hq, Tq, D), then partials (B, Hq, Tq, splits · kWARPS,
// D + 4): acc (D), m, l, 2 pad floats so every partial row stays 16-byte aligned.
inline size_t decodeWorkspaceFloats(int B, int Hq, int D, int splits, int Tq = 1) {
  return (size_t)B * Hq * Tq * D + (size_t)B * Hq * Tq * splits * kWARPS * (D + 4);
}

// q (fp16/bf16) -> fp32 in the score domain: q Πᵀ when rotated.  Grid (B, Hq, Tq), block D.
template <int D>
__global__ void kvxQPrologue(const KvxDecodeArgs a, bool rotated) {
  __shared__ float qs[D];
  const int b = blockIdx.x, hq = blockIdx.y, t = blockIdx.z, i = threadIdx.x;
  qs[i] = loadAct(a.q, b * a.q_sB + hq * a.q_sH + t * a.q_sT + i, a.q_dtype);
  __syncthreads();
  float r = qs[i];
  if (rotated) {
    const float* pi = a.consts[0] + i * D;  // row i of Π: (qΠᵀ)_i = Σ_j Π[i][j] q_j
    r = 0.f;
#pragma unroll 8
    for (int j = 0; j < D; ++j) r = fmaf(pi[j], qs[j], r);
  }
  a.workspace[(((size_t)b * a.q_heads + hq) * gridDim.z + t) * D + i] = r;
}

// One warp: fp16 window rows w0..w0+n-1 (rotated into the score domain) -> tile rows.
template <int D>
__device__ void loadWindowWarp(const KvxDecodeArgs& a, const void* win, int b, int h, int w0, int n,
                               __half* tile, bool rotated, int lane) {
  constexpr int LDH = TileCfg<D>::kLDH;
  const __half* base = static_cast<const __half*>(win) + b * a.w_sB + h * a.w_sH;
  for (int u = lane; u < n * D; u += 32) {
    const int r = u / D, i = u % D;
    const __half* row = base + (int64_t)(w0 + r) * a.w_sT;
    float acc;
    if (rotated) {
      const float* pi = a.consts[0] + i * D;
      acc = 0.f;
      for (int j = 0; j < D; ++j) acc = fmaf(pi[j], __half2float(row[j]), acc);
    } else {
      acc = __half2float(row[i]);
    }
    tile[r * LDH + i] = __float2half_rn(acc);
  }
}

__device__ __forceinline__ uint32_t smemAddr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void ldsm4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smemAddr(p)));
}
__device__ __forceinline__ void ldsm4t(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smemAddr(p)));
}
// c += a (16x16 fp16, row) · b (16x8 fp16, col), fp32 accumulators.
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};\n"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ uint32_t packHalf2(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// Online-softmax step of one subtile (log2 domain): row maxima mx0 / mx1 of the masked scores
// s -> new running maxima m0 / m1 (n0 / n1), rescale factors c0 / c1 of the old state, and
// p = 2^(s - n).  A row with no visible key so far keeps m = -inf, p = 0, c = 0 (no NaN).
// kFinite: the caller guarantees a finite score in every row (plain decode), no -inf guard.
template <bool kFinite = false>
__device__ __forceinline__ void softmaxStep(const float (&s)[2][4], float mx0, float mx1, float& m0, float& m1,
                                            float& n0, float& n1, float& c0, float& c1, float (&p)[2][4]) {
  n0 = fmaxf(m0, mx0);
  n1 = fmaxf(m1, mx1);
  const float b0 = (kFinite || n0 != -INFINITY) ? n0 : 0.f, b1 = (kFinite || n1 != -INFINITY) ? n1 : 0.f;
  c0 = exp2f(m0 - b0);  // 0 on the first subtile
  c1 = exp2f(m1 - b1);
  m0 = n0;
  m1 = n1;
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    p[j][0] = exp2f(s[j][0] - b0); p[j][1] = exp2f(s[j][1] - b0);
    p[j][2] = exp2f(s[j][2] - b1); p[j][3] = exp2f(s[j][3] - b1);
  }
}

// The tail of one warp subtile, shared by every split kernel (kvxDecodeSplit, kvxQjlDecode).
// Fragment layout (mma16816's C): the thread holds scores s[j][e] of query rows gr = lane / 4
// (e < 2) and gr + 8 (e >= 2), tokens tok = 8j + 2qd + (e & 1), qd = lane % 4; o: (D/8, 4)
// fp32 accumulators (n-tile i: columns 8i + 2qd + {0, 1} of rows gr, gr + 8); vt: the
// subtile's fp16 values (16, D + 8), rows past the subtile zero (finite).
//
// softmaxPVMax: masked scores s (log2 domain, -inf = masked) and the thread's row maxima
// mx0 / mx1 -> maxima over the quad, online-softmax step (softmaxStep; FlashAttention-2
// Alg. 1 lines 8-10) updating m, l of both rows, then O = O·c + P V on the tensor cores (P in
// fp16 as the A operand).
template <int D, bool kFinite>
__device__ __forceinline__ void softmaxPVMax(float (&s)[2][4], float mx0, float mx1, float& m0, float& m1, float& l0,
                                             float& l1, float (&o)[D / 8][4], const __half* vt, int lane) {
  constexpr int LDH = TileCfg<D>::kLDH;
#pragma unroll
  for (int off = 1; off <= 2; off <<= 1) {
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, off));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, off));
  }
  float n0, n1, c0, c1, p[2][4];
  softmaxStep<kFinite>(s, mx0, mx1, m0, m1, n0, n1, c0, c1, p);
  l0 = l0 * c0 + (p[0][0] + p[0][1] + p[1][0] + p[1][1]);
  l1 = l1 * c1 + (p[0][2] + p[0][3] + p[1][2] + p[1][3]);
  const uint32_t pa[4] = {packHalf2(p[0][0], p[0][1]), packHalf2(p[0][2], p[0][3]), packHalf2(p[1][0], p[1][1]),
                          packHalf2(p[1][2], p[1][3])};
  const int mi = lane >> 3;
  const __half* vb = vt + ((lane & 7) + (mi & 1) * 8) * LDH + (mi >> 1) * 8;
#pragma unroll
  for (int d0 = 0; d0 < D; d0 += 16) {
    uint32_t bf[4];
    ldsm4t(bf, vb + d0);
    const int i = d0 / 8;
    o[i][0] *= c0; o[i][1] *= c0; o[i][2] *= c1; o[i][3] *= c1;
    o[i + 1][0] *= c0; o[i + 1][1] *= c0; o[i + 1][2] *= c1; o[i + 1][3] *= c1;
    mma16816(o[i], pa, bf[0], bf[1]);
    mma16816(o[i + 1], pa, bf[2], bf[3]);
  }
}

// softmaxPV: raw scores s -> s = score(s, tok, e >= 2) (the masked score in the log2 domain:
// -inf for a masked key and for tok past the subtile), then softmaxPVMax.
template <int D, bool kFinite, class Score>
__device__ __forceinline__ void softmaxPV(float (&s)[2][4], Score&& score, float& m0, float& m1, float& l0, float& l1,
                                          float (&o)[D / 8][4], const __half* vt, int lane) {
  const int qd = lane & 3;
  float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
  for (int j = 0; j < 2; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int tok = 8 * j + 2 * qd + (e & 1);
      const float v = score(s[j][e], tok, e >= 2);
      s[j][e] = v;
      if (e < 2) mx0 = fmaxf(mx0, v); else mx1 = fmaxf(mx1, v);
    }
  softmaxPVMax<D, kFinite>(s, mx0, mx1, m0, m1, l0, l1, o, vt, lane);
}

// The warp's partial (acc (D), m, l) of its two fragment rows gr, gr + 8 after the last subtile
// (p0 / p1: the rows' partial records, null = row not in the tile); l is summed over the quad
// here.  A warp that saw no subtile writes its initial state m = -inf, l = 0, acc = 0 (the
// combine skips it).
template <int D>
__device__ __forceinline__ void writePartial(float* p0, float* p1, const float (&o)[D / 8][4], float m0, float m1,
                                             float l0, float l1, int lane) {
  const int qd = lane & 3;
  l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
  l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
  if (p0) {
#pragma unroll
    for (int i = 0; i < D / 8; ++i) *reinterpret_cast<float2*>(p0 + 8 * i + 2 * qd) = make_float2(o[i][0], o[i][1]);
    if (qd == 0) { p0[D] = m0; p0[D + 1] = l0; }
  }
  if (p1) {
#pragma unroll
    for (int i = 0; i < D / 8; ++i) *reinterpret_cast<float2*>(p1 + 8 * i + 2 * qd) = make_float2(o[i][2], o[i][3]);
    if (qd == 0) { p1[D] = m1; p1[D + 1] = l1; }
  }
}

// Resident blocks per SM the split kernel asks the register allocator for (launch bounds):
// R::kMinBlocks when the key reader declares it, else 4 at D <= 128 (128 registers: the one
// wave of 4 blocks per SM that num_splits_for plans; over 128 registers only 3 fit and the
// fourth block of each SM becomes a second wave), else 1 (no cap).  Without the bound ptxas
// picks anywhere from 128 to 250 registers for the same loop, whichever way the code moves.
template <class R, class = void>
struct MinBlocksOf {
  static constexpr bool declared = false;
  static constexpr int value = 1;
};
template <class R>
struct MinBlocksOf<R, std::void_t<decltype(R::kMinBlocks)>> {
  static constexpr bool declared = true;
  static constexpr int value = R::kMinBlocks;
};
template <class R, int D>
constexpr int decodeMinBlocks() {
  return MinBlocksOf<R>::declared ? MinBlocksOf<R>::value : (D <= 128 ? 4 : 1);
}

// Soft cap in the log2 domain (kvxScore's cap, with 1 / capL2 precomputed).
__device__ __forceinline__ float kvxCap(float v, float capL2, float invCapL2) { return capL2 * tanhf(v * invCapL2); }

template <class KR, class VR>
struct TabCfg {
  static constexpr bool kShare = std::is_same<KR, VR>::value;  // same reader: one table
  static constexpr int kK = (KR::kTabWords + 3) / 4 * 4;
  static constexpr int kV = kShare ? 0 : (VR::kTabWords + 3) / 4 * 4;
};

// kGeneral: false = plain decode (Tq = 1, sliding_window = 0, softcap = 0; the caller
// guarantees it), true = masks and soft cap from the args.
template <class KR, class VR, int D, bool kGeneral>
__global__ void __launch_bounds__(kTHREADS, (decodeMinBlocks<KR, D>())) kvxDecodeSplit(const KvxDecodeArgs a) {
  static_assert(KR::kRotated == VR::kRotated, "keys and values share the score domain");
  constexpr int LDH = TileCfg<D>::kLDH;
  using TC = TabCfg<KR, VR>;
  extern __shared__ uint4 smemRaw[];
  __half* qs = reinterpret_cast<__half*>(smemRaw);                 // (16, LDH) q / amax
  __half* tiles = qs + 16 * LDH;                                   // per warp: K (16, LDH), V (16, LDH)
  float* qscale = reinterpret_cast<float*>(tiles + kWARPS * 2 * kSUB * LDH);  // (16,)
  int* qpos = reinterpret_cast<int*>(qscale + 16);                            // (16,) row positions
  uint32_t* ktab = reinterpret_cast<uint32_t*>(qpos + 16);
  uint32_t* vtab = TC::kShare ? ktab : ktab + TC::kK;

  // Plain decode: one row tile, Tq = 1 as compile-time constants (the indexing folds away).
  const int nRT = kGeneral ? rowTiles(a) : 1;
  const int split = blockIdx.x, h = blockIdx.y / nRT, r0 = (blockIdx.y % nRT) * 16, b = blockIdx.z;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int G = a.q_heads / a.kv_heads, Tq = kGeneral ? qTokens(a) : 1, rows = G * Tq;
  const int len = a.lens[b];
  const int wl = a.win_k ? (a.win_lens ? a.win_lens[b] : a.win_max) : 0;
  const int total = len + wl;
  const int chunk = ceilDiv(ceilDiv(a.max_len + a.win_max, a.num_splits), kBLOCK_TOKENS) * kBLOCK_TOKENS;
  const int tBegin = split * chunk;
  int kLo = 0, kHi = total;
  if constexpr (kGeneral) visibleKeys(a, G, r0, total, kLo, kHi);
  const int tLo = max(tBegin, kLo), tEnd = min(min(total, tBegin + chunk), kHi);
  const int nParts = a.num_splits * kWARPS;
  float* part = a.workspace + (size_t)a.batch * a.q_heads * Tq * D;
  auto partAt = [&](int r, int w) {  // tile row r = (query token, head)
    const int R = r0 + r;
    return part + ((((size_t)b * a.q_heads + h * G + R % G) * Tq + R / G) * nParts + split * kWARPS + w) * (D + 4);
  };
  if (tLo >= tEnd) {  // empty split: l = 0 tells the combine to skip it
    for (int u = tid; u < 16 * kWARPS; u += blockDim.x) {
      if (r0 + u / kWARPS >= rows) continue;
      float* p = partAt(u / kWARPS, u % kWARPS);
      p[D] = -INFINITY;
      p[D + 1] = 0.f;
    }
    return;
  }

  // q of the tile's rows (rows past G·Tq zero), scaled by 1 / max|q| into fp16; the scale goes
  // to the scores.
  const float sl2 = a.scale * kLOG2E;
  for (int r = warp; r < 16; r += kWARPS) {
    const int R = r0 + r;
    const bool valid = R < rows;
    const float* qw = a.workspace + (((size_t)b * a.q_heads + h * G + (valid ? R % G : 0)) * Tq + R / G) * D;
    float mx = 0.f;
    if (valid)
      for (int i = lane; i < D; i += 32) mx = fmaxf(mx, fabsf(qw[i]));
    mx = warpMax(mx);
    const float inv = mx > 0.f ? 1.f / mx : 0.f;
    for (int i = lane; i < D; i += 32) qs[r * LDH + i] = __float2half_rn(valid ? qw[i] * inv : 0.f);
    if (lane == 0) {
      qscale[r] = mx * sl2;
      if constexpr (kGeneral) qpos[r] = total - Tq + R / G;  // padding rows: past the end, see everything
    }
  }
  KR::prepare(a, ktab);
  if constexpr (!TC::kShare) VR::prepare(a, vtab);
  __syncthreads();

  const int gr = lane >> 2;  // MMA fragment row (and gr + 8)
  const float sc0 = qscale[gr], sc1 = qscale[gr + 8];
  __half* kt = tiles + warp * 2 * kSUB * LDH;
  __half* vt = kt + kSUB * LDH;
  float o[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;
  // kGeneral only: positions of the tile's first and last valid rows, the cap (log2 domain).
  const int pFirst = total - Tq + r0 / G, pLast = total - Tq + (min(rows, r0 + 16) - 1) / G;
  const float capL2 = a.softcap * kLOG2E, invCapL2 = capL2 > 0.f ? 1.f / capL2 : 0.f;

  // Subtiles stay on the 16-token grid of the split; those before the first visible key are skipped.
  const int tFirst = kGeneral ? tBegin + (tLo - tBegin) / kSUB * kSUB : tBegin;
  for (int t0 = tFirst + warp * kSUB; t0 < tEnd; t0 += kBLOCK_TOKENS) {
    const int n = min(kSUB, tEnd - t0);
    const int np = max(0, min(n, len - t0));  // packed rows of this subtile, then window rows
    __syncwarp();
    if (np > 0) {
      KR::load(a, a.k, b, h, len, t0, np, kt, ktab, lane);
      VR::load(a, a.v, b, h, len, t0, np, vt, vtab, lane);
    }
    if (np < n) {
      const int w0 = max(0, t0 - len);
      loadWindowWarp<D>(a, a.win_k, b, h, w0, n - np, kt + np * LDH, KR::kRotated, lane);
      loadWindowWarp<D>(a, a.win_v, b, h, w0, n - np, vt + np * LDH, KR::kRotated, lane);
    }
    if (n < kSUB) {  // rows past the range: finite zeros (p = 0 must not meet NaN)
      for (int u = lane; u < (kSUB - n) * (D / 8); u += 32) {
        const int r = n + u / (D / 8), c = u % (D / 8);
        reinterpret_cast<uint4*>(kt + r * LDH)[c] = make_uint4(0, 0, 0, 0);
        reinterpret_cast<uint4*>(vt + r * LDH)[c] = make_uint4(0, 0, 0, 0);
      }
    }
    __syncwarp();

    // S (16 heads x 16 tokens) = Q Kᵀ: two n-tiles of 8 tokens.
    float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
    {
      const int mi = lane >> 3;
      const __half* qa = qs + ((lane & 7) + (mi & 1) * 8) * LDH + (mi >> 1) * 8;
      const __half* kb = kt + ((lane & 7) + (mi >> 1) * 8) * LDH + (mi & 1) * 8;
#pragma unroll
      for (int k0 = 0; k0 < D; k0 += 16) {
        uint32_t af[4], bf[4];
        ldsm4(af, qa + k0);
        ldsm4(bf, kb + k0);
        mma16816(s[0], af, bf[0], bf[1]);
        mma16816(s[1], af, bf[2], bf[3]);
      }
    }
    // Online softmax (log2 domain) and O += P V.
    if constexpr (kGeneral) {
      // Warp-uniform: keys t0..t0+n-1 visible to every row of the tile (first row at pFirst,
      // last at pLast) -> no per-score mask.  Else kvxScore's mask per score, the row
      // positions re-read from shared memory (not held in registers across the loop).  The
      // mask stays written out here: as a softmaxPV score functor ptxas allocates the general
      // kernels differently (kivi:bits=2, polar, ternary at D = 128: more spills).
      const bool full = t0 + n - 1 <= pFirst && (a.sliding_window <= 0 || t0 > pLast - a.sliding_window);
      const int qd = lane & 3;
      float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int tok = 8 * j + 2 * qd + (e & 1);
          float v = s[j][e] * (e < 2 ? sc0 : sc1);
          if (capL2 > 0.f) v = kvxCap(v, capL2, invCapL2);
          if (tok >= n) v = -INFINITY;
          else if (!full) {
            const int p = qpos[e < 2 ? gr : gr + 8], j0 = t0 + tok;
            if (j0 > p || (a.sliding_window > 0 && j0 <= p - a.sliding_window)) v = -INFINITY;
          }
          s[j][e] = v;
          if (e < 2) mx0 = fmaxf(mx0, v); else mx1 = fmaxf(mx1, v);
        }
      softmaxPVMax<D, false>(s, mx0, mx1, m0, m1, l0, l1, o, vt, lane);
    } else {
      softmaxPV<D, true>(s, [&](float raw, int tok, bool hi) { return tok < n ? raw * (hi ? sc1 : sc0) : -INFINITY; },
                         m0, m1, l0, l1, o, vt, lane);
    }
  }
  writePartial<D>(r0 + gr < rows ? partAt(gr, warp) : nullptr, r0 + gr + 8 < rows ? partAt(gr + 8, warp) : nullptr, o,
                  m0, m1, l0, l1, lane);
}

// Merge the partials (splits × warps) of one (b, q head, query token) and rotate back
// (out = acc Π).  Grid (B, Hq, Tq), block D.
template <int D>
__global__ void kvxCombine(const KvxDecodeArgs a, bool rotated) {
  __shared__ float accs[D];
  const int b = blockIdx.x, hq = blockIdx.y, t = blockIdx.z, i = threadIdx.x, Tq = gridDim.z;
  const int nParts = a.num_splits * kWARPS;
  const float* part = a.workspace + (size_t)a.batch * a.q_heads * Tq * D +
                      (((size_t)b * a.q_heads + hq) * Tq + t) * nParts * (D + 4);
  float m = -INFINITY;
  for (int s = 0; s < nParts; ++s) {
    const float* p = part + s * (D + 4);
    if (p[D + 1] > 0.f) m = fmaxf(m, p[D]);
  }
  float l = 0.f, acc = 0.f;
  for (int s = 0; s < nParts; ++s) {
    const float* p = part + s * (D + 4);
    if (p[D + 1] > 0.f) {
      const float w = exp2f(p[D] - m);
      l = fmaf(p[D + 1], w, l);
      acc = fmaf(p[i], w, acc);
    }
  }
  accs[i] = l > 0.f ? acc / l : 0.f;  // no token: zeros, like the reference softmax
  __syncthreads();
  float r = accs[i];
  if (rotated) {
    r = 0.f;
#pragma unroll 8
    for (int j = 0; j < D; ++j) r = fmaf(accs[j], a.consts[0][j * D + i], r);
  }
  storeAct(a.out, b * a.o_sB + hq * a.o_sH + t * a.o_sT + i, a.q_dtype, r);
}

template <class KR, class VR, int D>
size_t decodeSmemBytes() {
  constexpr int LDH = TileCfg<D>::kLDH;
  using TC = TabCfg<KR, VR>;
  return (size_t)(16 * LDH + kWARPS * 2 * kSUB * LDH) * sizeof(__half) + 16 * sizeof(float) + 16 * sizeof(int) +
         (size_t)(TC::kK + TC::kV) * sizeof(uint32_t);
}

template <class KR, class VR, int D>
cudaError_t launchDecode(const KvxDecodeArgs& a, cudaStream_t stream) {
  const size_t smem = decodeSmemBytes<KR, VR, D>();
  const bool general = qTokens(a) > 1 || a.sliding_window > 0 || a.softcap > 0.f;
  auto kern = general ? kvxDecodeSplit<KR, VR, D, true> : kvxDecodeSplit<KR, VR, D, false>;
  cudaError_t e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  if (e != cudaSuccess) return e;
  const int Tq = qTokens(a);
  kvxQPrologue<D><<<dim3(a.batch, a.q_heads, Tq), D, 0, stream>>>(a, KR::kRotated);
  kern<<<dim3(a.num_splits, a.kv_heads * rowTiles(a), a.batch), kTHREADS, smem, stream>>>(a);
  kvxCombine<D><<<dim3(a.batch, a.q_heads, Tq), D, 0, stream>>>(a, KR::kRotated);
  return cudaGetLastError();
}

// Checks shared by every launcher (the GQA ratio is checked by each: its limit may differ).
inline cudaError_t checkCommonArgs(const KvxDecodeArgs& a, const char* codec) {
  if (a.num_splits < 1 || a.batch < 1) { setError("%s: bad num_splits/batch", codec); return cudaErrorInvalidValue; }
  if (!(a.softcap >= 0.f) || !std::isfinite(a.softcap)) {
    setError("%s: softcap must be a finite number >= 0 (0 = off), got %g", codec, (double)a.softcap);
    return cudaErrorInvalidValue;
  }
  if (a.sliding_window < 0) {
    setError("%s: sliding_window must be >= 0 (0 = off), got %d", codec, a.sliding_window);
    return cudaErrorInvalidValue;
  }
  if (a.q_tokens > 65535 || (size_t)a.kv_heads * rowTiles(a) > 65535) {
    setError("%s: q_tokens %d too large (kv heads × ceil(G·q_tokens / 16) must be <= 65535)", codec, a.q_tokens);
    return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}

// Dispatch on head_dim.  Returns cudaErrorInvalidValue (with a message) for unsupported shapes.
template <template <int> class KRT, template <int> class VRT>
cudaError_t dispatchDecode(const KvxDecodeArgs& a, cudaStream_t s, const char* codec) {
  if (a.kv_heads <= 0 || a.q_heads % a.kv_heads) {
    setError("%s: q heads (%d) must be a multiple of kv heads (%d)", codec, a.q_heads, a.kv_heads);
    return cudaErrorInvalidValue;
  }
  const int G = a.q_heads / a.kv_heads;
  if (G > 16) { setError("%s: GQA ratio %d > 16 not supported", codec, G); return cudaErrorInvalidValue; }
  if (cudaError_t e = checkCommonArgs(a, codec)) return e;
  switch (a.head_dim) {
    case 64: return launchDecode<KRT<64>, VRT<64>, 64>(a, s);
    case 128: return launchDecode<KRT<128>, VRT<128>, 128>(a, s);
    case 256: return launchDecode<KRT<256>, VRT<256>, 256>(a, s);
  }
  setError("%s: head_dim %d not supported (64, 128, 256)", codec, a.head_dim);
  return cudaErrorInvalidValue;
}

}  // namespace kvx

#endif  // KVX_DECODE_ATTENTION_CUH
