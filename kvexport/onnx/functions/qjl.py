"""ONNX reference of ``qjl`` (``kvexport.codecs.qjl.codec``).

Keys, per whole group of ``group`` tokens: outlier channels = the ``outliers``
channels of largest sum of squares (TopK, ties → lower index, then ascending);
bits = sign bits [S·k_in ≥ 0] and [S_o·k_out ≥ 0] (1-bit LSB-first packing),
norms = fp16 RMS of k_in (over D) and of the gathered outlier channels; the
last ``tokens % group`` keys stay fp16.  Decode (paper Def. 3.1): the linear
reconstruction sqrt(π/2)/m·‖k‖·Sᵀ·signs whose inner products equal the
estimator.  Values: KIVI-style per-token integer codes (see ``kivi``).
Constants: ``c_sketch`` S (m, D), ``c_outlier_sketch`` S_o (m_o, D).
"""

from __future__ import annotations

import math

import numpy as np

from . import kivi
from .builder import F32, I64, U8, Fn

SQRT_HALF_PI = math.sqrt(math.pi / 2.0)


def _mask(fn: Fn, idx: str, d: int, group: int) -> str:
    """(B, H, G, o) channel indices → (B, H, G·group, D) bool, True on those channels."""
    oh = fn.op("OneHot", fn.cast(idx, I64), fn.ints(d), fn.const([0.0, 1.0]), axis=-1)    # (B, H, G, o, D)
    m = fn.reduce("ReduceMax", oh, 3, 1)                                      # (B, H, G, 1, D)
    bh_g = fn.shape_of(idx, 0, 3)
    m = fn.op("Expand", m, fn.cat_shape(bh_g, group, d))
    m = fn.reshape(m, fn.cat_shape(fn.shape_of(idx, 0, 2), -1, d))
    return fn.op("Greater", m, fn.const(0.0))


def _signs_rows(fn: Fn, bits: str, rows: int, sketch: str, rms: str, n: int) -> str:
    """sqrt(π/2)/rows · ‖k‖ · (±1 signs) @ S  → (B, H, T, D)."""
    s = fn.op("Sub", fn.op("Mul", fn.cast(fn.unpack_bits(bits, 1, rows), F32), fn.const(2.0)), fn.const(1.0))
    w = fn.op("Mul", fn.norm_from_rms(rms, n), fn.const(SQRT_HALF_PI / rows))
    return fn.op("Mul", fn.op("MatMul", s, sketch), fn.op("Unsqueeze", w, fn.ints(-1)))


def encode(fn: Fn, x: str, consts: dict, codec, role: str, d: int) -> dict[str, str]:
    p = codec.params
    if role == "value":
        vp = type("P", (), {"bits": p.value_bits, "value_group": p.value_group})
        return kivi.encode(fn, x, consts, type("C", (), {"params": vp})(), "value", d)
    x = fn.sanitize(x)
    m = codec.sketch_rows(d)
    s_t = fn.op("Transpose", consts["sketch"], perm=[1, 0])
    sign_bits = lambda v, st, rows: fn.pack_bits(fn.op("GreaterOrEqual", fn.op("MatMul", v, st), fn.const(0.0)), 1, rows)
    rms = lambda v: fn.op("Squeeze", fn.rms_side(v), fn.ints(-1))
    if p.outliers == 0:
        return {"bits": sign_bits(x, s_t, m), "norm": rms(x)}
    g, o = p.group, p.outliers
    bh = fn.shape_of(x, 0, 2)
    groups = fn.op("Div", fn.dim(x, 2), fn.ints(g))
    full = fn.op("Mul", groups, fn.ints(g))
    k = fn.slice(x, 0, full, 2)
    kg = fn.reshape(k, fn.cat_shape(bh, groups, g, d))
    energy = fn.reduce("ReduceSum", fn.op("Mul", kg, kg), 3, 0)             # (B, H, G, D)
    top = fn.topk(energy, o)[1]
    idx = fn.topk(top, o, largest=0)[0]                                         # ascending
    mask = _mask(fn, idx, d, g)
    k_in = fn.op("Where", mask, fn.const(0.0), k)
    k_out = fn.op("Where", mask, k, fn.const(0.0))
    idx_t = fn.reshape(fn.op("Expand", fn.op("Unsqueeze", idx, fn.ints(3)), fn.cat_shape(bh, groups, g, o)),
                       fn.cat_shape(bh, full, o))
    k_o = fn.op("GatherElements", k, idx_t, axis=3)
    so_t = fn.op("Transpose", consts["outlier_sketch"], perm=[1, 0])
    return {"bits": sign_bits(k_in, s_t, m), "norm": rms(k_in),
            "outlier_bits": sign_bits(k_out, so_t, p.outlier_m), "outlier_norm": rms(k_o),
            "outlier_idx": fn.cast(idx, U8),
            "residual": fn.to_fp16(fn.slice(x, full, np.iinfo(np.int64).max, 2))}


def decode(fn: Fn, f: dict[str, str], consts: dict, codec, role: str, d: int) -> str:
    p = codec.params
    if role == "value":
        vp = type("P", (), {"bits": p.value_bits, "value_group": p.value_group})
        return kivi.decode(fn, f, consts, type("C", (), {"params": vp})(), "value", d)
    m = codec.sketch_rows(d)
    k_in = _signs_rows(fn, f["bits"], m, consts["sketch"], f["norm"], d)
    if p.outliers == 0:
        return fn.clamp_fp16_range(k_in)   # saturated like the torch decode
    k_out = _signs_rows(fn, f["outlier_bits"], p.outlier_m, consts["outlier_sketch"], f["outlier_norm"], p.outliers)
    k = fn.clamp_fp16_range(fn.op("Where", _mask(fn, f["outlier_idx"], d, p.group), k_out, k_in))
    return fn.op("Concat", k, fn.cast(f["residual"], F32), axis=2)
