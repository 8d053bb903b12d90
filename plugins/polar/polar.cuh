// polar (PolarQuant, Han et al., arXiv:2502.02617): Haar rotation, recursive polar
// transform on blocks of 2^L coordinates, per-level angle codebooks, one fp16 radius per
// block (docs/formats/polar.md).  Fields (keys and values alike): 0 codes (T, ⌈C/8⌉) one
// LSB-first stream per token (level-1 codes, then level 2, ...), 1 radius (T, D/2^L) fp16
// (block radius / √D).  consts: 0 = Π (D, D), 1 = per level ℓ: cos_lℓ (2^bℓ) then sin_lℓ,
// concatenated over ℓ = 1..L, 2 = boundaries_lℓ (2^bℓ − 1) concatenated.
// a.bits = b₁ | b₂ << 4 | b₃ << 8 | ... (bits of level ℓ in nibble ℓ − 1); a.block = L.
#ifndef KVX_POLAR_CUH
#define KVX_POLAR_CUH

#include "../common/decode_attention.cuh"
#include "../common/kvx_common.cuh"
#include "../common/warp_stage.cuh"

namespace kvx {

__host__ __device__ __forceinline__ int polarLevelBits(int packed, int lvl) { return (packed >> (4 * (lvl - 1))) & 15; }

// Window of the staged code words (16-byte aligned shared memory, >= 8 spare bytes after the
// last row): bits [bit, bit + 32) resp. [bit, bit + 64) of the LSB-first stream.
__device__ __forceinline__ uint32_t polarWin32(const uint32_t* w, int bit) {
  const int q = bit >> 5;
  return __funnelshift_r(w[q], w[q + 1], bit & 31);
}
__device__ __forceinline__ void polarWin64(const uint32_t* w, int bit, uint32_t& lo, uint32_t& hi) {
  const int q = bit >> 5, s = bit & 31;
  const uint32_t a = w[q], b = w[q + 1], c = w[q + 2];
  lo = __funnelshift_r(a, b, s);
  hi = __funnelshift_r(b, c, s);
}

// Reader: one lane unit = (token, block of 2^L = 16 coordinates).  32 lanes cover 32 / NBLK
// tokens of a subtile per step, so a lane keeps its block index i (and every per-level bit and
// table offset) for the whole subtile.  Per unit: the block's codes of each level are one
// 32-bit window (level 1: 64 bits) of the staged row, read with 2–3 word loads and funnel
// shifts; each radius is loaded one step ahead.  The block is expanded top-down
// in fp32 registers from ρ = radius·√D (ρ·cos / ρ·sin per level, the reference's product
// order: the result is the previous reader's bit for bit) and stored to the tile in the rotated
// domain (q is rotated once in the prologue, the output rotated back once in the combine).
// Per 16 coordinates: ~9 word loads, 15 table loads (float2), 30 FMUL, ~45 integer ops.
template <int D, int L>
struct PolarReader {
  static constexpr bool kRotated = true;
  // Launch bounds asked of the split kernel (decode_attention.cuh MinBlocksOf, where supported):
  // 4 blocks per SM at D <= 128, the wave num_splits_for fills (168 registers gave 3: a second,
  // almost empty wave); D = 256 is held to 2 blocks by its shared memory anyway.
  static constexpr int kMinBlocks = D <= 128 ? 4 : 1;
  static constexpr int kN = 1 << L;            // coordinates per block
  static constexpr int kMaxEntries = 256;      // 2^8 codewords per level at most
  static constexpr int kTrigWords = 2 * kMaxEntries * L;
  // Then per warp a staging area for 16 code rows (<= D bytes each at <= 8 bits per level) + 16 spare.
  static constexpr int kStageWords = (16 * D + 16) / 4;
  static constexpr int kTabWords = kTrigWords + 4 * kStageWords;
  static constexpr int kNBLK = D / kN;         // blocks per token
  static constexpr int kRPS = 32 / kNBLK;      // tokens per warp step (32 lanes)
  static_assert(L == 4, "the reader expands 1 / 2 / 4 / 8 angles per level (blocks of 16)");
  static_assert(D % kN == 0 && 32 % kNBLK == 0, "head_dim 64, 128 or 256");

  // Table offsets (float2 entries) of level ℓ: Σ_{ℓ' < ℓ} 2^bℓ'.
  __device__ static void prepare(const KvxDecodeArgs& a, uint32_t* tab) {
    float2* t2 = reinterpret_cast<float2*>(tab);
    const float* trig = a.consts[1];
    int off = 0;
    for (int l = 1; l <= L; ++l) {
      const int n = 1 << polarLevelBits(a.bits, l);
      for (int c = threadIdx.x; c < n; c += blockDim.x) t2[off + c] = make_float2(trig[2 * off + c], trig[2 * off + n + c]);
      off += n;
    }
  }

  __device__ static void load(const KvxDecodeArgs& a, const KvxField* f, int b, int h, int len, int t0, int n,
                              __half* tile, const uint32_t* tab, int lane) {
    constexpr int LDH = D + 8;
    const float2* t2 = reinterpret_cast<const float2*>(tab);
    const int i = lane % kNBLK, r0 = lane / kNBLK;
    // Per level (index l − 1): bits, mask, bit offset of block i's codes in the row, table base.
    int bl[L], off[L];
    uint32_t msk[L];
    int tl[L];
    int tot = 0, ttot = 0;
#pragma unroll
    for (int l = 1; l <= L; ++l) {
      bl[l - 1] = polarLevelBits(a.bits, l);
      msk[l - 1] = (1u << bl[l - 1]) - 1u;
      off[l - 1] = tot + i * (kN >> l) * bl[l - 1];
      tl[l - 1] = ttot;
      tot += (D >> l) * bl[l - 1];
      ttot += 1 << bl[l - 1];
    }
    const int rb = (tot + 7) / 8;  // code bytes per token row
    {  // L2 prefetch of the warp's next subtile (kBLOCK_TOKENS on: the split kernel's stride)
      const int t1 = t0 + kBLOCK_TOKENS, n1 = min(16, len - t1);
      warpPrefetchRowsL2(f[0], b, h, t1, n1, rb, lane);
      warpPrefetchRowsL2(f[1], b, h, t1, n1, kNBLK * 2, lane);
    }
    const float sqd = sqrtf((float)D);
    uint8_t* stg = reinterpret_cast<uint8_t*>(const_cast<uint32_t*>(tab) + kTrigWords + (threadIdx.x >> 5) * kStageWords);
    // The first radius is loaded before the code rows are staged, each next one an iteration ahead.
    float radNext = r0 < n ? __half2float(__ldg(fieldPtr<const __half>(f[1], b, h, t0 + r0) + i)) : 0.f;
    warpStageRows(f[0], b, h, t0, n, rb, stg, lane);
    const uint32_t* sw = reinterpret_cast<const uint32_t*>(stg);
#pragma unroll 1
    for (int r = r0; r < n; r += kRPS) {
      const float rad = radNext * sqd;
      if (r + kRPS < n) radNext = __half2float(__ldg(fieldPtr<const __half>(f[1], b, h, t0 + r + kRPS) + i));
      const int rowbit = r * rb * 8;
      float v[kN];
      v[0] = rad;
      {  // level 4: one angle
        const uint32_t w = polarWin32(sw, rowbit + off[3]);
        const float2 cs = t2[tl[3] + (w & msk[3])];
        const float rho = v[0];
        v[0] = rho * cs.x;
        v[1] = rho * cs.y;
      }
      {  // level 3: two angles (top-down in place: v[j] is read before v[2j], v[2j+1] are written)
        const uint32_t w = polarWin32(sw, rowbit + off[2]);
#pragma unroll
        for (int j = 1; j >= 0; --j) {
          const float2 cs = t2[tl[2] + ((w >> (j * bl[2])) & msk[2])];
          const float rho = v[j];
          v[2 * j] = rho * cs.x;
          v[2 * j + 1] = rho * cs.y;
        }
      }
      {  // level 2: four angles (4·b₂ <= 32 bits)
        const uint32_t w = polarWin32(sw, rowbit + off[1]);
#pragma unroll
        for (int j = 3; j >= 0; --j) {
          const float2 cs = t2[tl[1] + ((w >> (j * bl[1])) & msk[1])];
          const float rho = v[j];
          v[2 * j] = rho * cs.x;
          v[2 * j + 1] = rho * cs.y;
        }
      }
      {  // level 1: eight angles in a 64-bit window; codes 4..7 from the window shifted by 4·b₁
        uint32_t lo, hi;
        polarWin64(sw, rowbit + off[0], lo, hi);
        const uint32_t mid = __funnelshift_rc(lo, hi, 4 * bl[0]);  // 4·b₁ = 32 gives hi
#pragma unroll
        for (int j = 7; j >= 0; --j) {
          const uint32_t c = ((j < 4 ? lo : mid) >> ((j & 3) * bl[0])) & msk[0];
          const float2 cs = t2[tl[0] + c];
          const float rho = v[j];
          v[2 * j] = rho * cs.x;
          v[2 * j + 1] = rho * cs.y;
        }
      }
      uint4* dst = reinterpret_cast<uint4*>(tile + r * LDH + i * kN);
#pragma unroll
      for (int q = 0; q < kN / 8; ++q) {
        uint32_t w4[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const __half2 x = __floats2half2_rn(v[8 * q + 2 * e], v[8 * q + 2 * e + 1]);
          w4[e] = *reinterpret_cast<const uint32_t*>(&x);
        }
        dst[q] = make_uint4(w4[0], w4[1], w4[2], w4[3]);
      }
    }
  }
};

template <int L>
struct PolarOf {
  template <int D>
  using R = PolarReader<D, L>;
};

// Append: one block per (new token, head, batch), D threads.  Same steps as the Python
// encoder: y = x Πᵀ (fp32), level-1 angle atan2 (+2π when negative) and hypot radius, then
// levels 2..L on pairs of radii; code = #boundaries <= angle (binary search: the boundaries
// are sorted, torch.bucketize(right=True)); radius = fp16(r_L / √D).  Π goes through shared
// memory 32 columns at a time (coalesced rows, odd stride: conflict-free), so thread j still
// sums Π[j][q]·x_q in ascending q with one fmaf each: the previous encoder's y bit for bit
// (it read row j of Π per thread, 32 cache lines per warp load).
template <int D>
__global__ void __launch_bounds__(D) kvxPolarEncode(const KvxAppendArgs a) {
  constexpr int PC = 32, PS = PC + 1;  // Π columns per pass, tile row stride
  __shared__ float xs[D];
  __shared__ float rs[D];       // radii of the current level
  __shared__ uint8_t codes[D];  // all angle codes of the token, level 1 first (D − D/2^L of them)
  __shared__ float pit[D * PS]; // Π[:, q0:q0+PC]
  const int i = blockIdx.x, h = blockIdx.y, b = blockIdx.z, j = threadIdx.x;
  const int t = a.lens[b] + i, L = a.block;
  xs[j] = sanitize(loadAct(a.x, b * a.x_sB + h * a.x_sH + (int64_t)i * a.x_sT + j, a.x_dtype));
  const float* pi = a.consts[0];
  float y = 0.f;
  for (int q0 = 0; q0 < D; q0 += PC) {
    __syncthreads();  // xs written / the previous pass read
#pragma unroll
    for (int u = j; u < D * PC; u += D) pit[(u / PC) * PS + u % PC] = __ldg(pi + (u / PC) * D + q0 + u % PC);
    __syncthreads();
#pragma unroll
    for (int q = 0; q < PC; ++q) y = fmaf(pit[j * PS + q], xs[q0 + q], y);
  }
  rs[j] = y;
  __syncthreads();
  const float* bnd = a.consts[2];
  int co = 0;  // code offset of the level
  for (int l = 1; l <= L; ++l) {
    const int na = D >> l, bl = polarLevelBits(a.bits, l);
    float ang = 0.f, rad = 0.f;
    if (j < na) {
      const float e = rs[2 * j], o = rs[2 * j + 1];
      ang = atan2f(o, e);
      if (l == 1 && ang < 0.f) ang += 6.283185307179586f;
      rad = hypotf(e, o);
      int lo = 0, hi = (1 << bl) - 1;  // first boundary > ang = number of boundaries <= ang
      while (lo < hi) {
        const int mid = (lo + hi) >> 1;
        if (__ldg(bnd + mid) <= ang) lo = mid + 1; else hi = mid;
      }
      codes[co + j] = (uint8_t)lo;
    }
    __syncthreads();
    if (j < na) rs[j] = rad;
    __syncthreads();
    co += na;
    bnd += (1 << bl) - 1;
  }
  const int nblk = D >> L;
  if (j < nblk) fieldPtr<__half>(a.f[1], b, h, t)[j] = toFp16(__fdiv_rn(rs[j], sqrtf((float)D)));
  // Pack: stream bit s of level ℓ is bit k of code j with s = O_ℓ + j·bℓ + k.
  int total = 0;
  for (int l = 1; l <= L; ++l) total += (D >> l) * polarLevelBits(a.bits, l);
  uint8_t* row = fieldPtr<uint8_t>(a.f[0], b, h, t);
  for (int m = j; m < (total + 7) / 8; m += blockDim.x) {
    uint32_t byte = 0;
    for (int bit = 0; bit < 8; ++bit) {
      int s = 8 * m + bit;
      if (s >= total) break;
      int cbase = 0;
      for (int l = 1; l <= L; ++l) {
        const int na = D >> l, bl = polarLevelBits(a.bits, l);
        if (s < na * bl) {
          byte |= ((uint32_t(codes[cbase + s / bl]) >> (s % bl)) & 1u) << bit;
          break;
        }
        s -= na * bl;
        cbase += na;
      }
    }
    row[m] = (uint8_t)byte;
  }
}

}  // namespace kvx

#endif  // KVX_POLAR_CUH
