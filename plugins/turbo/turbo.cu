// turbo (TurboQuant_mse): launchers.  The kernels are the shared rotated-codebook
// reader / encoder with K = 1 and the Lloyd–Max centroids as codebook.
// consts: 0 = rotation Π (D, D), 1 = centroids (2^bits), 2 = boundaries (2^bits - 1).
#include "../common/decode_attention.cuh"
#include "../common/rotated_codebook_v2.cuh"
#include "../common/rotated_codebook.cuh"

extern "C" int kvx_finish(int e);

namespace {

template <int IB>
cudaError_t decodeBits(const KvxDecodeArgs& a, cudaStream_t s) {
  using R = kvx::RotCodebookOf<1, IB>;
  return kvx::dispatchDecode<R::template R, R::template R>(a, s, "turbo");
}

template <int IB>
cudaError_t decodeBitsV2(const KvxDecodeArgs& a, cudaStream_t s) {
  using R = kvx::RotCodebookOf<1, IB>;
  using R2 = kvx::v2::RotCodebookV2Of<1, IB>;
  return kvx::v2::dispatchDecodeV2<R2::template R, R2::template R, R::template R, R::template R>(a, s, "turbo");
}

}  // namespace

// v2: packed codes through a cp.async pipeline, dequantized into MMA fragments (decode_v2.cuh).
extern "C" int kvx_turbo_decode_v2(const KvxDecodeArgs* a, cudaStream_t s) {
  kvx::clearError();
  if (int e = kvx_check_decode_bounds(a, "turbo")) return kvx_finish(e);
  switch (a->bits) {
    case 1: return kvx_finish(decodeBitsV2<1>(*a, s));
    case 2: return kvx_finish(decodeBitsV2<2>(*a, s));
    case 3: return kvx_finish(decodeBitsV2<3>(*a, s));
    case 4: return kvx_finish(decodeBitsV2<4>(*a, s));
    case 8: return kvx_finish(decodeBitsV2<8>(*a, s));
  }
  kvx::setError("turbo.bits must be one of 1, 2, 3, 4, 8 for the CUDA kernels, got %d", a->bits);
  return kvx_finish(cudaErrorInvalidValue);
}

extern "C" int kvx_turbo_decode(const KvxDecodeArgs* a, cudaStream_t s) {
  kvx::clearError();
  if (int e = kvx_check_decode_bounds(a, "turbo")) return kvx_finish(e);
  switch (a->bits) {
    case 1: return kvx_finish(decodeBits<1>(*a, s));
    case 2: return kvx_finish(decodeBits<2>(*a, s));
    case 3: return kvx_finish(decodeBits<3>(*a, s));
    case 4: return kvx_finish(decodeBits<4>(*a, s));
    case 8: return kvx_finish(decodeBits<8>(*a, s));
  }
  kvx::setError("turbo.bits must be one of 1, 2, 3, 4, 8 for the CUDA kernels, got %d", a->bits);
  return kvx_finish(cudaErrorInvalidValue);
}

extern "C" int kvx_turbo_append(const KvxAppendArgs* a, cudaStream_t s) {
  kvx::clearError();
  if (int e = kvx_check_append_bounds(a, "turbo")) return kvx_finish(e);
  switch (a->bits) {
    case 1: return kvx_finish(kvx::launchRotEncode<1, 1>(*a, s));
    case 2: return kvx_finish(kvx::launchRotEncode<1, 2>(*a, s));
    case 3: return kvx_finish(kvx::launchRotEncode<1, 3>(*a, s));
    case 4: return kvx_finish(kvx::launchRotEncode<1, 4>(*a, s));
    case 8: return kvx_finish(kvx::launchRotEncode<1, 8>(*a, s));
  }
  kvx::setError("turbo.bits must be one of 1, 2, 3, 4, 8 for the CUDA kernels, got %d", a->bits);
  return kvx_finish(cudaErrorInvalidValue);
}
