// ternary launchers: decode attention (base-3 trit planes, per-channel keys + fp16 residual
// or per-token keys, per-token values) and append.  Planes, key_group and the value channel
// group are runtime arguments: one kernel per head_dim.
#include "../common/decode_attention.cuh"
#include "ternary.cuh"

extern "C" int kvx_finish(int e);

namespace {

cudaError_t checkTernary(int D, int bits, int kg, int grp) {
  const int pk = kvx::ternaryPlanes(bits, true), pv = kvx::ternaryPlanes(bits, false);
  if (pk < 1 || pk > 8 || pv < 1 || pv > 8) {
    kvx::setError("ternary.key_planes / value_planes must be in [1, 8], got %d / %d", pk, pv);
    return cudaErrorInvalidValue;
  }
  if (grp < 1 || D % grp) {
    kvx::setError("ternary.group (%d) must divide head_dim (%d)", grp, D);
    return cudaErrorInvalidValue;
  }
  if (kg < 0) {
    kvx::setError("ternary.key_group must be >= 1 (0 = key_axis token), got %d", kg);
    return cudaErrorInvalidValue;
  }
  if (D != 64 && D != 128 && D != 256) {
    kvx::setError("ternary: head_dim %d not supported (64, 128, 256)", D);
    return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}

}  // namespace

extern "C" int kvx_ternary_decode(const KvxDecodeArgs* a, cudaStream_t s) {
  kvx::clearError();
  if (int e = kvx_check_decode_bounds(a, "ternary")) return kvx_finish(e);
  if (cudaError_t e = checkTernary(a->head_dim, a->bits, a->group, a->value_group)) return kvx_finish(e);
  return kvx_finish(kvx::dispatchDecode<kvx::TernaryKey, kvx::TernaryValue>(*a, s, "ternary"));
}

extern "C" int kvx_ternary_append(const KvxAppendArgs* a, cudaStream_t s) {
  kvx::clearError();
  if (int e = kvx_check_append_bounds(a, "ternary")) return kvx_finish(e);
  if (cudaError_t e = checkTernary(a->head_dim, a->bits, a->group, a->value_group)) return kvx_finish(e);
  if (a->n_new == 0) return 0;
  const int D = a->head_dim, planes = kvx::ternaryPlanes(a->bits, a->role == 0);
  if (a->role == 0 && a->group > 0) {
    if (a->group > kvx::kTernaryMaxKeyGroup) {
      kvx::setError("ternary.key_group must be <= %d for the append kernel, got %d", kvx::kTernaryMaxKeyGroup,
                    a->group);
      return kvx_finish(cudaErrorInvalidValue);
    }
    const size_t smem = kvx::ternaryChannelSmem(a->group);
    int dev = 0, optin = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
    if (smem > (size_t)optin) {
      kvx::setError("ternary.key_group (%d) too large for the append kernel: %zu bytes of shared memory > %d",
                    a->group, smem, optin);
      return kvx_finish(cudaErrorInvalidValue);
    }
    const dim3 grid(kvx::ceilDiv((D + 4) / 5, kvx::kTernaryChunkBytes), a->kv_heads, a->batch);
    auto launch = [&](auto kern) -> cudaError_t {
      if (cudaError_t e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem)) return e;
      kern<<<grid, kvx::kTernaryChannelThreads, smem, s>>>(*a, planes);
      return cudaSuccess;
    };
    cudaError_t e = cudaSuccess;
    switch (kvx::ternaryNpl(a->group)) {
      case 1: e = launch(kvx::kvxTernaryAppendChannel<1>); break;
      case 2: e = launch(kvx::kvxTernaryAppendChannel<2>); break;
      case 4: e = launch(kvx::kvxTernaryAppendChannel<4>); break;
      case 8: e = launch(kvx::kvxTernaryAppendChannel<8>); break;
      default: e = launch(kvx::kvxTernaryAppendChannel<16>); break;
    }
    if (e != cudaSuccess) return kvx_finish(e);
  } else {
    kvx::kvxTernaryAppendToken<<<dim3(a->n_new, a->kv_heads, a->batch), D, (size_t)D * 29, s>>>(*a, planes);
  }
  return kvx_finish(cudaGetLastError());
}
