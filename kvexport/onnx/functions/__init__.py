"""Each op's reference semantics as an ONNX function (domain ``kvexport``).

A codec's module here (``functions/<codec>.py``) gives two builders over a
:class:`~.builder.Fn`: ``encode(fn, x, consts, codec, role, head_dim)`` → the
packed fields, and ``decode(fn, fields, consts, codec, role, head_dim)`` → fp32
(B, H, T, D).  From them come the three functions of the codec's ops:
``<P>KeyEncode`` / ``<P>ValueEncode`` (encode) and ``<P>Attention`` (decode
both halves + the shared attention skeleton, which equals ``Codec.attend`` up
to float summation order: the codecs' packed-domain scores are the inner
products with the decoded vectors, see docs/adding_a_codec.md).

Functions are specialised to one model: head_dim, the codec parameters and
``causal`` are read from the model's nodes (all nodes of one op type must agree)
and folded in as constants; ``softcap`` and ``sliding_window`` are read from each
calling node (attribute references), since they change from layer to layer; the
codec's constants arrive as inputs ``c_<name>``.
"""

from __future__ import annotations

import importlib

import onnx

from ...ops.registry import DOMAIN, OpSpec
from .builder import Fn, attention_body, make_function


def codec_module(codec_name: str):
    try:
        return importlib.import_module(f"{__name__}.{codec_name}")
    except ModuleNotFoundError as e:
        if e.name == f"{__name__}.{codec_name}":
            raise NotImplementedError(f"no ONNX reference function for codec {codec_name!r} yet") from None
        raise


def has_function(codec_name: str) -> bool:
    try:
        codec_module(codec_name)
        return True
    except NotImplementedError:
        return False


def build_function(spec: OpSpec, codec, head_dim: int, const_names: list[str], *,
                   window: bool = False, causal: bool = True) -> onnx.FunctionProto:
    """The model-local function of ``spec`` for this codec object and head_dim."""
    mod = codec_module(spec.codec)
    fn = Fn(prefix="_")
    consts = {n: f"c_{n}" for n in const_names}
    attr_names = [a.name for a in spec.attrs] + ["plugin_namespace", "plugin_version"]
    in_names = [t.name for t in spec.inputs] + list(consts.values())
    if spec.kind == "encode":
        fields = mod.encode(fn, "x", consts, codec, spec.role, head_dim)
        outs = [f"out_{t.name}" for t in spec.outputs]   # formal names (fp16's field "x" = its input)
        for t, name in zip(spec.outputs, outs):
            fn.rename(fields[t.name], name)
        return make_function(spec.name, DOMAIN, fn, in_names, outs, attr_names, spec.doc)
    kf = {t.name[2:]: t.name for t in spec.inputs if t.name.startswith("k_")}
    vf = {t.name[2:]: t.name for t in spec.inputs if t.name.startswith("v_")}
    k32 = mod.decode(fn, kf, consts, codec, "key", head_dim)
    v32 = mod.decode(fn, vf, consts, codec, "value", head_dim)
    out = attention_body(fn, "q", k32, v32, "window_k" if window else None, "window_v" if window else None,
                         causal, head_dim, softcap=fn.attr_float("softcap"),
                         sliding_window=fn.attr_int("sliding_window"))
    fn.rename(out, "out")
    return make_function(spec.name, DOMAIN, fn, in_names, ["out"], attr_names, spec.doc)
