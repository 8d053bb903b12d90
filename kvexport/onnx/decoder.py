"""Whole-decoder export with a packed KV cache (Optimum / ORT-GenAI style, one graph).

:class:`PackedCacheDecoder` wraps a Hugging Face causal LM whose attention calls
the kvexport ops through transformers' attention interface:

inputs   ``input_ids`` (batch, sequence) int64, ``position_ids`` (batch, sequence) int64,
         per layer ``past.<l>.key.<field>`` / ``past.<l>.value.<field>`` (the codec layout),
         each role followed by ``past.<l>.<role>.window`` (B, Hkv, <=W, D) fp16 if the
         codec's ``window`` W > 0
outputs  ``logits`` (batch, sequence, vocab) fp32,
         ``present.<l>.key.<field>`` / ``present.<l>.value.<field>`` (and windows)

One step per layer: new K/V (post-RoPE) are encoded with ``<P>KeyEncode`` /
``<P>ValueEncode`` and appended to the past (``Concat`` on the token axis; codecs
whose keys keep an fp16 ``residual`` of an incomplete token group re-encode
``residual ++ new`` and concatenate the grouped fields, which is ``Codec.append``),
then ``<P>Attention`` attends over the present cache.  The prompt is compressed
before its own attention, as in ``Codec.attend``.  Sequences are unpadded: no
attention mask input; query i of a step sits at position past + i.  The same
module run eagerly (torch ops = codec reference math) is the torch reference.

Per layer the Attention node carries the ``sliding_window`` / ``softcap`` the HF module
passes (mistral, qwen2, gemma2/3); sliding layers keep every token and only mask, like
``models.cache``.  A ``scaling`` other than 1/sqrt(D) (Gemma's ``query_pre_attn_scalar``)
pre-scales q by ``scaling·sqrt(D)``.  With an fp16 window, ``window ++ new`` keeps its
newest W tokens and the older ones are encoded and appended (:meth:`PackedCacheDecoder._slide`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any

import torch

from ..codecs._core.numerics import store_fp16
from ..ops import torch_ops
from ..ops.registry import ops_for

ATTN_NAME = "kvexport_onnx_export"
_ROUTE = "_kvexport_onnx_route"


class _Route:
    """Per forward call: the flat past tensors in, the present tensors out."""

    def __init__(self, owner: "PackedCacheDecoder", layer: int):
        self.owner, self.layer = owner, layer


def _attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0,
               sliding_window=None, softcap=None, **kwargs):
    route = getattr(module, _ROUTE, None)
    if route is None:
        raise RuntimeError(f"{type(module).__name__} runs {ATTN_NAME} attention outside a PackedCacheDecoder")
    d = query.shape[-1]
    if key.shape[-1] != d or value.shape[-1] != d or d != route.owner.head_dim:
        raise ValueError(f"{type(module).__name__} (layer {route.layer}): q/k/v head dims "
                         f"{d}/{key.shape[-1]}/{value.shape[-1]} differ from the cache's {route.owner.head_dim}")
    if scaling is not None and not math.isclose(float(scaling), d ** -0.5, rel_tol=1e-6):
        # Gemma's query_pre_attn_scalar (or GPT-2's per-layer scaling): pre-scale q so that
        # the op's fixed 1/sqrt(d) gives scaling·q·k.
        query = query * (float(scaling) * math.sqrt(d))
    out = route.owner._layer_step(route.layer, query, key, value, softcap=float(softcap or 0.0),
                                  sliding_window=int(sliding_window or 0))
    return out.transpose(1, 2).contiguous(), None


class PackedCacheDecoder(torch.nn.Module):
    """``forward(input_ids, position_ids, *past) → (logits, *present)``; see the module doc."""

    def __init__(self, model: Any, codec, recipe=None):
        super().__init__()
        from ..models.recipes import recipe_for_config
        self.model = model
        self.codec = codec
        self.recipe = recipe or recipe_for_config(model.config)
        geo = self.recipe.geometry(model.config)
        self.layers, self.kv_heads, self.head_dim = geo.layers, geo.kv_heads, geo.head_dim
        codec.check_head_dim(self.head_dim)
        for m in model.modules():
            if getattr(m, "is_cross_attention", False):
                raise ValueError(f"{type(m).__name__} (layer {getattr(m, 'layer_idx', '?')}): cross-attention "
                                 "is not exportable with a packed cache (decoder-only self-attention only)")
        self.window = int(getattr(codec.params, "window", 0) or 0)
        self.specs = ops_for(codec)   # this codec's layout: key / value encode, attention
        self.attrs = {k: (list(v) if isinstance(v, tuple) else v)
                      for k, v in dataclasses.asdict(codec.params).items() if v is not None}
        self.fields = {r: [f.name for f in codec.layout(self.head_dim, 1, r)] for r in ("key", "value")}
        # per layer and role: the packed fields, then the fp16 window when the codec has one
        self.entries = {r: self.fields[r] + (["window"] if self.window else []) for r in ("key", "value")}
        if self.window and any("window" in f for f in self.fields.values()):
            raise ValueError(f"{codec.name}: a packed field named 'window' clashes with the fp16 window input")
        self._past: list[torch.Tensor] = []
        self._present: list[torch.Tensor] = []
        self.tap: list[dict] | None = None   # a list: every _layer_step appends its inputs and output
        torch_ops.ops_of(codec)   # define this layout's torch ops before any export

    # ----- names and empty caches ---------------------------------------------
    def cache_names(self, prefix: str) -> list[str]:
        return [f"{prefix}.{l}.{r}.{f}" for l in range(self.layers) for r in ("key", "value") for f in self.entries[r]]

    def empty_past(self, batch: int, dtype=torch.float32) -> list[torch.Tensor]:
        """The past of a fresh sequence: every field (and window) with 0 tokens."""
        out = []
        for _ in range(self.layers):
            for r in ("key", "value"):
                for f in self.codec.layout(self.head_dim, 0, r):
                    out.append(torch.zeros((batch, self.kv_heads, *f.shape), dtype=f.dtype))
                if self.window:
                    out.append(torch.zeros((batch, self.kv_heads, 0, self.head_dim), dtype=torch.float16))
        return out

    # ----- one layer ------------------------------------------------------------
    def _append(self, role: str, past: dict[str, torch.Tensor], x: torch.Tensor) -> dict[str, torch.Tensor]:
        spec = self.specs[role]
        if "residual" in past:    # grouped fields: re-encode the fp16 tail with the new tokens
            x = torch.cat([past["residual"].to(x.dtype), x], dim=2)
        new = dict(zip(self.fields[role], torch_ops.op(spec.name)(x, **self.attrs)))
        return {f: new[f] if f == "residual" else torch.cat([past[f], new[f]], dim=2) for f in self.fields[role]}

    def _slide(self, role: str, past: dict[str, torch.Tensor], x: torch.Tensor):
        """fp16 window of W tokens (``models.cache.LayerCache``): ``window ++ new`` keeps its newest
        W tokens; the older ones (0 or more, in order) are encoded and appended to the packed fields.
        Returns (packed fields, window (B, Hkv, <=W, D) fp16)."""
        w = self.window
        win = torch.cat([past["window"], store_fp16(x)], dim=2)  # NaN → 0, saturating (models.cache)
        # Python slices clamp like ONNX Slice: no overflow while the window is not full
        over, keep = win[:, :, :-w], win[:, :, -w:]
        packed = self._append(role, {f: past[f] for f in self.fields[role]}, over.to(x.dtype))
        return packed, keep

    def _layer_step(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                    softcap: float = 0.0, sliding_window: int = 0) -> torch.Tensor:
        n_k, n_v = len(self.entries["key"]), len(self.entries["value"])
        base = layer * (n_k + n_v)
        pk = dict(zip(self.entries["key"], self._past[base:base + n_k]))
        pv = dict(zip(self.entries["value"], self._past[base + n_k:base + n_k + n_v]))
        if self.window:
            (ck, wk), (cv, wv) = self._slide("key", pk, k), self._slide("value", pv, v)
            ck, cv = {**ck, "window": wk}, {**cv, "window": wv}
        else:
            ck, cv = self._append("key", pk, k), self._append("value", pv, v)
        self._present[base:base + n_k + n_v] = [ck[f] for f in self.entries["key"]] + [cv[f] for f in self.entries["value"]]
        att = self.specs["attention"]
        window = (ck["window"], cv["window"]) if self.window else ()
        out = torch_ops.op(att.name)(q, *[ck[f] for f in self.fields["key"]], *[cv[f] for f in self.fields["value"]],
                                     *window, **self.attrs, causal=True, softcap=softcap,
                                     sliding_window=sliding_window)
        if self.tap is not None:
            self.tap.append(dict(layer=layer, q=q, k=k, v=v, softcap=softcap, sliding_window=sliding_window, out=out))
        return out

    def layer_step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *past: torch.Tensor,
                   softcap: float = 0.0, sliding_window: int = 0):
        """One layer's cache step alone (the code the whole-model export runs per layer):
        q (B, Hq, T, D), k / v (B, Hkv, T, D), ``past`` that layer's entries (``cache_names`` order)
        → (attention output (B, Hq, T, D), *present entries)."""
        self._past, self._present = list(past), [None] * len(past)
        try:
            out = self._layer_step(0, q, k, v, softcap=softcap, sliding_window=sliding_window)
            return (out, *self._present)
        finally:
            self._past, self._present = [], []

    @contextlib.contextmanager
    def _routed(self):
        from ..models import compat
        compat.attention_interface().register(ATTN_NAME, _attention)
        mods = [m for m in self.model.modules()
                if type(m).__name__.endswith("Attention") and hasattr(m, "layer_idx")]
        if len(mods) != self.layers:
            raise ValueError(f"found {len(mods)} attention modules in {type(self.model).__name__}, "
                             f"expected {self.layers}: cannot route them to kvexport ops")
        for m in mods:
            setattr(m, _ROUTE, _Route(self, self.recipe.layer_index(m)))
        saved = compat.get_attn_implementation(self.model)
        compat.set_attn_implementation(self.model, ATTN_NAME)
        try:
            yield
        finally:
            compat.set_attn_implementation(self.model, saved)
            for m in mods:
                delattr(m, _ROUTE)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, *past: torch.Tensor):
        self._past = list(past)
        self._present = [None] * len(past)
        with self._routed():
            out = self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False)
        present, self._past, self._present = self._present, [], []
        return (out.logits.to(torch.float32), *present)


# ----- export and the onnxruntime decode loop ------------------------------------------
def export_decoder(dec: PackedCacheDecoder, *, batch: int = 1, seq: int = 5, past: int = 70):
    """Export ``dec`` (dynamic batch / sequence / past axes); returns the finalized ModelProto."""
    from .export import export_module
    g = torch.Generator().manual_seed(0)
    vocab = dec.model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, past), generator=g)
    pos = torch.arange(past).unsqueeze(0).expand(batch, -1)
    with torch.no_grad():
        _, *pres = dec(ids, pos, *dec.empty_past(batch))   # a real past of ``past`` tokens to trace with
    x_ids = torch.randint(0, vocab, (batch, seq), generator=g)
    x_pos = torch.arange(past, past + seq).unsqueeze(0).expand(batch, -1)
    auto = torch.export.Dim.AUTO
    dyn = ({0: auto, 1: auto}, {0: auto, 1: auto}, tuple({0: auto, 2: auto} for _ in pres))
    in_names = ["input_ids", "position_ids", *dec.cache_names("past")]
    out_names = ["logits", *dec.cache_names("present")]
    with torch.no_grad():
        return export_module(dec, (x_ids, x_pos, *pres), dynamic_shapes=dyn,
                             input_names=in_names, output_names=out_names, head_dim=dec.head_dim)


class LayerStep(torch.nn.Module):
    """``forward(q, k, v, *past) → (out, *present)``: :meth:`PackedCacheDecoder.layer_step` with
    fixed ``softcap`` / ``sliding_window``, exportable on its own (the fixed-bytes check,
    :func:`kvexport.onnx.agreement.fixed_bytes`)."""

    def __init__(self, dec: PackedCacheDecoder, softcap: float = 0.0, sliding_window: int = 0):
        super().__init__()
        self.dec, self.softcap, self.sliding_window = dec, float(softcap), int(sliding_window)

    def forward(self, q, k, v, *past):
        return self.dec.layer_step(q, k, v, *past, softcap=self.softcap, sliding_window=self.sliding_window)


def export_layer_step(dec: PackedCacheDecoder, softcap: float = 0.0, sliding_window: int = 0, *,
                      q_heads: int, past: int = 70, seq: int = 5):
    """Export one layer's step (:class:`LayerStep`; dynamic batch / sequence / past axes): inputs
    ``q``, ``k``, ``v``, ``past.<field>``; outputs ``out``, ``present.<field>``."""
    from .export import export_module
    g = torch.Generator().manual_seed(0)
    step = LayerStep(dec, softcap, sliding_window)
    rnd = lambda h, t: torch.randn(1, h, t, dec.head_dim, generator=g)
    empty = dec.empty_past(1)[:len(dec.entries["key"]) + len(dec.entries["value"])]
    with torch.no_grad():
        _, *pres = step(rnd(q_heads, past), rnd(dec.kv_heads, past), rnd(dec.kv_heads, past), *empty)
    names = [f"{r}.{f}" for r in ("key", "value") for f in dec.entries[r]]
    auto = torch.export.Dim.AUTO
    dyn = ({0: auto, 2: auto}, {0: auto, 2: auto}, {0: auto, 2: auto}, tuple({0: auto, 2: auto} for _ in pres))
    with torch.no_grad():
        return export_module(step, (rnd(q_heads, seq), rnd(dec.kv_heads, seq), rnd(dec.kv_heads, seq), *pres),
                             dynamic_shapes=dyn, input_names=["q", "k", "v", *[f"past.{n}" for n in names]],
                             output_names=["out", *[f"present.{n}" for n in names]], head_dim=dec.head_dim)


def greedy_torch(dec: PackedCacheDecoder, prompt: torch.Tensor, steps: int):
    """Prefill + ``steps`` greedy decode steps in torch; returns (tokens (B, steps), logits per step)."""
    past = dec.empty_past(prompt.shape[0])
    ids, n, toks, logits = prompt, 0, [], []
    with torch.no_grad():
        for _ in range(steps):
            pos = torch.arange(n, n + ids.shape[1]).unsqueeze(0).expand(ids.shape[0], -1)
            lg, *past = dec(ids, pos, *past)
            n += ids.shape[1]
            logits.append(lg[:, -1].numpy())
            ids = lg[:, -1].argmax(-1, keepdim=True)
            toks.append(ids)
    return torch.cat(toks, 1).numpy(), logits


def greedy_ort(sess, dec: PackedCacheDecoder, prompt: torch.Tensor, steps: int, *, force=None):
    """The same loop in onnxruntime: each present cache fed back as the next past.

    ``force`` (B, steps) feeds those tokens instead of ORT's own argmax (teacher forcing, so
    per-step logits compare on the same prefix).  Returns (tokens, logits per step)."""
    import numpy as np
    names = dec.cache_names("past")
    past = [t.numpy() for t in dec.empty_past(prompt.shape[0])]
    ids, n, toks, logits = prompt.numpy(), 0, [], []
    for i in range(steps):
        pos = np.broadcast_to(np.arange(n, n + ids.shape[1], dtype=np.int64), ids.shape).copy()
        lg, *past = sess.run(None, {"input_ids": ids.astype(np.int64), "position_ids": pos, **dict(zip(names, past))})
        n += ids.shape[1]
        logits.append(lg[:, -1])
        nxt = lg[:, -1].argmax(-1)[:, None]
        toks.append(nxt)
        ids = nxt if force is None else force[:, i:i + 1]
    return np.concatenate(toks, 1), logits


def compare_steps(sess, dec: PackedCacheDecoder, prompt: torch.Tensor, steps: int) -> dict[str, Any]:
    """torch ↔ onnxruntime over a greedy decode: the lock-step rows of
    :func:`kvexport.onnx.agreement.lockstep` (per step ORT on torch's exact inputs: logit errors,
    the first layer whose packed codes differ and by what fraction) and the free-running token
    agreement of the two greedy loops."""
    from .agreement import lockstep
    ls = lockstep(sess, dec, prompt, steps)
    tt = ls["torch_tokens"]
    ot, _ = greedy_ort(sess, dec, prompt, steps)
    return dict(torch_tokens=tt, ort_tokens=ot, token_agreement=float((tt == ot).mean()), steps=ls["steps"])
