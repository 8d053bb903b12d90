// v2 reader of the rotated-codebook format (rotated_codebook.cuh): turbo and fibquant keys and
// values dequantized straight into MMA fragments (decode_v2.cuh explains the layout).
#ifndef KVX_ROTATED_CODEBOOK_V2_CUH
#define KVX_ROTATED_CODEBOOK_V2_CUH

#include "decode_v2.cuh"
#include "rotated_codebook.cuh"

namespace kvx {
namespace v2 {

// Rotated codebook (turbo K = 1, fibquant K >= 2; rotated_codebook.cuh has the format): codes
// staged as packed rows, norms as 16 fp16; a table word is half2 of codeword·√D for one pair of
// dims (RotCodebook's units), replicated REP times so lanes hit distinct banks.
template <int D, int K, int IB>
struct RotCodebookV2 {
  using V1 = RotCodebook<D, K, IB>;
  static constexpr bool kRotated = true;
  static constexpr bool kSINGLE = V1::kSINGLE;
  static constexpr int kCPU = V1::kCPU, kUB = V1::kUB, kNE = V1::kNE, kWE = V1::kWE;
  static constexpr int kENTRY_WORDS = kNE * kWE;
  static constexpr int kREP = kENTRY_WORDS * 32 <= 8192 ? 32 : kENTRY_WORDS * 16 <= 8192 ? 16
                              : kENTRY_WORDS * 8 <= 8192 ? 8 : kENTRY_WORDS * 4 <= 8192 ? 4 : 1;
  static constexpr int kTabWords = kENTRY_WORDS * kREP;
  static constexpr int kRB = D / K * IB / 8, kRBP = rowStride<kRB>();
  static constexpr int kStageBytes = (kSUB * kRBP + kSUB * 2 + 4 + 15) / 16 * 16;  // + 4: rowBits overrun
  static constexpr int kKB = D / 4 / K * IB, kKW = (kKB + 31) / 32;  // key bits / words per thread
  static constexpr int kVB = D / 8 / K * IB, kVW = (kVB + 31) / 32;  // value bits / words per thread
  static constexpr bool kQIdentity = false, kVIdentity = false, kKeyScaled = true, kValScaled = true;
  static_assert(D / 8 % (K == 1 ? 2 : K) == 0, "a thread's value dims hold whole lookup units");
  struct KRegs { uint32_t w[2][kKW]; };
  struct VRegs { uint32_t w[4][kVW]; };

  __device__ static void prepare(const KvxDecodeArgs& a, uint32_t* tab) {
    const float* cb = a.consts[1];
    const float sq = sqrtf((float)D);
    for (int u = threadIdx.x; u < kENTRY_WORDS; u += blockDim.x) {
      const int e = u / kWE, w = u % kWE;
      float lo, hi;
      if constexpr (kSINGLE) { lo = cb[e]; hi = 0.f; }
      else if constexpr (K == 1) { lo = cb[e & ((1 << IB) - 1)]; hi = cb[e >> IB]; }
      else { lo = cb[e * K + 2 * w]; hi = cb[e * K + 2 * w + 1]; }
      const __half2 h2 = __floats2half2_rn(lo * sq, hi * sq);
      const uint32_t word = *reinterpret_cast<const uint32_t*>(&h2);
#pragma unroll 8
      for (int r = 0; r < kREP; ++r) tab[u * kREP + r] = word;
    }
  }
  __device__ static void stage(const KvxField* f, int b, int h, int t0, int n, uint8_t* st, int lane) {
    stageRows<kRB, kRBP>(f[1], b, h, t0, n, st, lane);  // rows past n: stale codes, still table indices
    stageHalves(f[0], b, h, t0, n, reinterpret_cast<__half*>(st + kSUB * kRBP), lane);
  }
  // MMA k position p (chunk c = p / 16) -> dim: thread qd's local dim 4c + sub is dim qd·D/4 + 4c + sub.
  __device__ static int qDim(int p) {
    const int c = p >> 4, pp = p & 15, qd = (pp & 7) >> 1, sub = (pp & 1) | ((pp >> 3) << 1);
    return qd * (D / 4) + 4 * c + sub;
  }
  __device__ static int vDim(int i, int col) { return col * (D / 8) + i; }
  // half2 of local dims 2p, 2p + 1 of a thread's run of codes w (units from the run's start).
  template <int NW>
  __device__ static uint32_t pairWord(const uint32_t (&w)[NW], const uint32_t* tl, int p) {
    if constexpr (kSINGLE) {
      return (tl[extract<kUB, NW>(w, 2 * p) * kREP] & 0xffffu) | (tl[extract<kUB, NW>(w, 2 * p + 1) * kREP] << 16);
    } else {
      const int u = 2 * p / kCPU, e = (2 * p % kCPU) / 2;
      return tl[(extract<kUB, NW>(w, u) * kWE + e) * kREP];
    }
  }
  __device__ static void keyLoad(const uint8_t* st, int lane, KRegs& kr) {
    const int gr = lane >> 2, qd = lane & 3;
    rowBits<kKW, kKB, kRBP>(st + gr * kRBP, qd * kKB, kr.w[0]);
    rowBits<kKW, kKB, kRBP>(st + (gr + 8) * kRBP, qd * kKB, kr.w[1]);
  }
  __device__ static void keyFrag(const KRegs& kr, const uint8_t*, const uint32_t* tab, int lane, int c,
                                 uint32_t (&bf)[4]) {
    const uint32_t* tl = tab + (lane & (kREP - 1));
    bf[0] = pairWord(kr.w[0], tl, 2 * c);
    bf[1] = pairWord(kr.w[0], tl, 2 * c + 1);
    bf[2] = pairWord(kr.w[1], tl, 2 * c);
    bf[3] = pairWord(kr.w[1], tl, 2 * c + 1);
  }
  __device__ static void tokenScales(const uint8_t* st, int lane, float (&x)[2][2]) {
    const __half2* nr = reinterpret_cast<const __half2*>(st + kSUB * kRBP);
    const int qd = lane & 3;
    const float2 a = __half22float2(nr[qd]), b = __half22float2(nr[4 + qd]);  // tokens 2qd.., 8 + 2qd..
    x[0][0] = a.x; x[0][1] = a.y; x[1][0] = b.x; x[1][1] = b.y;
  }
  __device__ static void keyScale(const uint8_t* st, int lane, float (&ks)[2][2]) { tokenScales(st, lane, ks); }
  __device__ static void valScale(const uint8_t* st, int lane, float (&vs)[2][2]) { tokenScales(st, lane, vs); }
  __device__ static void valLoad(const uint8_t* st, int lane, VRegs& vr) {
    const int gr = lane >> 2, qd = lane & 3;
#pragma unroll
    for (int x = 0; x < 4; ++x)  // tokens 2qd, 2qd + 1, 2qd + 8, 2qd + 9
      rowBits<kVW, kVB, kRBP>(st + (2 * qd + (x & 1) + 8 * (x >> 1)) * kRBP, gr * kVB, vr.w[x]);
  }
  __device__ static void valFrag(const VRegs& vr, const uint8_t*, const uint32_t* tab, int lane, int i,
                                 uint32_t (&bf)[4]) {
    const uint32_t* tl = tab + (lane & (kREP - 1));
    uint32_t w[4];
#pragma unroll
    for (int x = 0; x < 4; ++x) w[x] = pairWord(vr.w[x], tl, i / 2);  // local dims i, i + 1 of token x
    bf[0] = prmt(w[0], w[1], 0x5410);  // n-tile i: dim i of tokens 2qd, 2qd + 1
    bf[1] = prmt(w[2], w[3], 0x5410);  //           tokens 2qd + 8, 2qd + 9
    bf[2] = prmt(w[0], w[1], 0x7632);  // n-tile i + 1
    bf[3] = prmt(w[2], w[3], 0x7632);
  }
};

template <int K, int IB>
struct RotCodebookV2Of {
  template <int D>
  using R = RotCodebookV2<D, K, IB>;
};

}  // namespace v2
}  // namespace kvx

#endif  // KVX_ROTATED_CODEBOOK_V2_CUH
