"""Decoder routing for every model family (sliding windows, soft-capping, Gemma's scaling) against
transformers, and exported decoders of codecs with an fp16 window.  The per-family export +
onnxruntime loop is ``test_onnx_decoder.py::test_tiny_decoder_greedy_loop_matches_torch``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvexport import codecs

pytestmark = pytest.mark.requires("onnxruntime", "transformers")

@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gemma2", "gemma", "gpt2"])
def test_decoder_matches_transformers(family):
    """The routed decoder (fp16 codec) reproduces transformers' own logits: masks, soft-capping
    and scaling are the model's.  Prefill of 20 tokens then 6 single steps, past the windows."""
    from kvexport.models.recipes import tiny_model
    from kvexport.onnx.decoder import PackedCacheDecoder
    m = tiny_model(family)
    if family == "gemma2":   # the tiny model's scores are far below 50: make the cap bite
        for mod in m.modules():
            if hasattr(mod, "attn_logit_softcapping"):
                mod.attn_logit_softcapping = 0.02
    dec = PackedCacheDecoder(m, codecs.get("fp16"))
    ids = torch.randint(0, m.config.vocab_size, (2, 26), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(26).unsqueeze(0).expand(2, -1)
    with torch.no_grad():
        ref = m(input_ids=ids, position_ids=pos).logits
        lg, *past = dec(ids[:, :20], pos[:, :20], *dec.empty_past(2))
        outs = [lg]
        for i in range(20, 26):
            lg, *past = dec(ids[:, i:i + 1], pos[:, i:i + 1], *past)
            outs.append(lg)
    err = (torch.cat(outs, 1) - ref).abs().max().item()
    assert err <= 2e-3, err   # fp16 storage of K/V; a dropped window or cap costs > 0.1 here


def test_gemma_scaling_is_a_prescale_of_q():
    """query_pre_attn_scalar != head_dim: q is pre-scaled so the op's 1/sqrt(d) gives `scaling`."""
    from kvexport.models.recipes import tiny_model
    from kvexport.onnx.decoder import PackedCacheDecoder
    m = tiny_model("gemma2")
    for mod in m.modules():
        if hasattr(mod, "scaling") and hasattr(mod, "layer_idx"):
            mod.scaling = 0.5   # far from 1/sqrt(128)
    dec = PackedCacheDecoder(m, codecs.get("fp16"))
    ids = torch.randint(0, m.config.vocab_size, (1, 14), generator=torch.Generator().manual_seed(2))
    pos = torch.arange(14)[None]
    with torch.no_grad():
        ref = m(input_ids=ids, position_ids=pos).logits
        got = dec(ids, pos, *dec.empty_past(1))[0]
    assert (got - ref).abs().max().item() <= 2e-3


def test_cross_attention_is_refused_naming_the_module():
    from transformers import GPT2Config, GPT2LMHeadModel
    from kvexport.onnx.decoder import PackedCacheDecoder
    m = GPT2LMHeadModel(GPT2Config(vocab_size=320, n_positions=64, n_embd=64, n_layer=1, n_head=1,
                                   add_cross_attention=True))
    with pytest.raises(ValueError, match=r"GPT2Attention \(layer 0\): cross-attention"):
        PackedCacheDecoder(m, codecs.get("fp16"))


# ----- fp16 window ------------------------------------------------------------------------
@pytest.mark.parametrize("codec", ["kivi:group=4,window=5", "turbo:window=3"])
def test_window_slide_equals_the_compressed_session(codec):
    """Decoder's window ++ new → (packed, newest W) equals models.cache.LayerCache byte for byte."""
    from kvexport.models.cache import LayerCache
    from kvexport.models.recipes import tiny_model
    from kvexport.onnx.decoder import PackedCacheDecoder
    c = codecs.from_spec(codec)
    dec = PackedCacheDecoder(tiny_model("llama"), c)
    w = dec.window
    lc = LayerCache(c, w)
    past = dict(zip(dec.entries["key"], dec.empty_past(1)[:len(dec.entries["key"])]))
    g = torch.Generator().manual_seed(3)
    for tq in (2, 1, 1, 4, 1, 9, 1):
        k = torch.randn(1, dec.kv_heads, tq, dec.head_dim, generator=g)
        q = torch.randn(1, 2 * dec.kv_heads, tq, dec.head_dim, generator=g)
        lc.attend(q, k, k, scale=dec.head_dim ** -0.5)
        packed, win = dec._slide("key", past, k)
        past = {**packed, "window": win}
        assert torch.equal(win, lc.raw_k[:, :, -min(lc.n, w):]), lc.n
        for f in dec.fields["key"]:
            ref = lc.k[f] if lc.k is not None else past[f][:, :, :0]
            assert torch.equal(past[f], ref), (lc.n, f)


@pytest.mark.parametrize("codec", ["kivi:group=8,window=6"])
def test_windowed_export_present_cache_matches_torch(codec):
    """Exported decoder with an fp16 window: per step, ORT's present cache (packed fields and
    window) equals torch's on the same inputs, and the greedy loops agree."""
    from kvexport.models.recipes import tiny_model
    from kvexport.onnx.decoder import PackedCacheDecoder, export_decoder, greedy_ort, greedy_torch
    from kvexport.onnx.opmodels import session
    m = tiny_model("llama")
    dec = PackedCacheDecoder(m, codecs.from_spec(codec))
    model = export_decoder(dec, past=9)
    names = [i.name for i in model.graph.input]
    assert "past.0.key.window" in names and "present.2.value.window" in [o.name for o in model.graph.output]
    s = session(model)
    prompt = torch.randint(0, m.config.vocab_size, (2, 4), generator=torch.Generator().manual_seed(1))
    past, ids, n = dec.empty_past(2), prompt, 0
    with torch.no_grad():
        for step in range(8):   # window fills at step 2, overflow from then on
            pos = torch.arange(n, n + ids.shape[1]).unsqueeze(0).expand(2, -1)
            lg, *pres = dec(ids, pos, *past)
            o = s.run(None, {"input_ids": ids.numpy(), "position_ids": pos.numpy(),
                             **{k: v.numpy() for k, v in zip(dec.cache_names("past"), past)}})
            for name, a, b in zip(dec.cache_names("present"), pres, o[1:]):
                assert a.shape == b.shape, (step, name, a.shape, b.shape)
                if a.dtype == torch.uint8:
                    assert np.array_equal(a.numpy(), b), (step, name)
                else:
                    np.testing.assert_allclose(b.astype(np.float32), a.float().numpy(), atol=2e-3, rtol=2e-3)
            np.testing.assert_allclose(o[0][:, -1], lg[:, -1].numpy(), atol=2e-3, rtol=1e-3)
            n += ids.shape[1]
            past, ids = pres, lg[:, -1].argmax(-1, keepdim=True)
    assert pres[dec.entries["key"].index("window")].shape[2] == dec.window
    tt, _ = greedy_torch(dec, prompt, 6)
    ot, _ = greedy_ort(s, dec, prompt, 6)
    assert (tt == ot).mean() >= 0.9
