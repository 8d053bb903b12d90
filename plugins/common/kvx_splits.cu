// Split-K rule of the decode kernels, shared by every caller: kvexport.kernels.num_splits_for
// (Python, kept equal: tests/trt/test_num_splits.py) and the TensorRT plugins.  Host code only.
#include <stdint.h>

// Split-K parts for `batch` x `kv_heads` blocks over `tokens` keys: at most one wave of 4 blocks
// per multiprocessor (4 fit at 128 registers: a partial second wave would double the time), each
// split at least 8 block iterations of 64 tokens.  head_dim does not enter the rule (kept for the
// callers' symmetry with the launchers).
extern "C" int32_t kvx_num_splits(int32_t batch, int32_t kv_heads, int32_t tokens, int32_t head_dim, int32_t sms) {
  (void)head_dim;
  const int64_t kBlockTokens = 64;
  const int64_t rows = (int64_t)batch * kv_heads > 1 ? (int64_t)batch * kv_heads : 1;
  int64_t per = 4 * (int64_t)sms / rows;
  if (per < 1) per = 1;
  const int64_t t = tokens > 1 ? tokens : 1;
  const int64_t byLen = (t + 8 * kBlockTokens - 1) / (8 * kBlockTokens);
  const int64_t n = per < byLen ? per : byLen;
  return (int32_t)(n > 1 ? n : 1);
}
