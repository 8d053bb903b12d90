"""Real queries, keys and values from the default model, for tests and codec tables.

One forward pass of SmolLM2-135M over a window of the default Wikipedia text,
capturing post-RoPE q, k, v of selected layers through a transformers attention
function.  Cached as safetensors (never pickle) under ``$KVEXPORT_CACHE``
(default ``~/.cache/kvexport``), written atomically and verified before use (kvexport._cache).
"""

from __future__ import annotations

import hashlib

import torch

from ._cache import atomic_write, cache_dir, verified

DEFAULT_LAYERS = (0, 7, 15, 23, 29)


def load_default_model(dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of the installed default model, no network (see kvexport.models)."""
    from .models.loading import load_default_model as load
    return load(dtype)


def capture(layers=DEFAULT_LAYERS, tokens: int = 512, offset_chars: int = 0) -> dict[str, torch.Tensor]:
    """Capture {"q.L", "k.L", "v.L"} (B=1, heads, tokens, 64) fp32 for each layer L."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from .data import read_text

    model, tok = load_default_model()
    text = read_text()[offset_chars: offset_chars + tokens * 12]
    ids = tok(text, return_tensors="pt").input_ids[:, :tokens]
    if ids.shape[1] < tokens:
        raise ValueError(f"text too short for {tokens} tokens")
    out: dict[str, torch.Tensor] = {}

    def grab(module, query, key, value, attention_mask, **kw):
        i = module.layer_idx
        if i in layers:
            out[f"q.{i}"], out[f"k.{i}"], out[f"v.{i}"] = (t.detach().clone().contiguous() for t in (query, key, value))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kw)

    AttentionInterface.register("kvexport_capture", grab)
    model.set_attn_implementation("kvexport_capture")
    with torch.no_grad():
        model(ids)
    return out


def load_real_kv(layers=DEFAULT_LAYERS, tokens: int = 512) -> dict[str, torch.Tensor]:
    """Cached :func:`capture`; keys ``q.L`` / ``k.L`` / ``v.L``, fp32 (1, heads, tokens, 64)."""
    import safetensors.torch as st
    tag = hashlib.sha256(f"v1/{tuple(layers)}/{tokens}".encode()).hexdigest()[:12]
    path = cache_dir() / f"realkv-{tag}.safetensors"
    if verified(path):
        return st.load_file(str(path))
    data = capture(layers, tokens)
    atomic_write(path, lambda tmp: st.save_file(data, str(tmp)))
    return data
