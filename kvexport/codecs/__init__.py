"""The codec registry: ``get(name, **params)``, ``names()``, ``from_spec("name:k=v,...")``.

Each codec lives in ``kvexport/codecs/<name>/`` with the same files:
``codec.py`` (reference math, a :class:`Codec` subclass registered here) and
``ops.py`` (its op declarations for the op registry).
"""

from __future__ import annotations

import importlib
from typing import Any

from ._core.params import parse_spec

# Order is the order reports list them in: seed codecs, then baselines.
CODEC_NAMES = ("fp16", "kivi", "turbo", "qjl", "polar", "ternary", "fibquant")

# Imported on first use (PEP 562), so that names and specs are checked without torch.
_LAZY = {"Codec": "._core.base", "ROLES": "._core.base", "Field": "._core.packed", "Packed": "._core.packed"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

_REGISTRY: dict[str, type[Codec]] = {}


def register(cls: type[Codec]) -> type[Codec]:
    """Class decorator adding a codec to the registry under ``cls.name``."""
    if not cls.name or cls.name in _REGISTRY:
        raise RuntimeError(f"codec name {cls.name!r} missing or registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def _load_all() -> None:
    for n in CODEC_NAMES:
        if n not in _REGISTRY:
            mod = f"{__name__}.{n}.codec"
            try:
                importlib.import_module(mod)
            except ModuleNotFoundError as e:  # a codec folder not written yet; tests require all
                if e.name not in (mod, f"{__name__}.{n}"):
                    raise


def names() -> list[str]:
    """Registered codec names."""
    _load_all()
    return [n for n in CODEC_NAMES if n in _REGISTRY]


def codec_class(name: str) -> type[Codec]:
    _load_all()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise _unknown(name, names()) from None


def _unknown(name: str, known) -> ValueError:
    import difflib
    close = difflib.get_close_matches(name, known, n=1)
    return ValueError(f"unknown codec {name!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                      + f"; known: {', '.join(known)}")


def check_spec(spec: str) -> tuple[str, dict[str, str]]:
    """Parse ``spec`` and check its codec name without importing torch (fast refusal of a
    typo); the parameters are validated by :func:`from_spec`."""
    name, given = parse_spec(spec)
    if name not in CODEC_NAMES:
        raise _unknown(name, CODEC_NAMES)
    return name, given


def get(name: str, **params: Any) -> Codec:
    """A codec object, parameters validated (``ValueError`` names the bad one)."""
    return codec_class(name)(**params)


def from_spec(spec: str) -> Codec:
    """Codec from a CLI spec ``name[:key=value,...]`` such as ``fibquant:k=4,bits=2``."""
    name, given = parse_spec(spec)
    return get(name, **given)


__all__ = ["Codec", "Field", "Packed", "ROLES", "CODEC_NAMES", "register", "names", "get",
           "from_spec", "check_spec", "codec_class"]
