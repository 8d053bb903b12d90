// kivi launchers: decode attention (per-channel keys + fp16 residual, per-token
// values) and append.  bits, group, value_group come in the args.
#include "../common/decode_attention.cuh"
#include "kivi.cuh"

extern "C" int kvx_finish(int e);

namespace {

template <typename F>
cudaError_t byBits(int bits, F&& f) {
  switch (bits) {
    case 2: return f(std::integral_constant<int, 2>());
    case 3: return f(std::integral_constant<int, 3>());
    case 4: return f(std::integral_constant<int, 4>());
    case 8: return f(std::integral_constant<int, 8>());
  }
  kvx::setError("kivi.bits must be one of 2, 3, 4, 8 for the CUDA kernels, got %d", bits);
  return cudaErrorInvalidValue;
}

cudaError_t checkGroups(int D, int group, int vg) {
  if (group < 1 || vg < 1 || D % vg) {
    kvx::setError("kivi.value_group (%d) must divide head_dim (%d) and kivi.group (%d) be >= 1", vg, D, group);
    return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}

}  // namespace

extern "C" int kvx_kivi_decode(const KvxDecodeArgs* a, cudaStream_t s) {
  kvx::clearError();
  if (int e = kvx_check_decode_bounds(a, "kivi")) return kvx_finish(e);
  if (cudaError_t e = checkGroups(a->head_dim, a->group, a->value_group)) return kvx_finish(e);
  return kvx_finish(byBits(a->bits, [&](auto bits) {
    using R = kvx::KiviOf<decltype(bits)::value>;
    return kvx::dispatchDecode<R::template K, R::template V>(*a, s, "kivi");
  }));
}

extern "C" int kvx_kivi_append(const KvxAppendArgs* a, cudaStream_t s) {
  kvx::clearError();
  if (int e = kvx_check_append_bounds(a, "kivi")) return kvx_finish(e);
  if (cudaError_t e = checkGroups(a->head_dim, a->group, a->value_group)) return kvx_finish(e);
  if (a->head_dim != 64 && a->head_dim != 128 && a->head_dim != 256) {
    kvx::setError("kivi: head_dim %d not supported (64, 128, 256)", a->head_dim);
    return kvx_finish(cudaErrorInvalidValue);
  }
  if (a->n_new == 0) return 0;
  return kvx_finish(byBits(a->bits, [&](auto bits) {
    constexpr int B = decltype(bits)::value;
    if (a->role == 1) {
      kvx::kvxKiviAppendValue<B><<<dim3(a->n_new, a->kv_heads, a->batch), a->head_dim,
                                    a->head_dim * 5, s>>>(*a);
    } else {
      const size_t smem = (size_t)a->group * a->head_dim;
      if (smem > 48 * 1024) {
        kvx::setError("kivi.group (%d) x head_dim (%d) too large for the append kernel (<= 49152)",
                      a->group, a->head_dim);
        return cudaErrorInvalidValue;
      }
      kvx::kvxKiviAppendKey<B><<<dim3(a->kv_heads, a->batch), a->head_dim, smem, s>>>(*a);
    }
    return cudaGetLastError();
  }));
}
