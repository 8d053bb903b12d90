// Decode attention v2: packed tiles stream into shared memory through a cp.async pipeline
// and are dequantized in registers straight into tensor-core fragments (no fp16 tile).
//
// Same grid and partial layout as kvxDecodeSplit (decode_attention.cuh), splits capped at one
// wave of v2's occupancy, merged by kvxCombineV2 (v1's combine arithmetic, overlapped loads);
// plain decode only (q_tokens = 1, no fp16 window, no soft cap, no sliding window, D 64 / 128):
// every other call goes to v1 (dispatchDecodeV2).  docs/KERNELS.md "Decode v2" has the numbers.  Per block (split, kv head, batch) 4 warps work on
// 16-token subtiles as in v1; each warp keeps kSTAGES - 1 of its subtiles' PACKED bytes in
// flight (cp.async groups into a warp-private ring of stage buffers), so loads overlap the
// dequantize / MMA of the current subtile instead of load-wait-dequantize.
//
// Fragments without a tile.  mma m16n8k16: the B operand of S = Q Kᵀ holds, per thread
// (gr = lane / 4, qd = lane % 4), key gr of the n-tile at k positions 2qd, 2qd+1 (b0) and
// 2qd+8, 2qd+9 (b1) of every 16-wide chunk.  A dot product does not care about the order of its
// dims, so a reader may give thread qd any D/4 dims of the key as long as q is laid out in
// shared memory by the same permutation (R::qDim): the rotated codebook reader gives it the
// contiguous dims [qd·D/4, (qd+1)·D/4), i.e. one contiguous run of packed bits.  Likewise the
// B operand of O += P V holds tokens 2qd, 2qd+1 (b0), 2qd+8, 2qd+9 (b1) of output column gr of
// each 8-wide n-tile: the reader gives thread gr the contiguous dims [gr·D/8, (gr+1)·D/8) and
// the partial is written back through R::vDim.  Per-token factors (the rotated codecs' norms)
// never touch the dims: keys scale the score (R::keyScale), values scale P (R::valScale).
//
// A v2 reader R (one role or both) provides:
//   kRotated, kTabWords, prepare(a, tab)        as v1 (table shared by K and V when same type)
//   kStageBytes                                 shared memory of one 16-token subtile
//   stage(f, b, h, t0, n, st, lane)             issue cp.async of tokens t0..t0+n-1 (one warp);
//                                               what a later read needs finite past n is zeroed
//   keys:   kQIdentity, qDim(p), KRegs, keyLoad(st, lane, kr), keyFrag(kr, st, tab, lane, c, bf[4]),
//           kKeyScaled, keyScale(st, lane, ks[2][2])   (ks[j][x]: token 8j + 2qd + x)
//   values: kVIdentity, vDim(i, col), VRegs, valLoad(st, lane, vr), valFrag(vr, st, tab, lane, i, bf[4])
//           (n-tiles i, i + 1), kValScaled, valScale(st, lane, vs[2][2])
#ifndef KVX_DECODE_V2_CUH
#define KVX_DECODE_V2_CUH

#include "decode_attention.cuh"

namespace kvx {
namespace v2 {

constexpr int kSTAGES = 3;               // stage buffers per warp (kSTAGES - 1 subtiles in flight)
constexpr int kSMEM_PER_SM = 227 * 1024; // H100 / H200 / A100-class usable shared memory per SM

__device__ __forceinline__ void cpAsync16(void* dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smemAddr(dst)), "l"(src));
}
__device__ __forceinline__ void cpAsync4(void* dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(smemAddr(dst)), "l"(src));
}
__device__ __forceinline__ void cpCommit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cpWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) { return __byte_perm(a, b, sel); }

// Shared-memory row stride of RB-byte packed rows: +16 bytes when RB is a multiple of 32, so the
// value reads of rows 2qd (qd = 0..3) fall on different banks.
template <int RB>
constexpr int rowStride() {
  return RB % 32 == 0 ? RB + 16 : RB;
}

// One warp: cp.async of the packed rows t0..t0+n-1 (RB bytes each, RB % 4 == 0) of field f into
// dst (row stride RBP): 16-byte copies when source rows and strides allow, else 4-byte copies,
// else plain loads (a misaligned caller layout; correct, not pipelined).
template <int RB, int RBP>
__device__ __forceinline__ void stageRows(const KvxField& f, int b, int h, int t0, int n, uint8_t* dst, int lane) {
  static_assert(RB % 4 == 0 && RBP % 4 == 0, "packed rows of whole words");
  const char* g = fieldPtr<const char>(f, b, h, t0);
  const uintptr_t al = reinterpret_cast<uintptr_t>(g) | static_cast<uintptr_t>(f.sT);
  if constexpr (RB % 16 == 0 && RBP % 16 == 0) {
    if ((al & 15) == 0) {
      constexpr int C = RB / 16;
      for (int u = lane; u < n * C; u += 32) {
        const int r = u / C, c = u % C;
        cpAsync16(dst + r * RBP + 16 * c, g + (int64_t)r * f.sT + 16 * c);
      }
      return;
    }
  }
  constexpr int C = RB / 4;
  if ((al & 3) == 0) {
    for (int u = lane; u < n * C; u += 32) {
      const int r = u / C, c = u % C;
      cpAsync4(dst + r * RBP + 4 * c, g + (int64_t)r * f.sT + 4 * c);
    }
  } else {
    for (int u = lane; u < n * RB; u += 32) {
      const int r = u / RB, c = u % RB;
      dst[r * RBP + c] = __ldg(reinterpret_cast<const uint8_t*>(g) + (int64_t)r * f.sT + c);
    }
  }
}

// One warp: 16 fp16 per-token scalars (field f, tokens t0..t0+n-1) into dst[0..15], zeros past n.
__device__ __forceinline__ void stageHalves(const KvxField& f, int b, int h, int t0, int n, __half* dst, int lane) {
  const __half* g = fieldPtr<const __half>(f, b, h, t0);
  if (n == kSUB && f.sT == 2 && (reinterpret_cast<uintptr_t>(g) & 3) == 0) {
    if (lane < kSUB / 2) cpAsync4(dst + 2 * lane, g + 2 * lane);
  } else if (lane < kSUB) {
    dst[lane] = lane < n ? __ldg(fieldPtr<const __half>(f, b, h, t0 + lane)) : __float2half(0.f);
  }
}

// NW words of packed bits starting at bit sb of a shared-memory row (row 4-byte aligned):
// the widest aligned loads the compile-time width WB (bits per thread) allows, a funnel shift
// when sb is not word aligned.
template <int NW, int WB, int RBP>
__device__ __forceinline__ void rowBits(const uint8_t* row, int sb, uint32_t (&w)[NW]) {
  const uint32_t* r32 = reinterpret_cast<const uint32_t*>(row) + (sb >> 5);
  if constexpr (WB % 32 == 0) {
    if constexpr (WB % 128 == 0 && RBP % 16 == 0) {
#pragma unroll
      for (int i = 0; i < NW / 4; ++i) {
        const uint4 v = reinterpret_cast<const uint4*>(r32)[i];
        w[4 * i] = v.x; w[4 * i + 1] = v.y; w[4 * i + 2] = v.z; w[4 * i + 3] = v.w;
      }
    } else if constexpr (WB % 64 == 0 && RBP % 8 == 0) {
#pragma unroll
      for (int i = 0; i < NW / 2; ++i) {
        const uint2 v = reinterpret_cast<const uint2*>(r32)[i];
        w[2 * i] = v.x; w[2 * i + 1] = v.y;
      }
    } else {
#pragma unroll
      for (int i = 0; i < NW; ++i) w[i] = r32[i];
    }
  } else {
    const int off = sb & 31;
    uint32_t lo = r32[0];
#pragma unroll
    for (int i = 0; i < NW; ++i) {
      const uint32_t hi = r32[i + 1];  // may read past the row: bits past WB are never used
      w[i] = __funnelshift_r(lo, hi, off);
      lo = hi;
    }
  }
}

// fp16 cache: the staged rows are the fp16 tile itself (v1 layout, row stride D + 8 halves), read
// by ldmatrix exactly as v1; v2 only adds the pipeline.
template <int D>
struct Fp16V2 {
  static constexpr bool kRotated = false;
  static constexpr int kTabWords = 0;
  static constexpr int kLDH = D + 8;
  static constexpr int kStageBytes = kSUB * kLDH * 2;
  static constexpr bool kQIdentity = true, kVIdentity = true, kKeyScaled = false, kValScaled = false;
  struct KRegs {};
  struct VRegs {};
  __device__ static void prepare(const KvxDecodeArgs&, uint32_t*) {}
  __device__ static void stage(const KvxField* f, int b, int h, int t0, int n, uint8_t* st, int lane) {
    stageRows<2 * D, 2 * kLDH>(f[0], b, h, t0, n, st, lane);
    // Rows past n: finite zeros (p = 0 must not meet NaN in P V).
    for (int u = lane; u < (kSUB - n) * (D / 8); u += 32)
      reinterpret_cast<uint4*>(st + (n + u / (D / 8)) * 2 * kLDH)[u % (D / 8)] = make_uint4(0, 0, 0, 0);
  }
  __device__ static int qDim(int p) { return p; }
  __device__ static int vDim(int i, int col) { return 8 * i + col; }
  __device__ static void keyLoad(const uint8_t*, int, KRegs&) {}
  __device__ static void keyFrag(const KRegs&, const uint8_t* st, const uint32_t*, int lane, int c, uint32_t (&bf)[4]) {
    const int mi = lane >> 3;
    ldsm4(bf, reinterpret_cast<const __half*>(st) + ((lane & 7) + (mi >> 1) * 8) * kLDH + (mi & 1) * 8 + 16 * c);
  }
  __device__ static void keyScale(const uint8_t*, int, float (&)[2][2]) {}
  __device__ static void valLoad(const uint8_t*, int, VRegs&) {}
  __device__ static void valFrag(const VRegs&, const uint8_t* st, const uint32_t*, int lane, int i, uint32_t (&bf)[4]) {
    const int mi = lane >> 3;
    ldsm4t(bf, reinterpret_cast<const __half*>(st) + ((lane & 7) + (mi & 1) * 8) * kLDH + (mi >> 1) * 8 + 8 * i);
  }
  __device__ static void valScale(const uint8_t*, int, float (&)[2][2]) {}
};

template <class KR, class VR, int D>
struct Cfg {
  static constexpr int kLDH = D + 8;
  static constexpr bool kShare = std::is_same<KR, VR>::value;
  static constexpr int kQBytes = 16 * kLDH * 2 + 16 * 4;  // q tile, then 16 fp32 row scales
  static constexpr int kKTab = (KR::kTabWords * 4 + 15) / 16 * 16;
  static constexpr int kVTab = kShare ? 0 : (VR::kTabWords * 4 + 15) / 16 * 16;
  static constexpr int kKStage = (KR::kStageBytes + 15) / 16 * 16;
  static constexpr int kStage = kKStage + (VR::kStageBytes + 15) / 16 * 16;
  static constexpr int kSmem = kQBytes + kKTab + kVTab + kSTAGES * kWARPS * kStage;
  // Blocks per SM that shared memory allows (1 KB reserved per block), the register budget's bound.
  static constexpr int kFit = kSMEM_PER_SM / (kSmem + 1024);
  // At D = 128 at most 3 (168 registers: o, q fragments and the packed words fit without spills).
  static constexpr int kCap = D <= 64 ? 4 : 3;
  static constexpr int kMinBlocks = kFit < 1 ? 1 : (kFit > kCap ? kCap : kFit);
  static constexpr bool kQReg = D <= 128;  // q's A fragments live in registers
};

template <class KR, class VR, int D>
__global__ void __launch_bounds__(kTHREADS, (Cfg<KR, VR, D>::kMinBlocks)) kvxDecodeSplitV2(const KvxDecodeArgs a) {
  static_assert(KR::kRotated == VR::kRotated, "keys and values share the score domain");
  using C = Cfg<KR, VR, D>;
  constexpr int LDH = C::kLDH;
  extern __shared__ uint4 smemRaw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>(smemRaw);
  __half* qs = reinterpret_cast<__half*>(smem);  // (16, LDH) q / max|q|, dims in KR::qDim order; (16,) scales
  uint32_t* ktab = reinterpret_cast<uint32_t*>(smem + C::kQBytes);
  uint32_t* vtab = C::kShare ? ktab : reinterpret_cast<uint32_t*>(smem + C::kQBytes + C::kKTab);
  uint8_t* wst = smem + C::kQBytes + C::kKTab + C::kVTab;

  const int split = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int G = a.q_heads / a.kv_heads;
  const int len = a.lens[b];
  const int chunk = ceilDiv(ceilDiv(a.max_len, a.num_splits), kBLOCK_TOKENS) * kBLOCK_TOKENS;
  const int tBegin = split * chunk, tEnd = min(len, tBegin + chunk);
  const int nParts = a.num_splits * kWARPS;
  float* part = a.workspace + (size_t)a.batch * a.q_heads * D;
  auto partAt = [&](int g, int w) {
    return part + (((size_t)b * a.q_heads + h * G + g) * nParts + split * kWARPS + w) * (D + 4);
  };
  if (tBegin >= tEnd) {  // empty split: l = 0 tells the combine to skip it
    for (int u = tid; u < G * kWARPS; u += blockDim.x) {
      float* p = partAt(u / kWARPS, u % kWARPS);
      p[D] = -INFINITY;
      p[D + 1] = 0.f;
    }
    return;
  }
  wst += warp * kSTAGES * C::kStage;
  const int first = tBegin + warp * kSUB;
  const int nIt = first < tEnd ? ceilDiv(tEnd - first, kBLOCK_TOKENS) : 0;
  auto issue = [&](int i) {  // subtile i of this warp -> stage buffer i % kSTAGES (one cp.async group)
    if (i < nIt) {
      const int t0 = first + i * kBLOCK_TOKENS, n = min(kSUB, tEnd - t0);
      uint8_t* st = wst + (i % kSTAGES) * C::kStage;
      KR::stage(a.k, b, h, t0, n, st, lane);
      VR::stage(a.v, b, h, t0, n, st + C::kKStage, lane);
    }
    cpCommit();
  };
  // The first subtiles' loads go out before the q / table set-up.
#pragma unroll
  for (int i = 0; i < kSTAGES - 1; ++i) issue(i);

  const float sl2 = a.scale * kLOG2E;
  for (int r = warp; r < 16; r += kWARPS) {
    const bool valid = r < G;
    const float* qw = a.workspace + ((size_t)b * a.q_heads + h * G + (valid ? r : 0)) * D;
    float mx = 0.f;
    if (valid)
      for (int i = lane; i < D; i += 32) mx = fmaxf(mx, fabsf(qw[i]));
    mx = warpMax(mx);
    const float inv = mx > 0.f ? 1.f / mx : 0.f;
    for (int p = lane; p < D; p += 32) qs[r * LDH + p] = __float2half_rn(valid ? qw[KR::qDim(p)] * inv : 0.f);
    if (lane == 0) reinterpret_cast<float*>(qs + 16 * LDH)[r] = mx * sl2;  // the scale goes to the scores
  }
  KR::prepare(a, ktab);
  if constexpr (!C::kShare) VR::prepare(a, vtab);
  __syncthreads();
  const int gr = lane >> 2, qd = lane & 3;
  const int mi = lane >> 3;
  const __half* qa = qs + ((lane & 7) + (mi & 1) * 8) * LDH + (mi >> 1) * 8;
  const float* qsc = reinterpret_cast<const float*>(qs + 16 * LDH);
  const float sc0 = qsc[gr], sc1 = qsc[gr + 8];
  uint32_t qf[C::kQReg ? D / 16 : 1][4];
  if constexpr (C::kQReg) {
#pragma unroll
    for (int c = 0; c < D / 16; ++c) ldsm4(qf[c], qa + 16 * c);
  }

  float o[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;

  for (int i = 0; i < nIt; ++i) {
    __syncwarp();  // every lane is done with the buffer issue() refills next
    issue(i + kSTAGES - 1);
    cpWait<kSTAGES - 1>();
    __syncwarp();
    const uint8_t* st = wst + (i % kSTAGES) * C::kStage;
    const uint8_t* sv = st + C::kKStage;
    const int n = min(kSUB, tEnd - (first + i * kBLOCK_TOKENS));

    // S (16 heads x 16 tokens) = Q Kᵀ, B fragments straight from the packed bytes.
    // kCH independent accumulator chains (chunk c -> chain c % kCH): the D/16 dependent MMAs
    // of one chain are the subtile's critical path.  fp16 keeps v1's single chain (same bits).
    constexpr int kCH = KR::kQIdentity ? 1 : 2;
    float sc[kCH][2][4];
#pragma unroll
    for (int x = 0; x < kCH; ++x)
#pragma unroll
      for (int e = 0; e < 4; ++e) sc[x][0][e] = sc[x][1][e] = 0.f;
    {
      typename KR::KRegs kr;
      KR::keyLoad(st, lane, kr);
#pragma unroll
      for (int c = 0; c < D / 16; ++c) {
        uint32_t bf[4];
        KR::keyFrag(kr, st, ktab, lane, c, bf);
        float (&acc)[2][4] = sc[c % kCH];
        if constexpr (C::kQReg) {
          mma16816(acc[0], qf[c], bf[0], bf[1]);
          mma16816(acc[1], qf[c], bf[2], bf[3]);
        } else {
          uint32_t af[4];
          ldsm4(af, qa + 16 * c);
          mma16816(acc[0], af, bf[0], bf[1]);
          mma16816(acc[1], af, bf[2], bf[3]);
        }
      }
    }
    float s[2][4];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      s[0][e] = sc[0][0][e];
      s[1][e] = sc[0][1][e];
#pragma unroll
      for (int x = 1; x < kCH; ++x) { s[0][e] += sc[x][0][e]; s[1][e] += sc[x][1][e]; }
    }
    float ks[2][2] = {{1.f, 1.f}, {1.f, 1.f}};
    if constexpr (KR::kKeyScaled) KR::keyScale(st, lane, ks);
    float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int tok = 8 * j + 2 * qd + (e & 1);
        const float v = tok < n ? s[j][e] * (e < 2 ? sc0 : sc1) * ks[j][e & 1] : -INFINITY;
        s[j][e] = v;
        if (e < 2) mx0 = fmaxf(mx0, v); else mx1 = fmaxf(mx1, v);
      }
#pragma unroll
    for (int off = 1; off <= 2; off <<= 1) {
      mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, off));
      mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, off));
    }
    float n0, n1, c0, c1, p[2][4];
    softmaxStep<true>(s, mx0, mx1, m0, m1, n0, n1, c0, c1, p);  // every row has a finite score (n >= 1)
    l0 = l0 * c0 + (p[0][0] + p[0][1] + p[1][0] + p[1][1]);
    l1 = l1 * c1 + (p[0][2] + p[0][3] + p[1][2] + p[1][3]);
    float vs[2][2] = {{1.f, 1.f}, {1.f, 1.f}};
    if constexpr (VR::kValScaled) VR::valScale(sv, lane, vs);
    const uint32_t pa[4] = {packHalf2(p[0][0] * vs[0][0], p[0][1] * vs[0][1]),
                            packHalf2(p[0][2] * vs[0][0], p[0][3] * vs[0][1]),
                            packHalf2(p[1][0] * vs[1][0], p[1][1] * vs[1][1]),
                            packHalf2(p[1][2] * vs[1][0], p[1][3] * vs[1][1])};
    typename VR::VRegs vr;
    VR::valLoad(sv, lane, vr);
    // Rescale O only when some row's maximum moved (c = 1 exactly otherwise: skipping is exact).
    if (__any_sync(0xffffffffu, c0 != 1.f || c1 != 1.f)) {
#pragma unroll
      for (int d = 0; d < D / 8; ++d) { o[d][0] *= c0; o[d][1] *= c0; o[d][2] *= c1; o[d][3] *= c1; }
    }
#pragma unroll
    for (int d = 0; d < D / 8; d += 2) {
      uint32_t bf[4];
      VR::valFrag(vr, sv, vtab, lane, d, bf);
      mma16816(o[d], pa, bf[0], bf[1]);
      mma16816(o[d + 1], pa, bf[2], bf[3]);
    }
  }
  cpWait<0>();

  // The warp's partial (acc in true dim order through VR::vDim, m, l) of rows gr, gr + 8.
  l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
  l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = gr + 8 * half;
    if (r >= G) continue;
    float* pr = partAt(r, warp);
#pragma unroll
    for (int d = 0; d < D / 8; ++d) {
      if constexpr (VR::kVIdentity) {
        *reinterpret_cast<float2*>(pr + 8 * d + 2 * qd) = make_float2(o[d][2 * half], o[d][2 * half + 1]);
      } else {
        pr[VR::vDim(d, 2 * qd)] = o[d][2 * half];
        pr[VR::vDim(d, 2 * qd + 1)] = o[d][2 * half + 1];
      }
    }
    if (qd == 0) {
      pr[D] = half ? m1 : m0;
      pr[D + 1] = half ? l1 : l0;
    }
  }
}

// Blocks per SM of one v2 instantiation on the current device and the SM count (host).
// Merge the partials (splits × warps) of one (b, q head) and rotate back, as kvxCombine with the
// same arithmetic in the same order (bit-identical), but latency-tolerant: the maxima in parallel
// over the block, the weights once into shared memory, then a branch-free weighted sum whose
// loads do not wait on each other (kvxCombine's per-partial branch serialises ~2·splits·4 L2
// round trips: tens of µs at B = 1).  Grid (B, Hq), block D, dynamic smem nParts floats.
template <int D>
__global__ void __launch_bounds__(D) kvxCombineV2(const KvxDecodeArgs a, bool rotated) {
  extern __shared__ float wts[];
  __shared__ float accs[D];
  __shared__ float red[32];
  const int b = blockIdx.x, hq = blockIdx.y, i = threadIdx.x;
  const int nParts = a.num_splits * kWARPS;
  const float* part = a.workspace + (size_t)a.batch * a.q_heads * D + ((size_t)b * a.q_heads + hq) * nParts * (D + 4);
  float m = -INFINITY;
  for (int s = i; s < nParts; s += D) {
    const float* p = part + s * (D + 4);
    if (p[D + 1] > 0.f) m = fmaxf(m, p[D]);
  }
  m = blockMax(m, red);
  for (int s = i; s < nParts; s += D) {
    const float* p = part + s * (D + 4);
    wts[s] = p[D + 1] > 0.f ? exp2f(p[D] - m) : 0.f;  // 0: skipped (its acc may be unwritten)
  }
  __syncthreads();
  float l = 0.f, acc = 0.f;
#pragma unroll 8
  for (int s = 0; s < nParts; ++s) {
    const float w = wts[s], ls = part[s * (D + 4) + D + 1], v = part[s * (D + 4) + i];
    l = w > 0.f ? fmaf(ls, w, l) : l;
    acc = w > 0.f ? fmaf(v, w, acc) : acc;
  }
  accs[i] = l > 0.f ? acc / l : 0.f;
  __syncthreads();
  float r = accs[i];
  if (rotated) {
    r = 0.f;
#pragma unroll 8
    for (int j = 0; j < D; ++j) r = fmaf(accs[j], a.consts[0][j * D + i], r);
  }
  storeAct(a.out, b * a.o_sB + hq * a.o_sH + i, a.q_dtype, r);
}

// perSm = 0: the kernel's shared memory does not fit this device (sm_86 / sm_89: 99 KB per block).
template <class KR, class VR, int D>
cudaError_t occupancy(int& perSm, int& sms) {
  using C = Cfg<KR, VR, D>;
  auto kern = kvxDecodeSplitV2<KR, VR, D>;
  int dev = 0, optin = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (e != cudaSuccess) return e;
  perSm = 0;
  if (C::kSmem > optin) return cudaSuccess;
  if ((e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmem)) != cudaSuccess) return e;
  return cudaOccupancyMaxActiveBlocksPerMultiprocessor(&perSm, kern, kTHREADS, C::kSmem);
}

// Launch v2: the caller's num_splits (sized for v1's 4 blocks per SM: the workspace holds that
// many partials) is lowered to one wave of this kernel's occupancy.  cudaErrorNotSupported (no
// message) when the device cannot run it: the dispatch then runs v1.
template <class KR, class VR, int D>
cudaError_t launchDecodeV2(const KvxDecodeArgs& a0, cudaStream_t stream) {
  using C = Cfg<KR, VR, D>;
  int perSm = 0, sms = 0;
  if (cudaError_t e = occupancy<KR, VR, D>(perSm, sms)) return e;
  if (perSm < 1) return cudaErrorNotSupported;
  KvxDecodeArgs a = a0;
  const int rows = a.batch * a.kv_heads;
  const int wave = perSm * sms / (rows > 0 ? rows : 1);
  const int byLen = ceilDiv(a.max_len > 1 ? a.max_len : 1, 8 * kBLOCK_TOKENS);
  const int mine = wave < byLen ? wave : byLen;
  a.num_splits = a.num_splits < mine ? a.num_splits : (mine > 1 ? mine : 1);
  kvxQPrologue<D><<<dim3(a.batch, a.q_heads, 1), D, 0, stream>>>(a, KR::kRotated);
  kvxDecodeSplitV2<KR, VR, D><<<dim3(a.num_splits, a.kv_heads, a.batch), kTHREADS, C::kSmem, stream>>>(a);
  kvxCombineV2<D><<<dim3(a.batch, a.q_heads), D, a.num_splits * kWARPS * sizeof(float), stream>>>(a, KR::kRotated);
  return cudaGetLastError();
}

// v2 where it applies (plain decode, head_dim 64 / 128), else v1 with the v1 readers.
template <template <int> class KRT, template <int> class VRT, template <int> class KRT1, template <int> class VRT1>
cudaError_t dispatchDecodeV2(const KvxDecodeArgs& a, cudaStream_t s, const char* codec) {
  const bool plain = qTokens(a) == 1 && a.softcap == 0.f && a.sliding_window == 0 &&
                     !(a.win_k && a.win_max > 0) && (a.head_dim == 64 || a.head_dim == 128);
  if (!plain) return dispatchDecode<KRT1, VRT1>(a, s, codec);
  if (a.kv_heads <= 0 || a.q_heads % a.kv_heads) {
    setError("%s: q heads (%d) must be a multiple of kv heads (%d)", codec, a.q_heads, a.kv_heads);
    return cudaErrorInvalidValue;
  }
  if (a.q_heads / a.kv_heads > 16) {
    setError("%s: GQA ratio %d > 16 not supported", codec, a.q_heads / a.kv_heads);
    return cudaErrorInvalidValue;
  }
  if (cudaError_t e = checkCommonArgs(a, codec)) return e;
  const cudaError_t e = a.head_dim == 64 ? launchDecodeV2<KRT<64>, VRT<64>, 64>(a, s)
                                         : launchDecodeV2<KRT<128>, VRT<128>, 128>(a, s);
  return e == cudaErrorNotSupported ? dispatchDecode<KRT1, VRT1>(a, s, codec) : e;
}

}  // namespace v2
}  // namespace kvx

#endif  // KVX_DECODE_V2_CUH
