// C ABI shared by every kernel launcher: plain structs of raw device pointers,
// sizes and byte strides.  Mirrored field by field in kvexport/kernels/_abi.py
// (ctypes); bump kKVX_ABI_VERSION on any change.
#ifndef KVX_API_H
#define KVX_API_H

#include <cuda_runtime.h>
#include <stdint.h>

#define KVX_ABI_VERSION 5
#define KVX_MAX_FIELDS 8  // qjl keys use 6
#define KVX_MAX_CONSTS 4

#ifdef __cplusplus
extern "C" {
#endif

// One tensor of the packed cache laid out (B, H, T or groups, ...): byte strides.
typedef struct {
  void* ptr;
  int64_t sB, sH, sT;
} KvxField;

// Fused attention of q_tokens query tokens per sequence (1 = decode) over the packed cache
// followed by the fp16 window.  Key j of sequence b (packed j < lens[b], then window) sits at
// position j; query t at lens[b] + win_len(b) - q_tokens + t and sees key j iff j <= its
// position and, when sliding_window > 0, j > position - sliding_window.
typedef struct {
  int32_t batch, q_heads, kv_heads, head_dim;
  int32_t q_dtype;                  // 0 = fp16, 1 = bf16 (out has q's dtype)
  const void* q;   int64_t q_sB, q_sH;   // (B, Hq, Tq, D), element strides (q_sT below), unit on D
  void* out;       int64_t o_sB, o_sH;   // (B, Hq, Tq, D) (o_sT below)
  const int32_t* lens;              // (B,) tokens in the packed cache per sequence
  int32_t max_len;                  // >= max(lens): sizes the split grid
  KvxField k[KVX_MAX_FIELDS];       // codec-defined key fields
  KvxField v[KVX_MAX_FIELDS];       // codec-defined value fields
  const void* win_k; const void* win_v;  // optional fp16 window (B, Hkv, W, D), nullable
  int64_t w_sB, w_sH, w_sT;         // element strides (shared by win_k / win_v)
  const int32_t* win_lens;          // (B,) or null: every sequence has win_max tokens
  int32_t win_max;
  const float* consts[KVX_MAX_CONSTS];  // codec constants (rotation, codebook, ...), fp32 device
  int32_t bits, group, value_group, block;  // codec parameters (unused ones 0)
  float scale;                      // softmax scale (1/sqrt(D) by default)
  int32_t num_splits;               // split-K parts (>= 1)
  float* workspace;                 // B·Hq·Tq·D + B·Hq·Tq·splits·4·(D + 4) fp32 (4 warps per split)
  // ABI 4 (zero = previous behaviour):
  float softcap;                    // > 0: s = softcap·tanh(s / softcap) on the scaled score (Gemma 2)
  int32_t sliding_window;           // > 0: keys at positions > query position - sliding_window only
  int32_t q_tokens;                 // Tq query tokens per sequence, causal per token (<= 0 means 1)
  int64_t q_sT, o_sT;               // element strides of q / out between query tokens
  // ABI 5: tokens the packed buffers hold per sequence; the launcher refuses max_len > capacity.
  int32_t capacity;
} KvxDecodeArgs;

// Append: encode n_new tokens per sequence at positions lens[b] .. lens[b]+n_new-1
// of preallocated packed buffers, in place.  lens is not updated; the launcher refuses
// max_len + n_new > capacity (every lens[b] <= max_len is the caller's promise).
typedef struct {
  int32_t batch, kv_heads, head_dim, n_new;
  int32_t x_dtype;                  // 0 = fp16, 1 = bf16, 2 = fp32
  const void* x;   int64_t x_sB, x_sH, x_sT;   // (B, Hkv, n_new, D), element strides
  const int32_t* lens;
  int32_t role;                     // 0 = key, 1 = value
  KvxField f[KVX_MAX_FIELDS];
  const float* consts[KVX_MAX_CONSTS];
  int32_t bits, group, value_group, block;
  // ABI 5: host bound >= max(lens), and tokens the packed buffers hold per sequence.
  int32_t max_len, capacity;
} KvxAppendArgs;

// Bounds every launcher checks first (host side; lens itself lives on the device): decode
// 0 <= max_len <= capacity, append n_new >= 0, max_len >= 0, max_len + n_new <= capacity.
// 0, or cudaErrorInvalidValue with the message for kvx_last_error().
int kvx_check_decode_bounds(const KvxDecodeArgs* a, const char* codec);
int kvx_check_append_bounds(const KvxAppendArgs* a, const char* codec);

#ifdef __cplusplus
}
#endif
#endif  // KVX_API_H
