"""ONNX reference of ``polar`` (PolarQuant, ``kvexport.codecs.polar.codec``).

Encode: y = x Πᵀ; recursive polar transform (paper Alg. 1): level 1 angle
atan2(odd, even) mapped to [0, 2π), levels ≥ 2 atan2 of radius pairs; radius
hypot.  hypot runs in fp64 and rounds once to fp32; ONNX has no Atan2, so it is a
quadrant-corrected fp32 Atan of the smaller/larger ratio (a code can differ from torch's
atan2 when an angle lies within an ulp of a cell boundary: the ``codes`` tolerance).  Codes = bucketize per
level, one LSB-first bit stream (level 1's codes first); radius fp16 of r/√D.
Decode: radii split top level first into (r cos ψ, r sin ψ) from the cos/sin
tables, then ŷ Π, clamped to ±65504.
"""

from __future__ import annotations

import math

import numpy as np

from .builder import F32, F64, U8, Fn


def _atan(fn: Fn, r: str) -> str:
    """atan of an fp64 ratio in [−1, 1]: onnxruntime has Atan for fp32 only."""
    return fn.cast(fn.op("Atan", fn.cast(r, F32)), F64)


def _atan2_f64(fn: Fn, y: str, x: str) -> str:
    ax, ay = fn.op("Abs", x), fn.op("Abs", y)
    small = fn.op("LessOrEqual", ay, ax)                                       # |y| <= |x|
    zero = fn.const(0.0, np.float64)
    safe_x = fn.op("Where", fn.op("Equal", x, zero), fn.const(1.0, np.float64), x)
    safe_y = fn.op("Where", fn.op("Equal", y, zero), fn.const(1.0, np.float64), y)
    t_small = _atan(fn, fn.op("Div", y, safe_x))
    pi = fn.const(math.pi, np.float64)
    # x < 0: shift by ±π (y >= 0 → +π), x == 0 with y == 0 → 0
    neg_shift = fn.op("Where", fn.op("GreaterOrEqual", y, zero), pi, fn.op("Neg", pi))
    t_small = fn.op("Where", fn.op("Less", x, zero), fn.op("Add", t_small, neg_shift), t_small)
    t_small = fn.op("Where", fn.op("And", fn.op("Equal", x, zero), fn.op("Equal", y, zero)), zero, t_small)
    half = fn.op("Mul", fn.op("Sign", y), fn.const(math.pi / 2, np.float64))
    t_big = fn.op("Sub", half, _atan(fn, fn.op("Div", x, safe_y)))
    return fn.op("Where", small, t_small, t_big)


def _pairs(fn: Fn, v: str) -> tuple[str, str]:
    """(..., n) → (even (..., n/2), odd (..., n/2)) in fp64."""
    half = fn.op("Div", fn.dim(v, -1), fn.ints(2))    # not -1: Reshape cannot infer it for 0 tokens
    p = fn.reshape(v, fn.cat_shape(fn.shape_of(v, 0, -1), half, 2))
    even = fn.op("Squeeze", fn.slice(p, 0, 1, -1), fn.ints(-1))
    odd = fn.op("Squeeze", fn.slice(p, 1, 2, -1), fn.ints(-1))
    return fn.cast(even, F64), fn.cast(odd, F64)


def _hypot(fn: Fn, a: str, b: str) -> str:
    return fn.cast(fn.op("Sqrt", fn.op("Add", fn.op("Mul", a, a), fn.op("Mul", b, b))), F32)


def encode(fn: Fn, x: str, consts: dict, codec, role: str, d: int) -> dict[str, str]:
    lb = codec.params.level_bits
    x = fn.sanitize(x)
    y = fn.op("MatMul", x, fn.op("Transpose", consts["rotation"], perm=[1, 0]))
    even, odd = _pairs(fn, y)
    a = fn.cast(_atan2_f64(fn, odd, even), F32)
    a = fn.op("Where", fn.op("Less", a, fn.const(0.0)), fn.op("Add", a, fn.const(2 * math.pi)), a)
    angles, r = [a], _hypot(fn, even, odd)
    for _ in range(1, len(lb)):
        even, odd = _pairs(fn, r)
        angles.append(fn.cast(_atan2_f64(fn, odd, even), F32))
        r = _hypot(fn, even, odd)
    streams = []
    for lvl, (ang, b) in enumerate(zip(angles, lb), start=1):
        codes = fn.cast(fn.bucketize(ang, consts[f"boundaries_l{lvl}"]), U8)
        bits = fn.op("BitwiseAnd", fn.op("BitShift", fn.op("Unsqueeze", codes, fn.ints(-1)),
                                         fn.const(np.arange(b), np.uint8), direction="RIGHT"), fn.const(1, np.uint8))
        streams.append(fn.reshape(bits, fn.cat_shape(fn.shape_of(x, 0, 3), (d >> lvl) * b)))
    stream = fn.op("Concat", *streams, axis=-1) if len(streams) > 1 else streams[0]
    total = sum((d >> (i + 1)) * b for i, b in enumerate(lb))
    return {"codes": fn.pack_bits(stream, 1, total),
            "radius": fn.to_fp16(fn.op("Div", r, fn.const(math.sqrt(d))))}


def decode(fn: Fn, f: dict[str, str], consts: dict, codec, role: str, d: int) -> str:
    lb = codec.params.level_bits
    total = sum((d >> (i + 1)) * b for i, b in enumerate(lb))
    bits = fn.unpack_bits(f["codes"], 1, total)                               # (B, H, T, total) int32
    lead = fn.shape_of(f["codes"], 0, 3)
    cos, sin, off = [], [], 0
    for lvl, b in enumerate(lb, start=1):
        n = d >> lvl
        seg = fn.reshape(fn.slice(bits, off, off + n * b, -1), fn.cat_shape(lead, n, b))
        code = fn.reduce("ReduceSum", fn.op("Mul", seg, fn.const(1 << np.arange(b), np.int32)), -1, 0)
        cos.append(fn.op("Gather", consts[f"cos_l{lvl}"], code, axis=0))
        sin.append(fn.op("Gather", consts[f"sin_l{lvl}"], code, axis=0))
        off += n * b
    rho = fn.op("Mul", fn.cast(f["radius"], F32), fn.const(math.sqrt(d)))
    for c, s in zip(reversed(cos), reversed(sin)):
        pair = fn.op("Concat", fn.op("Unsqueeze", fn.op("Mul", rho, c), fn.ints(-1)),
                     fn.op("Unsqueeze", fn.op("Mul", rho, s), fn.ints(-1)), axis=-1)
        rho = fn.reshape(pair, fn.cat_shape(lead, fn.op("Mul", fn.dim(c, -1), fn.ints(2))))
    return fn.clamp_fp16_range(fn.op("MatMul", rho, consts["rotation"]))
