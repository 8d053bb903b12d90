"""FibQuant (Lee & Kim 2026): vector code beats its scalar specialisation (turbo) at matched rate."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kvexport import codecs
from kvexport.codecs.fibquant import codec as fq

# (fibquant k, N) against turbo bits at the same rate log2(N)/k.
MATCHED = [((2, 16), 2), ((4, 16), 1), ((4, 256), 2), ((8, 256), 1)]


def _unit(n, d, seed):
    x = torch.randn(1, 1, n, d, generator=torch.Generator().manual_seed(seed))
    return x / x.norm(dim=-1, keepdim=True)


def _err(c, x, role="key"):
    """Per-vector squared error (B*H*T,) and the relative MSE Σ‖x − x̂‖² / Σ‖x‖²."""
    e = ((c.decode(c.encode(x, role)) - x) ** 2).sum(-1).flatten()
    return e, e.sum().item() / (x ** 2).sum().item()


def test_params_bits_and_N_resolve_to_one_spec():
    c = codecs.get("fibquant")
    assert (c.params.k, c.params.N, c.params.bits) == (4, 256, 2.0)  # paper operating point
    assert codecs.get("fibquant", k=4, N=64).params.bits == 1.5
    assert codecs.get("fibquant", k=8, bits=0.5).params.N == 16
    assert codecs.get("fibquant", k=4, bits=2).spec_hash == codecs.get("fibquant", k=4, N=256).spec_hash
    assert codecs.from_spec("fibquant:k=4,bits=1.5").params.N == 64
    for bad, name in (({"k": 4, "bits": 1.1}, "bits"), ({"k": 4, "N": 64, "bits": 2}, "bits"),
                      ({"k": 16, "bits": 2}, "bits"), ({"N": 100}, "N"), ({"k": 17}, "k")):
        with pytest.raises(ValueError, match=rf"fibquant\.{name}"):
            codecs.get("fibquant", **bad)
    with pytest.raises(ValueError, match=r"fibquant\.k"):
        codecs.get("fibquant", k=3, N=8).encode(torch.zeros(1, 1, 2, 64))


def test_rate_picks_k_so_the_codebook_stays_fittable():
    """bits alone picks k: 4 (the paper's block) unless N would pass 256 (then 2, 1): bits=4 used
    to resolve to k=4, N=65536 with 16384 samples and fit for minutes without a word."""
    assert (codecs.from_spec("fibquant:bits=4").params.k, codecs.from_spec("fibquant:bits=4").params.N) == (2, 256)
    for bits, kn in ((0.5, (4, 4)), (1.5, (4, 64)), (2, (4, 256)), (3, (2, 64)), (8, (1, 256))):
        p = codecs.get("fibquant", bits=bits).params
        assert (p.k, p.N, p.bits) == (*kn, bits), bits
    assert codecs.get("fibquant", N=64).params.k == 4                # N alone: the default block
    assert codecs.get("fibquant", k=8, bits=0.5).params.N == 16      # k given: kept


def test_more_codewords_than_samples_is_refused():
    for bad in ({"k": 4, "bits": 4}, {"N": 65536}, {"N": 2048, "samples": 1024}):
        with pytest.raises(ValueError, match=r"fibquant\.N \(\d+\) exceeds fibquant\.samples") as e:
            codecs.get("fibquant", **bad)
        assert "\n" not in str(e.value)
    assert codecs.get("fibquant", N=1024, samples=1024).params.N == 1024


def test_codebook_fit_reports_progress(monkeypatch, capsys):
    """A fit longer than ``_PROGRESS_AFTER_S`` shows a tqdm bar (rate, ETA) on stderr."""
    monkeypatch.setattr(fq, "_PROGRESS_AFTER_S", 0.0, raising=False)
    fq._fit(16, 2, 8, restarts=1, iters=3, samples=1024, seed=0)
    err = capsys.readouterr().err
    assert "fibquant codebook (d=16, k=2, N=8)" in err and "iter" in err, err


@pytest.mark.parametrize("k,N", [(4, 64), (8, 16)])
def test_fractional_and_sub_one_bit_rates(k, N):
    c = codecs.get("fibquant", k=k, N=N)
    x = torch.randn(2, 3, 9, 64, generator=torch.Generator().manual_seed(k))
    p = c.encode(x)
    assert c.bits_per_coordinate(64, 9, "key") == math.log2(N) / k + 16 / 64
    assert p["codes"].shape == (2, 3, 9, math.ceil(64 // k * math.log2(N) / 8))
    _, rel = _err(c, x)
    assert rel < {64: 0.21, 16: 0.64}[N]  # measured 0.184 (1.5 bit) and 0.601 (0.5 bit) at d=128


def test_codebook_construction():
    radii = fq._beta_radii(128, 4, 4)
    assert np.all(np.diff(radii) > 0) and 0 < radii[0] and radii[-1] < 1
    # mean radius over the bins equals E[ρ] for ρ² ~ Beta(k/2, (d−k)/2)
    rho = np.linalg.norm(fq.block_samples(128, 4, 200000, np.random.default_rng(0)), axis=1)
    assert radii.mean() == pytest.approx(rho.mean(), rel=1e-2)
    for k in (2, 3, 4, 8):
        dirs = fq._directions(k, 64, 0)
        assert np.allclose(np.linalg.norm(dirs, axis=1), 1) and len(np.unique(dirs.round(6), axis=0)) == 64
        init = fq._init_codebook(128, k, 64, fq._shell_choices(k, 64)[0], None)
        assert init.shape == (64, k)
    # Lloyd–Max refinement lowers the MSE of the radial–angular start on fresh samples
    held = torch.from_numpy(fq.block_samples(128, 4, 50000, np.random.default_rng(1)))
    start = torch.from_numpy(fq._init_codebook(128, 4, 16, fq._shell_choices(4, 16)[0], None))
    cb = fq.fit_codebook(128, 4, 16, 2, 30, 16384, 0)
    assert cb.shape == (16, 4) and cb.dtype == torch.float32
    assert fq._mse(held, cb.double()) < 0.99 * fq._mse(held, start)


@pytest.mark.parametrize("fib,bits", MATCHED)
def test_vector_code_beats_scalar_turbo_on_unit_vectors(fib, bits):
    """The paper's theorem: at matched rate the vector code's MSE is strictly below turbo's."""
    k, n = fib
    x = _unit(4096, 128, 100 + k)
    f, t = codecs.get("fibquant", k=k, N=n), codecs.get("turbo", bits=bits)
    assert f.bits_per_coordinate(128) == t.bits_per_coordinate(128)
    ef, rf = _err(f, x)
    et, rt = _err(t, x)
    diff = ef - et  # paired per-vector difference
    assert diff.mean() < -4 * diff.std() / math.sqrt(len(diff)), (fib, rf, rt)
    assert rf < 0.97 * rt, (fib, rf, rt)


def test_vector_code_beats_turbo_on_real_kv(real_kv):
    rows = []
    for (k, n), bits in MATCHED:
        f, t = codecs.get("fibquant", k=k, N=n), codecs.get("turbo", bits=bits)
        for layer in (0, 15, 29):
            for role, name in (("key", "k"), ("value", "v")):
                x = real_kv[f"{name}.{layer}"]
                rf, rt = _err(f, x, role)[1], _err(t, x, role)[1]
                rows.append((k, n, bits, layer, name, rf, rt))
                assert rf < rt, rows[-1]
    for r in rows:
        print("fibquant k=%d N=%-3d vs turbo b=%d layer %2d %s: %.4f vs %.4f" % r)


def test_table_lookup_scores_and_sums_equal_the_decoded_reference():
    c = codecs.get("fibquant", k=8, N=16, seed=2)
    k = torch.randn(2, 3, 41, 64, generator=torch.Generator().manual_seed(1)) * 3
    q = torch.randn(2, 9, 3, 64, generator=torch.Generator().manual_seed(2))
    pk, pv = c.encode(k, "key"), c.encode(k, "value")
    ref = q @ c.decode(pk).repeat_interleave(3, 1).transpose(-1, -2)
    assert torch.allclose(c.scores(q, pk), ref, rtol=1e-4, atol=1e-4)
    p = torch.softmax(ref, -1)
    assert torch.allclose(c.weighted_sum(p, pv), p @ c.decode(pv).repeat_interleave(3, 1), rtol=1e-4, atol=1e-5)
    const = c.constants(64)
    assert set(const) == {"rotation", "codebook"} and const["codebook"].shape == (16, 8)
