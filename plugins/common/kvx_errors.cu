// Last-error message and ABI version, exported for the ctypes loader.
#include <cstdarg>
#include <cstdio>

#include "kvx_common.cuh"

namespace {
thread_local char gError[512] = "";
}

namespace kvx {
void setError(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(gError, sizeof(gError), fmt, ap);
  va_end(ap);
}
void clearError() { gError[0] = 0; }
}  // namespace kvx

extern "C" const char* kvx_last_error() { return gError; }
extern "C" int kvx_abi_version() { return KVX_ABI_VERSION; }
extern "C" int kvx_args_sizes(int* decode, int* append) {
  *decode = (int)sizeof(KvxDecodeArgs);
  *append = (int)sizeof(KvxAppendArgs);
  return 0;
}

extern "C" int kvx_check_decode_bounds(const KvxDecodeArgs* a, const char* codec) {
  if (a->capacity < 0 || a->max_len < 0 || a->max_len > a->capacity) {
    kvx::setError("%s: max_len (%d) must be in [0, capacity] (capacity %d tokens per sequence)", codec, a->max_len,
                  a->capacity);
    return cudaErrorInvalidValue;
  }
  return 0;
}

extern "C" int kvx_check_append_bounds(const KvxAppendArgs* a, const char* codec) {
  if (a->n_new < 0 || a->max_len < 0 || a->capacity < 0 || (int64_t)a->max_len + a->n_new > a->capacity) {
    kvx::setError("%s: append of %d tokens at lens up to %d exceeds the capacity of %d tokens per sequence", codec,
                  a->n_new, a->max_len, a->capacity);
    return cudaErrorInvalidValue;
  }
  return 0;
}

// Finish a launcher: translate a CUDA error into the message read by kvx_last_error().
extern "C" int kvx_finish(int e) {
  if (e != 0 && gError[0] == 0) kvx::setError("CUDA error %d: %s", e, cudaGetErrorString((cudaError_t)e));
  return e;
}
