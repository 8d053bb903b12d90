"""A small builder for ONNX function bodies, and the pieces every codec shares.

Bodies use only default-domain ops of opset :data:`~kvexport.onnx.OPSET`.  Each
helper mirrors one function of the torch reference so that packed codes come
out bit-identical: ``sanitize``/``to_fp16`` (``_core.numerics``),
``pack_bits``/``unpack_bits`` (``_core.bitpack``, LSB-first, via BitShift /
BitwiseAnd on uint8), ``rms_side``, and the attention skeleton
(``_core.attention`` + ``Codec.attend``).
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .. import OPSET

FP16_MAX = 65504.0
F32, F64, F16, U8, I32, I64 = (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16,
                               TensorProto.UINT8, TensorProto.INT32, TensorProto.INT64)


class Fn:
    """Accumulates nodes; every method returns the name(s) of its output value(s)."""

    def __init__(self, prefix: str = "t") -> None:
        self.nodes: list[onnx.NodeProto] = []
        self._n = 0
        self._prefix = prefix

    def _name(self) -> str:
        self._n += 1
        return f"{self._prefix}{self._n}"

    def op(self, op_type: str, *inputs: str, n_out: int = 1, out: list[str] | None = None, **attrs):
        outs = out or [self._name() for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, [i or "" for i in inputs], outs, **attrs))
        return outs[0] if len(outs) == 1 else outs

    def const(self, value, dtype=np.float32) -> str:
        arr = np.asarray(value, dtype=dtype)
        return self.op("Constant", value=numpy_helper.from_array(arr))

    def ints(self, *v: int) -> str:
        return self.const(list(v), np.int64)

    def attr_float(self, name: str) -> str:
        """fp32 scalar holding the calling node's float attribute ``name`` (an attribute reference)."""
        return self._attr_const(name, onnx.AttributeProto.FLOAT, "value_float")

    def attr_int(self, name: str) -> str:
        """int64 scalar holding the calling node's int attribute ``name`` (an attribute reference)."""
        return self._attr_const(name, onnx.AttributeProto.INT, "value_int")

    def _attr_const(self, name: str, kind: int, field: str) -> str:
        out = self._name()
        node = helper.make_node("Constant", [], [out])
        node.attribute.append(onnx.AttributeProto(name=field, ref_attr_name=name, type=kind))
        self.nodes.append(node)
        return out

    def topk(self, x: str, k: int, *, largest: int = 1) -> tuple[str, str]:
        """Sorted ``TopK`` over the last axis → (values, indices); safe on empty inputs.

        onnxruntime 1.30 dies with SIGFPE on a TopK whose input has no elements (a
        one-token prompt has no complete token group): the leading axes are flattened,
        one zero row is appended, and its results are dropped again."""
        lead, n = self.shape_of(x, 0, -1), self.dim(x, -1)
        rows = self.op("ReduceProd", lead, keepdims=1)
        flat = self.op("Reshape", x, self.cat_shape(rows, n), allowzero=1)   # rows may be 0
        zero = self.op("CastLike", self.op("ConstantOfShape", self.cat_shape(1, n)), flat)
        v, i = self.op("TopK", self.op("Concat", flat, zero, axis=0), self.ints(k), axis=-1, largest=largest,
                       sorted=1, n_out=2)
        back = self.cat_shape(lead, k)
        return tuple(self.op("Reshape", self.slice(t, 0, rows, 0), back, allowzero=1) for t in (v, i))

    def rename(self, src: str, dst: str) -> str:
        return self.op("Identity", src, out=[dst])

    # ----- shapes ------------------------------------------------------------
    def dim(self, x: str, axis: int) -> str:
        """Size of ``axis`` as a 1-element int64 tensor."""
        return self.op("Shape", x, start=axis, end=axis + 1 if axis != -1 else None) if axis != -1 else \
            self.op("Shape", x, start=-1)

    def shape_of(self, x: str, start: int, end: int | None = None) -> str:
        return self.op("Shape", x, start=start, end=end) if end is not None else self.op("Shape", x, start=start)

    def cat_shape(self, *parts) -> str:
        """Concat of 1-D int64 pieces; ints become constants."""
        names = [self.ints(p) if isinstance(p, int) else p for p in parts]
        return self.op("Concat", *names, axis=0)

    def reshape(self, x: str, shape) -> str:
        return self.op("Reshape", x, shape if isinstance(shape, str) else self.ints(*shape))

    def slice(self, x: str, start, end, axis: int) -> str:
        s = start if isinstance(start, str) else self.ints(start)
        e = end if isinstance(end, str) else self.ints(end)
        return self.op("Slice", x, s, e, self.ints(axis))

    def reduce(self, op_type: str, x: str, axis: int, keepdims: int = 1) -> str:
        """``Reduce*`` over one axis, reshaped to the expected shape: onnxruntime returns the
        input unchanged when it is empty (a cache of 0 tokens), the reshape makes that right."""
        r = self.op(op_type, x, self.ints(axis), keepdims=1)
        if axis == -1:
            want = self.cat_shape(self.shape_of(x, 0, -1), 1)
        else:
            want = self.cat_shape(self.shape_of(x, 0, axis), 1, self.shape_of(x, axis + 1))
        r = self.reshape(r, want)
        return r if keepdims else self.op("Squeeze", r, self.ints(axis))

    # ----- numerics (kvexport.codecs._core.numerics) --------------------------
    def cast(self, x: str, to: int) -> str:
        return self.op("Cast", x, to=to)

    def sanitize(self, x: str) -> str:
        """fp32 copy with NaN → 0 and ±Inf → ±65504."""
        x = self.cast(x, F32)
        x = self.op("Where", self.op("IsNaN", x), self.const(0.0), x)
        return self.op("Where", self.op("IsInf", x), self.op("Mul", self.op("Sign", x), self.const(FP16_MAX)), x)

    def to_fp16(self, x: str) -> str:
        """Saturating cast (via fp32, like the torch reference)."""
        return self.cast(self.op("Clip", self.cast(x, F32), self.const(-FP16_MAX), self.const(FP16_MAX)), F16)

    def rms_side(self, x32: str) -> str:
        """fp16 RMS over the last axis (keepdims), computed in fp64."""
        x64 = self.cast(x32, F64)
        ms = self.reduce("ReduceMean", self.op("Mul", x64, x64), -1, 1)
        return self.to_fp16(self.op("Sqrt", ms))

    def unit_rows(self, x32: str) -> str:
        """x / ‖x‖ over the last axis in fp64 (zero rows stay zero), cast to fp32."""
        x64 = self.cast(x32, F64)
        nrm = self.op("Sqrt", self.reduce("ReduceSum", self.op("Mul", x64, x64), -1, 1))
        pos = self.op("Greater", nrm, self.const(0.0, np.float64))
        safe = self.op("Max", nrm, self.const(1e-300, np.float64))
        u = self.op("Where", pos, self.op("Div", x64, safe), self.const(0.0, np.float64))
        return self.cast(u, F32)

    def norm_from_rms(self, rms16: str, n: int) -> str:
        return self.op("Mul", self.cast(rms16, F32), self.const(n ** 0.5))

    def clamp_fp16_range(self, x: str) -> str:
        return self.op("Clip", x, self.const(-FP16_MAX), self.const(FP16_MAX))

    # ----- bit packing (kvexport.codecs._core.bitpack) -------------------------
    def pack_bits(self, codes: str, bits: int, n: int) -> str:
        """(..., n) integer codes (any int/float type) in [0, 2^bits) → (..., ceil(n·bits/8)) uint8."""
        c = self.cast(codes, U8)
        if bits == 8:
            return c
        nbytes = (n * bits + 7) // 8
        lead = self.shape_of(c, 0, -1)
        bitv = self.op("BitwiseAnd",
                       self.op("BitShift", self.op("Unsqueeze", c, self.ints(-1)),
                               self.const(np.arange(bits), np.uint8), direction="RIGHT"),
                       self.const(1, np.uint8))                                  # (..., n, bits)
        stream = self.reshape(bitv, self.cat_shape(lead, n * bits))
        pad = nbytes * 8 - n * bits
        if pad:
            zeros = self.op("Expand", self.const(0, np.uint8), self.cat_shape(lead, pad))
            stream = self.op("Concat", stream, zeros, axis=-1)
        grouped = self.reshape(stream, self.cat_shape(lead, nbytes, 8))
        return self.cast(self.bits_to_int(grouped, 8), U8)

    def unpack_bits(self, packed: str, bits: int, n: int) -> str:
        """(..., nbytes) uint8 → (..., n) int32 codes."""
        if bits == 8:
            return self.cast(self.slice(packed, 0, n, -1), I32)
        nbytes = (n * bits + 7) // 8
        lead = self.shape_of(packed, 0, -1)
        bitv = self.op("BitwiseAnd",
                       self.op("BitShift", self.op("Unsqueeze", packed, self.ints(-1)),
                               self.const(np.arange(8), np.uint8), direction="RIGHT"),
                       self.const(1, np.uint8))                                  # (..., nbytes, 8)
        stream = self.reshape(bitv, self.cat_shape(lead, nbytes * 8))
        if nbytes * 8 != n * bits:
            stream = self.slice(stream, 0, n * bits, -1)
        return self.bits_to_int(self.reshape(stream, self.cat_shape(lead, n, bits)), bits)

    def bits_to_int(self, bitv: str, bits: int) -> str:
        """(..., bits) 0/1 values, LSB first → (...) int32.  An exact fp32 MatMul rather than
        ReduceSum, which onnxruntime mishandles on empty tensors (a cache of 0 tokens)."""
        w = self.const((1 << np.arange(bits)).reshape(bits, 1), np.float32)
        return self.cast(self.op("Squeeze", self.op("MatMul", self.cast(bitv, F32), w), self.ints(-1)), I32)

    # ----- codebooks --------------------------------------------------------------
    def bucketize(self, x: str, boundaries: str) -> str:
        """torch.bucketize(x, boundaries, right=True): #boundaries <= x, as int32."""
        ge = self.op("GreaterOrEqual", self.op("Unsqueeze", x, self.ints(-1)), boundaries)
        return self.reduce("ReduceSum", self.cast(ge, I32), -1, 0)

    def nearest_codeword(self, x: str, codebook: str) -> str:
        """argmin_n ‖c_n‖² − 2<x, c_n> over the last axis (ties → lowest index), int64.

        x (..., k) fp32, codebook (N, k) fp32 (``kvexport.codecs._core.vq.nearest_codeword``)."""
        c2 = self.reduce("ReduceSum", self.op("Mul", codebook, codebook), -1, 0)
        dots = self.op("MatMul", x, self.op("Transpose", codebook, perm=[1, 0]))
        d = self.op("Sub", c2, self.op("Mul", self.const(2.0), dots))
        idx = self.op("ArgMin", d, axis=-1, keepdims=0, select_last_index=0)
        return self.reshape(idx, self.shape_of(d, 0, -1))   # onnxruntime: empty input comes back unreduced


def make_function(name: str, domain: str, fn: Fn, inputs: list[str], outputs: list[str],
                  attributes: list[str], doc: str = "") -> onnx.FunctionProto:
    f = helper.make_function(domain, name, inputs, outputs, fn.nodes,
                             [helper.make_opsetid("", OPSET)], attributes=attributes)
    f.doc_string = doc
    return f


def attention_body(fn: Fn, q: str, k32: str, v32: str, window_k: str | None, window_v: str | None,
                   causal: bool, head_dim: int, scale: float | None = None, *,
                   softcap: str | None = None, sliding_window: str | None = None) -> str:
    """Softmax attention of q (B, Hq, Tq, D) over decoded k/v (B, Hkv, T, D) fp32 (+ fp16 window).

    Mirrors ``Codec.attend``: GQA by grouping query heads (query head h uses kv head
    h // (Hq/Hkv)), scores · 1/√D, soft-capping ``c·tanh(s/c)`` where c > 0, mask of
    ``_core.attention.visible`` with query i at position p = Tk − Tq + i (causal: j <= p;
    sliding window S > 0: j > p − S), max-subtracted softmax in fp32 (fully masked rows →
    zeros), output saturated at ±65504 and cast to q's type.  ``softcap`` (fp32 scalar) and ``sliding_window``
    (int64 scalar) are value names, typically :meth:`Fn.attr_float` / :meth:`Fn.attr_int`
    of the calling node, so one function serves layers with different windows.
    """
    if window_k is not None:
        k32 = fn.op("Concat", k32, fn.cast(window_k, F32), axis=2)
        v32 = fn.op("Concat", v32, fn.cast(window_v, F32), axis=2)
    q32 = fn.cast(q, F32)
    hkv = fn.dim(k32, 1)
    qg = fn.reshape(q32, fn.cat_shape(fn.dim(q32, 0), hkv, -1, head_dim))     # (B, Hkv, G*Tq, D)
    s = fn.op("MatMul", qg, fn.op("Transpose", k32, perm=[0, 1, 3, 2]))       # (B, Hkv, G*Tq, Tk)
    q_shape3 = fn.shape_of(q32, 0, 3)
    s = fn.reshape(s, fn.cat_shape(q_shape3, -1))                             # (B, Hq, Tq, Tk)
    s = fn.op("Mul", s, fn.const(1.0 / math.sqrt(head_dim) if scale is None else scale))
    if softcap is not None:   # c > 0: c·tanh(s/c); the Where keeps s (and drops s/0) when off
        capped = fn.op("Mul", fn.op("Tanh", fn.op("Div", s, softcap)), softcap)
        s = fn.op("Where", fn.op("Greater", softcap, fn.const(0.0)), capped, s)
    tq, tk = fn.dim(q32, 2), fn.dim(k32, 2)
    qpos = fn.op("Add", fn.op("Range", fn.ints(0), tq, fn.ints(1)), fn.op("Sub", tk, tq))
    kpos = fn.op("Range", fn.ints(0), tk, fn.ints(1))
    kpos2, qpos2 = fn.op("Unsqueeze", kpos, fn.ints(0)), fn.op("Unsqueeze", qpos, fn.ints(1))  # (1, Tk), (Tq, 1)
    visible = fn.op("LessOrEqual", kpos2, qpos2) if causal else None
    if sliding_window is not None:   # S > 0: j > p − S; S <= 0 sees everything
        inside = fn.op("Or", fn.op("LessOrEqual", sliding_window, fn.ints(0)),
                       fn.op("Greater", kpos2, fn.op("Sub", qpos2, sliding_window)))
        visible = inside if visible is None else fn.op("And", visible, inside)
    if visible is not None:
        s = fn.op("Where", visible, s, fn.const(-np.inf))
    mx = fn.reduce("ReduceMax", s, -1, 1)
    mx = fn.op("Where", fn.op("IsInf", mx), fn.const(0.0), mx)
    e = fn.op("Exp", fn.op("Sub", s, mx))
    z = fn.reduce("ReduceSum", e, -1, 1)
    p = fn.op("Div", e, fn.op("Where", fn.op("Greater", z, fn.const(0.0)), z, fn.const(1.0)))
    pg = fn.reshape(p, fn.cat_shape(fn.dim(q32, 0), hkv, -1, fn.dim(k32, 2)))  # (B, Hkv, G*Tq, Tk)
    o = fn.op("MatMul", pg, v32)                                               # (B, Hkv, G*Tq, D)
    o = fn.reshape(o, fn.cat_shape(q_shape3, head_dim))
    return fn.op("CastLike", fn.clamp_fp16_range(o), q)   # saturated like Codec.attend
