"""The compressed session on the CUDA kernels (``backend="cuda"``) vs the reference path (GPU).

A tiny llama in fp16 on cuda, every codec: logits of prefill + decode steps on the kernels vs
one prefill on the reference path (``tolerance(codec, "end-to-end")``); the default model's
perplexity over 2 windows × 256 tokens, kernel vs reference path (``tolerance(codec, "ppl")``),
fp16 and bf16.  The CPU checks of the same binding (errors; bookkeeping with the kernels
emulated) are in tests/models/test_kernel_binding.py (tests/gpu is skipped without a GPU).
"""

from __future__ import annotations

import math

import pytest
import torch

from kvexport import codecs
from kvexport.kernels import KernelsUnavailable
from kvexport.models.cache import LayerPlan
from kvexport.tolerances import tolerance

SPECS = ["fp16", "kivi:bits=2", "kivi:bits=4,group=16,value_group=16,window=5", "turbo:bits=3",
         "fibquant", "fibquant:k=4,N=16", "polar", "ternary", "ternary:key_axis=token,bits=2.4",
         "qjl", "qjl:outliers=0,value_bits=3"]


# ----- GPU ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cuda_kernels():
    import kvexport.kernels as kernels
    try:
        kernels.library()
    except KernelsUnavailable as e:
        pytest.skip(str(e))
    return kernels


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


@pytest.fixture(scope="module")
def default_windows(default_model_path):
    from kvexport.data import read_text
    from kvexport.models.evaluate import text_windows
    from kvexport.models.loading import load_model
    lm = load_model("default")
    return lm, text_windows(lm, read_text(None), 2, 256)


@pytest.mark.gpu
@pytest.mark.model
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("spec", ["fp16", "kivi:bits=2", "turbo:bits=3", "fibquant", "polar", "ternary", "qjl"])
def test_default_model_ppl_kernel_vs_reference(cuda_kernels, default_windows, dtype, spec):
    """Default model, 2 windows × 256 tokens: ppl on the kernels (prefill 128 + 128 decode steps)
    vs the reference path on the same windows, within ``tolerance(codec, "ppl", dtype)``."""
    from kvexport.models.evaluate import evaluate
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("no bf16 on this GPU")
    lm, wins = default_windows
    lm.model.to(device="cuda", dtype=dtype)
    wins = wins.cuda()
    plan = LayerPlan(codecs.from_spec(spec))
    ref = evaluate(lm, spec, plan, wins)
    ker = evaluate(lm, spec, plan, wins, backend="cuda")
    assert ker.decode_from == 128 and ker.tokens == ref.tokens == 2 * 255
    rel = abs(ker.ppl - ref.ppl) / ref.ppl
    print(f"{spec} {dtype}: ppl reference {ref.ppl:.4f} kernels {ker.ppl:.4f} (rel {rel:.2e}); "
          f"{1e3 * ker.seconds / ker.tokens:.2f} ms/token on the kernels")
    assert math.isfinite(ker.ppl)
    assert rel <= tolerance(codec_name(spec), "ppl", str(dtype).split(".")[1]).rtol


def codec_name(spec: str) -> str:
    return spec.split(":")[0]
