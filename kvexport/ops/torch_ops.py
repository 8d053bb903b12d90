"""torch.library custom ops ``kvexport::<Name>`` generated from the op registry.

Every :class:`~kvexport.ops.registry.OpSpec` becomes one op whose schema lists
its tensors positionally and the codec parameters (plus ``causal``, ``softcap``
and ``sliding_window`` for attention) as keyword-only attributes.  The eager
kernel calls the codec's reference math; the fake kernel derives output shapes
from ``Codec.layout`` so ``torch.export`` traces the ops with symbolic token counts.
Ops are defined on first use; a codec object's own ops (layout variants included) come
from :func:`ops_of`.

    >>> from kvexport.ops import torch_ops
    >>> c = codecs.get("kivi", bits=2)
    >>> codes, scale, zero = torch_ops.ops_of(c)["value"](v, **torch_ops.op_attrs(c))
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch

from .registry import ATTENTION_ATTRS, DOMAIN, AttrSpec, OpSpec, all_ops, get_op, ops_for

_LIB: torch.library.Library | None = None
_REGISTERED: dict[str, OpSpec] = {}

_TYPES = {"int": "int", "float": "float", "bool": "bool", "ints": "int[]", "str": "str"}


def _default_text(a: AttrSpec) -> str:
    v = a.default
    if v is None:
        return "None"
    if a.type == "str":
        return repr(str(v))
    if a.type == "bool":
        return "True" if v else "False"
    if a.type == "ints":
        return "[" + ",".join(str(int(i)) for i in v) + "]"
    return repr(v)


def schema_string(spec: OpSpec) -> str:
    """The torch schema, e.g. ``KiviValueEncode(Tensor x, *, int bits=2, ...) -> Tensor[]``."""
    ins = [f"Tensor{'?' if t.optional else ''} {t.name}{'=None' if t.optional else ''}" for t in spec.inputs]
    attrs = [f"{_TYPES[a.type]}{'?' if a.default is None else ''} {a.name}={_default_text(a)}"
             for a in spec.attrs]
    ret = "Tensor[]" if spec.kind == "encode" else "Tensor"
    return f"{spec.name}({', '.join(ins)}, *, {', '.join(attrs)}) -> {ret}"


def codec_from_attrs(spec: OpSpec, attrs: dict[str, Any]):
    """The codec object an op node stands for (attributes = codec params; ``ATTENTION_ATTRS`` aside)."""
    from .. import codecs
    cls = codecs.codec_class(spec.codec)
    names = {a.name for a in spec.attrs} - {a.name for a in ATTENTION_ATTRS}
    params = {k: (tuple(v) if isinstance(v, list) else v) for k, v in attrs.items()
              if k in names and v is not None}
    return _codec_cached(cls, tuple(sorted(params.items())))


@functools.lru_cache(maxsize=64)
def _codec_cached(cls, params: tuple):
    return cls(**dict(params))


def _codec_for(spec: OpSpec, attrs: dict[str, Any]):
    """``codec_from_attrs``, refusing parameters whose layout is another op's."""
    c = codec_from_attrs(spec, attrs)
    want = ops_for(c)[spec.role or "attention"].name
    if want != spec.name:
        raise ValueError(f"{spec.name} is the op of another layout than {c!r}: call {want} "
                         "(kvexport.ops.registry.ops_for(codec))")
    return c


def _split(spec: OpSpec, args: tuple, kwargs: dict) -> tuple[dict[str, Any], dict[str, Any]]:
    tensors = {t.name: None for t in spec.inputs}
    for t, v in zip(spec.inputs, args):
        tensors[t.name] = v
    attrs = {a.name: a.default for a in spec.attrs}
    for k, v in kwargs.items():
        (tensors if k in tensors else attrs)[k] = v
    return tensors, attrs


def infer_tokens(codec, head_dim: int, role: str, fields: dict[str, Any]) -> int:
    """Token count of a packed cache from its field shapes (layouts may hold grouped fields)."""
    lens = [int(v.shape[2]) for v in fields.values()]
    lo, hi = max(lens, default=0), sum(lens)
    for t in range(lo, hi + 1):
        if all((int(fields[f.name].shape[2]),) + tuple(fields[f.name].shape[3:]) == tuple(f.shape)
               for f in codec.layout(head_dim, t, role)):
            return t
    raise ValueError(f"{codec.name}: packed {role} fields {[tuple(v.shape) for v in fields.values()]} "
                     f"match no token count")


def packed_from_fields(codec, role: str, fields: dict[str, torch.Tensor], head_dim: int, dtype) -> Any:
    from ..codecs import Packed
    first = next(iter(fields.values()))
    t = infer_tokens(codec, head_dim, role, fields)
    return Packed(codec.name, role, (first.shape[0], first.shape[1], t, head_dim), dtype,
                  codec.spec_hash, dict(fields))


def _field_names(spec: OpSpec, prefix: str) -> list[str]:
    return [t.name for t in spec.inputs if t.name.startswith(prefix)]


def _make_impl(spec: OpSpec) -> Callable:
    if spec.kind == "encode":
        def impl(*args, **kwargs):
            tensors, attrs = _split(spec, args, kwargs)
            c = _codec_for(spec, attrs)
            p = c.encode(tensors["x"], spec.role)
            return [p[t.name].contiguous() for t in spec.outputs]
        return impl

    def attn(*args, **kwargs):
        tensors, attrs = _split(spec, args, kwargs)
        c = _codec_for(spec, attrs)
        q = tensors["q"]
        d = q.shape[-1]
        pk = packed_from_fields(c, "key", {n[2:]: tensors[n] for n in _field_names(spec, "k_")}, d, q.dtype)
        pv = packed_from_fields(c, "value", {n[2:]: tensors[n] for n in _field_names(spec, "v_")}, d, q.dtype)
        return c.attend(q, pk, pv, window_k=tensors["window_k"], window_v=tensors["window_v"],
                        causal=bool(attrs["causal"]), softcap=float(attrs["softcap"]),
                        sliding_window=int(attrs["sliding_window"])).contiguous()
    return attn


class _Tokens:
    """A symbolic token count that also supports ``divmod`` (SymInt lacks it), so that
    ``Codec.layout`` written for ints gives symbolic field shapes under ``torch.export``."""

    def __init__(self, v):
        self.v = v

    def __divmod__(self, o):
        return self.v // _raw(o), self.v % _raw(o)

    def __getattr__(self, name):
        return getattr(self.v, name)


def _raw(v):
    return v.v if isinstance(v, _Tokens) else v


for _name in ("add", "sub", "mul", "floordiv", "mod", "lt", "le", "gt", "ge", "eq", "ne"):
    setattr(_Tokens, f"__{_name}__", (lambda n: lambda self, o: getattr(self.v, f"__{n}__")(_raw(o)))(_name))
    if _name in ("add", "sub", "mul", "floordiv", "mod"):
        setattr(_Tokens, f"__r{_name}__", (lambda n: lambda self, o: getattr(self.v, f"__r{n}__")(_raw(o)))(_name))


def _layout(codec, d: int, t, role: str):
    if isinstance(t, int):
        return codec.layout(d, t, role)
    return codec.layout(d, _Tokens(t), role)


def _make_fake(spec: OpSpec) -> Callable:
    if spec.kind == "encode":
        def fake(*args, **kwargs):
            tensors, attrs = _split(spec, args, kwargs)
            c = _codec_for(spec, attrs)
            x = tensors["x"]
            b, h, t, d = x.shape
            return [x.new_empty((b, h, *[_raw(s) for s in f.shape]), dtype=f.dtype)
                    for f in _layout(c, int(d), t, spec.role)]
        return fake

    def fake_attn(*args, **kwargs):
        tensors, _ = _split(spec, args, kwargs)
        return torch.empty_like(tensors["q"])
    return fake_attn


def register(spec: OpSpec) -> None:
    """Define ``spec`` under ``torch.ops.kvexport`` (idempotent)."""
    global _LIB
    if spec.name in _REGISTERED:
        return
    if _LIB is None:
        _LIB = torch.library.Library(DOMAIN, "FRAGMENT")
    _LIB.define(schema_string(spec))
    _LIB.impl(spec.name, _make_impl(spec), "CompositeExplicitAutograd")
    torch.library.register_fake(spec.qualname, _make_fake(spec), lib=_LIB)
    _REGISTERED[spec.name] = spec


def register_all() -> dict[str, OpSpec]:
    """Define every default-layout op (and the layout variants registered so far); returns
    name → spec of every op defined under ``torch.ops.kvexport``."""
    for spec in all_ops():
        register(spec)
    return dict(_REGISTERED)


def op(name: str):
    """``torch.ops.kvexport.<name>.default`` (registering first); ``name`` as in
    :func:`~kvexport.ops.registry.get_op`."""
    register_all()
    register(get_op(name))
    return getattr(getattr(torch.ops, DOMAIN), name).default


def op_attrs(codec) -> dict[str, Any]:
    """The keyword attributes of ``codec``'s ops: its resolved parameters (None left out)."""
    import dataclasses
    return {k: (list(v) if isinstance(v, tuple) else v)
            for k, v in dataclasses.asdict(codec.params).items() if v is not None}


def ops_of(codec) -> dict[str, Any]:
    """The torch ops of one codec object: ``{"key", "value", "attention"}`` → op."""
    return {k: op(s.name) for k, s in ops_for(codec).items()}
