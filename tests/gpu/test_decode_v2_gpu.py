"""Decode attention v2 (plugins/common/decode_v2.cuh) vs the Python reference and vs v1.

v2 stages packed tiles with cp.async and dequantizes into MMA fragments through per-codec
dim permutations: a wrong permutation, fragment slot, stage index or tail fill shows up as a
large error against ``codec.attend``.  The allocator is poisoned with NaN before each call so
that a partial or output the kernel forgets to write is not silently zero.
"""

from __future__ import annotations

import pytest
import torch

from kvexport import codecs

from .test_kernels_gpu import _caches, _reference, _rel

pytestmark = pytest.mark.gpu

SPECS = ["fp16", "turbo:bits=4", "turbo:bits=3", "turbo:bits=2", "turbo:bits=1", "turbo:bits=8", "fibquant",
         "fibquant:k=8,N=16", "fibquant:k=4,N=16", "fibquant:k=4,N=64", "fibquant:k=2,N=16", "fibquant:k=8,N=256"]
REL = {torch.float16: 2e-3, torch.bfloat16: 1e-2}  # the bounds v1 meets in test_kernels_gpu


@pytest.fixture(scope="module")
def K(cuda_kernels):
    return cuda_kernels  # tests/conftest.py: a build failure on a GPU machine fails, never skips


def _poison():
    """Fill freed allocator blocks with NaN: torch.empty inside decode_attention then returns NaN."""
    x = torch.full((64 << 20,), float("nan"), dtype=torch.float32, device="cuda")
    del x


def _run(K, q, ck, cv, lens, kernel, **kw):
    _poison()
    out = K.decode_attention(q, ck, cv, lens, kernel=kernel, **kw)
    torch.cuda.synchronize()
    return out


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("d,hkv,g", [(64, 3, 3), (128, 2, 4), (128, 1, 8), (64, 2, 1), (128, 1, 16)])
@pytest.mark.parametrize("cap", [301, 320])  # 301: rows / norms not 16-byte aligned per head
def test_v2_matches_reference(K, spec, d, hkv, g, cap):
    torch.manual_seed(hash((spec, d, g, cap)) % 2**31)
    codec = codecs.from_spec(spec)
    lens = [300, 77, 1]  # T not a multiple of 16 or 64; a one-token sequence
    b = len(lens)
    k = torch.randn(b, hkv, cap, d) * 2
    v = torch.randn(b, hkv, cap, d)
    ck, cv, pks, pvs = _caches(K, codec, k, v, lens, cap)
    lens_d = torch.tensor(lens, dtype=torch.int32, device="cuda")
    for dtype in (torch.float16, torch.bfloat16):
        q = torch.randn(b, hkv * g, 1, d, dtype=dtype)
        ref = _reference(codec, q, pks, pvs)
        for splits in (None, 1, 7):
            out = _run(K, q.cuda(), ck, cv, lens_d, "v2", num_splits=splits, max_len=max(lens))
            assert out.shape == q.shape and out.dtype == dtype
            assert _rel(out, ref) < REL[dtype], (spec, dtype, splits, _rel(out, ref))


@pytest.mark.parametrize("spec", ["fp16", "turbo:bits=4", "fibquant"])
def test_v2_long_batch8(K, spec):
    """B = 8, a few thousand tokens: many pipeline iterations per warp, ragged lengths."""
    torch.manual_seed(3)
    codec = codecs.from_spec(spec)
    lens = [2500, 1, 1999, 64, 65, 2047, 700, 16]
    b, hkv, g, d, cap = len(lens), 2, 4, 128, 2500
    k = torch.randn(b, hkv, cap, d) * 2
    v = torch.randn(b, hkv, cap, d)
    ck, cv, pks, pvs = _caches(K, codec, k, v, lens, cap)
    q = torch.randn(b, hkv * g, 1, d, dtype=torch.float16)
    ref = _reference(codec, q, pks, pvs)
    out = _run(K, q.cuda(), ck, cv, torch.tensor(lens, dtype=torch.int32, device="cuda"), "v2")
    assert _rel(out, ref) < REL[torch.float16], _rel(out, ref)


@pytest.mark.parametrize("spec", ["fp16", "turbo:bits=4"])
def test_v2_one_sequence_many_splits(K, spec):
    """B = 1, 20k tokens: v2 picks ~40 splits (160 partials > the combine's D threads)."""
    torch.manual_seed(6)
    codec = codecs.from_spec(spec)
    t, hkv, g, d = 20000, 2, 4, 128
    k, v = torch.randn(1, hkv, t, d) * 2, torch.randn(1, hkv, t, d)
    ck, cv, pks, pvs = _caches(K, codec, k, v, [t], t)
    q = torch.randn(1, hkv * g, 1, d, dtype=torch.float16)
    ref = _reference(codec, q, pks, pvs)
    out = _run(K, q.cuda(), ck, cv, torch.tensor([t], dtype=torch.int32, device="cuda"), "v2")
    assert _rel(out, ref) < REL[torch.float16], _rel(out, ref)


def test_v2_fp16_bitwise_equals_v1(K):
    """fp16: v2 reads the staged rows with v1's ldmatrix, keeps v1's MMA order and its combine's
    arithmetic order, so with the same split count the outputs are identical."""
    torch.manual_seed(4)
    codec = codecs.from_spec("fp16")
    lens, hkv, g, d, cap = [1000, 333], 2, 4, 128, 1000
    k, v = torch.randn(2, hkv, cap, d), torch.randn(2, hkv, cap, d)
    ck, cv, _, _ = _caches(K, codec, k, v, lens, cap)
    q = torch.randn(2, hkv * g, 1, d, dtype=torch.float16, device="cuda")
    lens_d = torch.tensor(lens, dtype=torch.int32, device="cuda")
    for splits in (1, 2):  # 2 = ceil(1000 / 512): v2 keeps it (its rule caps splits at 8 subtile rounds)
        a = _run(K, q, ck, cv, lens_d, "v1", num_splits=splits)
        b = _run(K, q, ck, cv, lens_d, "v2", num_splits=splits)
        assert torch.equal(a, b), (splits, float((a.float() - b.float()).abs().max()))


@pytest.mark.parametrize("spec", ["fp16", "turbo:bits=3", "turbo:bits=4", "fibquant"])
def test_v2_real_kv(K, real_kv, spec):
    """Real post-RoPE q/k/v of the default model (9 q / 3 kv heads, d = 64)."""
    codec = codecs.from_spec(spec)
    for layer in (0, 15, 29):
        q, k, v = (real_kv[f"{n}.{layer}"] for n in "qkv")
        t = k.shape[2] - 1
        qd = q[:, :, t:t + 1].to(torch.float16)
        ck, cv, pks, pvs = _caches(K, codec, k, v, [t], t)
        ref = _reference(codec, qd, pks, pvs)
        out = _run(K, qd.cuda(), ck, cv, torch.tensor([t], dtype=torch.int32, device="cuda"), "v2")
        assert _rel(out, ref) < REL[torch.float16], (layer, _rel(out, ref))


def test_v2_falls_back_to_v1_where_not_covered(K):
    """A window, several query tokens or a soft cap run v1's kernel: same bytes as kernel="v1"."""
    torch.manual_seed(5)
    codec = codecs.from_spec("turbo:bits=4")
    lens, hkv, g, d, cap, w = [200, 33], 2, 4, 128, 256, 8
    k, v = torch.randn(2, hkv, cap, d), torch.randn(2, hkv, cap, d)
    ck, cv, _, _ = _caches(K, codec, k, v, lens, cap)
    lens_d = torch.tensor(lens, dtype=torch.int32, device="cuda")
    wk = torch.randn(2, hkv, w, d, dtype=torch.float16, device="cuda")
    wv = torch.randn(2, hkv, w, d, dtype=torch.float16, device="cuda")
    q1 = torch.randn(2, hkv * g, 1, d, dtype=torch.float16, device="cuda")
    q3 = torch.randn(2, hkv * g, 3, d, dtype=torch.float16, device="cuda")
    for q, kw in ((q1, dict(window_k=wk, window_v=wv)), (q3, {}), (q1, dict(softcap=30.0))):
        a = _run(K, q, ck, cv, lens_d, "v1", **kw)
        b = _run(K, q, ck, cv, lens_d, "v2", **kw)
        assert torch.equal(a, b), kw.keys()
