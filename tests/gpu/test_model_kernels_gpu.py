"""The compressed session on the CUDA kernels (``backend="cuda"``) vs the reference path (GPU).

A tiny llama in fp16 on cuda, every codec: logits of prefill + decode steps on the kernels vs
one prefill on the reference path (``tolerance(codec, "end-to-end")``); the default model's
perplexity over 256 windows × 256 tokens, kernel vs reference path on the same schedule, paired per
window (``tolerance(codec, "ppl")``, ``kvexport.models.paired``), every codec setting, fp16 and bf16.
The CPU side of the paired comparison (one schedule on both paths, pairing, a biased kernel caught)
runs in tests/models/test_kernel_binding.py with the kernels emulated.  The CPU checks of the same binding (errors; bookkeeping with the kernels
emulated) are in tests/models/test_kernel_binding.py (tests/gpu is skipped without a GPU).
"""

from __future__ import annotations

import math

import pytest
import torch

from kvexport import codecs
from kvexport.models.cache import LayerPlan
from kvexport.tolerances import tolerance

SPECS = ["fp16", "kivi:bits=2", "kivi:bits=4,group=16,value_group=16,window=5", "turbo:bits=3",
         "fibquant", "fibquant:k=4,N=16", "polar", "ternary", "ternary:key_axis=token,bits=2.4",
         "qjl", "qjl:outliers=0,value_bits=3"]


# ----- GPU ---------------------------------------------------------------------------------

# cuda_kernels: tests/conftest.py (a build failure on a GPU machine fails, never skips)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.mark.gpu
@pytest.mark.parametrize("spec", SPECS)
def test_tiny_llama_kernel_path_logits(cuda_kernels, spec):
    """Tiny llama (fp16, cuda): prefill 20 + 28 decode steps on the kernels, capacity 16 (grown),
    vs one prefill on the reference path, same model and device."""
    from kvexport.models.evaluate import run_window
    from kvexport.models.recipes import tiny_model
    from kvexport.models.rewrite import CompressedSession
    m = tiny_model("llama", dtype=torch.float16).cuda()
    ids = torch.randint(0, 320, (2, 48), generator=torch.Generator().manual_seed(4)).cuda()
    codec = codecs.from_spec(spec)
    plan = LayerPlan(codec, overrides={2: codecs.from_spec("turbo:bits=4")} if codec.name == "kivi" else {})
    with CompressedSession(m, plan) as s:
        want = run_window(s, ids)
    with CompressedSession(m, plan, backend="cuda", capacity=16) as s:
        got = run_window(s, ids, decode_from=20)
        assert s.cache.layers[0].ck.capacity >= 48 - int(getattr(codec.params, "window", 0) or 0)
    assert torch.isfinite(got).all()
    tol = tolerance(codec.name, "end-to-end", "float16")
    err = (got - want).abs().max().item()
    print(f"{spec}: max |Δlogit| {err:.3e}, rel {_rel(got, want):.2e}")
    torch.testing.assert_close(got, want, atol=tol.atol, rtol=tol.rtol)


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_tiny_sliding_softcap_families_kernel_path(cuda_kernels, family):
    """Sliding-window (mistral: 12 < 40 tokens) and soft-capped + sliding (gemma2) layers on the
    kernels (ABI 4 ``softcap`` / ``sliding_window``) vs the reference path."""
    from kvexport.models.evaluate import run_window
    from kvexport.models.recipes import tiny_model
    from kvexport.models.rewrite import CompressedSession
    m = tiny_model(family, dtype=torch.float16).cuda()
    ids = torch.randint(0, 320, (1, 40), generator=torch.Generator().manual_seed(5)).cuda()
    plan = LayerPlan(codecs.get("kivi", bits=4, group=16, value_group=16, window=4))
    with CompressedSession(m, plan) as s:
        want = run_window(s, ids)
    with CompressedSession(m, plan, backend="cuda", capacity=8) as s:
        got = run_window(s, ids, decode_from=15)
    tol = tolerance("kivi", "end-to-end", "float16")
    print(f"{family}: max |Δlogit| {(got - want).abs().max().item():.3e}, rel {_rel(got, want):.2e}")
    torch.testing.assert_close(got, want, atol=tol.atol, rtol=tol.rtol)


# Windows of the paired perplexity comparison: 256 windows × 256 tokens = 65 280 predicted tokens
# per path, 64 windows per batch (4 batches × (one 128-token prefill + 128 decode steps)).  Chosen so
# the standard error of the mean paired difference can resolve the 0.5 % ppl bound at PPL_Z σ:
# per-window |d_w| up to a few % (docs: 2 windows gave 0.2–6 %) → SE ≈ 4 % / 16 = 2.5e-3 at worst;
# the test fails (names the SE) rather than widening the bound if the data do not resolve it.
PPL_WINDOWS, PPL_LEN, PPL_BATCH = 256, 256, 64


@pytest.fixture(scope="module")
def default_windows(default_model_path):
    from kvexport.data import read_text
    from kvexport.models.evaluate import text_windows
    from kvexport.models.loading import load_model
    lm = load_model("default")
    wins = text_windows(lm, read_text(None), PPL_WINDOWS, PPL_LEN)
    assert wins.shape == (PPL_WINDOWS, PPL_LEN), wins.shape   # the text holds them (~380k tokens)
    return lm, wins


# Measured on the H200 (2026-12-03, scripts/gpu_check.sh model): about 150 s per case; fp16
# codec rel +1.75e-5 (SE 3.1e-5, bound 9.8e-4) passes; kivi:bits=2 rel -8.6e-4 but SE 3.5e-3 with
# per-window |d_w| up to 0.33 (code flips amplified over 30 layers), so 256 windows cannot resolve
# the 0.5 % bound (≈ 1100 windows would) and the test fails saying so.  The remaining 20 cases
# were not run (device time).  Not a CI test: it needs a GPU and ~1 h for all cases.
@pytest.mark.gpu
@pytest.mark.model
@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("spec", SPECS)
def test_default_model_ppl_kernel_vs_reference(cuda_kernels, default_windows, dtype, spec):
    """Default model, 256 windows × 256 tokens: ppl on the kernels vs the reference path on the SAME
    schedule (both: prefill 128 + 128 teacher-forced decode steps, kvexport.models.paired), paired
    per window; |exp(mean d) − 1| within ``tolerance(codec, "ppl", dtype)`` and resolved by the data
    (standard error ≤ rtol / PPL_Z)."""
    from kvexport.models.paired import paired_ppl, schedule
    from kvexport.tolerances import PPL_Z
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("no bf16 on this GPU")
    lm, wins = default_windows
    lm.model.to(device="cuda", dtype=dtype)
    codec = codecs.from_spec(spec)
    res = paired_ppl(lm, LayerPlan(codec), wins.cuda(), backends=("torch", "cuda"), decode_from=PPL_LEN // 2,
                     batch=PPL_BATCH)
    assert res["schedule"] == schedule(PPL_LEN, PPL_LEN // 2) and res["tokens"] == PPL_WINDOWS * (PPL_LEN - 1)
    d, tol = res["diff"], tolerance(codec.name, "ppl", str(dtype).split(".")[1]).rtol
    print(f"{spec} {dtype}: ppl reference {res['ppl']['torch']:.4f} kernels {res['ppl']['cuda']:.4f}; paired "
          f"rel {d['rel']:+.2e} (SE {d['se']:.1e}, max |d_w| {d['max_abs']:.1e}); bound {tol:.1e}")
    assert all(math.isfinite(x) for x in res["nll"]["cuda"])
    assert d["se"] <= tol / PPL_Z, f"SE {d['se']:.2e} cannot resolve the {tol:.1e} bound: more windows needed"
    assert abs(d["rel"]) <= tol, d
