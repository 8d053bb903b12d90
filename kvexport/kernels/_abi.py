"""ctypes mirror of ``plugins/common/kvx_api.h`` (field for field; checked against the
library's own ``sizeof`` at load time)."""

from __future__ import annotations

import ctypes as C

ABI_VERSION = 5
MAX_FIELDS = 8
MAX_CONSTS = 4


class KvxField(C.Structure):
    _fields_ = [("ptr", C.c_void_p), ("sB", C.c_int64), ("sH", C.c_int64), ("sT", C.c_int64)]


class KvxDecodeArgs(C.Structure):
    _fields_ = [
        ("batch", C.c_int32), ("q_heads", C.c_int32), ("kv_heads", C.c_int32), ("head_dim", C.c_int32),
        ("q_dtype", C.c_int32),
        ("q", C.c_void_p), ("q_sB", C.c_int64), ("q_sH", C.c_int64),
        ("out", C.c_void_p), ("o_sB", C.c_int64), ("o_sH", C.c_int64),
        ("lens", C.c_void_p), ("max_len", C.c_int32),
        ("k", KvxField * MAX_FIELDS), ("v", KvxField * MAX_FIELDS),
        ("win_k", C.c_void_p), ("win_v", C.c_void_p),
        ("w_sB", C.c_int64), ("w_sH", C.c_int64), ("w_sT", C.c_int64),
        ("win_lens", C.c_void_p), ("win_max", C.c_int32),
        ("consts", C.c_void_p * MAX_CONSTS),
        ("bits", C.c_int32), ("group", C.c_int32), ("value_group", C.c_int32), ("block", C.c_int32),
        ("scale", C.c_float), ("num_splits", C.c_int32),
        ("workspace", C.c_void_p),
        # ABI 4
        ("softcap", C.c_float), ("sliding_window", C.c_int32),
        ("q_tokens", C.c_int32), ("q_sT", C.c_int64), ("o_sT", C.c_int64),
        # ABI 5
        ("capacity", C.c_int32),
    ]


class KvxAppendArgs(C.Structure):
    _fields_ = [
        ("batch", C.c_int32), ("kv_heads", C.c_int32), ("head_dim", C.c_int32), ("n_new", C.c_int32),
        ("x_dtype", C.c_int32),
        ("x", C.c_void_p), ("x_sB", C.c_int64), ("x_sH", C.c_int64), ("x_sT", C.c_int64),
        ("lens", C.c_void_p), ("role", C.c_int32),
        ("f", KvxField * MAX_FIELDS),
        ("consts", C.c_void_p * MAX_CONSTS),
        ("bits", C.c_int32), ("group", C.c_int32), ("value_group", C.c_int32), ("block", C.c_int32),
        # ABI 5
        ("max_len", C.c_int32), ("capacity", C.c_int32),
    ]
