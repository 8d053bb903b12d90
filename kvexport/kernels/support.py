"""The settings the CUDA kernels are compiled for: the Python statement of the launchers'
dispatch in ``plugins/<codec>/*.cu`` (template instantiations and their guards).

:func:`kernel_support` (the torch binding, ``kvexport.trt.plugin_support``) and the
TensorRT creators' tables (``kvx_trt_ops.inc``, written by :mod:`kvexport.trt.codegen`)
read it, so a setting is refused by name before an export, not as a parser error after.
Adding an instantiation to a launcher means adding it here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

HEAD_DIMS = (64, 128, 256)  # dispatchDecode / the append kernels


@dataclasses.dataclass(frozen=True)
class Choice:
    """Integer parameter ``param`` of ``codec`` the launchers switch on: only ``values`` exist."""
    codec: str
    param: str
    values: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Span:
    """Integer parameter (or each entry of a tuple parameter) bounded by the kernels; where the
    parameter is None its value is ``getattr(codec, from_head_dim)(head_dim)`` (e.g. qjl m)."""
    codec: str
    param: str
    lo: int
    hi: int
    multiple_of: int = 1
    from_head_dim: str | None = None


@dataclasses.dataclass(frozen=True)
class Combo:
    """Parameters dispatched on together: only the listed value tuples exist."""
    codec: str
    params: tuple[str, ...]
    values: tuple[tuple[int, ...], ...]


CHOICES = (
    Choice("turbo", "bits", (1, 2, 3, 4, 8)),
    Choice("kivi", "bits", (2, 3, 4, 8)),
    Choice("qjl", "value_bits", (2, 3, 4, 8)),
    Choice("polar", "levels", (4,)),
)
SPANS = (
    Span("polar", "level_bits", 1, 8),
    Span("qjl", "m", 8, 4096, 8, from_head_dim="sketch_rows"),
    Span("qjl", "outlier_m", 8, 4096, 8),
    Span("ternary", "key_planes", 1, 8),
    Span("ternary", "value_planes", 1, 8),
)
# fibquant.cu byKB: the paper's operating points and the rate sweep.
COMBOS = (
    Combo("fibquant", ("k", "N"), ((8, 16), (8, 256), (4, 16), (4, 64), (4, 256), (2, 16))),
)


@dataclasses.dataclass(frozen=True)
class Derived:
    """Kernel parameter ``name`` the codec derives from ``source`` (the optional codec parameter
    ``name``, when given, wins): tabulated by the codec's own ``value(codec, head_dim)`` over
    ``grid`` (every value the kernels can run) for the plugin creators, which derive nothing."""
    codec: str
    name: str
    source: str
    grid: tuple
    value: Callable[[Any, int], int]
    per_head_dim: bool = False


def _fib_pairs() -> tuple:
    return next(c.values for c in COMBOS if c.codec == "fibquant")


DERIVED = (
    # fibquant: N -> index bits, at the compiled (k, N) pairs
    Derived("fibquant", "index_bits", "N", tuple(sorted({n for _, n in _fib_pairs()})),
            lambda c, d: c.index_bits),
    # ternary: bits (a multiple of 0.8 in [1.6, 12.8]) -> key / value planes (the codec's split)
    Derived("ternary", "key_planes", "bits", tuple(round(0.8 * i, 1) for i in range(2, 17)),
            lambda c, d: c.planes("key")),
    Derived("ternary", "value_planes", "bits", tuple(round(0.8 * i, 1) for i in range(2, 17)),
            lambda c, d: c.planes("value")),
    # qjl: bits -> sketch rows m = bits·head_dim, for every m the kernels take
    Derived("qjl", "m", "bits", tuple(range(8, 4097, 8)), lambda c, d: c.sketch_rows(d), per_head_dim=True),
)


def derived_rows() -> list[tuple[str, str, float, int, str, int]]:
    """(codec, source, source value, head_dim or 0, name, value) of every :data:`DERIVED` entry,
    each computed by the codec itself (for qjl the grid is m: the source value is m / head_dim)."""
    from .. import codecs
    rows = []
    for dv in DERIVED:
        cls = codecs.codec_class(dv.codec)
        for d in (HEAD_DIMS if dv.per_head_dim else (0,)):
            for g in dv.grid:
                src = g / d if dv.per_head_dim else g
                try:
                    codec = cls(**{dv.source: src})
                except ValueError:
                    continue  # outside the codec's own range: refused before any kernel
                rows.append((dv.codec, dv.source, float(src), d, dv.name, int(dv.value(codec, d))))
    return rows


def _bad_span(s: Span, v) -> bool:
    vals = v if isinstance(v, (tuple, list)) else (v,)
    return any(not (s.lo <= int(x) <= s.hi) or int(x) % s.multiple_of for x in vals)


def kernel_support(codec, head_dim: int | None = None) -> str | None:
    """None if the CUDA kernels run ``codec`` (at ``head_dim`` if given), else a one-line
    reason naming the parameter."""
    name, p = codec.name, codec.params
    if head_dim is not None and head_dim not in HEAD_DIMS:
        return f"{name}: head_dim {head_dim} has no CUDA kernel (compiled: {', '.join(map(str, HEAD_DIMS))})"
    for c in CHOICES:
        if c.codec == name and getattr(p, c.param) not in c.values:
            return (f"{name}.{c.param}={getattr(p, c.param)} has no CUDA kernel "
                    f"(compiled: {', '.join(map(str, c.values))})")
    for s in SPANS:
        if s.codec != name:
            continue
        v = getattr(p, s.param)
        if v is None and s.from_head_dim and head_dim is not None:
            try:
                v = getattr(codec, s.from_head_dim)(head_dim)
            except ValueError as e:
                return str(e).splitlines()[0]
        if v is not None and _bad_span(s, v):
            step = f" multiple of {s.multiple_of}" if s.multiple_of > 1 else ""
            return f"{name}.{s.param}={v} has no CUDA kernel (each a{step} in [{s.lo}, {s.hi}])"
    for c in (c for c in COMBOS if c.codec == name):
        got = tuple(getattr(p, n) for n in c.params)
        if got not in c.values:
            have = " ".join("(" + ",".join(map(str, t)) + ")" for t in c.values)
            return (f"{name} ({', '.join(f'{n}={v}' for n, v in zip(c.params, got))}) has no CUDA kernel; "
                    f"({', '.join(c.params)}) must be one of {have}")
    return None


__all__ = ["HEAD_DIMS", "CHOICES", "SPANS", "COMBOS", "DERIVED", "Choice", "Span", "Combo", "Derived",
           "derived_rows", "kernel_support"]
