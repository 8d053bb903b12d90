// Small device helpers of the plugin shells (no codec math): per-query visible lengths
// for the decode kernel, fp32 <-> fp16 staging of activations and an fp32 transpose.
#include <cuda_fp16.h>

#include "decode_attention.cuh"
#include "kvx_trt_util.h"

namespace kvx {
namespace trt {
namespace {

// Row r's query sits at position cache + window - qTokens + i (i = r when perQuery,
// else the last query); it sees positions <= its own when causal, everything otherwise.
__global__ void kvxVisibleLens(int32_t* lens, int32_t* winLens, int32_t n, int32_t cache, int32_t window,
                               int32_t qTokens, bool causal, bool perQuery) {
  int32_t const r = blockIdx.x * blockDim.x + threadIdx.x;
  if (r >= n) return;
  int32_t const i = perQuery ? r : qTokens - 1;
  int32_t const visible = causal ? cache + window - qTokens + i + 1 : cache + window;
  lens[r] = max(0, min(cache, visible));
  winLens[r] = max(0, min(window, visible - cache));
}

__global__ void kvxF32ToF16(float const* in, __half* out, int64_t n) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    out[i] = __float2half_rn(in[i]);
}

__global__ void kvxF16ToF32(__half const* in, float* out, int64_t n) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    out[i] = __half2float(in[i]);
}

__global__ void kvxTranspose(float const* in, float* out, int64_t rows, int64_t cols) {
  const int64_t n = rows * cols;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t c = i / rows, r = i - c * rows;  // out[c][r]: coalesced writes
    out[i] = in[r * cols + c];
  }
}

int blocksFor(int64_t n) { return static_cast<int>(n / 256 + 1 < 4096 ? n / 256 + 1 : 4096); }

}  // namespace

size_t decodeWorkspaceBytes(int64_t rows, int64_t qHeads, int64_t headDim, int32_t splits) {
  return sizeof(float) * kvx::decodeWorkspaceFloats(static_cast<int>(rows), static_cast<int>(qHeads),
                                                    static_cast<int>(headDim), splits);
}

cudaError_t fillVisibleLens(int32_t* lens, int32_t* winLens, int32_t n, int32_t cache, int32_t window,
                            int32_t qTokens, bool causal, bool perQuery, cudaStream_t s) {
  kvxVisibleLens<<<(n + 127) / 128, 128, 0, s>>>(lens, winLens, n, cache, window, qTokens, causal, perQuery);
  return cudaGetLastError();
}

cudaError_t castFloatToHalf(void const* in, void* out, int64_t n, cudaStream_t s) {
  kvxF32ToF16<<<blocksFor(n), 256, 0, s>>>(static_cast<float const*>(in), static_cast<__half*>(out), n);
  return cudaGetLastError();
}

cudaError_t castHalfToFloat(void const* in, void* out, int64_t n, cudaStream_t s) {
  kvxF16ToF32<<<blocksFor(n), 256, 0, s>>>(static_cast<__half const*>(in), static_cast<float*>(out), n);
  return cudaGetLastError();
}

cudaError_t transposeFloat(float const* in, float* out, int64_t rows, int64_t cols, cudaStream_t s) {
  kvxTranspose<<<blocksFor(rows * cols), 256, 0, s>>>(in, out, rows, cols);
  return cudaGetLastError();
}

}  // namespace trt
}  // namespace kvx
