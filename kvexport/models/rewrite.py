"""Swap a model's attention for attention on a compressed cache.

transformers routes every attention call of the supported families through
``ALL_ATTENTION_FUNCTIONS[config._attn_implementation](module, q, k, v, mask,
scaling=, sliding_window=, softcap=, ...)`` with q/k already rotated (RoPE) and
no cache of its own when ``use_cache=False``.  :class:`CompressedSession`
registers one function under :data:`ATTN_NAME`, points the model at it for the
duration of a ``with`` block and restores the original implementation on exit.
Keys are therefore compressed after RoPE.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from . import compat
from .cache import CompressedKVCache, LayerPlan
from .recipes import Recipe, recipe_for_config

ATTN_NAME = "kvexport_compressed"
_ROUTE = "_kvexport_route"


def _attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0,
               sliding_window=None, softcap=None, **kwargs):
    """The registered attention function: q (B, Hq, T, D), k/v (B, Hkv, T, D) → ((B, T, Hq, D), None).

    ``attention_mask`` is ignored: sequences are unpadded and the cache applies the
    causal / sliding-window mask by position itself.
    """
    route = getattr(module, _ROUTE, None)
    if route is None:
        raise RuntimeError(f"{type(module).__name__} runs {ATTN_NAME} attention outside a CompressedSession")
    cache, layer = route
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    out = cache.attend(layer, query, key, value, scale=float(scaling),
                       sliding_window=sliding_window, softcap=softcap)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


class CompressedSession:
    """A model running on a :class:`CompressedKVCache` inside a ``with`` block.

    ``forward(ids)`` appends ``ids`` (B, T) to the sequence — the whole prompt
    (prefill) or one token (decode) — and returns fp32 logits (B, T, V).
    ``backend="cuda"``: attention on the CUDA kernels (model on a CUDA device; see
    :class:`~kvexport.models.cache.CompressedKVCache`).
    """

    def __init__(self, model: Any, plan: LayerPlan, *, recipe: Recipe | None = None,
                 track_cosine: bool = False, compute_device: str | None = None,
                 backend: str = "torch", capacity: int | None = None) -> None:
        compat.require_transformers()
        self.model = model
        self.recipe = recipe or recipe_for_config(model.config)
        self.geometry = self.recipe.geometry(model.config)
        self.cache = CompressedKVCache(plan, self.geometry.layers, self.geometry.head_dim,
                                       track_cosine=track_cosine, compute_device=compute_device,
                                       backend=backend, capacity=capacity)
        self._saved: str | None = None
        self._routed: list[Any] = []
        self.seconds = 0.0

    def __enter__(self) -> "CompressedSession":
        compat.attention_interface().register(ATTN_NAME, _attention)
        for mod in self.model.modules():
            if type(mod).__name__.endswith("Attention") and hasattr(mod, "layer_idx") \
                    and not getattr(mod, "is_cross_attention", False):
                setattr(mod, _ROUTE, (self.cache, self.recipe.layer_index(mod)))
                self._routed.append(mod)
        if len(self._routed) != self.geometry.layers:
            self._unroute()
            raise RuntimeError(f"found {len(self._routed)} attention modules, expected {self.geometry.layers}")
        self._saved = compat.get_attn_implementation(self.model)
        compat.set_attn_implementation(self.model, ATTN_NAME)
        return self

    def __exit__(self, *exc) -> None:
        try:
            compat.set_attn_implementation(self.model, self._saved)
        finally:
            self._unroute()

    def _unroute(self) -> None:
        for mod in self._routed:
            if hasattr(mod, _ROUTE):
                delattr(mod, _ROUTE)
        self._routed = []

    @torch.no_grad()
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise ValueError(f"ids must be (batch, tokens>0), got {tuple(ids.shape)}")
        n = self.cache.tokens
        pos = torch.arange(n, n + ids.shape[1], device=ids.device).unsqueeze(0).expand(ids.shape[0], -1)
        t0 = time.perf_counter()
        out = self.model(input_ids=ids, position_ids=pos, use_cache=False)
        if ids.is_cuda:  # time the kernels, not their launch
            torch.cuda.synchronize(ids.device)
        self.seconds += time.perf_counter() - t0
        return out.logits.to(torch.float32)

    def reset(self) -> None:
        self.cache.reset()


@torch.no_grad()
def generate(session: CompressedSession, ids: torch.Tensor, max_new_tokens: int,
             eos_token_id: int | None = None) -> torch.Tensor:
    """Greedy continuation on the compressed cache: prefill ``ids`` (B, T), then one token a step.

    Returns the new tokens (B, ≤ max_new_tokens)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    logits = session.forward(ids)
    out = []
    for i in range(max_new_tokens):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        out.append(nxt)
        if i + 1 == max_new_tokens or (eos_token_id is not None and bool((nxt == eos_token_id).all())):
            break
        logits = session.forward(nxt)
    return torch.cat(out, dim=1)


@torch.no_grad()
def generate_reference(model: Any, ids: torch.Tensor, max_new_tokens: int,
                       eos_token_id: int | None = None) -> torch.Tensor:
    """Greedy continuation with the model's own attention and cache (the fp16/fp32 baseline)."""
    out = []
    res = model(input_ids=ids, use_cache=True)
    past, logits = res.past_key_values, res.logits
    for i in range(max_new_tokens):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        out.append(nxt)
        if i + 1 == max_new_tokens or (eos_token_id is not None and bool((nxt == eos_token_id).all())):
            break
        res = model(input_ids=nxt, past_key_values=past, use_cache=True)
        past, logits = res.past_key_values, res.logits
    return torch.cat(out, dim=1)
