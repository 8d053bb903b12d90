// ternary (KVTQ ternary digit planes, docs/formats/ternary.md): x ≈ Σ_p step_p · t_p,
// t ∈ {−1, 0, +1}, trits packed 5 per byte in base 3 (digit t mod 3, lowest channel least
// significant), one byte row of NB = ⌈D/5⌉ per (token, plane).
// Per-token fields (values; keys with key_axis=token): 0 trits (T, P, NB), 1 steps (T, P, D/group).
// Per-channel keys (key_axis=channel): 0 trits (N·K, P, NB), 1 steps (N, P, D) per (token group,
// plane, channel), 2 residual (K, D) fp16 holding the newest len % K keys (row t % K).
// Args: bits = key planes | value planes << 8; group = key_group K (0: key_axis=token);
// value_group = channels per step group of the per-token layout.
#ifndef KVX_TERNARY_CUH
#define KVX_TERNARY_CUH

#include <type_traits>

#include "../common/decode_attention.cuh"
#include "../common/kvx_common.cuh"
#include "../common/warp_stage.cuh"

namespace kvx {

__host__ __device__ __forceinline__ int ternaryPlanes(int bits, bool key) { return key ? (bits & 0xff) : (bits >> 8) & 0xff; }

// Reader.  Lane unit = (token, 10 channels = one byte pair of a plane row), so every unit
// starts on a byte: units per row kU = ⌈NB/2⌉, and a lane keeps its unit k for the whole
// subtile (32 / kU token slots, rows slot, slot + kSLOTS, ...; 26 of 32 lanes busy at d = 128).
// A 256-entry shared table maps a byte to its 5 trits as PRMT selector bytes (4 | d << 4,
// digit d: 0 → 0, 1 → +1, 2 → −1); per plane and channel pair one PRMT turns two of them into
// the half2 (t_c, t_{c+1}) ∈ {0, ±1}² and one HFMA2 adds step·t: per 10 channels and plane 2
// byte loads, 2 table loads, 4 funnel / byte ops, 5 PRMT, 5 HFMA2 and the steps (per-channel
// keys: 5 half2 loads of the key group's row, L1-resident across its tokens; per token: two
// scalars, the unit's at most two step groups when a group is >= 16 channels, else per pair).
// Planes are summed in fp16 from the last (smallest) to the first: the first product is exact,
// then one rounding per plane on partial sums growing toward |x̂| (the previous reader summed
// in fp32 and rounded once; on real K/V the element error vs the fp32 sum grows ~1.1×).
// Tokens past the last full key group read the fp16 residual (row t − ⌊len/K⌋·K), as kivi's
// reader does.
template <int D, bool KEY>
struct TernaryReader {
  static constexpr bool kRotated = false;
  // Launch bounds asked of the split kernel (decode_attention.cuh MinBlocksOf, where supported):
  // 4 blocks per SM at D <= 128 (see PolarReader::kMinBlocks).
  static constexpr int kMinBlocks = D <= 128 ? 4 : 1;
  static constexpr int kNB = (D + 4) / 5;
  static constexpr int kU = (kNB + 1) / 2;      // 10-channel units per row (last one partial)
  static constexpr int kSLOTS = 32 / kU;        // tokens per warp step
  static constexpr int kLUT = 2 * 256;          // uint2 per byte value (> 242: still 5 digits mod 3)
  // Then per warp a staging area for the trit rows of 16 tokens at <= 4 planes (more: global reads).
  static constexpr int kStagePlanes = 4;
  static constexpr int kStageWords = (16 * kStagePlanes * kNB + 16 + 15) / 16 * 4;
  static constexpr int kTabWords = kLUT + 4 * kStageWords;
  static constexpr uint32_t kHalfBytes = 0x00BC3C00u;  // PRMT source: byte d = high byte of half(t(d))
  static_assert(kU <= 32 && kSLOTS >= 1, "head_dim <= 320");

  __device__ static void prepare(const KvxDecodeArgs&, uint32_t* tab) {
    for (int u = threadIdx.x; u < 256; u += blockDim.x) {
      uint32_t lo = 0, hi = 0;
      int v = u;
#pragma unroll
      for (int k = 0; k < 5; ++k) {
        const uint32_t sel = 4u | uint32_t(v % 3) << 4;  // low nibble 4: byte 0 of the zero operand
        if (k < 4) lo |= sel << (8 * k); else hi = sel;
        v /= 3;
      }
      tab[2 * u] = lo;
      tab[2 * u + 1] = hi;
    }
  }

  // (t_c, t_{c+1}) as half2 bits from two selector bytes in the low 16 bits of x.
  __device__ __forceinline__ static __half2 trits2(uint32_t x) {
    const uint32_t r = __byte_perm(kHalfBytes, 0u, x);
    return *reinterpret_cast<const __half2*>(&r);
  }

  __device__ static void load(const KvxDecodeArgs& a, const KvxField* f, int b, int h, int len, int t0, int n,
                              __half* tile, const uint32_t* tab, int lane) {
    constexpr int LDH = D + 8;
    const int P = ternaryPlanes(a.bits, KEY);
    const int kg = KEY ? a.group : 0;  // > 0: per-channel key steps over kg tokens
    const int full = kg > 0 ? (len / kg) * kg : len;
    const int grp = a.value_group, G = D / grp;
    const int nfull = max(0, min(n, full - t0));  // packed trit rows of this subtile
    const bool staged = P <= kStagePlanes;
    {  // L2 prefetch of the warp's next subtile (kBLOCK_TOKENS on: the split kernel's stride):
       // trit rows, and per-token steps (per-channel key steps are shared by a group's tokens)
      const int t1 = t0 + kBLOCK_TOKENS, n1 = min(16, full - t1);
      warpPrefetchRowsL2(f[0], b, h, t1, n1, P * kNB, lane);
      if (!(KEY && kg > 0)) warpPrefetchRowsL2(f[1], b, h, t1, n1, P * G * 2, lane);
    }
    const uint8_t* stg = reinterpret_cast<const uint8_t*>(tab + kLUT + (threadIdx.x >> 5) * kStageWords);
    if (staged) warpStageRows(f[0], b, h, t0, nfull, P * kNB, const_cast<uint8_t*>(stg), lane);
    const int k = lane % kU, slot = lane / kU;
    if (slot >= kSLOTS) return;  // idle lanes (the caller's __syncwarp follows)
    const int c0 = 10 * k;
    const bool lastOdd = (kNB & 1) && k == kU - 1;  // the row's last byte has no partner
    const uint2* lut = reinterpret_cast<const uint2*>(tab);
    // Per-token steps (values, token keys): step groups of the unit when grp >= 16 (a power of
    // two: grp divides D), the boundary channel between them.
    const int gA = c0 / grp, gB = min((c0 + 9) / grp, G - 1), cb = gB * grp;
    auto rows = [&](auto stagedTag) {
      for (int r = slot; r < n; r += kSLOTS) {
        const int t = t0 + r;
        uint32_t* dst = reinterpret_cast<uint32_t*>(tile + r * LDH + c0);
        if (t >= full) {  // fp16 residual key (per-channel layout only)
          const uint32_t* src = reinterpret_cast<const uint32_t*>(fieldPtr<const __half>(f[2], b, h, t - full) + c0);
#pragma unroll
          for (int j = 0; j < 5; ++j)
            if (c0 + 2 * j < D) dst[j] = __ldg(src + j);
          continue;
        }
        const uint8_t* row;  // shared (staged) or global: separate instantiations keep LDS for the first
        if constexpr (decltype(stagedTag)::value) row = stg + r * P * kNB;
        else row = fieldPtr<const uint8_t>(f[0], b, h, t);
        // Steps: per-channel keys (P, D) of t's key group from channel c0; else per token (P, G).
        const __half* sp = KEY && kg > 0 ? fieldPtr<const __half>(f[1], b, h, t / max(kg, 1)) + c0
                                         : fieldPtr<const __half>(f[1], b, h, t);
        __half2 acc[5];
#pragma unroll
        for (int j = 0; j < 5; ++j) acc[j] = __float2half2_rn(0.f);
#pragma unroll 1
        for (int p = P - 1; p >= 0; --p) {
          const uint8_t* pr = row + p * kNB + 2 * k;
          const uint32_t by0 = pr[0], by1 = lastOdd ? 0u : pr[1];
          const uint2 e0 = lut[by0], e1 = lut[by1];
          __half2 tr[5];
          tr[0] = trits2(e0.x);                                // t0 t1
          tr[1] = trits2(e0.x >> 16);                          // t2 t3
          tr[2] = trits2(__byte_perm(e0.y, e1.x, 0x40));       // t4 t5
          tr[3] = trits2(e1.x >> 8);                           // t6 t7
          tr[4] = trits2(__funnelshift_r(e1.x, e1.y, 24));     // t8 t9
          __half2 st[5];
          if (KEY && kg > 0) {
#pragma unroll
            for (int j = 0; j < 5; ++j)
              st[j] = c0 + 2 * j < D ? __ldg(reinterpret_cast<const __half2*>(sp + p * D) + j) : __float2half2_rn(0.f);
          } else if (grp >= 16) {
            const __half2 sA = __half2half2(__ldg(sp + p * G + gA)), sB = __half2half2(__ldg(sp + p * G + gB));
#pragma unroll
            for (int j = 0; j < 5; ++j) st[j] = c0 + 2 * j < cb ? sA : sB;
          } else {
#pragma unroll
            for (int j = 0; j < 5; ++j) {
              const int c = min(c0 + 2 * j, D - 2);
              st[j] = __halves2half2(__ldg(sp + p * G + c / grp), __ldg(sp + p * G + (c + 1) / grp));
            }
          }
#pragma unroll
          for (int j = 0; j < 5; ++j) acc[j] = __hfma2(st[j], tr[j], acc[j]);
        }
#pragma unroll
        for (int j = 0; j < 5; ++j)
          if (c0 + 2 * j < D) dst[j] = *reinterpret_cast<const uint32_t*>(&acc[j]);
      }
    };
    if (staged) rows(std::true_type{});
    else rows(std::false_type{});
  }
};

template <int D> using TernaryKey = TernaryReader<D, true>;
template <int D> using TernaryValue = TernaryReader<D, false>;

// ---- append: the reference plane fit (ternary.fit_plane), order-free ---------------------
// For element i of a group with a = |r|: k_i = #{a_j > a_i} + #{a_j = a_i, j <= i} is its
// position in the descending sort and S_i = Σ_{a_j > a_i} a_j + a_i·#{a_j = a_i, j <= i} the
// prefix sum there (fp64; exact under the format's span condition, like the sequential sum),
// so the (k, S_k) pairs are the reference's and k* = argmax S_k²/k (ties: smallest k).
__device__ __forceinline__ void ternaryRank(const float* r, int n, int stride, int i, int& k, double& S) {
  const float ai = fabsf(r[i * stride]);
  k = 0;
  S = 0.0;
  for (int q = 0; q < n; ++q) {
    const float aq = fabsf(r[q * stride]);
    if (aq > ai || (aq == ai && q <= i)) { ++k; S += (double)aq; }
  }
}
__device__ __forceinline__ __half ternaryStep(double S, int k) {
  return toFp16((float)(S / (double)k));
}
__device__ __forceinline__ uint8_t ternaryDigit(float& r, float step) {
  const float t = fabsf(r) > step * 0.5f ? (r > 0.f ? 1.f : -1.f) : 0.f;
  r = r - step * t;  // exact product, one rounding
  return t == 0.f ? 0 : (t > 0.f ? 1 : 2);
}
// Byte m of a plane row from digits dig[c·stride] (c < D).
__device__ __forceinline__ uint8_t ternaryByte(const uint8_t* dig, int D, int m, int stride) {
  uint32_t v = 0, p3 = 1;
  for (int k = 0; k < 5; ++k) {
    const int c = 5 * m + k;
    if (c < D) v += dig[c * stride] * p3;
    p3 *= 3;
  }
  return (uint8_t)v;
}

// Per-token groups (values; keys with key_axis=token): one block per (new token, head, batch),
// D threads, thread j = channel j of group j / group.
__global__ void kvxTernaryAppendToken(const KvxAppendArgs a, int planes) {
  extern __shared__ double tsm[];  // ratio (D), S (D) fp64; k (D) int; r (D), steps (D) fp32; digits (D)
  const int D = a.head_dim, grp = a.value_group, NB = (D + 4) / 5;
  double* ratio = tsm;
  double* sS = ratio + D;
  int* ks = reinterpret_cast<int*>(sS + D);
  float* rr = reinterpret_cast<float*>(ks + D);
  float* st = rr + D;
  uint8_t* dig = reinterpret_cast<uint8_t*>(st + D);
  const int i = blockIdx.x, h = blockIdx.y, b = blockIdx.z, j = threadIdx.x;
  const int t = a.lens[b] + i, g = j / grp, lo = g * grp;
  rr[j] = sanitize(loadAct(a.x, b * a.x_sB + h * a.x_sH + (int64_t)i * a.x_sT + j, a.x_dtype));
  __syncthreads();
  uint8_t* trow = fieldPtr<uint8_t>(a.f[0], b, h, t);
  __half* srow = fieldPtr<__half>(a.f[1], b, h, t);
  for (int p = 0; p < planes; ++p) {
    int k;
    double S;
    ternaryRank(rr + lo, grp, 1, j - lo, k, S);
    ratio[j] = S * S / (double)k;
    ks[j] = k;
    sS[j] = S;
    __syncthreads();
    // argmax S_k²/k over the group, ties to the smallest k: a tree over the group's threads
    // (group a power of two: it divides head_dim).  The k of a group are distinct, so the
    // (ratio, −k) maximum is unique and the tree finds the serial scan's element.
    for (int half = grp >> 1; half > 0; half >>= 1) {
      if (j - lo < half) {
        const int q = j + half;
        if (ratio[q] > ratio[j] || (ratio[q] == ratio[j] && ks[q] < ks[j])) { ratio[j] = ratio[q]; ks[j] = ks[q]; sS[j] = sS[q]; }
      }
      __syncthreads();
    }
    if (j == lo) {  // the group's leader holds the maximum
      const __half s16 = ternaryStep(sS[lo], ks[lo]);
      st[g] = __half2float(s16);
      srow[p * (D / grp) + g] = s16;
    }
    __syncthreads();
    float r = rr[j];
    dig[j] = ternaryDigit(r, st[g]);
    rr[j] = r;
    __syncthreads();
    for (int m = j; m < NB; m += blockDim.x) trow[p * NB + m] = ternaryByte(dig, D, m, 1);
    __syncthreads();
  }
}

// Per-channel keys.  Block (channel chunk, head, batch): kTernaryChunkBytes trit bytes =
// 5·kTernaryChunkBytes channels, one warp per channel (channels are independent, and a chunk
// owns whole bytes of every plane row).  New tokens in order: each goes to the fp16 residual
// row t % K; a token that completes a group fits every channel's K values (the group's
// earlier keys from the residual, this call's tokens from x unrounded, as TernaryCodec.append)
// exactly as ternary.fit_plane, per plane:
//   A. warp per channel: |r| sorted descending in registers (bitonic over 32·NPL >= K slots,
//      padding −1; lane holds positions lane + 32 i), stored to shared memory;
//   B. one lane per channel: S_k accumulated sequentially in fp64 in sorted order (the
//      reference's cumsum, bit for bit whatever the span);
//   C. warp per channel: S_k²/k in fp64 over the lanes, first-maximum argmax (xor shuffles),
//      step = fp16(fp32(S/k)), digits and the fp32 residual update;
//   D. the block packs its bytes of the K plane rows.
// O(K log² K / 32) shuffle compare-exchanges per lane and plane instead of the previous O(K²)
// fp64 rank sums by one thread per channel.
constexpr int kTernaryChunkBytes = 4;
constexpr int kTernaryChunkCh = 5 * kTernaryChunkBytes;  // channels (warps) per block
constexpr int kTernaryChannelThreads = 32 * kTernaryChunkCh;
constexpr int kTernaryMaxKeyGroup = 512;                 // 16 sort slots per lane (174 KB of shared memory)

// Sort slots per lane: 32·NPL >= K, NPL a power of two.
__host__ __device__ __forceinline__ int ternaryNpl(int k) {
  int n = 1;
  while (32 * n < k) n <<= 1;
  return n;
}
// Dynamic shared memory of kvxTernaryAppendChannel<NPL>: per channel S (K | 1) fp64, sorted
// |r| (32·NPL + 1) and residuals (K | 1) fp32 (odd strides: conflict-free per-lane rows);
// then digits (K, chunk channels).
__host__ __device__ __forceinline__ size_t ternaryChannelSmem(int K) {
  return (size_t)kTernaryChunkCh * (8 * (K | 1) + 4 * (32 * ternaryNpl(K) + 1) + 4 * (K | 1)) +
         (size_t)K * kTernaryChunkCh;
}

template <int NPL>
__global__ void __launch_bounds__(kTernaryChannelThreads) kvxTernaryAppendChannel(const KvxAppendArgs a, int planes) {
  extern __shared__ double csm[];
  constexpr int CW = kTernaryChunkCh, N = 32 * NPL, SBS = N + 1;
  const int D = a.head_dim, K = a.group, NB = (D + 4) / 5, RS = K | 1;
  const int m0 = blockIdx.x * kTernaryChunkBytes, c0 = 5 * m0;
  const int cw = min(CW, D - c0), nbC = min(kTernaryChunkBytes, NB - m0);  // channels / bytes of this chunk
  const int h = blockIdx.y, b = blockIdx.z, tid = threadIdx.x, lane = tid & 31, w = tid >> 5;
  const int len = a.lens[b];
  double* sk = csm;                                              // (CW, RS) S_k
  float* sb = reinterpret_cast<float*>(sk + CW * RS);            // (CW, SBS) sorted |r|
  float* rr = sb + CW * SBS;                                     // (CW, RS) residuals
  uint8_t* dig = reinterpret_cast<uint8_t*>(rr + CW * RS);       // (K, CW) digits
  float* rw = rr + w * RS;
  auto xAt = [&](int q, int c) {
    return sanitize(loadAct(a.x, b * a.x_sB + h * a.x_sH + (int64_t)(q - len) * a.x_sT + c, a.x_dtype));
  };
  for (int i = 0; i < a.n_new; ++i) {
    const int pos = len + i, gi = pos / K, rk = pos - gi * K;
    if (tid < cw) fieldPtr<__half>(a.f[2], b, h, rk)[c0 + tid] = toFp16(xAt(pos, c0 + tid));
    if (rk != K - 1) continue;  // uniform over the block
    __syncthreads();            // residual rows written by other threads
    for (int u = tid; u < K * cw; u += blockDim.x) {
      const int e = u / cw, cl = u - e * cw, q = gi * K + e;
      rr[cl * RS + e] = q >= len ? xAt(q, c0 + cl) : __half2float(fieldPtr<const __half>(a.f[2], b, h, e)[c0 + cl]);
    }
    __syncthreads();
    for (int p = 0; p < planes; ++p) {
      if (w < cw) {  // A: bitonic sort, descending
        float v[NPL];
#pragma unroll
        for (int s = 0; s < NPL; ++s) v[s] = lane + 32 * s < K ? fabsf(rw[lane + 32 * s]) : -1.f;
        // Stages unrolled for up to 4 slots per lane (K <= 128); beyond, runtime stage loops keep
        // the code small (slot indices stay compile-time: one unrolled body per j / 32).
        constexpr int kUnroll = NPL <= 4 ? 16 : 1;
#pragma unroll kUnroll
        for (int k = 2; k <= N; k <<= 1)
#pragma unroll kUnroll
          for (int j = k >> 1; j > 0; j >>= 1) {
            if (j >= 32) {  // partner in the same lane, slot s ^ (j / 32)
#pragma unroll
              for (int jj = 1; jj < NPL; jj <<= 1) {
                if (jj != (j >> 5)) continue;
#pragma unroll
                for (int s = 0; s < NPL; ++s) {
                  const int o = s ^ jj;
                  if (o > s) {
                    const bool desc = ((lane + 32 * s) & k) == 0;
                    const float x = v[s], y = v[o];
                    v[s] = desc ? fmaxf(x, y) : fminf(x, y);
                    v[o] = desc ? fminf(x, y) : fmaxf(x, y);
                  }
                }
              }
            } else {  // partner lane ^ j, same slot: the lower position keeps the max when descending
#pragma unroll
              for (int s = 0; s < NPL; ++s) {
                const float o = __shfl_xor_sync(0xffffffffu, v[s], j);
                const bool keepMax = (((lane + 32 * s) & k) == 0) == ((lane & j) == 0);
                v[s] = keepMax ? fmaxf(v[s], o) : fminf(v[s], o);
              }
            }
          }
#pragma unroll
        for (int s = 0; s < NPL; ++s)
          if (lane + 32 * s < K) sb[w * SBS + lane + 32 * s] = v[s];
      }
      __syncthreads();
      if (tid < cw) {  // B: lane = channel, sequential fp64 prefix sums
        double S = 0.0;
        const float* src = sb + tid * SBS;
        double* dst = sk + tid * RS;
#pragma unroll 4
        for (int k = 0; k < K; ++k) { S += (double)src[k]; dst[k] = S; }
      }
      __syncthreads();
      if (w < cw) {  // C: argmax S_k²/k (ties: smallest k), step, digits
        const double* skw = sk + w * RS;
        double bestR = -1.0;
        int bestK = K + 1;
        for (int k = lane + 1; k <= K; k += 32) {  // ascending k: strict > keeps the first maximum
          const double S = skw[k - 1], ratio = S * S / (double)k;
          if (ratio > bestR) { bestR = ratio; bestK = k; }
        }
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) {
          const double oR = __shfl_xor_sync(0xffffffffu, bestR, off);
          const int oK = __shfl_xor_sync(0xffffffffu, bestK, off);
          if (oR > bestR || (oR == bestR && oK < bestK)) { bestR = oR; bestK = oK; }
        }
        const __half s16 = ternaryStep(skw[bestK - 1], bestK);
        if (lane == 0) fieldPtr<__half>(a.f[1], b, h, gi)[p * D + c0 + w] = s16;
        const float s = __half2float(s16);
        for (int e = lane; e < K; e += 32) {
          float r = rw[e];
          dig[e * CW + w] = ternaryDigit(r, s);
          rw[e] = r;
        }
      }
      __syncthreads();
      for (int u = tid; u < K * nbC; u += blockDim.x) {  // D: pack
        const int e = u / nbC, m = u - e * nbC;
        fieldPtr<uint8_t>(a.f[0], b, h, gi * K + e)[p * NB + m0 + m] = ternaryByte(dig + e * CW + 5 * m, cw - 5 * m, 0, 1);
      }
      __syncthreads();
    }
  }
}

}  // namespace kvx

#endif  // KVX_TERNARY_CUH
