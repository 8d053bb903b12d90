// fp16 baseline launchers (decode attention on an uncompressed fp16 cache).
#include "../common/decode_attention.cuh"
#include "../common/decode_v2.cuh"
#include "fp16.cuh"

extern "C" int kvx_finish(int e);

extern "C" int kvx_fp16_decode(const KvxDecodeArgs* a, cudaStream_t s) {
  kvx::clearError();
  if (int e = kvx_check_decode_bounds(a, "fp16")) return kvx_finish(e);
  return kvx_finish(kvx::dispatchDecode<kvx::Fp16Reader, kvx::Fp16Reader>(*a, s, "fp16"));
}

// v2: cp.async pipeline of the fp16 rows (decode_v2.cuh); other calls go to v1.
extern "C" int kvx_fp16_decode_v2(const KvxDecodeArgs* a, cudaStream_t s) {
  kvx::clearError();
  if (int e = kvx_check_decode_bounds(a, "fp16")) return kvx_finish(e);
  return kvx_finish(kvx::v2::dispatchDecodeV2<kvx::v2::Fp16V2, kvx::v2::Fp16V2, kvx::Fp16Reader, kvx::Fp16Reader>(
      *a, s, "fp16"));
}

extern "C" int kvx_fp16_append(const KvxAppendArgs* a, cudaStream_t s) {
  kvx::clearError();
  if (int e = kvx_check_append_bounds(a, "fp16")) return kvx_finish(e);
  const int64_t total = (int64_t)a->batch * a->kv_heads * a->n_new * a->head_dim;
  if (total == 0) return 0;
  const int blocks = (int)((total + 255) / 256 < 4096 ? (total + 255) / 256 : 4096);
  kvx::kvxFp16Append<<<blocks, 256, 0, s>>>(*a);
  return kvx_finish(cudaGetLastError());
}
