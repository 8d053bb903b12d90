// Device helpers shared by every codec's kernels: element conversion, packed-bit
// extraction (LSB-first, docs of kvexport/codecs/_core/bitpack.py), reductions.
// Knows nothing of torch or TensorRT.
#ifndef KVX_COMMON_CUH
#define KVX_COMMON_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "kvx_api.h"

namespace kvx {

constexpr int kTHREADS = 128;         // threads of every attention block
constexpr float kLOG2E = 1.4426950408889634f;
constexpr float kFP16_MAX = 65504.0f;

__host__ __device__ constexpr int ceilDiv(int a, int b) { return (a + b - 1) / b; }

// Element pointer of (b, h, t) of a field with byte strides.
template <typename T = uint8_t>
__device__ __forceinline__ T* fieldPtr(const KvxField& f, int b, int h, int t) {
  return reinterpret_cast<T*>(static_cast<char*>(f.ptr) + b * f.sB + h * f.sH + (int64_t)t * f.sT);
}

// Load one activation (dtype code: 0 fp16, 1 bf16, 2 fp32) as fp32.
__device__ __forceinline__ float loadAct(const void* p, int64_t i, int dtype) {
  if (dtype == 0) return __half2float(static_cast<const __half*>(p)[i]);
  if (dtype == 1) return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
  return static_cast<const float*>(p)[i];
}

// The encoders' input policy (numerics.sanitize): NaN -> 0, +-Inf -> +-65504.
__device__ __forceinline__ float sanitize(float x) {
  if (isnan(x)) return 0.f;
  if (isinf(x)) return x > 0 ? kFP16_MAX : -kFP16_MAX;
  return x;
}

// Saturating fp32 -> fp16 (numerics.to_fp16).
__device__ __forceinline__ __half toFp16(float x) {
  return __float2half_rn(fminf(fmaxf(x, -kFP16_MAX), kFP16_MAX));
}

__device__ __forceinline__ void storeAct(void* p, int64_t i, int dtype, float v) {
  if (dtype == 0) static_cast<__half*>(p)[i] = toFp16(v);  // saturating, like Codec.attend's output clamp
  else if (dtype == 1) static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
  else static_cast<float*>(p)[i] = v;
}

// NW little-endian 32-bit words holding NBYTES packed bytes starting at p
// (word loads when 4-byte aligned, byte assembly otherwise; bytes past NBYTES are 0).
template <int NW, int NBYTES>
__device__ __forceinline__ void loadWords(const uint8_t* p, uint32_t (&w)[NW]) {
  if ((reinterpret_cast<uintptr_t>(p) & 3) == 0 && NBYTES == NW * 4) {
    const uint32_t* q = reinterpret_cast<const uint32_t*>(p);
    if constexpr (NW % 4 == 0) {
      if ((reinterpret_cast<uintptr_t>(p) & 15) == 0) {
#pragma unroll
        for (int i = 0; i < NW / 4; ++i) {
          uint4 v = reinterpret_cast<const uint4*>(p)[i];
          w[4 * i] = v.x; w[4 * i + 1] = v.y; w[4 * i + 2] = v.z; w[4 * i + 3] = v.w;
        }
        return;
      }
    }
#pragma unroll
    for (int i = 0; i < NW; ++i) w[i] = q[i];
    return;
  }
#pragma unroll
  for (int i = 0; i < NW; ++i) w[i] = 0;
#pragma unroll
  for (int i = 0; i < NBYTES; ++i) w[i / 4] |= uint32_t(p[i]) << (8 * (i % 4));
}

// Code i (BITS bits, LSB-first stream) out of words loaded by loadWords.
template <int BITS, int NW>
__device__ __forceinline__ uint32_t extract(const uint32_t (&w)[NW], int i) {
  const int bit = i * BITS, wi = bit >> 5, off = bit & 31;
  uint32_t v = w[wi] >> off;
  if (off + BITS > 32 && wi + 1 < NW) v |= w[wi + 1] << (32 - off);
  return v & ((1u << BITS) - 1u);
}

template <typename T>
__device__ __forceinline__ T warpMax(T v) {
#pragma unroll
  for (int o = 16; o; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
template <typename T>
__device__ __forceinline__ T warpSum(T v) {
#pragma unroll
  for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, <= 1024); every thread gets the total.
template <typename T>
__device__ T blockSum(T v, T* scratch /* >= 32 */) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warpSum(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  T t = lane < nw ? scratch[lane] : T(0);
  return warpSum(t);
}
template <typename T>
__device__ T blockMax(T v, T* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warpMax(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  T t = lane < nw ? scratch[lane] : scratch[0];
  return warpMax(t);
}

}  // namespace kvx

// Error plumbing for the launchers: a thread-local message read by kvx_last_error().
namespace kvx {
void setError(const char* fmt, ...);
void clearError();
}

#endif  // KVX_COMMON_CUH
