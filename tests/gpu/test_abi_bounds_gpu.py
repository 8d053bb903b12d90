"""Kernel ABI bounds on the GPU: an append past the cache capacity and a decode with
max_len < lens are refused (by the Python binding before launch, and by the C launchers'
own host-side check when the binding is bypassed) without touching a byte; calls at the
bounds still work."""

from __future__ import annotations

import pytest
import torch

from kvexport import codecs

pytestmark = pytest.mark.gpu

SPECS = ["fp16", "kivi:group=16", "turbo:bits=4", "fibquant:k=4,N=16", "polar", "ternary", "qjl"]
B, H, HQ, D, CAP = 2, 2, 4, 64, 32


@pytest.fixture(scope="module")
def K(cuda_kernels):
    return cuda_kernels  # tests/conftest.py: a build failure on a GPU machine fails, never skips


def _caches(K, spec):
    codec = codecs.from_spec(spec)
    return (K.KernelCache.allocate(codec, "key", B, H, D, CAP), K.KernelCache.allocate(codec, "value", B, H, D, CAP))


def _snapshot(*caches):
    return [t.clone() for c in caches for t in c.fields.values()]


def _same(before, *caches):
    """Every buffer byte as before (the float poison is NaN: compared with NaN = NaN)."""
    after = [t for c in caches for t in c.fields.values()]
    return all(torch.equal(a, b) if a.dtype == torch.uint8 else torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))
               for a, b in zip(before, after))


def _lens(*v):
    return torch.tensor(v, dtype=torch.int32, device="cuda")


@pytest.mark.parametrize("spec", SPECS)
def test_append_past_capacity_is_refused(K, spec):
    ck, cv = _caches(K, spec)
    x = torch.randn(B, H, 4, D, dtype=torch.float16, device="cuda")
    before = _snapshot(ck, cv)
    with pytest.raises(ValueError, match="exceeds the cache capacity of 32"):
        K.append(ck, x, _lens(0, CAP - 3))
    torch.cuda.synchronize()
    assert _same(before, ck, cv)
    # at the bound: lens + n_new == capacity writes, and a decode over the full cache runs
    K.append(ck, x, _lens(0, CAP - 4))
    K.append(cv, x, _lens(0, CAP - 4))
    out = K.decode_attention(torch.randn(B, HQ, D, dtype=torch.float16, device="cuda"), ck, cv, _lens(4, CAP))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("spec", SPECS)
def test_launcher_refuses_what_the_binding_would(K, spec, monkeypatch):
    """With the Python check bypassed (it vouches a false host bound), the C launcher's own
    capacity check answers: an error code mapped to a one-line RuntimeError, nothing written."""
    ck, cv = _caches(K, spec)
    x = torch.randn(B, H, 4, D, dtype=torch.float16, device="cuda")
    before = _snapshot(ck, cv)
    monkeypatch.setattr(K, "check_append_bounds", lambda cap, n, lens, m=None: cap - n + 1)
    with pytest.raises(RuntimeError, match=r"append of 4 tokens at lens up to 29 exceeds the capacity of 32") as e:
        K.append(ck, x, _lens(0, 0))
    assert "\n" not in str(e.value)
    monkeypatch.setattr(K, "check_decode_bounds", lambda cap, *a, **k: cap + 1)
    with pytest.raises(RuntimeError, match=r"max_len \(33\) must be in \[0, capacity\] \(capacity 32"):
        K.decode_attention(torch.randn(B, HQ, D, dtype=torch.float16, device="cuda"), ck, cv, _lens(0, 0))
    torch.cuda.synchronize()
    assert _same(before, ck, cv)


def test_decode_max_len_below_lens_is_refused(K):
    ck, cv = _caches(K, "fp16")
    q = torch.randn(B, HQ, D, dtype=torch.float16, device="cuda")
    with pytest.raises(ValueError, match=r"lens in \[3, 20\] but max_len is 16"):
        K.decode_attention(q, ck, cv, _lens(3, 20), max_len=16)
    with pytest.raises(ValueError, match=r"max_len \(33\) must be in \[0, capacity 32\]"):
        K.decode_attention(q, ck, cv, _lens(3, 20), max_len=33)


def test_fp16_append_to_capacity_is_exact(K):
    """The whole capacity written in two appends holds exactly the saturated fp16 tokens."""
    ck, _ = _caches(K, "fp16")
    x = torch.randn(B, H, CAP, D, device="cuda")
    K.append(ck, x[:, :, :CAP - 5], _lens(0, 0))
    K.append(ck, x[:, :, CAP - 5:], _lens(CAP - 5, CAP - 5))
    assert torch.equal(ck.fields["x"], x.half())


def test_graph_capture_uses_the_host_bound(K):
    ck, _ = _caches(K, "fp16")
    x = torch.randn(B, H, 1, D, dtype=torch.float16, device="cuda")
    lens = _lens(CAP - 1, CAP - 1)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        g = torch.cuda.CUDAGraph()
        with pytest.raises(ValueError, match="capture needs max_len="):
            with torch.cuda.graph(g, stream=s):
                K.append(ck, x, lens)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        K.append(ck, x, lens, max_len=CAP - 1)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(ck.fields["x"][:, :, CAP - 1], x[:, :, 0])
