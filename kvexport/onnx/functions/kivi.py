"""ONNX reference of ``kivi`` (``kvexport.codecs.kivi.codec``).

Keys: per-channel min/scale over groups of ``group`` tokens; the last
``tokens % group`` keys stay fp16 in ``residual``.  Values: per-token min/scale
over groups of ``value_group`` channels.  Codes use the stored fp16 scale/zero
(``_core.uniform``): round-half-even((x − zero) / scale) clamped to [0, 2^b − 1].
"""

from __future__ import annotations

import numpy as np

from .builder import F32, Fn


def _quantize(fn: Fn, xg: str, bits: int, axis: int) -> tuple[str, str, str]:
    """(codes fp32, scale fp16, zero fp16) reduced over ``axis`` (keepdims)."""
    levels = float((1 << bits) - 1)
    lo = fn.reduce("ReduceMin", xg, axis, 1)
    hi = fn.reduce("ReduceMax", xg, axis, 1)
    zero = fn.to_fp16(lo)
    scale = fn.to_fp16(fn.op("Div", fn.op("Sub", hi, lo), fn.const(levels)))
    s32, z32 = fn.cast(scale, F32), fn.cast(zero, F32)
    pos = fn.op("Greater", s32, fn.const(0.0))
    safe = fn.op("Where", pos, s32, fn.const(1.0))
    codes = fn.op("Clip", fn.op("Round", fn.op("Div", fn.op("Sub", xg, z32), safe)), fn.const(0.0), fn.const(levels))
    codes = fn.op("Where", pos, codes, fn.const(0.0))
    return codes, scale, zero


def encode(fn: Fn, x: str, consts: dict, codec, role: str, d: int) -> dict[str, str]:
    p = codec.params
    x = fn.sanitize(x)
    bh = fn.shape_of(x, 0, 2)
    if role == "key":
        g = p.group
        t = fn.dim(x, 2)
        groups = fn.op("Div", t, fn.ints(g))
        full = fn.op("Mul", groups, fn.ints(g))
        xg = fn.reshape(fn.slice(x, 0, full, 2), fn.cat_shape(bh, groups, g, d))   # (B, H, G, g, D)
        codes, scale, zero = _quantize(fn, xg, p.bits, 3)
        codes = fn.reshape(codes, fn.cat_shape(bh, full, d))
        return {"codes": fn.pack_bits(codes, p.bits, d),
                "scale": fn.op("Squeeze", scale, fn.ints(3)), "zero": fn.op("Squeeze", zero, fn.ints(3)),
                "residual": fn.to_fp16(fn.slice(x, full, np.iinfo(np.int64).max, 2))}
    vg = p.value_group
    xg = fn.reshape(x, fn.cat_shape(fn.shape_of(x, 0, 3), d // vg, vg))
    codes, scale, zero = _quantize(fn, xg, p.bits, 4)
    codes = fn.reshape(codes, fn.cat_shape(fn.shape_of(x, 0, 3), d))
    return {"codes": fn.pack_bits(codes, p.bits, d),
            "scale": fn.op("Squeeze", scale, fn.ints(4)), "zero": fn.op("Squeeze", zero, fn.ints(4))}


def decode(fn: Fn, f: dict[str, str], consts: dict, codec, role: str, d: int) -> str:
    p = codec.params
    codes = fn.cast(fn.unpack_bits(f["codes"], p.bits, d), F32)
    if role == "key":
        sc3 = fn.shape_of(f["scale"], 0, 3)                                       # (B, H, G)
        cg = fn.reshape(codes, fn.cat_shape(sc3, p.group, d))
        deq = fn.op("Add", fn.op("Mul", cg, fn.op("Unsqueeze", fn.cast(f["scale"], F32), fn.ints(3))),
                    fn.op("Unsqueeze", fn.cast(f["zero"], F32), fn.ints(3)))
        deq = fn.reshape(fn.clamp_fp16_range(deq), fn.cat_shape(fn.shape_of(f["codes"], 0, 3), d))
        return fn.op("Concat", deq, fn.cast(f["residual"], F32), axis=2)
    lead = fn.shape_of(f["codes"], 0, 3)
    cg = fn.reshape(codes, fn.cat_shape(lead, d // p.value_group, p.value_group))
    deq = fn.op("Add", fn.op("Mul", cg, fn.op("Unsqueeze", fn.cast(f["scale"], F32), fn.ints(4))),
                fn.op("Unsqueeze", fn.cast(f["zero"], F32), fn.ints(4)))
    return fn.reshape(fn.clamp_fp16_range(deq), fn.cat_shape(lead, d))    # _core.uniform: saturated
