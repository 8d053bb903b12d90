"""Attention skeleton shared by every codec: GQA grouping, masks, soft-capping, fp16 window.

Shapes: q (B, Hq, Tq, D); a packed cache holds T tokens at positions 0..T-1; an
optional fp16 window (B, Hkv, W, D) holds the newest W tokens at positions
T..T+W-1.  Query i sits at position ``p = q_start + i`` (default: the last Tq
positions) and, when causal, sees keys ``j <= p``; with ``sliding_window`` S > 0
only keys ``j > p - S`` (transformers' sliding layers: Mistral, Qwen2, Gemma 2/3).
``softcap`` c > 0 caps the *scaled* score: ``s = c·tanh(s/c)`` (Gemma 2).
"""

from __future__ import annotations

import torch


def group_queries(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(B, Hq, Tq, D) → (B, Hkv, G*Tq, D): the G query heads sharing a kv head, stacked."""
    b, hq, tq, d = q.shape
    if kv_heads <= 0 or hq % kv_heads:
        raise ValueError(f"query heads ({hq}) must be a multiple of kv heads ({kv_heads})")
    g = hq // kv_heads
    return q.reshape(b, kv_heads, g * tq, d)


def ungroup(x: torch.Tensor, q_heads: int, tq: int) -> torch.Tensor:
    """Inverse of :func:`group_queries` for any trailing size: (B, Hkv, G*Tq, X) → (B, Hq, Tq, X)."""
    b = x.shape[0]
    return x.reshape(b, q_heads, tq, x.shape[-1])


def visible(qpos: torch.Tensor, kpos: torch.Tensor, causal: bool = True,
            sliding_window: int | None = 0) -> torch.Tensor:
    """(Tq, Tk) bool, True where the query at position ``qpos[i]`` may see key ``kpos[j]``:
    ``kpos <= qpos`` when causal, and ``kpos > qpos - sliding_window`` when that is > 0."""
    allow = torch.ones(qpos.shape[0], kpos.shape[0], dtype=torch.bool, device=qpos.device)
    if causal:
        allow = allow & (kpos[None, :] <= qpos[:, None])
    if sliding_window:
        allow = allow & (kpos[None, :] > qpos[:, None] - sliding_window)
    return allow


def causal_mask(tq: int, tk: int, q_start: int, device: torch.device, sliding_window: int = 0) -> torch.Tensor:
    """(Tq, Tk) bool, True where query i may see key j (j <= q_start + i, within the window)."""
    qi = torch.arange(tq, device=device) + q_start
    return visible(qi, torch.arange(tk, device=device), True, sliding_window)


def soft_cap(s: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Gemma 2's attention logit soft-capping ``c·tanh(s/c)`` of scaled scores; 0/None = off."""
    return torch.tanh(s / softcap) * softcap if softcap else s


def softmax_attend(scores: torch.Tensor, scale: float, causal: bool, q_start: int, *,
                   softcap: float = 0.0, sliding_window: int = 0) -> torch.Tensor:
    """Scaled, soft-capped, masked softmax over the last axis in fp32; fully masked rows give zeros."""
    s = soft_cap(scores.to(torch.float32) * scale, softcap)
    if s.shape[-1] == 0:  # nothing to attend to (empty cache, no window): amax has no identity
        return s
    if causal or sliding_window:
        qi = torch.arange(s.shape[-2], device=s.device) + q_start
        m = visible(qi, torch.arange(s.shape[-1], device=s.device), causal, sliding_window)
        s = s.masked_fill(~m, float("-inf"))
    mx = s.amax(dim=-1, keepdim=True)
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    e = torch.exp(s - mx)
    z = e.sum(dim=-1, keepdim=True)
    return e / torch.where(z > 0, z, torch.ones_like(z))
