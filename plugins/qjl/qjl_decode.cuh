// qjl fused decode (format and score: qjl.cuh, docs/formats/qjl.md "Scores").
//
// One block per (split, kv head × 16-row query tile, batch), 4 independent warps; warp w owns
// a contiguous token range (so an outlier group's q' is built once per warp and group) and
// walks it in 16-token subtiles through a cp.async pipeline of kQJL_STAGES stages: while
// subtile i is scored, the packed bytes of subtiles i + 1, i + 2 (sign bits, norms, outlier
// indices, value codes / scales / zeros) are in flight into the warp's next stage buffers.
// q' of a group: Sq_in = S q − S[:, I] q[I] per tile row in fp32 (S q from block shared memory
// when it fits), then fp16.
//
// Score (paper Def. 3.1 / Lemma 3.2) on the tensor cores, mma.m16n8k16, A = q' (the tile's
// query rows; fp16 Sq_in | Sq_out scaled by 1 / max|S q| of the row), B = the sign bits
// expanded in registers: a lane of quad index qd owns whole 32-bit words of a token's bit row
// (words qd·wc .. qd·wc + wc − 1 of every chunk of 128·wc bits), and a pair of bits p, p + 16
// of a word becomes one half2 of ±1 with one shift and one LOP3:
//   ((w << (15 − p)) & 0x80008000) ^ 0xBC00BC00          (bit 1 -> +1.0, bit 0 -> −1.0).
// The MMA k order is therefore a permutation of the sketch coordinates; q' is stored in that
// order (qjlCol), so no shuffle or shared-memory key tile is needed.  A subtile costs
// (m + m_o)/16 k-steps × 2 MMAs and 4 integer ops per MMA; the bit words are one LDS per chunk.
// Values: kivi's reader (KiviValueReader) run on the staged bytes.  Residual / window keys:
// fp32 dot products.  Masks and soft cap (kvxScore), online softmax, P·V and the partials: the
// subtile tail and epilogue that kvxDecodeSplit uses too (softmaxPV, writePartial of
// decode_attention.cuh), then kvxCombine.
#ifndef KVX_QJL_DECODE_CUH
#define KVX_QJL_DECODE_CUH

#include "qjl.cuh"

namespace kvx {

constexpr int kQJL_STAGES = 3;  // cp.async pipeline depth: subtiles in flight per warp + 1

// ---- cp.async (sm_80+) ---------------------------------------------------------------------

__device__ __forceinline__ void cpAsync16(void* dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smemAddr(dst)), "l"(src));
}
__device__ __forceinline__ void cpAsync4(void* dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(smemAddr(dst)), "l"(src));
}
__device__ __forceinline__ void cpAsyncCommit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cpAsyncWait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// One warp: nbytes contiguous global bytes -> shared (16-byte cp.async when both ends are
// 16-byte aligned, 4-byte when 4-byte aligned, the tail by plain loads).  Complete for the
// issuing lane after cpAsyncWait, for the warp after the __syncwarp that follows it.
__device__ __forceinline__ void warpCopyAsync(uint8_t* dst, const uint8_t* src, int nbytes, int lane) {
  const uintptr_t al = reinterpret_cast<uintptr_t>(src) | smemAddr(dst);
  int done = 0;
  if ((al & 15) == 0) {
    const int n16 = nbytes >> 4;
    for (int i = lane; i < n16; i += 32) cpAsync16(dst + 16 * i, src + 16 * i);
    done = n16 << 4;
  } else if ((al & 3) == 0) {
    const int n4 = nbytes >> 2;
    for (int i = lane; i < n4; i += 32) cpAsync4(dst + 4 * i, src + 4 * i);
    done = n4 << 2;
  }
  for (int i = done + lane; i < nbytes; i += 32) dst[i] = __ldg(src + i);
}

// Rows t0..t0+n-1 (rb bytes each) of a field -> shared, back to back.
__device__ __forceinline__ void warpStageAsync(const KvxField& f, int b, int h, int t0, int n, int rb, uint8_t* dst,
                                               int lane) {
  if (n <= 0) return;
  if (f.sT == rb) {
    warpCopyAsync(dst, fieldPtr<const uint8_t>(f, b, h, t0), n * rb, lane);
  } else {
    for (int r = 0; r < n; ++r) warpCopyAsync(dst + r * rb, fieldPtr<const uint8_t>(f, b, h, t0 + r), rb, lane);
  }
}

// ---- layout --------------------------------------------------------------------------------

constexpr int kQJL_BLOCK_SMEM = 256;  // per block: row inverse scales, row score scales, a zero row, row ids

// Per-warp shared memory, byte offsets.  A part of s sketch rows is scored in chunks of
// 128·wc bits (wc = min(4, ⌈s/128⌉) words per lane and token row); its q' columns are padded
// to whole chunks (zeros beyond s).
struct QjlLayout {
  int m, mo, o, G;                // sketch rows, outlier sketch rows (0 when o = 0), outliers, group
  int wc, wco, mpad, mopad, ldq;  // words per lane per chunk, padded widths, q' row stride (halves)
  int rT;                         // q' rows allocated (the largest tile: min(16, G·Tq))
  int rbI, rbO, rbV, rbS;         // bytes per token: bits, outlier bits, value codes, value scale
  int sqN, blockBytes;            // S q of the tile rows kept in block shared memory (floats; 0 = read from global)
  int qp, vt, ex, qo, stage, stageBytes, warpBytes;
  int sBits, sOBits, sNorm, sONorm, sOid, sCodes, sScale, sZero;  // offsets inside a stage
  __host__ __device__ static int al16(int x) { return (x + 15) / 16 * 16; }
  __host__ __device__ QjlLayout(int D, int VB, const KvxDecodeArgs& a) {
    o = (a.bits >> 8) & 0xff;
    m = a.block & 0xffff;
    mo = o ? (a.block >> 16) & 0xffff : 0;
    G = o ? a.group : 0;
    wc = min(4, (m + 127) / 128);
    mpad = (m + 128 * wc - 1) / (128 * wc) * 128 * wc;
    wco = mo ? min(4, (mo + 127) / 128) : 1;
    mopad = mo ? (mo + 128 * wco - 1) / (128 * wco) * 128 * wco : 0;
    ldq = mpad + mopad + 8;  // 16-byte rows, ldmatrix rows spread over banks
    const int rows = a.q_heads / a.kv_heads * (a.q_tokens > 0 ? a.q_tokens : 1);
    rT = rows < 16 ? rows : 16;
    sqN = rT * m <= 4096 ? rT * m : 0;
    blockBytes = kQJL_BLOCK_SMEM + al16(sqN * 4);
    rbI = m / 8;
    rbO = mo / 8;
    rbV = D * VB / 8;
    rbS = 2 * (D / a.value_group);
    sBits = 0;
    sOBits = al16(16 * rbI + 64);  // + 64: a lane's chunk may read past the last row
    sNorm = sOBits + al16(16 * rbO + 64);
    sONorm = sNorm + 32;
    sOid = sONorm + 32;
    sCodes = sOid + al16(16 * o + 16);
    sScale = sCodes + al16(16 * rbV);
    sZero = sScale + al16(16 * rbS);
    stageBytes = sZero + al16(16 * rbS);
    qp = 0;
    vt = al16(rT * ldq * 2);
    ex = vt + 16 * (D + 8) * 2;
    qo = ex + 16 * kSUB * 4;
    stage = qo + al16(rT * (o > 4 ? o : 4) * 4);
    warpBytes = stage + kQJL_STAGES * stageBytes;
  }
};
// MMA k position (q' column) of sketch coordinate x of a part scored with wc words per lane.
// Chunk c, lane quad qd, word u, step v: k-step 8u + v of the chunk reads bits 2v, 2v + 16
// (k = 2qd, 2qd + 1) and 2v + 1, 2v + 17 (k = 2qd + 8, 2qd + 9) of word qd·wc + u.
__device__ __forceinline__ int qjlCol(int x, int wc) {
  const int cb = 128 * wc, c = x / cb, y = x - c * cb;
  const int wi = y >> 5, bit = y & 31, qd = wi / wc, u = wi - qd * wc, p = bit & 15;
  return c * cb + 16 * (8 * u + (p >> 1)) + 8 * (p & 1) + 2 * qd + (bit >> 4);
}

// Bits p (low half) and p + 16 (high half) of w -> half2 of ±1 (p < 16; a constant after unrolling).
__device__ __forceinline__ uint32_t signHalf2(uint32_t w, int p) {
  return ((w << (15 - p)) & 0x80008000u) ^ 0xBC00BC00u;
}

// The lane's wc words of chunk c of token row `row` (rb bytes per row, staged).
__device__ __forceinline__ void qjlWords(uint32_t (&w)[4], const uint8_t* row, int rb, int c, int wc, int qd) {
  const uint8_t* p = row + 16 * wc * c + 4 * wc * qd;
  if ((rb & 3) == 0) {  // rows 4-byte aligned (stage rows are back to back from a 16-byte base)
    if (wc == 4 && (rb & 15) == 0) {
      const uint4 x = *reinterpret_cast<const uint4*>(p);
      w[0] = x.x; w[1] = x.y; w[2] = x.z; w[3] = x.w;
    } else if (wc == 2 && (rb & 7) == 0) {
      const uint2 x = *reinterpret_cast<const uint2*>(p);
      w[0] = x.x; w[1] = x.y;
    } else {
#pragma unroll
      for (int u = 0; u < 4; ++u)
        if (u < wc) w[u] = reinterpret_cast<const uint32_t*>(p)[u];
    }
  } else {
#pragma unroll
    for (int u = 0; u < 4; ++u)
      if (u < wc) w[u] = p[4 * u] | (uint32_t)p[4 * u + 1] << 8 | (uint32_t)p[4 * u + 2] << 16 | (uint32_t)p[4 * u + 3] << 24;
  }
}

// s[j] += q'[:, col0 ..] · signs of tokens 8j .. 8j + 7 (two n-tiles), one part of `nc` chunks.
// qa: the lane's ldmatrix row address of the part's first column (kst = 0: a zero row).
__device__ __forceinline__ void qjlScorePart(float (&s)[2][4], const __half* qa, int kst, const uint8_t* bits, int rb,
                                             int nc, int wc, int lane) {
  const int gr = lane >> 2, qd = lane & 3;
  const uint8_t* r0 = bits + gr * rb;
  const uint8_t* r1 = bits + (gr + 8) * rb;
  float t[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};  // odd k-steps: two MMA chains per n-tile
  for (int c = 0; c < nc; ++c) {
    uint32_t w0[4], w1[4];
    qjlWords(w0, r0, rb, c, wc, qd);
    qjlWords(w1, r1, rb, c, wc, qd);
    for (int u = 0; u < wc; ++u) {  // word u of the lane's chunk words: 8 k-steps
      const __half* qu = qa + kst * (128 * wc * c + 128 * u);
#pragma unroll
      for (int v = 0; v < 8; ++v) {
        uint32_t af[4];
        ldsm4(af, qu + kst * 16 * v);
        float(&acc)[2][4] = v & 1 ? t : s;
        mma16816(acc[0], af, signHalf2(w0[0], 2 * v), signHalf2(w0[0], 2 * v + 1));
        mma16816(acc[1], af, signHalf2(w1[0], 2 * v), signHalf2(w1[0], 2 * v + 1));
      }
#pragma unroll
      for (int i = 0; i < 3; ++i) { w0[i] = w0[i + 1]; w1[i] = w1[i + 1]; }
    }
  }
#pragma unroll
  for (int j = 0; j < 2; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) s[j][e] += t[j][e];
}

template <int D, int VB>
__global__ void __launch_bounds__(kTHREADS, 2) kvxQjlDecode(const KvxDecodeArgs a, size_t sqOff) {
  constexpr int LDH = D + 8;
  const QjlLayout L(D, VB, a);
  extern __shared__ uint4 smemRaw[];
  uint8_t* sm = reinterpret_cast<uint8_t*>(smemRaw);
  float* rowInv = reinterpret_cast<float*>(sm);         // 1 / max|S q| per tile row
  float* rowScl = rowInv + 16;                          // max|S q| · scale · log2 e per tile row
  const __half* zero16 = reinterpret_cast<const __half*>(rowScl + 16);  // 16 zero bytes
  int* rowId = reinterpret_cast<int*>(rowScl + 20);     // tile row -> (b, q head, token) row
  float* sqs = reinterpret_cast<float*>(sm + kQJL_BLOCK_SMEM);  // (rows, m) S q when L.sqN
  uint8_t* wbase = sm + L.blockBytes + (size_t)(threadIdx.x >> 5) * L.warpBytes;
  __half* qp = reinterpret_cast<__half*>(wbase + L.qp);
  __half* vt = reinterpret_cast<__half*>(wbase + L.vt);
  float* ex = reinterpret_cast<float*>(wbase + L.ex);
  float* qo = reinterpret_cast<float*>(wbase + L.qo);  // (rows, oS): q at the group's outlier channels
  const int oS = L.o > 4 ? L.o : 4;                    // qo row stride (o <= 4: one float4, zero padded)

  const int nRT = rowTiles(a);
  const int split = blockIdx.x, h = blockIdx.y / nRT, r0 = (blockIdx.y % nRT) * 16, b = blockIdx.z;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, gr = lane >> 2, qd = lane & 3;
  const int G = a.q_heads / a.kv_heads, Tq = qTokens(a), rows = G * Tq;
  const int nr = min(16, rows - r0);  // query rows of this tile
  const int len = a.lens[b];
  const int wl = a.win_k ? (a.win_lens ? a.win_lens[b] : a.win_max) : 0;
  const int total = len + wl;
  const int full = L.o ? (len / L.G) * L.G : len;  // sketched tokens
  auto rowIdx = [&](int r) { return ((size_t)b * a.q_heads + h * G + (r0 + r) % G) * Tq + (r0 + r) / G; };

  // Whole block: per tile row, the fp16 scale of q' (rows of S q; Sq_in / Sq_out stay within a
  // small factor of max|S q|, far from the fp16 range), and S q itself when it fits.
  const float sl2 = a.scale * kLOG2E;
  for (int r = warp; r < 16; r += kWARPS) {
    float mx = 0.f;
    if (r < nr) {
      const float* sq = a.workspace + sqOff + rowIdx(r) * L.m;
      for (int j = lane; j < L.m; j += 32) {
        const float v = sq[j];
        mx = fmaxf(mx, fabsf(v));
        if (L.sqN) sqs[r * L.m + j] = v;
      }
    }
    mx = warpMax(mx);
    if (lane == 0) { rowInv[r] = mx > 0.f ? 1.f / mx : 0.f; rowScl[r] = mx * sl2; }
  }
  if (tid < 4) reinterpret_cast<uint32_t*>(rowScl + 16)[tid] = 0u;
  if (tid < 16) rowId[tid] = tid < nr ? (int)rowIdx(tid) : 0;
  __syncthreads();

  const int chunk = ceilDiv(ceilDiv(a.max_len + a.win_max, a.num_splits), kQJL_WARP_TOKENS_ALIGN) *
                    kQJL_WARP_TOKENS_ALIGN;
  const int wq = chunk / kWARPS, wStart = split * chunk + warp * wq;
  int kLo, kHi;
  visibleKeys(a, G, r0, total, kLo, kHi);
  // Subtiles on the 16-token grid of the warp range (aligned stage copies); keys before kLo
  // are masked by kvxScore.
  const int tFirst = wStart + max(0, kLo - wStart) / kSUB * kSUB;
  const int wEnd = min(min(total, wStart + wq), kHi);
  const int nParts = a.num_splits * kWARPS;
  float* part = a.workspace + (size_t)a.batch * a.q_heads * Tq * D;
  auto partAt = [&](int r) { return part + (rowIdx(r) * nParts + split * kWARPS + warp) * (D + 4); };
  if (tFirst >= wEnd) {  // empty warp range: l = 0 tells the combine to skip it
    for (int r = lane; r < nr; r += 32) {
      partAt(r)[D] = -INFINITY;
      partAt(r)[D + 1] = 0.f;
    }
    return;
  }

  const float cIn = kSQRT_HALF_PI / L.m * sqrtf((float)D);
  const float cOut = L.o ? kSQRT_HALF_PI / L.mo * sqrtf((float)L.o) : 0.f;
  const float si0 = rowScl[gr] * cIn, si1 = rowScl[gr + 8] * cIn;  // rows >= nr: 0
  const float so0 = rowScl[gr] * cOut, so1 = rowScl[gr + 8] * cOut;
  const int nc = L.mpad / (128 * L.wc), nco = L.mopad / (128 * L.wco);
  // The lane's ldmatrix row of q' (rows past the tile read the zero row, not advancing).
  const int mi = lane >> 3, arow = (lane & 7) + (mi & 1) * 8;
  const int kst = arow < nr ? 1 : 0;
  const __half* qa = kst ? qp + arow * L.ldq + (mi >> 1) * 8 : zero16;

  // q' = [S q − S[:, I] q[I] | S_o[:, I] q[I]] of a group (oid: its o outlier channels), fp16
  // scaled by the row's 1 / max|S q|, columns in MMA k order.  o = 0: q' = S q.
  auto buildQ = [&](const uint8_t* oid) {
    __syncwarp();
    for (int u = lane; u < nr * oS; u += 32)
      qo[u] = u % oS < L.o ? a.workspace[(size_t)rowId[u / oS] * D + oid[u % oS]] : 0.f;
    __syncwarp();
    // Column x of one part: sign · Σ_c q[I_c]·S[x, I_c] (+ S q for the inlier part), per row;
    // the first 8 outlier columns of S are held in registers across the rows.
    auto buildPart = [&](const float* ST, int ms, int xpad, int wc, int col0, bool inl) {
#pragma unroll 2
      for (int x = lane; x < xpad; x += 32) {
        const bool live = x < ms;
        float sv[8];
#pragma unroll
        for (int c = 0; c < 8; ++c) sv[c] = live && c < L.o ? __ldg(ST + (size_t)oid[c] * ms + x) : 0.f;
        const int col = col0 + qjlCol(x, wc);
#pragma unroll 1
        for (int g = 0; g < nr; ++g) {
          const float* qg = qo + g * oS;
          float r = 0.f;
          if (L.o <= 4) {  // sv[c] = 0 and qg[c] = 0 for c >= o
            const float4 q4 = *reinterpret_cast<const float4*>(qg);
            r = fmaf(q4.w, sv[3], fmaf(q4.z, sv[2], fmaf(q4.y, sv[1], q4.x * sv[0])));
          } else {
#pragma unroll
            for (int c = 0; c < 8; ++c)
              if (c < L.o) r = fmaf(qg[c], sv[c], r);
            for (int c = 8; c < L.o; ++c) r = fmaf(qg[c], live ? __ldg(ST + (size_t)oid[c] * ms + x) : 0.f, r);
          }
          const float sq = !(inl && live) ? 0.f : L.sqN ? sqs[g * ms + x] : a.workspace[sqOff + (size_t)rowId[g] * ms + x];
          const float v = inl ? sq - r : r;
          qp[g * L.ldq + col] = __float2half_rn(v * rowInv[g]);
        }
      }
    };
#pragma unroll 1
    for (int pi = 0; pi < (L.o ? 2 : 1); ++pi)  // one code copy for both parts (compile time)
      buildPart(a.consts[pi], pi ? L.mo : L.m, pi ? L.mopad : L.mpad, pi ? L.wco : L.wc, pi ? L.mpad : 0, pi == 0);
    __syncwarp();
  };

  // Stage the packed bytes of the subtile at t0 (asynchronous; one commit group per call).
  auto issue = [&](int t0, int st) {
    uint8_t* sb = wbase + L.stage + st * L.stageBytes;
    if (t0 < wEnd) {
      const int n = min(kSUB, wEnd - t0);
      const int ns = max(0, min(n, full - t0)), np = max(0, min(n, len - t0));
      const int g0 = L.o ? t0 / L.G : 0, g1 = L.o && ns ? (t0 + ns - 1) / L.G : g0;
#pragma unroll 1
      for (int j = 0; j < 8; ++j) {  // one copy loop for the 8 fields (compile time)
        KvxField f;
        int t = t0, cnt = ns, rb, off;
        switch (j) {
          case 0: f = a.k[0]; rb = L.rbI; off = L.sBits; break;
          case 1: f = a.k[1]; rb = 2; off = L.sNorm; break;
          case 2: f = a.k[2]; rb = L.rbO; off = L.sOBits; cnt = L.o ? ns : 0; break;
          case 3: f = a.k[3]; rb = 2; off = L.sONorm; cnt = L.o ? ns : 0; break;
          case 4: f = a.k[4]; rb = L.o; off = L.sOid; t = g0; cnt = L.o && ns ? g1 - g0 + 1 : 0; break;
          case 5: f = a.v[0]; rb = L.rbV; off = L.sCodes; cnt = np; break;
          case 6: f = a.v[1]; rb = L.rbS; off = L.sScale; cnt = np; break;
          default: f = a.v[2]; rb = L.rbS; off = L.sZero; cnt = np; break;
        }
        warpStageAsync(f, b, h, t, cnt, rb, sb + off, lane);
      }
    }
    cpAsyncCommit();
  };

  // Positions of the thread's two query rows (padding rows: past the end, see everything).
  const int pos0 = total - Tq + (r0 + gr) / G, pos1 = total - Tq + (r0 + gr + 8) / G;
  const float capL2 = a.softcap * kLOG2E;
  float o[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;
  int cached = -1;
  if (!L.o && tFirst < full) { buildQ(nullptr); cached = 0; }

  // Iteration ti stages the subtile at ti and scores the one kQJL_STAGES − 1 subtiles behind it.
  int st = 0, sti = 0;
  for (int ti = tFirst; ti < wEnd + (kQJL_STAGES - 1) * kSUB; ti += kSUB) {
    issue(ti, sti);
    sti = sti + 1 == kQJL_STAGES ? 0 : sti + 1;
    const int t0 = ti - (kQJL_STAGES - 1) * kSUB;
    if (t0 < tFirst) continue;
    cpAsyncWait<kQJL_STAGES - 1>();
    __syncwarp();
    const uint8_t* sb = wbase + L.stage + st * L.stageBytes;
    const int n = min(kSUB, wEnd - t0);
    const int ns = max(0, min(n, full - t0)), np = max(0, min(n, len - t0));

    // Values -> fp16 tile (staged packed rows through kivi's reader, then window rows, zeros).
    if (np > 0) {
      KvxField fv[3];
      fv[0] = KvxField{const_cast<uint8_t*>(sb + L.sCodes), 0, 0, L.rbV};
      fv[1] = KvxField{const_cast<uint8_t*>(sb + L.sScale), 0, 0, L.rbS};
      fv[2] = KvxField{const_cast<uint8_t*>(sb + L.sZero), 0, 0, L.rbS};
      KiviValueReader<D, VB>::load(a, fv, 0, 0, len, 0, np, vt, nullptr, lane);
    }
    if (np < n) loadWindowWarp<D>(a, a.win_v, b, h, max(0, t0 - len), n - np, vt + np * LDH, false, lane);
    for (int u = lane; u < (kSUB - n) * (D / 8); u += 32)
      reinterpret_cast<uint4*>(vt + (n + u / (D / 8)) * LDH)[u % (D / 8)] = make_uint4(0, 0, 0, 0);

    float s[2][4];
#pragma unroll
    for (int j = 0; j < 2; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
    if (ns > 0) {
      const int g0 = L.o ? t0 / L.G : 0, g1 = L.o ? (t0 + ns - 1) / L.G : 0;
      for (int gi = g0; gi <= g1; ++gi) {
        if (gi != cached) { buildQ(sb + L.sOid + (gi - g0) * L.o); cached = gi; }
        float si[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
        float so[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
        qjlScorePart(si, qa, kst, sb + L.sBits, L.rbI, nc, L.wc, lane);
        if (L.o) qjlScorePart(so, qa + kst * L.mpad, kst, sb + L.sOBits, L.rbO, nco, L.wco, lane);
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int tk = 8 * j + 2 * qd;
          const __half2 nIn = *reinterpret_cast<const __half2*>(sb + L.sNorm + 2 * tk);
          const __half2 nOut = L.o ? *reinterpret_cast<const __half2*>(sb + L.sONorm + 2 * tk) : __half2();
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int tok = tk + (e & 1), t = t0 + tok;
            if (tok < ns && (!L.o || t / L.G == gi)) {
              float v = si[j][e] * (e < 2 ? si0 : si1) * __half2float(e & 1 ? nIn.y : nIn.x);
              if (L.o) v += so[j][e] * (e < 2 ? so0 : so1) * __half2float(e & 1 ? nOut.y : nOut.x);
              s[j][e] = v;
            }
          }
        }
      }
    }
    if (ns < n) {  // exact keys (fp16 residual, then window): fp32 dot products
      __syncwarp();
      for (int u = lane; u < 16 * kSUB; u += 32) {
        const int g = u / kSUB, r = u % kSUB, t = t0 + r;
        float acc = 0.f;
        if (g < nr && r >= ns && r < n) {
          const __half* kr = t < len ? fieldPtr<const __half>(a.k[5], b, h, t - full)
                                     : static_cast<const __half*>(a.win_k) + b * a.w_sB + h * a.w_sH +
                                           (int64_t)(t - len) * a.w_sT;
          const float* qg = a.workspace + rowIdx(g) * D;
          for (int i = 0; i < D; ++i) acc = fmaf(qg[i], __half2float(kr[i]), acc);
        }
        ex[u] = acc * sl2;
      }
      __syncwarp();
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int tok = 8 * j + 2 * qd + (e & 1);
          if (tok >= ns && tok < n) s[j][e] = ex[(e < 2 ? gr : gr + 8) * kSUB + tok];
        }
    }
    __syncwarp();  // value tile written by every lane
    const int sw = a.sliding_window;
    auto score = [&](float v, int tok, bool hi) {
      return tok < n ? kvxScore(v, t0 + tok, hi ? pos1 : pos0, capL2, sw) : -INFINITY;
    };
    softmaxPV<D, false>(s, score, m0, m1, l0, l1, o, vt, lane);
    __syncwarp();  // this stage and the value tile are free again
    st = st + 1 == kQJL_STAGES ? 0 : st + 1;
  }
  cpAsyncWait<0>();
  writePartial<D>(gr < nr ? partAt(gr) : nullptr, gr + 8 < nr ? partAt(gr + 8) : nullptr, o, m0, m1, l0, l1, lane);
}

}  // namespace kvx

#endif  // KVX_QJL_DECODE_CUH
