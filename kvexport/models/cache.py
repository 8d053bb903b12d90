"""The compressed KV cache: per layer a packed K/V cache plus an fp16 window.

State of one layer after ``n`` tokens, with fp16 window ``W`` (the codec's
``window`` parameter): tokens ``[0, n-W)`` live in the codec's packed cache,
the newest ``min(n, W)`` tokens in fp16.  A codec may keep its newest packed
tokens raw too (KIVI's key ``residual``: a group that is not full yet); such a
token is seen in fp16 until its group is quantized.  Query at position ``a``
therefore sees key ``j <= a`` through the codec iff ``j < cut(a)`` where
``cut(a) = c(max(0, a+1-W))`` and ``c(m)`` counts the tokens of an ``m``-token
packed cache that are really encoded.

:meth:`LayerCache.attend` appends ``Tq`` new tokens and attends all ``Tq``
queries at once with exactly the view each would have had when decoded one by
one, so prefill equals token-by-token decode (for codecs whose encoding of a
token is fixed once made — every per-token codec, and KIVI's groups).  The
scores of encoded tokens are computed on the packed form (``codec.scores`` /
``codec.weighted_sum``); the raw tokens in fp16.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Sequence

import torch

from ..codecs import Codec, Packed, from_spec
from ..codecs._core import attention as _att
from ..codecs._core.numerics import FP16_MAX, count_sanitized, store_fp16


def _encoded_count(codec: Codec, head_dim: int, m: int, role: str) -> int:
    """Tokens of an ``m``-token packed cache that are encoded (not held raw in a ``residual``)."""
    if m == 0:
        return 0
    raw = sum(f.shape[0] for f in codec.layout(head_dim, m, role) if f.name == "residual")
    return m - raw


def _encoded_counts(codec: Codec, head_dim: int, ms: torch.Tensor, role: str) -> torch.Tensor:
    """:func:`_encoded_count` for each packed size in ``ms`` (1-D int64)."""
    has_residual = any(f.name == "residual" for f in codec.layout(head_dim, 1, role))
    if not has_residual:
        return ms
    return torch.tensor([_encoded_count(codec, head_dim, int(m), role) for m in ms], dtype=torch.long)


def codec_window(codec: Codec) -> int:
    return int(getattr(codec.params, "window", 0) or 0)


COMPRESS = ("kv", "k", "v")
BACKENDS = ("torch", "cuda")  # where a CompressedKVCache runs its attention (see CompressedKVCache)


@dataclasses.dataclass
class LayerPlan:
    """Which codec each layer uses: ``default`` unless ``overrides`` names the layer.

    ``compress``: which half of the cache goes through the codec — ``"kv"`` (both),
    ``"k"`` (keys only; values held by the ``fp16`` codec) or ``"v"`` (values only).
    The uncompressed half is stored, and counted, at 2 bytes per coordinate.
    ``value_codec``: values of every layer without an override use this codec
    instead of ``default`` (mixed key/value rates); only with ``compress="kv"``.
    """
    default: Codec
    overrides: dict[int, Codec] = dataclasses.field(default_factory=dict)
    compress: str = "kv"
    value_codec: Codec | None = None

    def __post_init__(self) -> None:
        if self.compress not in COMPRESS:
            raise ValueError(f"compress must be one of {'|'.join(COMPRESS)}, got {self.compress!r}")
        if self.value_codec is not None and self.compress != "kv":
            raise ValueError("value_codec needs compress='kv'")

    def codec(self, layer: int) -> Codec:
        return self.overrides.get(layer, self.default)

    def role_codecs(self, layer: int) -> tuple[Codec, Codec]:
        """(key codec, value codec) of ``layer`` under :attr:`compress`."""
        c = self.codec(layer)
        if self.compress == "kv":
            vc = self.value_codec if self.value_codec is not None and layer not in self.overrides else c
            return c, vc
        from ..codecs import get
        raw = get("fp16", window=codec_window(c))
        return (c, raw) if self.compress == "k" else (raw, c)

    def describe(self) -> str:
        if not self.overrides:
            return ""
        by: dict[str, list[int]] = {}
        for i, c in sorted(self.overrides.items()):
            by.setdefault(_codec_label(c), []).append(i)
        return "; ".join(f"layers {','.join(map(str, ls))}={lab}" for lab, ls in by.items())


def _codec_label(c: Codec) -> str:
    from ..codecs._core.params import as_dict
    defaults = type(c)().params
    changed = {k: v for k, v in as_dict(c.params).items() if as_dict(defaults)[k] != v}
    return c.name + (":" + ",".join(f"{k}={'/'.join(map(str, v)) if isinstance(v, list) else v}"
                                    for k, v in changed.items()) if changed else "")


def parse_overrides(items: Sequence[str], num_layers: int) -> dict[int, Codec]:
    """``["0,-1=fp16", "1-3=kivi:bits=4"]`` → {layer: codec}; negative indices count from the end."""
    out: dict[int, Codec] = {}
    for item in items:
        layers, eq, spec = item.partition("=")
        if not eq or not layers.strip() or not spec.strip():
            raise ValueError(f"bad layer override {item!r}: expected LAYERS=SPEC such as 0,-1=fp16")
        codec = from_spec(spec)
        for part in layers.split(","):
            part = part.strip()
            m = re.fullmatch(r"(-?\d+)(?:-(\d+))?", part)
            if not m:
                raise ValueError(f"bad layer list {layers!r} in override {item!r}: use 0,-1 or 2-5")
            lo = int(m.group(1))
            hi = int(m.group(2)) if m.group(2) is not None else lo
            for i in range(lo, hi + 1):
                j = i + num_layers if i < 0 else i
                if not 0 <= j < num_layers:
                    raise ValueError(f"layer {i} in override {item!r} is out of range for {num_layers} layers")
                out[j] = codec
    return out


class LayerCache:
    """One layer's cache: packed K/V (tokens ``[0, m)``) and fp16 raw tails.

    ``raw_k`` holds fp16 copies of keys ``[ck, n)`` (KIVI-style residual + the
    window), ``raw_v`` of values ``[cv, n)``.  Only the window part of them is
    extra storage (the residual is inside the packed cache), see :meth:`nbytes`.
    """

    def __init__(self, codec: Codec, window: int, value_codec: Codec | None = None) -> None:
        self.codec = codec  # the keys' codec
        self.vcodec = codec if value_codec is None else value_codec
        self.window = window
        self.n = 0
        self.k: Packed | None = None
        self.v: Packed | None = None
        self.raw_k: torch.Tensor | None = None
        self.raw_v: torch.Tensor | None = None
        self.ck = 0
        self.cv = 0

    @property
    def packed_tokens(self) -> int:
        return 0 if self.k is None else self.k.tokens

    def nbytes(self) -> int:
        """Bytes held: the packed caches plus the fp16 window (2 bytes per coordinate)."""
        total = 0
        if self.k is not None:
            total += self.k.nbytes + self.v.nbytes
        w = self.n - self.packed_tokens
        if w and self.raw_k is not None:
            b, h, _, d = self.raw_k.shape
            total += 2 * 2 * b * h * w * d
        return total

    def _append_packed(self, xk: torch.Tensor, xv: torch.Tensor) -> None:
        if xk.shape[2] == 0:
            return
        if self.k is None:
            self.k, self.v = self.codec.encode(xk, "key"), self.vcodec.encode(xv, "value")
        else:
            self.k, self.v = self.codec.append(self.k, xk), self.vcodec.append(self.v, xv)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
               sliding_window: int | None = None, softcap: float | None = None) -> torch.Tensor:
        """Append ``k, v`` (B, Hkv, Tq, D) at positions ``[n, n+Tq)`` and attend ``q`` (B, Hq, Tq, D).

        Returns (B, Hq, Tq, D) fp32: softmax(cap(scale · q·k̂)) · v̂ under the causal
        (and sliding-window) mask, each query seeing the cache as it stood when
        its own token had just been appended.
        """
        codec, vcodec, d = self.codec, self.vcodec, k.shape[-1]
        b, hkv, tq, _ = k.shape
        n0, n1 = self.n, self.n + tq
        w = self.window
        kf, vf = store_fp16(k), store_fp16(v)  # saturating: NaN → 0, beyond ±65504 → ±65504
        # Raw tails over the new total: keys [ck, n1), values [cv, n1).
        raw_k = kf if self.raw_k is None else torch.cat([self.raw_k, kf], dim=2)
        raw_v = vf if self.raw_v is None else torch.cat([self.raw_v, vf], dim=2)
        ck0, cv0 = self.ck, self.cv
        # Tokens entering the packed cache: [m0, m1), taken from the raw tails.
        m0, m1 = self.packed_tokens, max(0, n1 - w)
        if m1 > m0:
            src = slice(m0 - ck0, m1 - ck0), slice(m0 - cv0, m1 - cv0)
            self._append_packed(raw_k[:, :, src[0]].to(k.dtype), raw_v[:, :, src[1]].to(v.dtype))
        # cut(a) per query: encoded keys / values visible to query a (position n0 + t).
        pos = torch.arange(n0, n1)
        mk = (pos + 1 - w).clamp(min=0)
        dev = q.device
        cut_k = _encoded_counts(codec, d, mk, "key").to(dev)
        cut_v = _encoded_counts(vcodec, d, mk, "value").to(dev)
        pos, j = pos.to(dev), torch.arange(n1, device=dev)
        enc_k = j[None, :] < cut_k[:, None]  # (Tq, n1): key j seen through the codec
        enc_v = j[None, :] < cut_v[:, None]

        hq = q.shape[1]
        qf = q.to(torch.float32)
        s = qf.new_zeros(b, hq, tq, n1)
        if m1 > 0:
            s[..., :m1] = codec.scores(qf, self.k)
        qg = _att.group_queries(qf, hkv)
        s_raw = _att.ungroup(qg @ raw_k.to(torch.float32).transpose(-1, -2), hq, tq)
        s[..., ck0:] = torch.where(enc_k[:, ck0:], s[..., ck0:], s_raw)
        p = _probs(s, scale, softcap, pos, j, sliding_window)
        out = qf.new_zeros(b, hq, tq, d)
        if m1 > 0:
            out = vcodec.weighted_sum(p[..., :m1] * enc_v[:, :m1], self.v)
        pr = (p[..., cv0:] * ~enc_v[:, cv0:])
        out = out + _att.ungroup(_att.group_queries(pr, hkv) @ raw_v.to(torch.float32), hq, tq)

        # Keep raw only from the first token still raw at n1.
        self.n = n1
        self.ck = _encoded_count(codec, d, m1, "key")
        self.cv = _encoded_count(vcodec, d, m1, "value")
        self.raw_k, self.raw_v = raw_k[:, :, self.ck - ck0:], raw_v[:, :, self.cv - cv0:]
        return out.clamp(-FP16_MAX, FP16_MAX)  # saturated like Codec.attend (no fp16 Inf downstream)


def _probs(s: torch.Tensor, scale: float, softcap: float | None, qpos: torch.Tensor,
           kpos: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
    """Scaled, soft-capped, masked softmax (fp32) as transformers' eager attention computes it."""
    s = _att.soft_cap(s * scale, softcap)
    s = s.masked_fill(~_att.visible(qpos, kpos, True, sliding_window), float("-inf"))
    return torch.softmax(s, dim=-1)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
                        q_start: int = 0, sliding_window: int | None = None,
                        softcap: float | None = None) -> torch.Tensor:
    """Exact fp32 attention of q (B, Hq, Tq, D) over k, v (B, Hkv, T, D) → (B, Hq, Tq, D)."""
    hq, tq, hkv = q.shape[1], q.shape[2], k.shape[1]
    qg = _att.group_queries(q.to(torch.float32), hkv)
    s = _att.ungroup(qg @ k.to(torch.float32).transpose(-1, -2), hq, tq)
    p = _probs(s, scale, softcap, torch.arange(q_start, q_start + tq, device=q.device),
               torch.arange(k.shape[2], device=q.device), sliding_window)
    return _att.ungroup(_att.group_queries(p, hkv) @ v.to(torch.float32), hq, tq)


class CompressedKVCache:
    """All layers' caches for one sequence batch, plus per-layer fidelity statistics.

    ``track_cosine``: on a fresh prefill, also compute exact fp32 attention on the
    same q/k/v and accumulate the cosine between the two outputs per layer.

    Every K/V value the model hands the cache is stored through ``store_fp16``; what that
    changed (NaN zeroed, values clamped to ±65504) is counted per layer, see :meth:`sanitized`.

    ``backend``: ``"torch"`` (reference math, :class:`LayerCache`) or ``"cuda"`` (the CUDA
    kernels, :class:`kvexport.kernels.torch_backend.KernelLayerCache`, same results within
    ``kvexport.tolerances``; ``capacity`` = tokens preallocated per layer, grown when full).
    """

    def __init__(self, plan: LayerPlan, num_layers: int, head_dim: int, *, track_cosine: bool = False,
                 compute_device: str | torch.device | None = None, backend: str = "torch",
                 capacity: int | None = None) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {'|'.join(BACKENDS)}, got {backend!r}")
        for i in range(num_layers):
            plan.codec(i).check_head_dim(head_dim)
        self.plan = plan
        self.num_layers = num_layers
        self.head_dim = head_dim
        self.backend = backend
        self.capacity = capacity
        self.layers = [self._new_layer(i) for i in range(num_layers)]  # unsupported layers fail here
        if backend == "cuda":
            from ..kernels.torch_backend import require_kernels
            require_kernels()
        self.track_cosine = track_cosine
        # Where the cache lives and codec math runs (default: the activations' device).
        self.compute_device = None if compute_device is None else torch.device(compute_device)
        self.cos_sum = [0.0] * num_layers
        self.cos_count = [0] * num_layers
        self._sanitized: torch.Tensor | None = None  # (layers, 2) int64 on the compute device

    @property
    def tokens(self) -> int:
        return self.layers[0].n

    def _new_layer(self, i: int):
        kc, vc = self.plan.role_codecs(i)
        if self.backend == "cuda":
            from ..kernels.torch_backend import KernelLayerCache
            return KernelLayerCache(kc, codec_window(self.plan.codec(i)), value_codec=vc, layer=i,
                                    capacity=self.capacity)
        return LayerCache(kc, codec_window(self.plan.codec(i)), value_codec=vc)

    def reset(self) -> None:
        """Drop the cached tokens (keep the fidelity statistics and sanitised counts)."""
        self.layers = [self._new_layer(i) for i in range(self.num_layers)]

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
               sliding_window: int | None = None, softcap: float | None = None) -> torch.Tensor:
        lc = self.layers[layer]
        fresh = lc.n == 0
        home = q.device
        if self.compute_device is not None and self.compute_device != home:
            q, k, v = (t.to(self.compute_device) for t in (q, k, v))
        if self._sanitized is None:
            self._sanitized = torch.zeros(self.num_layers, 2, dtype=torch.long, device=k.device)
        self._sanitized[layer] += count_sanitized(k) + count_sanitized(v)
        out = lc.attend(q, k, v, scale=scale, sliding_window=sliding_window, softcap=softcap)
        if self.track_cosine and fresh:
            ref = reference_attention(q, k, v, scale=scale, sliding_window=sliding_window, softcap=softcap)
            cos = torch.nn.functional.cosine_similarity(out, ref, dim=-1, eps=1e-12)
            self.cos_sum[layer] += float(cos.sum())
            self.cos_count[layer] += cos.numel()
        return out.to(home)

    def sanitized(self) -> dict:
        """What the fp16 conversion changed in the K/V handed to this cache so far (resets
        included): ``nan_zeroed``, ``clamped`` (±Inf or |x| > 65504 → ±65504) and the
        ``layers`` where either happened.  Nonzero means the model produced values fp16 cannot
        hold: an upstream bug or overflow the compressed results silently work around."""
        c = torch.zeros(self.num_layers, 2, dtype=torch.long) if self._sanitized is None else self._sanitized.cpu()
        return dict(nan_zeroed=int(c[:, 0].sum()), clamped=int(c[:, 1].sum()),
                    layers=[i for i in range(self.num_layers) if c[i].any()])

    def layer_cosine(self) -> list[float]:
        return [s / c if c else math.nan for s, c in zip(self.cos_sum, self.cos_count)]
