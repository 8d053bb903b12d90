// Device helpers of the plugin shells (kvx_trt_util.cu): no codec math, only per-query
// visible lengths for the decode kernel, the kernels' workspace rule, fp32 <-> fp16 staging and
// an fp32 transpose (constants the kernels want transposed).
#ifndef KVX_TRT_UTIL_H
#define KVX_TRT_UTIL_H

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace kvx {
namespace trt {

cudaError_t fillVisibleLens(int32_t* lens, int32_t* winLens, int32_t n, int32_t cacheTokens, int32_t window,
                            int32_t qTokens, bool causal, bool perQuery, cudaStream_t s);
size_t decodeWorkspaceBytes(int64_t rows, int64_t qHeads, int64_t headDim, int32_t splits);  // the kernels' rule
cudaError_t castFloatToHalf(void const* in, void* out, int64_t n, cudaStream_t s);
cudaError_t castHalfToFloat(void const* in, void* out, int64_t n, cudaStream_t s);
// out (cols, rows) = in (rows, cols)ᵀ, fp32, row-major.
cudaError_t transposeFloat(float const* in, float* out, int64_t rows, int64_t cols, cudaStream_t s);

}  // namespace trt
}  // namespace kvx

#endif  // KVX_TRT_UTIL_H
