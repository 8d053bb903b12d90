// qjl launchers: decode attention (sign-bit keys with per-group outliers + fp16 residual,
// kivi per-token values) and append.  Parameters come packed in the args (qjl.cuh).
#include "qjl_decode.cuh"

extern "C" int kvx_finish(int e);

namespace {

template <typename F>
cudaError_t byValueBits(int bits, F&& f) {
  switch (bits) {
    case 2: return f(std::integral_constant<int, 2>());
    case 3: return f(std::integral_constant<int, 3>());
    case 4: return f(std::integral_constant<int, 4>());
    case 8: return f(std::integral_constant<int, 8>());
  }
  kvx::setError("qjl.value_bits must be one of 2, 3, 4, 8 for the CUDA kernels, got %d", bits);
  return cudaErrorInvalidValue;
}

cudaError_t checkArgs(int D, int bits, int group, int vg, int block) {
  const int o = (bits >> 8) & 0xff, m = block & 0xffff, mo = (block >> 16) & 0xffff;
  if (D != 64 && D != 128 && D != 256) {
    kvx::setError("qjl: head_dim %d not supported (64, 128, 256)", D);
    return cudaErrorInvalidValue;
  }
  if (m < 8 || m % 8 || m > 4096) {
    kvx::setError("qjl.m must be a multiple of 8 in [8, 4096] for the CUDA kernels, got %d", m);
    return cudaErrorInvalidValue;
  }
  if (o >= D || (o && (mo < 8 || mo % 8 || mo > 4096 || group < 1))) {
    kvx::setError("qjl.outliers (%d) must be < head_dim (%d), qjl.outlier_m (%d) a multiple of 8 in [8, 4096] "
                  "and qjl.group (%d) >= 1", o, D, mo, group);
    return cudaErrorInvalidValue;
  }
  if (vg < 1 || D % vg) {
    kvx::setError("qjl.value_group (%d) must divide head_dim (%d)", vg, D);
    return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}

template <int D, int VB>
cudaError_t launch(const KvxDecodeArgs& a, cudaStream_t s) {
  const kvx::QjlLayout L(D, VB, a);
  const size_t smem = (size_t)L.blockBytes + (size_t)kvx::kWARPS * L.warpBytes;
  int dev = 0, optin = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (smem > (size_t)optin) {
    kvx::setError("qjl.m + qjl.outlier_m (%d + %d) too large for the decode kernel at head_dim %d "
                  "(%zu bytes of shared memory > %d)", L.m, L.mo, D, smem, optin);
    return cudaErrorInvalidValue;
  }
  auto kern = kvx::kvxQjlDecode<D, VB>;
  cudaError_t e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  if (e != cudaSuccess) return e;
  const int Tq = kvx::qTokens(a);
  const size_t sqOff = kvx::decodeWorkspaceFloats(a.batch, a.q_heads, D, a.num_splits, Tq);
  kvx::kvxQPrologue<D><<<dim3(a.batch, a.q_heads, Tq), D, 0, s>>>(a, false);
  kvx::kvxQjlSketchQ<D><<<dim3(a.batch, a.q_heads, Tq), 128, 0, s>>>(a, sqOff);
  kern<<<dim3(a.num_splits, a.kv_heads * kvx::rowTiles(a), a.batch), kvx::kTHREADS, smem, s>>>(a, sqOff);
  kvx::kvxCombine<D><<<dim3(a.batch, a.q_heads, Tq), D, 0, s>>>(a, false);
  return cudaGetLastError();
}

}  // namespace

extern "C" int kvx_qjl_decode(const KvxDecodeArgs* a, cudaStream_t s) {
  kvx::clearError();
  if (int e = kvx_check_decode_bounds(a, "qjl")) return kvx_finish(e);
  if (cudaError_t e = checkArgs(a->head_dim, a->bits, a->group, a->value_group, a->block)) return kvx_finish(e);
  if (a->kv_heads <= 0 || a->q_heads % a->kv_heads || a->q_heads / a->kv_heads > 16) {
    kvx::setError("qjl: GQA ratio %d/%d not supported (a multiple, <= 16)", a->q_heads, a->kv_heads);
    return kvx_finish(cudaErrorInvalidValue);
  }
  if (cudaError_t e = kvx::checkCommonArgs(*a, "qjl")) return kvx_finish(e);
  return kvx_finish(byValueBits(a->bits & 0xff, [&](auto vb) {
    constexpr int VB = decltype(vb)::value;
    switch (a->head_dim) {
      case 64: return launch<64, VB>(*a, s);
      case 128: return launch<128, VB>(*a, s);
      default: return launch<256, VB>(*a, s);
    }
  }));
}

extern "C" int kvx_qjl_append(const KvxAppendArgs* a, cudaStream_t s) {
  kvx::clearError();
  if (int e = kvx_check_append_bounds(a, "qjl")) return kvx_finish(e);
  if (cudaError_t e = checkArgs(a->head_dim, a->bits, a->group, a->value_group, a->block)) return kvx_finish(e);
  if (a->n_new == 0) return 0;
  if (a->role == 1) {
    return kvx_finish(byValueBits(a->bits & 0xff, [&](auto vb) {
      kvx::kvxKiviAppendValue<decltype(vb)::value><<<dim3(a->n_new, a->kv_heads, a->batch), a->head_dim,
                                                       a->head_dim * 5, s>>>(*a);
      return cudaGetLastError();
    }));
  }
  if ((a->bits >> 8) & 0xff) {
    kvx::kvxQjlAppendKeyGrouped<<<dim3(a->kv_heads, a->batch), a->head_dim, 0, s>>>(*a);
  } else {
    kvx::kvxQjlAppendKeyFlat<<<dim3(a->n_new, a->kv_heads, a->batch), a->head_dim, 0, s>>>(*a);
  }
  return kvx_finish(cudaGetLastError());
}
