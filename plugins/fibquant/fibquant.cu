// fibquant: launchers over the shared rotated-codebook reader / encoder.
// a.block = k (coordinates per index), a.bits = log2(N) (index bits).
// consts: 0 = rotation Π (D, D), 1 = codebook C (N, k).
#include "../common/decode_attention.cuh"
#include "../common/rotated_codebook_v2.cuh"
#include "../common/rotated_codebook.cuh"

extern "C" int kvx_finish(int e);

namespace {

template <int K, int IB>
cudaError_t decodeKB(const KvxDecodeArgs& a, cudaStream_t s) {
  using R = kvx::RotCodebookOf<K, IB>;
  return kvx::dispatchDecode<R::template R, R::template R>(a, s, "fibquant");
}

template <int K, int IB>
cudaError_t decodeKBV2(const KvxDecodeArgs& a, cudaStream_t s) {
  using R = kvx::RotCodebookOf<K, IB>;
  using R2 = kvx::v2::RotCodebookV2Of<K, IB>;
  return kvx::v2::dispatchDecodeV2<R2::template R, R2::template R, R::template R, R::template R>(a, s, "fibquant");
}

// The (k, log2 N) pairs compiled: the paper's operating points and the rate sweep.
template <typename F>
cudaError_t byKB(int k, int ib, F&& f) {
  if (k == 8 && ib == 4) return f(std::integral_constant<int, 8>(), std::integral_constant<int, 4>());
  if (k == 8 && ib == 8) return f(std::integral_constant<int, 8>(), std::integral_constant<int, 8>());
  if (k == 4 && ib == 4) return f(std::integral_constant<int, 4>(), std::integral_constant<int, 4>());
  if (k == 4 && ib == 6) return f(std::integral_constant<int, 4>(), std::integral_constant<int, 6>());
  if (k == 4 && ib == 8) return f(std::integral_constant<int, 4>(), std::integral_constant<int, 8>());
  if (k == 2 && ib == 4) return f(std::integral_constant<int, 2>(), std::integral_constant<int, 4>());
  kvx::setError("fibquant (k=%d, N=%d) not compiled for the CUDA kernels; (k, N) must be one of "
                "(8,16) (8,256) (4,16) (4,64) (4,256) (2,16)", k, 1 << ib);
  return cudaErrorInvalidValue;
}

}  // namespace

extern "C" int kvx_fibquant_decode(const KvxDecodeArgs* a, cudaStream_t s) {
  kvx::clearError();
  if (int e = kvx_check_decode_bounds(a, "fibquant")) return kvx_finish(e);
  return kvx_finish(byKB(a->block, a->bits, [&](auto k, auto ib) {
    return decodeKB<decltype(k)::value, decltype(ib)::value>(*a, s);
  }));
}

// v2: packed codes through a cp.async pipeline, dequantized into MMA fragments (decode_v2.cuh).
extern "C" int kvx_fibquant_decode_v2(const KvxDecodeArgs* a, cudaStream_t s) {
  kvx::clearError();
  if (int e = kvx_check_decode_bounds(a, "fibquant")) return kvx_finish(e);
  return kvx_finish(byKB(a->block, a->bits, [&](auto k, auto ib) {
    return decodeKBV2<decltype(k)::value, decltype(ib)::value>(*a, s);
  }));
}

extern "C" int kvx_fibquant_append(const KvxAppendArgs* a, cudaStream_t s) {
  kvx::clearError();
  if (int e = kvx_check_append_bounds(a, "fibquant")) return kvx_finish(e);
  return kvx_finish(byKB(a->block, a->bits, [&](auto k, auto ib) {
    return kvx::launchRotEncode<decltype(k)::value, decltype(ib)::value>(*a, s);
  }));
}
