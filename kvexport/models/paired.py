"""Perplexity of two backends on one schedule, compared window by window.

The kernel path (``backend="cuda"``) and the reference path (``backend="torch"``) are compared on
the SAME schedule: every window is a prefill of its first ``decode_from`` tokens followed by one
teacher-forced decode step per remaining token, on both sides (:func:`schedule`, one loop).  The
split itself moves a quantizing codec's perplexity by several % (docs/KERNELS.md), so comparing a
prefill on one side with decode steps on the other measures the split, not the kernels.

Paired statistic: per window w, ``d_w = NLL_b(w) − NLL_a(w)`` (mean per predicted token).  Under a
correct kernel the d_w are zero-mean noise (a value near a cell boundary gets the neighbouring code
on one path, both signs); their mean estimates log(ppl_b / ppl_a) with standard error
``std(d) / sqrt(W)``.  A test holds ``|exp(mean d) − 1|`` to ``tolerance(codec, "ppl", dtype)`` and
requires the standard error to be small enough that the bound is resolved (kvexport.tolerances).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from .cache import LayerPlan
from .loading import LoadedModel
from .rewrite import CompressedSession


def schedule(length: int, decode_from: int) -> list[tuple[int, int]]:
    """Token ranges [lo, hi) of one window: the prefill, then one-token decode steps."""
    if not 1 <= decode_from <= length:
        raise ValueError(f"decode_from must be in [1, {length}] (the window length), got {decode_from}")
    return [(0, decode_from)] + [(t, t + 1) for t in range(decode_from, length)]


@torch.no_grad()
def window_nll(s: CompressedSession, ids: torch.Tensor, chunks: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Mean NLL per predicted token of each row of ``ids`` (B, L), running ``chunks`` in order on a
    fresh session; returns (B,) float64."""
    s.reset()
    nll = torch.zeros(ids.shape[0], dtype=torch.float64, device=ids.device)
    for lo, hi in chunks:
        logits = s.forward(ids[:, lo:hi])
        tgt = ids[:, lo + 1:hi + 1]            # logits of token t predict token t + 1
        n = tgt.shape[1]
        if n:
            lp = F.cross_entropy(logits[:, :n].reshape(-1, logits.shape[-1]).float(), tgt.reshape(-1),
                                 reduction="none")
            nll += lp.view(ids.shape[0], n).sum(1).double()
    return nll / (ids.shape[1] - 1)


@torch.no_grad()
def paired_ppl(lm: LoadedModel, plan: LayerPlan, wins: torch.Tensor, *, backends: Sequence[str] = ("torch", "cuda"),
               decode_from: int | None = None, batch: int = 64) -> dict:
    """Both ``backends`` on the windows ``wins`` (W, L), ``batch`` windows at a time, one schedule.

    Returns ``schedule`` (the chunk list both ran), per backend the per-window NLL and ppl, and the
    paired difference of the second backend against the first: ``mean`` / ``se`` of d_w (nats) and
    ``rel`` = exp(mean) − 1 (relative ppl difference)."""
    a, b = backends
    L = wins.shape[1]
    chunks = schedule(L, L // 2 if decode_from is None else decode_from)
    nll = {}
    for backend in (a, b):
        parts = []
        with CompressedSession(lm.model, plan, recipe=lm.recipe, backend=backend,
                               capacity=L) as s:
            for i in range(0, wins.shape[0], batch):
                parts.append(window_nll(s, wins[i:i + batch], chunks))
        nll[backend] = torch.cat(parts).cpu()
    d = nll[b] - nll[a]
    W = d.numel()
    mean = float(d.mean())
    se = float(d.std(unbiased=True) / math.sqrt(W)) if W > 1 else math.inf
    return dict(schedule=chunks, windows=W, window_len=L, tokens=W * (L - 1),
                nll={k: v.tolist() for k, v in nll.items()},
                ppl={k: math.exp(float(v.mean())) for k, v in nll.items()},
                diff=dict(mean=mean, se=se, rel=math.expm1(mean), max_abs=float(d.abs().max())))
