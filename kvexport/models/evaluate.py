"""Perplexity and attention fidelity of a model on a compressed cache.

Every codec is measured on the same non-overlapping windows of ``L`` tokens.
A window runs as one prefill on the compressed cache, which (see
:mod:`kvexport.models.cache`) gives each query exactly the view it would have
when decoding token by token: older tokens through the codec, the newest
``window`` in fp16.  ``ppl = exp(mean NLL)`` over the ``L-1`` predicted tokens
of every window.  Attention cosine: per layer, the cosine between the
compressed-cache attention output and exact fp32 attention on the same q/k/v,
averaged over heads and positions.

Kernel path (``backend="cuda"``, :mod:`kvexport.kernels.torch_backend`): a window runs as a
prefill of its first ``decode_from`` tokens (default ``L // 2``), then ``L - decode_from``
teacher-forced one-token decode steps (token t in, logits for t + 1 out), so the fused
decode kernel and the append kernel do most of the work; the logits are the same as one
prefill's on the reference path (prefill equals token-by-token decode).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..codecs import Codec
from .cache import LayerPlan, codec_window
from .loading import LoadedModel
from .rewrite import CompressedSession


def text_windows(lm: LoadedModel, text: str, windows: int, window_len: int) -> torch.Tensor:
    """``windows`` consecutive windows (N, L) int64 of the tokenized text; a text too short for
    that many is refused (``ValueError`` saying how many it gives), never silently fewer."""
    if windows < 1:
        raise ValueError(f"--windows must be >= 1, got {windows}")
    if window_len < 2:
        raise ValueError(f"--window-len must be >= 2, got {window_len}")
    need = windows * window_len
    chars = need * 8  # ~4–5 characters per token in English; tokenize a prefix, grow if short
    while True:
        ids = lm.encode(text[:chars])[0]
        if ids.numel() >= need or chars >= len(text):
            break
        chars *= 2
    n = min(windows, ids.numel() // window_len)
    if n == 0:
        raise ValueError(f"text is shorter than one window: {ids.numel()} tokens < --window-len {window_len}")
    if n < windows:
        raise ValueError(f"the text gives {n} window(s) of {window_len} tokens ({ids.numel()} tokens), not "
                         f"--windows {windows}: pass --windows {n}, a shorter --window-len or a longer text")
    return ids[: n * window_len].reshape(n, window_len)


def _nll(logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    lp = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1),
                         reduction="sum")
    return float(lp), ids[:, 1:].numel()


@dataclasses.dataclass
class Result:
    """One codec's measurement over all windows."""
    spec: str
    codec: str
    params: dict
    window: int
    overrides: str
    ppl: float
    nll: float
    tokens: int
    seconds: float
    kv_bytes_per_token: float
    fp16_bytes_per_token: float
    codec_bits_per_coordinate: float
    layer_cosine: list[float]
    compress: str = "kv"  # which half went through the codec (see LayerPlan)
    backend: str = "torch"  # "torch" (reference math) or "cuda" (the CUDA kernels)
    decode_from: int | None = None  # prefill length before one-token decode steps (None: one prefill)
    sanitized: dict | None = None  # CompressedKVCache.sanitized(): K/V values fp16 could not hold

    @property
    def compression(self) -> float:
        return self.fp16_bytes_per_token / self.kv_bytes_per_token

    @property
    def bits_per_coordinate(self) -> float:
        return 16.0 / self.compression

    @property
    def attn_cosine(self) -> float:
        vals = [c for c in self.layer_cosine if not math.isnan(c)]
        return sum(vals) / len(vals) if vals else math.nan


@torch.no_grad()
def baseline(lm: LoadedModel, wins: torch.Tensor, progress: Callable[[], None] | None = None) -> dict:
    """Perplexity of the model with its own attention (fp32 compute, uncompressed cache)."""
    nll, n, secs = 0.0, 0, 0.0
    for w in wins:
        t0 = time.perf_counter()
        logits = lm.model(input_ids=w[None], use_cache=False).logits
        secs += time.perf_counter() - t0
        a, b = _nll(logits, w[None])
        nll, n = nll + a, n + b
        if progress:
            progress()
    return dict(ppl=math.exp(nll / n), nll=nll / n, tokens=n, seconds=secs)


def run_window(s: CompressedSession, ids: torch.Tensor, decode_from: int | None = None) -> torch.Tensor:
    """Logits (B, T, V) of ``ids`` (B, T) on a fresh session: one prefill, or a prefill of
    ``decode_from`` tokens then one teacher-forced decode step per remaining token."""
    s.reset()
    if decode_from is None or decode_from >= ids.shape[1]:
        return s.forward(ids)
    parts = [s.forward(ids[:, :decode_from])]
    parts += [s.forward(ids[:, t:t + 1]) for t in range(decode_from, ids.shape[1])]
    return torch.cat(parts, dim=1)


@torch.no_grad()
def evaluate(lm: LoadedModel, spec: str, plan: LayerPlan, wins: torch.Tensor,
             progress: Callable[[], None] | None = None, codec_device: str | None = None,
             backend: str = "torch", decode_from: int | None = None) -> Result:
    """Run every window on the compressed cache of ``plan``; see module doc.

    ``backend``: "torch" or "cuda" (the CUDA kernels; model and windows on a CUDA device).
    ``decode_from``: prefill length before teacher-forced one-token decode steps (None: one
    prefill per window; backend "cuda" defaults to half the window)."""
    codec: Codec = plan.default
    nll, n = 0.0, 0
    geo = lm.recipe.geometry(lm.model.config)
    L = wins.shape[1]
    if backend == "cuda" and decode_from is None:
        decode_from = max(1, L // 2)
    if decode_from is not None and not 1 <= decode_from <= L:
        raise ValueError(f"decode_from must be in [1, {L}] (the window length), got {decode_from}")
    with CompressedSession(lm.model, plan, recipe=lm.recipe, track_cosine=True,
                           compute_device=codec_device, backend=backend, capacity=L) as s:
        kv_bytes = 0
        for w in wins:
            logits = run_window(s, w[None], decode_from)
            a, b = _nll(logits, w[None])
            nll, n = nll + a, n + b
            kv_bytes = s.cache.nbytes()
            if progress:
                progress()
        fp16_bytes = 2 * 2 * geo.layers * geo.kv_heads * geo.head_dim  # K+V, fp16, per token
        return Result(spec=spec, codec=codec.name, params=codec.spec()["params"], window=codec_window(codec),
                      overrides=plan.describe(), ppl=math.exp(nll / n), nll=nll / n, tokens=n,
                      seconds=s.seconds, kv_bytes_per_token=kv_bytes / L, fp16_bytes_per_token=fp16_bytes,
                      codec_bits_per_coordinate=codec.bits_per_coordinate(geo.head_dim, L),
                      layer_cosine=s.cache.layer_cosine(), compress=plan.compress, backend=backend,
                      decode_from=decode_from, sanitized=s.cache.sanitized())


def result_row(r: Result, base_ppl: float) -> dict[str, Any]:
    return dict(spec=r.spec, codec=r.codec, bits_per_coordinate=r.bits_per_coordinate,
                compression=r.compression, ppl=r.ppl, delta_ppl=r.ppl - base_ppl,
                attn_cosine=r.attn_cosine, window=r.window, overrides=r.overrides, compress=r.compress,
                codec_bits_per_coordinate=r.codec_bits_per_coordinate,
                kv_bytes_per_token=r.kv_bytes_per_token, seconds=r.seconds,
                ms_per_token=1e3 * r.seconds / max(1, r.tokens), params=r.params, backend=r.backend,
                decode_from=r.decode_from, sanitized=r.sanitized,
                layer_cosine=r.layer_cosine)
