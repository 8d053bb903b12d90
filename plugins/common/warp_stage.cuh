// Warp-level staging of packed token rows into shared memory, for readers whose rows are
// not word-aligned (polar, ternary): one coalesced copy instead of per-lane byte loads.
#ifndef KVX_WARP_STAGE_CUH
#define KVX_WARP_STAGE_CUH

#include "kvx_common.cuh"

namespace kvx {

// One warp copies the packed rows t0..t0+n-1 (rb bytes each) of field f into shared memory
// `stg` (16-byte aligned, rows back to back): wide coalesced loads when the rows are
// contiguous (sT == rb) and aligned, bytes otherwise.  Ends with __syncwarp.
__device__ __forceinline__ void warpStageRows(const KvxField& f, int b, int h, int t0, int n, int rb,
                                              uint8_t* stg, int lane) {
  __syncwarp();  // the previous reader's lanes are done with stg
  const uint8_t* g = fieldPtr<const uint8_t>(f, b, h, t0);
  const int nbytes = n * rb;
  if (f.sT == rb) {
    int done = 0;
    if ((reinterpret_cast<uintptr_t>(g) & 15) == 0) {
      const int n16 = nbytes >> 4;
      for (int i = lane; i < n16; i += 32) reinterpret_cast<uint4*>(stg)[i] = __ldg(reinterpret_cast<const uint4*>(g) + i);
      done = n16 << 4;
    } else if ((reinterpret_cast<uintptr_t>(g) & 3) == 0) {
      const int n4 = nbytes >> 2;
      for (int i = lane; i < n4; i += 32) reinterpret_cast<uint32_t*>(stg)[i] = __ldg(reinterpret_cast<const uint32_t*>(g) + i);
      done = n4 << 2;
    }
    for (int i = done + lane; i < nbytes; i += 32) stg[i] = __ldg(g + i);
  } else {
    for (int i = lane; i < nbytes; i += 32) stg[i] = __ldg(fieldPtr<const uint8_t>(f, b, h, t0 + i / rb) + i % rb);
  }
  __syncwarp();
}

// Hint: one warp asks L2 for the packed rows t..t+n-1 (rb bytes each, n <= 16) of field f, the
// 128-byte lines of the span when the rows are contiguous (sT == rb), else each row's first
// line.  Readers call it for the warp's next subtile before staging the current one, so that
// subtile's bytes come from L2 instead of DRAM.  No effect on results.
__device__ __forceinline__ void warpPrefetchRowsL2(const KvxField& f, int b, int h, int t, int n, int rb, int lane) {
  if (n <= 0) return;
  const char* g = fieldPtr<const char>(f, b, h, t);
  const char* p = nullptr;
  if (f.sT == rb) {
    const uintptr_t lo = reinterpret_cast<uintptr_t>(g) & ~uintptr_t(127), hi = reinterpret_cast<uintptr_t>(g) + n * rb;
    if (lo + uintptr_t(lane) * 128 < hi) p = reinterpret_cast<const char*>(lo + uintptr_t(lane) * 128);
  } else if (lane < n) {
    p = g + (int64_t)lane * f.sT;
  }
  if (p) asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
}

}  // namespace kvx

#endif  // KVX_WARP_STAGE_CUH
