"""One declaration per op; every backend derives from it.

An :class:`OpSpec` names the op once — the torch op ``kvexport::<Name>``, the
ONNX node ``<Name>`` in domain ``kvexport``, the TensorRT plugin creator
``<Name>`` with ``plugin_namespace="kvexport"`` — and lists its tensors with
symbolic axes and its typed attributes with allowed ranges (taken from the
codec's parameter declaration).  Each codec's ``ops.py`` returns its specs.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

DOMAIN = "kvexport"


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str            # "float", "uint8", "float16", "int64" ("float" = fp16/bf16/fp32)
    axes: tuple[str, ...]  # symbolic axes, e.g. ("batch", "kv_heads", "tokens", "head_dim")
    optional: bool = False
    doc: str = ""


@dataclasses.dataclass(frozen=True)
class AttrSpec:
    name: str
    type: str             # "int", "float", "bool", "ints", "str"
    default: Any
    range: str
    doc: str = ""


@dataclasses.dataclass(frozen=True)
class OpSpec:
    name: str
    codec: str
    version: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    attrs: tuple[AttrSpec, ...]
    doc: str = ""
    kind: str = ""                # "encode" or "attention"
    role: str | None = None       # for encode ops: "key" or "value"
    # names of the codec's shared constants (``Codec.constants``); in ONNX they are
    # trailing inputs ``c_<name>`` fed from initializers so the file is self-contained
    constants: tuple[str, ...] = ()

    @property
    def qualname(self) -> str:
        return f"{DOMAIN}::{self.name}"


def attrs_from_params(params_cls: type) -> tuple[AttrSpec, ...]:
    from ..codecs._core.params import describe
    kinds = {"int": "int", "float": "float", "bool": "bool", "tuple": "ints", "str": "str"}
    return tuple(AttrSpec(r["name"], kinds.get(r["type"], r["type"]), r["default"], r["range"], r["doc"])
                 for r in describe(params_cls))


# Attributes of every Attention op beyond the codec parameters (not codec parameters:
# ``codec_from_attrs`` drops them).  Semantics in ``kvexport.codecs._core.attention``.
ATTENTION_ATTRS = (
    AttrSpec("causal", "bool", True, "0 or 1", "causal mask over absolute positions"),
    AttrSpec("softcap", "float", 0.0, ">= 0 (0 = off)",
             "logit soft-capping of the scaled score: s = softcap*tanh(s/softcap) (Gemma 2)"),
    AttrSpec("sliding_window", "int", 0, ">= 0 (0 = off)",
             "query at position p sees key j only if j > p - sliding_window"),
)
# Attention ops are one version ahead of the encode ops: version 2 added softcap / sliding_window.
ATTENTION_VERSION_BUMP = 1


def standard_ops(codec_cls: type, prefix: str, version: int = 1) -> list[OpSpec]:
    """The three ops every codec has: ``<prefix>KeyEncode``, ``<prefix>ValueEncode``
    and ``<prefix>Attention``.

    Encode: x (batch, kv_heads, tokens, head_dim) → the packed fields of the codec's
    key (resp. value) layout.  Keys and values are separate ops because their
    layouts differ (a backend needs a fixed output list per op).  Attention: q, the
    packed key fields, the packed value fields and an optional fp16 window → out.
    Every op also takes the codec's constants (rotations, codebooks, sketches) as
    trailing inputs in ONNX (see :attr:`OpSpec.constants`).
    """
    attrs = attrs_from_params(codec_cls.Params)
    consts = _constant_names(codec_cls)
    fields = {r: _field_specs(codec_cls, r) for r in ("key", "value")}
    x = TensorSpec("x", "float", ("batch", "kv_heads", "tokens", "head_dim"))
    specs = []
    for role in ("key", "value"):
        specs.append(OpSpec(f"{prefix}{role.capitalize()}Encode", codec_cls.name, version, (x,),
                            tuple(fields[role]), attrs,
                            f"Encode new {role} tokens into {codec_cls.name}'s packed {role} layout.",
                            kind="encode", role=role, constants=consts))
    q = TensorSpec("q", "float", ("batch", "q_heads", "q_tokens", "head_dim"))
    wk = TensorSpec("window_k", "float16", ("batch", "kv_heads", "window", "head_dim"), True)
    wv = TensorSpec("window_v", "float16", ("batch", "kv_heads", "window", "head_dim"), True)
    out = TensorSpec("out", "float", ("batch", "q_heads", "q_tokens", "head_dim"))
    specs.append(OpSpec(f"{prefix}Attention", codec_cls.name, version + ATTENTION_VERSION_BUMP,
                        (q, *[_prefixed(f, "k_") for f in fields["key"]],
                         *[_prefixed(f, "v_") for f in fields["value"]], wk, wv),
                        (out,), attrs + ATTENTION_ATTRS,
                        f"Softmax attention over a {codec_cls.name} packed cache (+ optional fp16 window); "
                        "query i sits at position p = (cache + window tokens) - q_tokens + i and sees key j "
                        "iff j <= p (causal) and j > p - sliding_window (if > 0); scores are "
                        "softcap·tanh(q·k/(√D·softcap)) if softcap > 0.",
                        kind="attention", constants=consts))
    return specs


def _constant_names(codec_cls: type) -> tuple[str, ...]:
    probe = codec_cls()
    d = probe.default_probe_head_dim() if hasattr(probe, "default_probe_head_dim") else 128
    return tuple(probe.constants(d).keys())


def _field_specs(codec_cls: type, role: str) -> list[TensorSpec]:
    import torch
    probe = codec_cls()
    d = probe.default_probe_head_dim() if hasattr(probe, "default_probe_head_dim") else 128
    specs = []
    for f in probe.layout(d, 64, role):
        dt = {torch.uint8: "uint8", torch.float16: "float16"}.get(f.dtype, str(f.dtype))
        axes = ("batch", "kv_heads", "tokens" if f.token_axis else "token_groups") + tuple(
            f"{f.name}_dim{i}" for i in range(1, len(f.shape)))
        specs.append(TensorSpec(f.name, dt, axes, doc=f.doc))
    return specs


def _prefixed(t: TensorSpec, p: str) -> TensorSpec:
    return dataclasses.replace(t, name=p + t.name)


def all_ops() -> list[OpSpec]:
    """Every op of every registered codec, in registry order."""
    from .. import codecs
    out: list[OpSpec] = []
    for n in codecs.names():
        mod = importlib.import_module(f"kvexport.codecs.{n}.ops")
        out.extend(mod.ops())
    names = [o.name for o in out]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise RuntimeError(f"op names declared twice: {sorted(dup)}")
    return out


def get_op(name: str) -> OpSpec:
    for o in all_ops():
        if o.name == name or o.qualname == name:
            return o
    raise ValueError(f"unknown kvexport op {name!r}")


def ops_table_markdown() -> str:
    """The docs table of every op (written to docs/OPS.md by scripts/gen_docs.py)."""
    lines = ["| op | codec | version | inputs | outputs | attributes |", "|---|---|---|---|---|---|"]
    for o in all_ops():
        ins = ", ".join(f"`{t.name}`{'?' if t.optional else ''}" for t in o.inputs)
        outs = ", ".join(f"`{t.name}`{'?' if t.optional else ''}" for t in o.outputs)
        attrs = ", ".join(f"`{a.name}`" for a in o.attrs)
        lines.append(f"| `{o.qualname}` | {o.codec} | {o.version} | {ins} | {outs} | {attrs} |")
    return "\n".join(lines) + "\n"
