"""One declaration per op; every backend derives from it.

An :class:`OpSpec` names the op once — the torch op ``kvexport::<Name>``, the
ONNX node ``<Name>`` in domain ``kvexport``, the TensorRT plugin creator
``<Name>`` with ``plugin_namespace="kvexport"`` — and lists its tensors with
symbolic axes and its typed attributes with allowed ranges (taken from the
codec's parameter declaration).  A codec object's ops come from its own layout
(:func:`ops_for`); :func:`all_ops` lists every codec's ops at its default parameters.
"""

from __future__ import annotations

import dataclasses
import hashlib
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
# Attention ops are one version ahead of the encode ops of the same format: version 2 (format 1)
# added softcap / sliding_window.  Raise it on an attention interface change.
ATTENTION_VERSION_BUMP = 1


def op_version(codec_cls: type, kind: str) -> int:
    """An op's version: the codec's packed-format version (``Codec.version``), plus
    :data:`ATTENTION_VERSION_BUMP` for attention.  A format change thus changes every op's
    version, and a graph or engine written for another format is refused by name."""
    return int(codec_cls.version) + (ATTENTION_VERSION_BUMP if kind == "attention" else 0)


_PROBE_HEAD_DIMS = (128, 64, 256, 96, 192, 80, 160, 112, 48, 32, 512)


def probe_head_dim(codec) -> int:
    """A head_dim ``codec`` accepts (op specs do not depend on it: only field names, dtypes,
    ranks and token grouping enter a spec, and those follow the parameters alone)."""
    for d in (*_PROBE_HEAD_DIMS, *range(1, 1025)):
        try:
            codec.check_head_dim(d)
        except ValueError:
            continue
        return d
    raise ValueError(f"{codec!r} accepts no head_dim up to 1024")


def _field_specs(codec, role: str, head_dim: int) -> tuple[TensorSpec, ...]:
    import torch
    specs = []
    for f in codec.layout(head_dim, 64, role):
        dt = {torch.uint8: "uint8", torch.float16: "float16"}.get(f.dtype, str(f.dtype))
        axes = ("batch", "kv_heads", "tokens" if f.token_axis else "token_groups") + tuple(
            f"{f.name}_dim{i}" for i in range(1, len(f.shape)))
        specs.append(TensorSpec(f.name, dt, axes, doc=f.doc))
    return tuple(specs)


def _build_ops(codec) -> dict[str, OpSpec]:
    """The three ops of this codec object, named as its codec's default-parameter ops.

    Encode: x (batch, kv_heads, tokens, head_dim) → the packed fields of the key (resp.
    value) layout; keys and values are separate ops because their layouts differ (a backend
    needs a fixed output list per op).  Attention: q, the packed key fields, the packed value
    fields and an optional fp16 window → out.  Every op also takes the codec's constants
    (rotations, codebooks, sketches) as trailing inputs in ONNX (:attr:`OpSpec.constants`).
    """
    cls = type(codec)
    prefix = cls.op_prefix or cls.name.capitalize()
    d = probe_head_dim(codec)
    attrs = attrs_from_params(cls.Params)
    consts = tuple(codec.constant_names(d))
    fields = {r: _field_specs(codec, r, d) for r in ("key", "value")}
    x = TensorSpec("x", "float", ("batch", "kv_heads", "tokens", "head_dim"))
    out: dict[str, OpSpec] = {}
    for role in ("key", "value"):
        out[role] = OpSpec(f"{prefix}{role.capitalize()}Encode", cls.name, op_version(cls, "encode"), (x,),
                           fields[role], attrs,
                           f"Encode new {role} tokens into {cls.name}'s packed {role} layout.",
                           kind="encode", role=role, constants=consts)
    q = TensorSpec("q", "float", ("batch", "q_heads", "q_tokens", "head_dim"))
    wk = TensorSpec("window_k", "float16", ("batch", "kv_heads", "window", "head_dim"), True)
    wv = TensorSpec("window_v", "float16", ("batch", "kv_heads", "window", "head_dim"), True)
    o = TensorSpec("out", "float", ("batch", "q_heads", "q_tokens", "head_dim"))
    out["attention"] = OpSpec(
        f"{prefix}Attention", cls.name, op_version(cls, "attention"),
        (q, *[_prefixed(f, "k_") for f in fields["key"]], *[_prefixed(f, "v_") for f in fields["value"]], wk, wv),
        (o,), attrs + ATTENTION_ATTRS,
        f"Softmax attention over a {cls.name} packed cache (+ optional fp16 window); "
        "query i sits at position p = (cache + window tokens) - q_tokens + i and sees key j "
        "iff j <= p (causal) and j > p - sliding_window (if > 0); scores are "
        "softcap·tanh(q·k/(√D·softcap)) if softcap > 0.",
        kind="attention", constants=consts)
    return out


def _signature(spec: OpSpec) -> str:
    """What a backend's fixed tensor list depends on: tensors (name, dtype, axes) and constants."""
    t = lambda ts: [(x.name, x.dtype, x.axes, x.optional) for x in ts]
    return repr((t(spec.inputs), t(spec.outputs), spec.constants))


_OPS: dict[str, dict[str, OpSpec]] = {}        # codec spec hash → its ops
_CANONICAL: dict[str, dict[str, OpSpec]] = {}  # codec name → ops of the default parameters
_VARIANTS: dict[str, OpSpec] = {}              # op name → spec, for every layout seen so far


def ops_for(codec) -> dict[str, OpSpec]:
    """The ops of one codec object: ``{"key": <P>KeyEncode, "value": <P>ValueEncode,
    "attention": <P>Attention}``, fields and constants from *its* layout.

    Where this codec's parameters give an op another tensor list than the default
    parameters do (``qjl:outliers=0`` has no outlier fields, ``ternary:key_axis=token`` no
    key ``residual``), that op is a distinct op named ``<Name>_<8 hex digits of its
    signature>``: torch and ONNX schemas are fixed per name, and TensorRT creators exist only
    for the default layouts (a layout without a creator is refused by name, never misread).
    """
    key = codec.spec_hash
    got = _OPS.get(key)
    if got is not None:
        return got
    base = _canonical(type(codec))
    got = {}
    for k, spec in _build_ops(codec).items():
        if _signature(spec) != _signature(base[k]):
            tag = hashlib.sha256(_signature(spec).encode()).hexdigest()[:8]
            spec = dataclasses.replace(spec, name=f"{spec.name}_{tag}",
                                       doc=spec.doc + " (a parameter-dependent layout variant)")
        _VARIANTS.setdefault(spec.name, spec)
        got[k] = spec
    _OPS[key] = got
    return got


def _canonical(cls: type) -> dict[str, OpSpec]:
    got = _CANONICAL.get(cls.name)
    if got is None:
        got = _CANONICAL[cls.name] = _build_ops(cls())
        for s in got.values():
            _VARIANTS[s.name] = s
    return got


def _prefixed(t: TensorSpec, p: str) -> TensorSpec:
    return dataclasses.replace(t, name=p + t.name)


def all_ops() -> list[OpSpec]:
    """The ops of every registered codec at its default parameters, in registry order (the
    ops TensorRT creators and the docs table are generated from)."""
    from .. import codecs
    out: list[OpSpec] = []
    for n in codecs.names():
        out.extend(_canonical(codecs.codec_class(n)).values())
    names = [o.name for o in out]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise RuntimeError(f"op names declared twice: {sorted(dup)}")
    return out


def known_ops() -> list[OpSpec]:
    """:func:`all_ops` plus every layout variant :func:`ops_for` has named in this process."""
    all_ops()
    return list(_VARIANTS.values())


def get_op(name: str) -> OpSpec:
    """An op by name (``<Name>`` or ``kvexport::<Name>``): a default-layout op, or a variant
    that :func:`ops_for` has named in this process."""
    for o in known_ops():
        if o.name == name or o.qualname == name:
            return o
    raise ValueError(f"unknown kvexport op {name!r}")


def spec_for_node(op_type: str, attrs: dict[str, Any]) -> tuple[OpSpec, Any]:
    """(op spec, codec object) of a graph node ``op_type`` with attributes ``attrs``.

    The codec is rebuilt from the attributes; its op must be ``op_type`` (a node whose name
    does not match its parameters' layout is refused), and a node carrying
    ``plugin_version`` must carry this codec format's op version.
    """
    base = op_type.split("_", 1)[0]
    fam = next((o for o in all_ops() if o.name == base), None)
    if fam is None:
        raise ValueError(f"unknown kvexport op {op_type!r}")
    from .torch_ops import codec_from_attrs
    codec = codec_from_attrs(fam, attrs)
    spec = ops_for(codec)[fam.role or "attention"]
    if spec.name != op_type:
        raise ValueError(f"kvexport op {op_type} does not match the layout of its parameters "
                         f"({codec!r} has op {spec.name})")
    v = attrs.get("plugin_version")
    if v is not None and str(v) != str(spec.version):
        raise ValueError(f"kvexport op {op_type} has version {v}, but the installed {codec.name} packed "
                         f"format (version {codec.version}) has op version {spec.version}: re-export the model")
    return spec, codec


def ops_table_markdown() -> str:
    """The docs table of every op (written to docs/OPS.md by scripts/gen_docs.py)."""
    lines = ["| op | codec | version | inputs | outputs | attributes |", "|---|---|---|---|---|---|"]
    for o in all_ops():
        ins = ", ".join(f"`{t.name}`{'?' if t.optional else ''}" for t in o.inputs)
        outs = ", ".join(f"`{t.name}`{'?' if t.optional else ''}" for t in o.outputs)
        attrs = ", ".join(f"`{a.name}`" for a in o.attrs)
        lines.append(f"| `{o.qualname}` | {o.codec} | {o.version} | {ins} | {outs} | {attrs} |")
    return "\n".join(lines) + "\n"
