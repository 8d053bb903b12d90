"""The codec interface every backend reads.

A codec subclasses :class:`Codec`, declares ``name``, ``Params`` (a frozen
dataclass of :func:`~kvexport.codecs._core.params.param` fields) and
``version`` (the packed-format version, bumped on any layout change), and
implements:

- ``layout(head_dim, tokens, role)`` → the list of :class:`Field` of its packed
  cache (the exact bytes; ``bits_per_coordinate`` is computed from it),
- ``_encode(x, role)`` on a sanitized fp32 (B, H, T, D) tensor → tensors dict,
- ``_decode(packed)`` → fp32 reconstruction,
- optionally ``_scores`` / ``_weighted_sum`` working on the packed form,
  ``constants`` (rotations, codebooks, sketches) and ``check_head_dim``.

Its ops (:func:`kvexport.ops.registry.ops_for`) follow from ``layout`` and ``version``.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from . import attention as _att
from .numerics import FP16_MAX, check_kv, sanitize
from .packed import Field, Packed
from .params import as_dict, build_params, spec_hash

ROLES = ("key", "value")


class Codec:
    name: ClassVar[str] = ""
    Params: ClassVar[type]
    version: ClassVar[int] = 1
    # Op names are ``<op_prefix>KeyEncode`` / ``ValueEncode`` / ``Attention`` (default: Name)
    op_prefix: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    lossless: ClassVar[bool] = False
    # Parameter sets of increasing rate (used by the distortion tests and reports);
    # the defaults of ``Params`` are the paper's operating point.
    RATE_SWEEP: ClassVar[tuple[dict, ...]] = ()

    def __init__(self, **params: Any) -> None:
        self.params = build_params(self.name, self.Params, params)

    # ----- identity -------------------------------------------------------
    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in as_dict(self.params).items())
        return f"{type(self).__name__}({args})"

    @property
    def spec_hash(self) -> str:
        return spec_hash(self.name, self.version, self.params)

    def spec(self) -> dict[str, Any]:
        """What a backend needs to rebuild this codec: name, format version, params, hash."""
        return dict(codec=self.name, version=self.version, params=as_dict(self.params),
                    hash=self.spec_hash)

    def constants(self, head_dim: int) -> dict[str, torch.Tensor]:
        """Shared fp32 constants (rotations, codebooks, sketches) for ``head_dim``; none by default."""
        self.check_head_dim(head_dim)
        return {}

    def constant_names(self, head_dim: int) -> tuple[str, ...]:
        """Names of :meth:`constants` in order (override where building them is slow)."""
        return tuple(self.constants(head_dim))

    # ----- layout and rate ------------------------------------------------
    def check_head_dim(self, head_dim: int) -> None:
        """Raise ``ValueError`` if this codec cannot encode vectors of ``head_dim``."""
        if head_dim < 1:
            raise ValueError(f"head_dim must be >= 1, got {head_dim}")

    def layout(self, head_dim: int, tokens: int, role: str = "key") -> list[Field]:
        raise NotImplementedError

    def nbytes(self, head_dim: int, tokens: int, role: str = "key", batch: int = 1, heads: int = 1) -> int:
        _check_role(role)
        return batch * heads * sum(f.nbytes_per_head for f in self.layout(head_dim, tokens, role))

    def bits_per_coordinate(self, head_dim: int, tokens: int = 1, role: str | None = None) -> float:
        """Exact average stored bits per coordinate, side values included.

        ``role=None`` averages keys and values (the whole cache); equals
        ``8 * packed.nbytes / numel`` of the packed cache for that shape.
        """
        self.check_head_dim(head_dim)
        if tokens < 1:
            raise ValueError(f"tokens must be >= 1, got {tokens}")
        roles = ROLES if role is None else (role,)
        total = sum(self.nbytes(head_dim, tokens, r) for r in roles)
        return 8.0 * total / (len(roles) * tokens * head_dim)

    def compression(self, head_dim: int, tokens: int = 1) -> float:
        """Compression factor of the whole K+V cache against fp16."""
        return 16.0 / self.bits_per_coordinate(head_dim, tokens)

    # ----- encode / decode ------------------------------------------------
    def encode(self, x: torch.Tensor, role: str = "key") -> Packed:
        """Encode ``x`` (B, H, T, D) fp16/bf16/fp32 → :class:`Packed`."""
        _check_role(role)
        check_kv(x)
        self.check_head_dim(x.shape[-1])
        tensors = self._encode(sanitize(x), role)
        b, h, t, d = x.shape
        for f in self.layout(d, t, role):
            got = tensors.get(f.name)
            want = (b, h, *f.shape)
            if got is None or tuple(got.shape) != want or got.dtype != f.dtype:
                raise RuntimeError(f"{self.name}: field {f.name} is "
                                   f"{None if got is None else (tuple(got.shape), got.dtype)}, layout says {(want, f.dtype)}")
        return Packed(self.name, role, (b, h, t, d), x.dtype, self.spec_hash, tensors)

    def decode(self, packed: Packed) -> torch.Tensor:
        """Reconstruction (B, H, T, D) in the input's dtype."""
        self._check_packed(packed)
        return self._decode(packed).to(packed.dtype)

    def append(self, packed: Packed, x: torch.Tensor) -> Packed:
        """Cache with the tokens of ``x`` (B, H, T_new, D) appended, equal to a one-shot encode.

        Per-token layouts concatenate. Layouts with token-group fields (``token_axis=False``)
        keep the newest ``tokens % group`` vectors in an fp16 ``residual`` field; appending
        re-encodes ``residual ++ x`` so full groups are quantized exactly as a one-shot encode
        would (byte-equal for fp16 inputs), then concatenates the group fields.
        """
        self._check_packed(packed)
        check_kv(x)
        if x.shape[:2] != packed.shape[:2] or x.shape[3] != packed.head_dim:
            raise ValueError(f"cannot append {tuple(x.shape)} to a cache of shape {packed.shape}")
        if packed.tokens == 0:
            return self.encode(x, packed.role)
        layout = self.layout(packed.head_dim, packed.tokens, packed.role)
        if all(f.token_axis for f in layout):
            new = self.encode(x, packed.role)
        else:
            if "residual" not in {f.name for f in layout}:
                raise NotImplementedError(f"{self.name}: grouped fields need a 'residual' field to append")
            new = self.encode(torch.cat([packed["residual"].to(torch.float32), sanitize(x)], dim=2), packed.role)
        tensors = {k: new[k] if k == "residual" else torch.cat([packed[k], new[k]], dim=2) for k in packed.tensors}
        shape = (packed.batch, packed.heads, packed.tokens + x.shape[2], packed.head_dim)
        return Packed(self.name, packed.role, shape, packed.dtype, self.spec_hash, tensors)

    # ----- attention on the packed form -----------------------------------
    def scores(self, q: torch.Tensor, packed_k: Packed) -> torch.Tensor:
        """Raw inner products <q, k̂> (B, Hq, Tq, T) in fp32, GQA by head grouping."""
        check_kv(q, "q")
        self._check_packed(packed_k, "key")
        if q.shape[-1] != packed_k.head_dim or q.shape[0] != packed_k.batch:
            raise ValueError(f"q {tuple(q.shape)} does not match keys {packed_k.shape}")
        b, hq, tq, _ = q.shape
        qg = _att.group_queries(q.to(torch.float32), packed_k.heads)
        s = self._scores(qg, packed_k)  # (B, Hkv, G*Tq, T)
        return _att.ungroup(s, hq, tq)

    def weighted_sum(self, p: torch.Tensor, packed_v: Packed) -> torch.Tensor:
        """Σ_t p[..., t] · v̂_t for weights p (B, Hq, Tq, T) → (B, Hq, Tq, D) fp32."""
        self._check_packed(packed_v, "value")
        b, hq, tq, t = p.shape
        pg = _att.group_queries(p.to(torch.float32), packed_v.heads)
        return _att.ungroup(self._weighted_sum(pg, packed_v), hq, tq)

    def attend(self, q: torch.Tensor, packed_k: Packed, packed_v: Packed, *,
               window_k: torch.Tensor | None = None, window_v: torch.Tensor | None = None,
               causal: bool = True, q_start: int | None = None,
               scale: float | None = None, softcap: float = 0.0, sliding_window: int = 0) -> torch.Tensor:
        """Softmax attention of ``q`` over the packed cache plus an optional fp16 window.

        ``softcap`` > 0 caps the scaled scores (c·tanh(s/c)); ``sliding_window`` S > 0 lets
        the query at position p see only keys j > p - S (see :mod:`._core.attention`).
        Returns (B, Hq, Tq, D) in q's dtype, saturated at ±65504 (reconstructions on the packed
        form may overshoot fp16's range when inputs saturated); softmax and accumulation in fp32.
        """
        if packed_k.tokens != packed_v.tokens:
            raise ValueError(f"keys hold {packed_k.tokens} tokens but values {packed_v.tokens}")
        if (window_k is None) != (window_v is None):
            raise ValueError("window_k and window_v must be given together")
        w = 0 if window_k is None else window_k.shape[2]
        t = packed_k.tokens
        tq = q.shape[2]
        if q_start is None:
            q_start = t + w - tq
        if scale is None:
            scale = 1.0 / math.sqrt(q.shape[-1])
        s = self.scores(q, packed_k)
        if w:
            check_kv(window_k, "window_k")
            check_kv(window_v, "window_v")
            qg = _att.group_queries(q.to(torch.float32), window_k.shape[1])
            sw = _att.ungroup(qg @ window_k.to(torch.float32).transpose(-1, -2), q.shape[1], tq)
            s = torch.cat([s, sw], dim=-1)
        p = _att.softmax_attend(s, scale, causal, q_start, softcap=softcap, sliding_window=sliding_window)
        out = self.weighted_sum(p[..., :t], packed_v)
        if w:
            pg = _att.group_queries(p[..., t:], window_v.shape[1])
            out = out + _att.ungroup(pg @ window_v.to(torch.float32), q.shape[1], tq)
        return out.clamp(-FP16_MAX, FP16_MAX).to(q.dtype)

    # ----- defaults for subclasses ----------------------------------------
    def _encode(self, x: torch.Tensor, role: str) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _decode(self, packed: Packed) -> torch.Tensor:
        raise NotImplementedError

    def _scores(self, qg: torch.Tensor, packed_k: Packed) -> torch.Tensor:
        """Grouped queries (B, Hkv, M, D) fp32 → (B, Hkv, M, T); default decodes the keys."""
        return qg @ self._decode(packed_k).transpose(-1, -2)

    def _weighted_sum(self, pg: torch.Tensor, packed_v: Packed) -> torch.Tensor:
        """Grouped weights (B, Hkv, M, T) fp32 → (B, Hkv, M, D); default decodes the values."""
        return pg @ self._decode(packed_v)

    def _check_packed(self, packed: Packed, role: str | None = None) -> None:
        if not isinstance(packed, Packed):
            raise ValueError(f"expected a Packed cache, got {type(packed).__name__}")
        if packed.codec != self.name or packed.spec != self.spec_hash:
            raise ValueError(f"cache was encoded by {packed.codec} (spec {packed.spec}), "
                             f"not by this {self.name} (spec {self.spec_hash})")
        if role is not None and packed.role != role:
            raise ValueError(f"expected a {role} cache, got a {packed.role} cache")


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise ValueError(f"role must be 'key' or 'value', got {role!r}")
