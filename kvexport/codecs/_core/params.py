"""Typed, validated codec parameters.

A codec declares its parameters as a frozen dataclass whose fields are made with
:func:`param`.  The same declaration validates user input (a one-line
``ValueError`` naming the parameter and its allowed range), parses CLI specs
(``fibquant:k=4,bits=2``), becomes ONNX / plugin attributes, and is hashed into
the codec's spec so constants can be rebuilt.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from typing import Any, Sequence


def param(default: Any, *, lo: float | None = None, hi: float | None = None,
          choices: Sequence[Any] | None = None, doc: str = "",
          power_of_two: bool = False, multiple_of: int | None = None,
          kind: type | None = None) -> Any:
    """A dataclass field carrying its validation rule in ``metadata``.

    ``kind`` gives the type when the default is ``None`` (an optional parameter
    that another one determines, e.g. QJL's ``m`` from ``bits``)."""
    meta = dict(kind=kind or type(default), lo=lo, hi=hi, choices=tuple(choices) if choices is not None else None,
                doc=doc, power_of_two=power_of_two, multiple_of=multiple_of)
    if isinstance(default, list):
        default = tuple(default)
    return dataclasses.field(default=default, metadata=meta)


def _range_text(meta: dict) -> str:
    if meta["choices"] is not None:
        return "one of " + ", ".join(repr(c) for c in meta["choices"])
    lo, hi = meta["lo"], meta["hi"]
    parts = []
    if lo is not None and hi is not None:
        parts.append(f"in [{lo}, {hi}]")
    elif lo is not None:
        parts.append(f">= {lo}")
    elif hi is not None:
        parts.append(f"<= {hi}")
    if meta["power_of_two"]:
        parts.append("a power of two")
    if meta["multiple_of"]:
        parts.append(f"a multiple of {meta['multiple_of']}")
    return " and ".join(parts) or "any value"


def _coerce(codec: str, f: dataclasses.Field, value: Any) -> Any:
    """Coerce ``value`` to the field's declared type (strings come from CLI specs)."""
    kind = f.metadata["kind"]
    name = f"{codec}.{f.name}"
    if value is None and f.default is None:
        return None
    if kind is bool:
        if isinstance(value, str):
            low = value.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"{name} must be a boolean (true/false), got {value!r}")
        if isinstance(value, (bool, int)) and value in (0, 1):
            return bool(value)
        raise ValueError(f"{name} must be a boolean, got {value!r}")
    if kind is int:
        if isinstance(value, bool):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        if isinstance(value, str):
            try:
                value = float(value) if any(c in value for c in ".eE") else int(value)
            except ValueError:
                raise ValueError(f"{name} must be an integer, got {value!r}") from None
        if isinstance(value, float):
            if not value.is_integer():
                raise ValueError(f"{name} must be an integer, got {value!r}")
            value = int(value)
        if not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        return value
    if kind is float:
        if isinstance(value, bool):
            raise ValueError(f"{name} must be a number, got {value!r}")
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a number, got {value!r}") from None
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value!r}")
        return value
    if kind is tuple:
        if isinstance(value, str):
            items = [v for v in value.replace("/", " ").replace(";", " ").split() if v]
        elif isinstance(value, (list, tuple)):
            items = list(value)
        else:
            raise ValueError(f"{name} must be a list such as 4/2/2/2, got {value!r}")
        try:
            return tuple(int(v) for v in items)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a list of integers such as 4/2/2/2, got {value!r}") from None
    if kind is str:
        return str(value)
    return value


def _check(codec: str, f: dataclasses.Field, value: Any) -> None:
    meta = f.metadata
    if value is None:
        return
    name = f"{codec}.{f.name}"
    values = value if isinstance(value, tuple) else (value,)
    for v in values:
        bad = False
        if meta["choices"] is not None and v not in meta["choices"]:
            bad = True
        if meta["lo"] is not None and v < meta["lo"]:
            bad = True
        if meta["hi"] is not None and v > meta["hi"]:
            bad = True
        if meta["power_of_two"] and (v <= 0 or (int(v) & (int(v) - 1)) != 0):
            bad = True
        if meta["multiple_of"] and int(v) % meta["multiple_of"] != 0:
            bad = True
        if bad:
            raise ValueError(f"{name} must be {_range_text(meta)}, got {value!r}")


def build_params(codec: str, cls: type, given: dict[str, Any]) -> Any:
    """Instantiate the params dataclass ``cls`` from user values, validating each."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(given) - set(fields))
    if unknown:
        raise ValueError(f"{codec} has no parameter {unknown[0]!r}; "
                         f"known: {', '.join(sorted(fields))}")
    values = {}
    for name, f in fields.items():
        if name in given:
            values[name] = _coerce(codec, f, given[name])
            _check(codec, f, values[name])
    obj = cls(**values)
    post = getattr(obj, "validate", None)
    if post is not None:
        post()
    return obj


def describe(cls: type) -> list[dict[str, Any]]:
    """Parameter table rows (name, type, default, range, doc) for docs and CLI help."""
    rows = []
    for f in dataclasses.fields(cls):
        rows.append(dict(name=f.name, type=f.metadata["kind"].__name__, default=f.default,
                         range=_range_text(f.metadata), doc=f.metadata.get("doc", "")))
    return rows


def as_dict(params: Any) -> dict[str, Any]:
    d = dataclasses.asdict(params)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def spec_hash(name: str, version: int, params: Any) -> str:
    """Stable hash of (codec, format version, params): names the constants a backend rebuilds."""
    blob = json.dumps(dict(codec=name, version=version, params=as_dict(params)), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """Split ``name[:key=value,...]`` into the codec name and raw string values."""
    name, _, rest = spec.strip().partition(":")
    name = name.strip()
    if not name:
        raise ValueError(f"empty codec name in spec {spec!r}")
    given: dict[str, str] = {}
    if rest.strip():
        for item in rest.split(","):
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise ValueError(f"bad codec spec {spec!r}: expected key=value, got {item!r}")
            if key.strip() in given:
                raise ValueError(f"bad codec spec {spec!r}: parameter {key.strip()!r} given twice")
            given[key.strip()] = value.strip()
    return name, given
