// polar launchers: decode attention (rotated-domain reader, shared split-K kernel) and append.
// Compiled for L = 4 (blocks of 16, the paper's point) with any level bits 1..8 (runtime).
#include "../common/decode_attention.cuh"
#include "polar.cuh"

extern "C" int kvx_finish(int e);

namespace {

cudaError_t checkPolar(int levels, int bits, int D) {
  if (levels != 4) {
    kvx::setError("polar.levels must be 4 for the CUDA kernels (blocks of 16), got %d", levels);
    return cudaErrorInvalidValue;
  }
  for (int l = 1; l <= levels; ++l) {
    const int b = kvx::polarLevelBits(bits, l);
    if (b < 1 || b > 8) {
      kvx::setError("polar.level_bits must be in [1, 8] for the CUDA kernels, level %d has %d", l, b);
      return cudaErrorInvalidValue;
    }
  }
  if (D != 64 && D != 128 && D != 256) {
    kvx::setError("polar: head_dim %d not supported (64, 128, 256)", D);
    return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}

}  // namespace

extern "C" int kvx_polar_decode(const KvxDecodeArgs* a, cudaStream_t s) {
  kvx::clearError();
  if (int e = kvx_check_decode_bounds(a, "polar")) return kvx_finish(e);
  if (cudaError_t e = checkPolar(a->block, a->bits, a->head_dim)) return kvx_finish(e);
  using R = kvx::PolarOf<4>;
  return kvx_finish(kvx::dispatchDecode<R::template R, R::template R>(*a, s, "polar"));
}

extern "C" int kvx_polar_append(const KvxAppendArgs* a, cudaStream_t s) {
  kvx::clearError();
  if (int e = kvx_check_append_bounds(a, "polar")) return kvx_finish(e);
  if (cudaError_t e = checkPolar(a->block, a->bits, a->head_dim)) return kvx_finish(e);
  if (a->n_new == 0) return 0;
  const dim3 grid(a->n_new, a->kv_heads, a->batch);
  switch (a->head_dim) {
    case 64: kvx::kvxPolarEncode<64><<<grid, 64, 0, s>>>(*a); break;
    case 128: kvx::kvxPolarEncode<128><<<grid, 128, 0, s>>>(*a); break;
    case 256: kvx::kvxPolarEncode<256><<<grid, 256, 0, s>>>(*a); break;
  }
  return kvx_finish(cudaGetLastError());
}
