"""NaN / ±Inf / |x| > 65504 keys and values on the model path (issue 10 item 2).

An fp32 or bf16 model can hand the cache values fp16 cannot hold.  The session stores its
fp16 tails through the one saturating conversion (``_core.numerics.store_fp16``: NaN → 0,
±Inf and beyond-range values → ±65504), on the reference path, the kernel path and the
exported decoder alike, and counts what it changed so that ``compare``'s report.json shows
an upstream model bug instead of hiding it.  The poisoned tiny model below puts NaN and ±Inf
into layer 0's keys and values beyond fp16 range into layer 0's values and layer 1's keys.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from kvexport import codecs
from kvexport.codecs._core.numerics import FP16_MAX
from kvexport.models.cache import LayerCache, LayerPlan
from kvexport.models.recipes import tiny_model
from kvexport.models.rewrite import CompressedSession

from .test_kernel_binding import fake_kernels  # noqa: F401  (fixture: the kernels emulated on the CPU)

# kivi: fp16 key residual; turbo: no raw storage of its own; polar / qjl: an fp16 window.
SPECS = ["kivi:group=8,value_group=8", "turbo", "polar:window=4", "qjl:group=8,window=3"]


def _poisoned(dtype: torch.dtype):
    m = tiny_model("llama", dtype=dtype)
    a0, a1 = m.model.layers[0].self_attn, m.model.layers[1].self_attn
    with torch.no_grad():
        a0.k_proj.weight[0] = float("nan")   # key channel 0 of kv head 0 (and its RoPE partner): NaN
        a0.k_proj.weight[1] = 3e38           # channel 1: ±Inf (and NaN where RoPE mixes Inf·0)
        a0.v_proj.weight.mul_(1e6)           # values far beyond fp16 range
        a1.k_proj.weight.mul_(1e6)           # keys far beyond fp16 range
    return m


def _count(x: torch.Tensor) -> torch.Tensor:
    """[NaN, |x| > 65504 or ±Inf] of ``x``, counted here independently of the package."""
    a = x.float().abs()
    return torch.tensor([int(a.isnan().sum()), int((a > FP16_MAX).sum())])


def _spy(cache, seen: dict):
    """Record per layer what the model hands ``cache.attend`` (the counts the session must report)."""
    orig = cache.attend

    def attend(layer, q, k, v, **kw):
        seen[layer] = seen.get(layer, torch.zeros(2, dtype=torch.long)) + _count(k) + _count(v)
        return orig(layer, q, k, v, **kw)
    cache.attend = attend


def _stored(layer) -> list[torch.Tensor]:
    """Every tensor a layer cache holds (packed fields and fp16 tails)."""
    if hasattr(layer, "raw_k"):   # LayerCache
        out = [t for t in (layer.raw_k, layer.raw_v) if t is not None]
        for p in (layer.k, layer.v):
            out += [] if p is None else list(p.tensors.values())
        return out
    # KernelLayerCache under the emulation: its fp16 window and the tokens handed to append
    out = [t for t in (layer.wk, layer.wv) if t is not None]
    return out + [c.fields["x"][:, :, :layer.m] for c in (layer.ck, layer.cv) if c is not None]


def _run(m, spec: str, backend: str = "torch"):
    ids = torch.randint(0, 320, (2, 20), generator=torch.Generator().manual_seed(0))
    seen: dict[int, torch.Tensor] = {}
    with CompressedSession(m, LayerPlan(codecs.from_spec(spec)), backend=backend, capacity=8) as s:
        _spy(s.cache, seen)
        logits = [s.forward(ids[:, :13])] + [s.forward(ids[:, t:t + 1]) for t in range(13, 20)]
        stored = [t for layer in s.cache.layers for t in _stored(layer)]
    return torch.cat(logits, 1), stored, s.cache, seen


def _check(logits, stored, cache, seen):
    assert torch.isfinite(logits).all()
    for t in stored:
        assert not t.is_floating_point() or torch.isfinite(t.float()).all()
    counts = cache.sanitized()
    total = sum(seen.values())
    assert total[0] > 0 and total[1] > 0  # the poison reached the cache: NaN and out-of-range values
    assert (counts["nan_zeroed"], counts["clamped"]) == (int(total[0]), int(total[1]))
    assert counts["layers"] == sorted(i for i, c in seen.items() if c.any())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("spec", SPECS)
def test_session_saturates_and_counts(spec, dtype):
    """Prefill 13 tokens + 7 decode steps on the poisoned model: finite logits, nothing stored
    holds NaN/Inf, and the session's counts equal the NaN / out-of-range values it was given."""
    _check(*_run(_poisoned(dtype), spec))


@pytest.mark.parametrize("spec", ["kivi:group=8,value_group=8,window=3", "turbo:window=4"])
def test_kernel_session_saturates_and_counts(fake_kernels, spec):  # noqa: F811
    """The same on the CUDA-kernel binding (kernels emulated): its fp16 window and the tokens it
    hands the append kernel go through the same conversion."""
    _check(*_run(_poisoned(torch.float32), spec, backend="cuda"))


def test_clean_model_counts_nothing():
    logits, _, cache, seen = _run(tiny_model("llama"), "kivi:group=8,value_group=8")
    assert cache.sanitized() == dict(nan_zeroed=0, clamped=0, layers=[]) and not any(c.any() for c in seen.values())


def test_compare_report_carries_counts(tmp_path):
    """``kvexport compare`` rows carry the session's counts in report.json and report.md says
    what the model gave the cache (the fp16-range model's zeros: test_clean_model_counts_nothing)."""
    from kvexport.models.compare import CompareConfig, run_compare, write_reports
    from kvexport.models.loading import ByteTokenizer, LoadedModel
    from kvexport.models.recipes import recipe_for_config
    m = _poisoned(torch.float32)
    lm = LoadedModel(m, ByteTokenizer(), "tiny:llama", recipe_for_config(m.config))
    cfg = CompareConfig(specs=["kivi:group=8,value_group=8"], windows=1, window_len=24)
    write_reports(run_compare(lm, "the quick brown fox jumps over the lazy dog. " * 20, "t", cfg, progress=False),
                  tmp_path)
    row = json.loads((tmp_path / "report.json").read_text())["codecs"][0]
    got = row["sanitized"]
    assert got["nan_zeroed"] > 0 and got["clamped"] > 0 and got["layers"] == [0, 1]
    assert math.isfinite(row["ppl"])
    assert f"{got['nan_zeroed']} NaN (stored as 0)" in (tmp_path / "report.md").read_text()


def test_exported_decoder_window_saturates():
    """The ONNX decoder's fp16 window (``PackedCacheDecoder._slide``): the eager decoder gives
    finite logits on the poisoned model, and ``_slide`` exported and run in onnxruntime stores
    the same saturated window (and packed bytes) as torch."""
    import numpy as np
    from kvexport.onnx.decoder import PackedCacheDecoder, greedy_torch
    from kvexport.onnx.export import export_module
    from kvexport.onnx.opmodels import session
    codec = codecs.from_spec("turbo:window=4")
    dec = PackedCacheDecoder(_poisoned(torch.float32), codec)
    _, logits = greedy_torch(dec, torch.randint(0, 320, (1, 9), generator=torch.Generator().manual_seed(2)), 2)
    assert all(np.isfinite(x).all() for x in logits)

    class Slide(torch.nn.Module):   # one role of one layer step: window ++ new, the overflow encoded
        def forward(self, x, *past):
            packed, win = dec._slide("key", dict(zip(dec.entries["key"], past)), x)
            return (*[packed[f] for f in dec.fields["key"]], win)

    past = dec.empty_past(1)[:len(dec.entries["key"])]
    x = torch.randn(1, 2, 6, 64, generator=torch.Generator().manual_seed(3)) * 1e5
    x[0, 0, :, 3], x[0, 1, 2, 5], x[0, 1, 4, 7] = float("nan"), float("inf"), -float("inf")
    names = [f"past{i}" for i in range(len(past))]
    sess = session(export_module(Slide(), (x, *past), input_names=["x", *names], head_dim=64))
    got = sess.run(None, {"x": x.numpy(), **{n: p.numpy() for n, p in zip(names, past)}})
    with torch.no_grad():
        want = Slide()(x, *past)
    assert got[-1].dtype == np.float16 and got[-1].shape == (1, 2, 4, 64)
    lc = LayerCache(codec, 4)   # the session stores the same window
    lc.attend(torch.randn(1, 4, 6, 64), x, x, scale=0.125)
    assert torch.equal(lc.raw_k[:, :, -4:], want[-1])
    for g, w in zip(got, want):
        assert np.isfinite(g.astype(np.float32)).all() and np.array_equal(g, w.numpy())
