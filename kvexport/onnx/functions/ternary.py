"""ONNX reference of ``ternary`` (KVTQ digit planes, ``kvexport.codecs.ternary.codec``).

Encode, per (token, channel group) and plane (greedy on the residual r): a = |r|
sorted descending (TopK), S = cumsum(a) in fp64, k* = first argmax S²/k,
step = fp16(fp32(S_k*/k*)), t = sign(r)·[|r| > step/2], r ← r − step·t.
Trits are packed 5 per byte in base 3 (digit = t mod 3, least significant first).
Groups: ``group`` channels of one token (values; keys with ``key_axis='token'``),
or one channel over ``key_group`` tokens (keys, ``key_axis='channel'``: the last
``tokens % key_group`` keys stay fp16 in ``residual``).
Decode: Σ_p step_p · t_p.
"""

from __future__ import annotations

import numpy as np

from .builder import F32, F64, I32, U8, Fn

_POW3 = np.array([1, 3, 9, 27, 81], np.int32)


def _fit_plane(fn: Fn, r: str, n: int) -> tuple[str, str]:
    a = fn.op("Abs", r)
    srt = fn.topk(a, n)[0]
    s = fn.op("CumSum", fn.cast(srt, F64), fn.const(-1, np.int64))
    k = fn.const(np.arange(1, n + 1), np.float64)
    kstar = fn.op("ArgMax", fn.op("Div", fn.op("Mul", s, s), k), axis=-1, keepdims=1, select_last_index=0)
    sk = fn.op("GatherElements", s, kstar, axis=-1)
    kk = fn.cast(fn.op("Add", kstar, fn.ints(1)), F64)
    step = fn.to_fp16(fn.cast(fn.op("Div", sk, kk), F32))
    step = fn.reshape(step, fn.cat_shape(fn.shape_of(r, 0, -1), 1))   # right shape when r is empty
    half = fn.op("Mul", fn.cast(step, F32), fn.const(0.5))
    trits = fn.op("Where", fn.op("Greater", a, half), fn.op("Sign", r), fn.const(0.0))
    return step, trits


def _pack_trits(fn: Fn, t: str, n: int) -> str:
    nb = (n + 4) // 5
    lead = fn.shape_of(t, 0, -1)
    ti = fn.cast(t, I32)
    d = fn.op("Where", fn.op("Less", ti, fn.const(0, np.int32)), fn.const(2, np.int32), ti)
    if nb * 5 != n:
        d = fn.op("Concat", d, fn.op("Expand", fn.const(0, np.int32), fn.cat_shape(lead, nb * 5 - n)), axis=-1)
    d = fn.reshape(d, fn.cat_shape(lead, nb, 5))
    return fn.cast(fn.reduce("ReduceSum", fn.op("Mul", d, fn.const(_POW3, np.int32)), -1, 0), U8)


def _unpack_trits(fn: Fn, b: str, n: int) -> str:
    nb = (n + 4) // 5
    lead = fn.shape_of(b, 0, -1)
    digits = fn.op("Mod", fn.op("Div", fn.op("Unsqueeze", fn.cast(b, I32), fn.ints(-1)), fn.const(_POW3, np.int32)),
                   fn.const(3, np.int32))
    digits = fn.reshape(digits, fn.cat_shape(lead, nb * 5))
    if nb * 5 != n:
        digits = fn.slice(digits, 0, n, -1)
    one = fn.cast(fn.op("Equal", digits, fn.const(1, np.int32)), F32)
    two = fn.cast(fn.op("Equal", digits, fn.const(2, np.int32)), F32)
    return fn.op("Sub", one, two)


def _fit_planes(fn: Fn, r: str, n: int, planes: int) -> tuple[str, str]:
    """Greedy planes over the last axis of r (..., G, n) → (steps (..., G, P), trits (..., G, P, n))."""
    steps, trits = [], []
    for _ in range(planes):
        s, t = _fit_plane(fn, r, n)
        r = fn.op("Sub", r, fn.op("Mul", fn.cast(s, F32), t))
        steps.append(s)
        trits.append(fn.op("Unsqueeze", t, fn.ints(-2)))
    st = fn.op("Concat", *steps, axis=-1) if planes > 1 else steps[0]
    tr = fn.op("Concat", *trits, axis=-2) if planes > 1 else trits[0]
    return st, tr


def _by_channel(codec, role: str) -> bool:
    return role == "key" and getattr(codec.params, "key_axis", "token") == "channel"


def encode(fn: Fn, x: str, consts: dict, codec, role: str, d: int) -> dict[str, str]:
    planes = codec.planes(role)
    x = fn.sanitize(x)
    if _by_channel(codec, role):
        # one channel over key_group tokens: (B, H, NG, kg, D) → (B, H, NG, D, kg)
        kg = codec.params.key_group
        bh = fn.shape_of(x, 0, 2)
        ng = fn.op("Div", fn.dim(x, 2), fn.ints(kg))
        full = fn.op("Mul", ng, fn.ints(kg))
        xg = fn.op("Transpose", fn.reshape(fn.slice(x, 0, full, 2), fn.cat_shape(bh, ng, kg, d)), perm=[0, 1, 2, 4, 3])
        st, tr = _fit_planes(fn, xg, kg, planes)                   # (B,H,NG,D,P), (B,H,NG,D,P,kg)
        tr = fn.reshape(fn.op("Transpose", tr, perm=[0, 1, 2, 5, 4, 3]), fn.cat_shape(bh, full, planes, d))
        return {"trits": _pack_trits(fn, tr, d), "steps": fn.op("Transpose", st, perm=[0, 1, 2, 4, 3]),
                "residual": fn.to_fp16(fn.slice(x, full, np.iinfo(np.int64).max, 2))}
    g = codec.params.group
    lead3 = fn.shape_of(x, 0, 3)
    st, tr = _fit_planes(fn, fn.reshape(x, fn.cat_shape(lead3, d // g, g)), g, planes)  # (B,H,T,G,P), (..,G,P,g)
    tr = fn.reshape(fn.op("Transpose", tr, perm=[0, 1, 2, 4, 3, 5]), fn.cat_shape(lead3, planes, d))
    return {"trits": _pack_trits(fn, tr, d), "steps": fn.op("Transpose", st, perm=[0, 1, 2, 4, 3])}


def decode(fn: Fn, f: dict[str, str], consts: dict, codec, role: str, d: int) -> str:
    if _by_channel(codec, role):
        kg = codec.params.key_group
        st = fn.cast(f["steps"], F32)                                           # (B, H, NG, P, D)
        tr = fn.reshape(_unpack_trits(fn, f["trits"], d),
                        fn.cat_shape(fn.shape_of(st, 0, 3), kg, codec.planes("key"), d))  # (B,H,NG,kg,P,D)
        full = fn.reduce("ReduceSum", fn.op("Mul", tr, fn.op("Unsqueeze", st, fn.ints(3))), 4, 0)
        full = fn.reshape(fn.clamp_fp16_range(full), fn.cat_shape(fn.shape_of(st, 0, 2), -1, d))
        return fn.op("Concat", full, fn.cast(f["residual"], F32), axis=2)
    g = codec.params.group
    lead4 = fn.shape_of(f["trits"], 0, 4)                                     # (B, H, T, P)
    tr = fn.reshape(_unpack_trits(fn, f["trits"], d), fn.cat_shape(lead4, d // g, g))
    st = fn.op("Unsqueeze", fn.cast(f["steps"], F32), fn.ints(-1))
    x = fn.reduce("ReduceSum", fn.op("Mul", tr, st), 3, 0)       # (B, H, T, G, g)
    return fn.reshape(fn.clamp_fp16_range(x), fn.cat_shape(fn.shape_of(f["trits"], 0, 3), d))
