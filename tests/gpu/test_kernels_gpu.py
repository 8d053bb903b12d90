"""CUDA kernels vs the Python reference codecs (run on the GPU machine: ``pytest -m gpu``).

Decode attention must equal ``codec.attend`` on the same packed bytes within fp16
output rounding; the append kernel must write the Python encoder's bytes (exact for
fp16 / kivi / norms; rotated-codebook indices may differ only where fp32 rounding
puts the rotated coordinate on a cell boundary: see docs/KERNELS.md).
"""

from __future__ import annotations

import pytest
import torch

from kvexport import codecs
from kvexport.codecs._core.bitpack import unpack_bits

pytestmark = pytest.mark.gpu

SPECS = ["fp16", "kivi:bits=2", "kivi:bits=4,group=16,value_group=16", "turbo:bits=3", "turbo:bits=4",
         "turbo:bits=2", "fibquant", "fibquant:k=8,N=16", "fibquant:k=4,N=16",
         "polar", "polar:level_bits=3/1/1/1", "polar:level_bits=8/4/4/4",
         "ternary", "ternary:key_axis=token,bits=2.4", "ternary:bits=4.0,key_group=16,group=4",
         # qjl: defaults; no outliers; m / m_o not multiples of 16 and groups that straddle subtiles
         "qjl", "qjl:outliers=0,value_bits=3", "qjl:m=200,outliers=3,outlier_m=40,group=24,value_bits=4,value_group=16"]
# Codecs whose append bytes may differ from the encoder's in a tolerated fraction
# (kvexport.tolerances "codes": fp32 rotation / atan2 / hypot rounding at a cell or fp16 edge).
# qjl: fp32 sketch projections summed in another order may flip a sign within rounding of 0.
BYTE_TOL = ("polar", "ternary", "qjl")


@pytest.fixture(scope="module")
def K(cuda_kernels):
    return cuda_kernels  # tests/conftest.py: a build failure on a GPU machine fails, never skips


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    assert torch.isfinite(a).all(), "non-finite kernel output"
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _caches(K, codec, k, v, lens, capacity):
    """Encode each sequence's first lens[b] tokens with the Python codec into kernel caches."""
    b, h, _, d = k.shape
    ck = K.KernelCache.allocate(codec, "key", b, h, d, capacity)
    cv = K.KernelCache.allocate(codec, "value", b, h, d, capacity)
    pks, pvs = [], []
    for i, n in enumerate(lens):
        pk, pv = codec.encode(k[i:i + 1, :, :n], "key"), codec.encode(v[i:i + 1, :, :n], "value")
        ck.load(pk, i)
        cv.load(pv, i)
        pks.append(pk)
        pvs.append(pv)
    return ck, cv, pks, pvs


def _reference(codec, q, pks, pvs, wk=None, wv=None, wlens=None):
    outs = []
    for i in range(q.shape[0]):
        kw = {}
        if wk is not None:
            n = wlens[i]
            kw = dict(window_k=wk[i:i + 1, :, :n].cpu(), window_v=wv[i:i + 1, :, :n].cpu())
        outs.append(codec.attend(q[i:i + 1].cpu().float(), pks[i], pvs[i], **kw))
    return torch.cat(outs)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("d,hkv,g", [(64, 3, 3), (128, 2, 4), (256, 2, 1), (128, 1, 16)])
def test_decode_matches_reference(K, spec, d, hkv, g):
    torch.manual_seed(hash((spec, d, g)) % 2**31)
    codec = codecs.from_spec(spec)
    lens = [300, 77, 1]
    b, cap = len(lens), 320
    k = torch.randn(b, hkv, cap, d, dtype=torch.float16)
    v = torch.randn(b, hkv, cap, d, dtype=torch.float16)
    q = torch.randn(b, hkv * g, 1, d, dtype=torch.float16)
    ck, cv, pks, pvs = _caches(K, codec, k, v, lens, cap)
    ref = _reference(codec, q, pks, pvs)
    lens_d = torch.tensor(lens, dtype=torch.int32, device="cuda")
    for splits in (None, 1, 7):
        out = K.decode_attention(q.cuda(), ck, cv, lens_d, num_splits=splits, max_len=max(lens))
        torch.cuda.synchronize()
        assert out.shape == q.shape and out.dtype == q.dtype
        assert _rel(out, ref) < 2e-3, (spec, splits, _rel(out, ref))


@pytest.mark.parametrize("spec", ["fp16", "kivi:bits=2", "turbo:bits=3", "fibquant", "polar", "ternary", "qjl",
                                  "qjl:outliers=0"])
def test_decode_bf16_and_window(K, spec):
    torch.manual_seed(1)
    codec = codecs.from_spec(spec)
    d, hkv, g, lens, wl = 128, 2, 4, [200, 33], [5, 0]
    b, cap, w = len(lens), 256, 8
    k = torch.randn(b, hkv, cap, d) * 2
    v = torch.randn(b, hkv, cap, d)
    q = torch.randn(b, hkv * g, 1, d, dtype=torch.bfloat16)
    wk = torch.randn(b, hkv, w, d, dtype=torch.float16)
    wv = torch.randn(b, hkv, w, d, dtype=torch.float16)
    ck, cv, pks, pvs = _caches(K, codec, k, v, lens, cap)
    ref = _reference(codec, q, pks, pvs, wk, wv, wl)
    out = K.decode_attention(q.cuda(), ck, cv, torch.tensor(lens, dtype=torch.int32, device="cuda"),
                             window_k=wk.cuda(), window_v=wv.cuda(),
                             window_lens=torch.tensor(wl, dtype=torch.int32, device="cuda"))
    torch.cuda.synchronize()
    assert out.dtype == torch.bfloat16
    assert _rel(out, ref) < 1e-2, _rel(out, ref)


def _index_mismatch(codec, got: dict, want, d):
    """Fraction of differing indices of a rotated-codebook codes field."""
    bits = codec.index_bits if codec.name == "fibquant" else codec.params.bits
    n = d // (codec.params.k if codec.name == "fibquant" else 1)
    a = unpack_bits(got["codes"].cpu(), bits, n)
    b = unpack_bits(want["codes"], bits, n)
    return float((a != b).double().mean())


def _byte_mismatch(got: dict, want) -> float:
    """Fraction of differing bytes over every field (fields compared as raw bytes)."""
    diff = total = 0
    for name, g in got.items():
        a, b = g.contiguous().view(torch.uint8), want[name].contiguous().view(torch.uint8)
        assert a.shape == b.shape, name
        diff += int((a != b).sum())
        total += a.numel()
    return diff / max(1, total)


def _codes_tol(codec) -> float:
    from kvexport.tolerances import tolerance
    return tolerance(codec.name, "codes").atol


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("role", ["key", "value"])
def test_append_bytes_match_encoder(K, spec, role):
    torch.manual_seed(2)
    codec = codecs.from_spec(spec)
    b, h, d, t0, cap = 2, 2, 128, 30, 128
    steps = [1, 1, 1, 40, 3]  # crosses kivi key groups one token at a time and in a block
    x = torch.randn(b, h, t0 + sum(steps), d, dtype=torch.float16)
    cache = K.KernelCache.allocate(codec, role, b, h, d, cap)
    ref = codec.encode(x[:, :, :t0], role)
    cache.load(ref)
    pos = t0
    lens = torch.full((b,), t0, dtype=torch.int32, device="cuda")
    for n in steps:
        K.append(cache, x[:, :, pos:pos + n].cuda(), lens)
        ref = codec.append(ref, x[:, :, pos:pos + n])
        pos += n
        lens += n
    torch.cuda.synchronize()
    got = {name: buf[:, :, :ref[name].shape[2]].cpu() for name, buf in cache.fields.items()}
    if codec.name in ("turbo", "fibquant"):
        assert torch.equal(got["norm"], ref["norm"])
        assert _index_mismatch(codec, got, ref, d) < 2e-3
    elif codec.name in BYTE_TOL:
        assert _byte_mismatch(got, ref) <= _codes_tol(codec), _byte_mismatch(got, ref)
    else:
        for name in got:
            assert torch.equal(got[name].view(torch.uint8), ref[name].view(torch.uint8)), name


@pytest.mark.parametrize("spec", ["fp16", "kivi:bits=2", "turbo:bits=3", "turbo:bits=4", "fibquant", "polar",
                                  "ternary", "qjl", "qjl:bits=4,outliers=8,outlier_m=256"])
def test_real_kv(K, real_kv, spec):
    """Real post-RoPE q/k/v of the default model (9 q / 3 kv heads, d = 64)."""
    codec = codecs.from_spec(spec)
    for layer in (0, 15, 29):
        q, k, v = (real_kv[f"{n}.{layer}"] for n in "qkv")
        t = k.shape[2] - 1
        qd = q[:, :, t:t + 1].to(torch.float16)
        ck, cv, pks, pvs = _caches(K, codec, k, v, [t], t)
        ref = _reference(codec, qd, pks, pvs)
        out = K.decode_attention(qd.cuda(), ck, cv, torch.tensor([t], dtype=torch.int32, device="cuda"))
        torch.cuda.synchronize()
        assert _rel(out, ref) < 2e-3, (layer, _rel(out, ref))
        # The append kernel on real vectors: same norms, indices within the boundary tolerance.
        cache = K.KernelCache.allocate(codec, "key", 1, k.shape[1], k.shape[3], t)
        K.append(cache, k[:, :, :t].cuda(), torch.zeros(1, dtype=torch.int32, device="cuda"))
        torch.cuda.synchronize()
        if codec.name in ("turbo", "fibquant"):
            got = {n: b.cpu() for n, b in cache.fields.items()}
            assert torch.equal(got["norm"], pks[0]["norm"])
            assert _index_mismatch(codec, got, pks[0], k.shape[3]) < 2e-3
        if codec.name in BYTE_TOL:
            got = {n: b[:, :, :pks[0][n].shape[2]].cpu() for n, b in cache.fields.items()}
            assert _byte_mismatch(got, pks[0]) <= _codes_tol(codec), (layer, _byte_mismatch(got, pks[0]))


def test_bad_arguments_raise(K):
    codec = codecs.get("turbo", bits=3)
    ck = K.KernelCache.allocate(codec, "key", 1, 2, 128, 16)
    cv = K.KernelCache.allocate(codec, "value", 1, 2, 128, 16)
    lens = torch.zeros(1, dtype=torch.int32, device="cuda")
    with pytest.raises(RuntimeError, match="GQA ratio"):
        K.decode_attention(torch.zeros(1, 34, 1, 128, dtype=torch.float16, device="cuda"), ck, cv, lens)
    with pytest.raises(ValueError, match="lens"):
        K.decode_attention(torch.zeros(1, 4, 1, 128, dtype=torch.float16, device="cuda"), ck, cv,
                           torch.zeros(1, dtype=torch.int64, device="cuda"))
    with pytest.raises(RuntimeError, match="polar.levels"):
        bad = codecs.get("polar", levels=3)
        K.append(K.KernelCache.allocate(bad, "key", 1, 2, 128, 16),
                 torch.zeros(1, 2, 1, 128, dtype=torch.float16, device="cuda"), lens)
    with pytest.raises(RuntimeError, match="ternary.key_group"):
        bad = codecs.get("ternary", key_group=4096)
        K.append(K.KernelCache.allocate(bad, "key", 1, 2, 256, 16),
                 torch.zeros(1, 2, 1, 256, dtype=torch.float16, device="cuda"), lens)
    with pytest.raises(RuntimeError, match="qjl.value_bits"):
        bad = codecs.get("qjl", value_bits=5)
        K.append(K.KernelCache.allocate(bad, "value", 1, 2, 128, 16),
                 torch.zeros(1, 2, 1, 128, dtype=torch.float16, device="cuda"), lens)
    with pytest.raises(RuntimeError, match="qjl.m"):
        bad = codecs.get("qjl", m=8192)
        K.append(K.KernelCache.allocate(bad, "key", 1, 2, 64, 64),
                 torch.zeros(1, 2, 1, 64, dtype=torch.float16, device="cuda"), lens)
    with pytest.raises(RuntimeError, match="turbo.bits"):
        bad = codecs.get("turbo", bits=5)
        K.append(K.KernelCache.allocate(bad, "key", 1, 2, 128, 16),
                 torch.zeros(1, 2, 1, 128, dtype=torch.float16, device="cuda"), lens)


def test_qjl_long_uneven_splits(K):
    """qjl over several groups per warp range, uneven lengths (one inside a group, one on a
    boundary, one residual-only), every split count: the group cache of the split kernel."""
    torch.manual_seed(5)
    codec = codecs.from_spec("qjl")
    d, hkv, g, lens = 128, 2, 4, [1000, 640, 17]
    b, cap = len(lens), 1024
    k = torch.randn(b, hkv, cap, d, dtype=torch.float16)
    v = torch.randn(b, hkv, cap, d, dtype=torch.float16)
    q = torch.randn(b, hkv * g, 1, d, dtype=torch.float16)
    ck, cv, pks, pvs = _caches(K, codec, k, v, lens, cap)
    ref = _reference(codec, q, pks, pvs)
    lens_d = torch.tensor(lens, dtype=torch.int32, device="cuda")
    for splits in (None, 1, 3, 16):
        out = K.decode_attention(q.cuda(), ck, cv, lens_d, num_splits=splits)
        torch.cuda.synchronize()
        assert _rel(out, ref) < 2e-3, (splits, _rel(out, ref))


# qjl sketch layouts of the decode kernel (plugins/qjl/qjl_decode.cuh): a lane owns wc = ⌈m/128⌉
# (≤ 4) bit words per chunk of 128·wc sketch rows; m / m_o not multiples of 32 take the byte path.
QJL_LAYOUTS = ["qjl:m=256,outliers=4,outlier_m=128,group=32",            # the benchmark: wc 2 / 1
               "qjl:m=512,outliers=2,outlier_m=64,group=8,value_bits=8",  # wc 4, two groups per subtile
               "qjl:m=640,outliers=0,value_bits=4",                       # two chunks, the last part padding
               "qjl:m=200,outliers=9,outlier_m=40,group=5"]               # byte path, o > 8, 4 groups / subtile


@pytest.mark.parametrize("spec", QJL_LAYOUTS)
@pytest.mark.parametrize("d,hkv,g", [(128, 2, 8), (64, 1, 1), (256, 1, 16)])
def test_qjl_decode_layouts(K, spec, d, hkv, g):
    """qjl decode vs ``codec.attend`` over the lane word layouts, GQA 1 / 8 / 16, with a bf16
    query and a ragged fp16 window on the last split setting."""
    torch.manual_seed(hash((spec, d, g)) % 2**31)
    codec = codecs.from_spec(spec)
    lens, wl = [300, 77, 1], [3, 0, 5]
    b, cap, w = len(lens), 320, 5
    k = torch.randn(b, hkv, cap, d, dtype=torch.float16)
    v = torch.randn(b, hkv, cap, d, dtype=torch.float16)
    q = torch.randn(b, hkv * g, 1, d, dtype=torch.float16)
    ck, cv, pks, pvs = _caches(K, codec, k, v, lens, cap)
    lens_d = torch.tensor(lens, dtype=torch.int32, device="cuda")
    ref = _reference(codec, q, pks, pvs)
    for splits in (None, 1, 7):
        out = K.decode_attention(q.cuda(), ck, cv, lens_d, num_splits=splits, max_len=max(lens))
        torch.cuda.synchronize()
        assert _rel(out, ref) < 2e-3, (spec, splits, _rel(out, ref))
    wk = torch.randn(b, hkv, w, d, dtype=torch.float16)
    wv = torch.randn(b, hkv, w, d, dtype=torch.float16)
    qb = q.to(torch.bfloat16)
    ref = _reference(codec, qb, pks, pvs, wk, wv, wl)
    out = K.decode_attention(qb.cuda(), ck, cv, lens_d, window_k=wk.cuda(), window_v=wv.cuda(),
                             window_lens=torch.tensor(wl, dtype=torch.int32, device="cuda"), num_splits=3)
    torch.cuda.synchronize()
    assert out.dtype == torch.bfloat16
    assert _rel(out, ref) < 1e-2, (spec, _rel(out, ref))


# ---- soft-capping, sliding windows, several query tokens per sequence (ABI 4) ----------------

# One setting per codec (every reader and qjl's own split kernel).
MASK_SPECS = ["fp16", "kivi:bits=2", "turbo:bits=3", "fibquant", "polar", "ternary", "qjl",
              "qjl:m=200,outliers=3,outlier_m=40,group=24,value_bits=4,value_group=16"]


def _raw_scores(codec, q, pk, pv, wk=None, wv=None):
    """fp64 raw scores (1, Hq, Tq, T + W) and values (1, Hkv, T + W, D) of one sequence: keys from
    ``Codec.decode`` (qjl: ``Codec.scores``, its estimator is not a decode), values from
    ``Codec.decode``, then the fp16 window."""
    from kvexport.codecs._core import attention as att
    hq, tq = q.shape[1], q.shape[2]
    qg = att.group_queries(q.double().cpu(), pk.heads)  # (1, Hkv, G·Tq, D)
    if codec.name == "qjl":
        s = codec.scores(q.float().cpu(), pk).double()
    else:
        s = att.ungroup(qg @ codec.decode(pk).double().transpose(-1, -2), hq, tq)
    v = codec.decode(pv).double()
    if wk is not None and wk.shape[2]:
        s = torch.cat([s, att.ungroup(qg @ wk.double().cpu().transpose(-1, -2), hq, tq)], dim=-1)
        v = torch.cat([v, wv.double().cpu()], dim=2)
    return s, v


def _masked_attention(s, v, *, softcap=0.0, sliding_window=0):
    """The masked softmax of kvexport/models/cache.py ``_probs`` in fp64 (scale 1/√D, soft cap,
    causal + sliding-window mask; the Tq queries are the last positions; rows with no visible key
    give zeros), times v → (1, Hq, Tq, D)."""
    from kvexport.codecs._core import attention as att
    hq, tq, t = s.shape[1], s.shape[2], s.shape[3]
    s = s / v.shape[-1] ** 0.5
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    qpos = torch.arange(t - tq, t).unsqueeze(1)
    kpos = torch.arange(t).unsqueeze(0)
    allow = kpos <= qpos
    if sliding_window:
        allow &= kpos > qpos - sliding_window
    s = s.masked_fill(~allow, float("-inf"))
    mx = s.amax(-1, keepdim=True)
    e = torch.exp(s - torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx)))
    z = e.sum(-1, keepdim=True)
    p = e / torch.where(z > 0, z, torch.ones_like(z))
    return att.ungroup(att.group_queries(p, v.shape[1]) @ v, hq, tq)


def _masked_reference(codec, q, pk, pv, wk=None, wv=None, *, softcap=0.0, sliding_window=0):
    """fp64 reference attention of q (1, Hq, Tq, D) over one sequence's packed cache (+ window)."""
    return _masked_attention(*_raw_scores(codec, q, pk, pv, wk, wv), softcap=softcap, sliding_window=sliding_window)


def _masked_errors(K, spec, d, hkv, g, tq, lens, wl, settings, *, seed=0):
    """Encode once, then for each (softcap, sliding_window, splits) the kernel's relative error
    vs the fp64 reference."""
    torch.manual_seed(seed)
    codec = codecs.from_spec(spec)
    b, cap, w = len(lens), max(lens) + 16, max(wl) if wl else 0
    k = torch.randn(b, hkv, cap, d, dtype=torch.float16)
    v = torch.randn(b, hkv, cap, d, dtype=torch.float16)
    q = torch.randn(b, hkv * g, tq, d, dtype=torch.float16)
    ck, cv, pks, pvs = _caches(K, codec, k, v, lens, cap)
    wk = torch.randn(b, hkv, w, d, dtype=torch.float16) if w else None
    wv = torch.randn(b, hkv, w, d, dtype=torch.float16) if w else None
    lens_d = torch.tensor(lens, dtype=torch.int32, device="cuda")
    kw = {}
    if w:
        kw = dict(window_k=wk.cuda(), window_v=wv.cuda(), window_lens=torch.tensor(wl, dtype=torch.int32, device="cuda"))
    raw = [_raw_scores(codec, q[i:i + 1], pks[i], pvs[i], wk[i:i + 1, :, :wl[i]] if w else None,
                       wv[i:i + 1, :, :wl[i]] if w else None) for i in range(b)]
    errs = {}
    for softcap, sw, splits in settings:
        ref = torch.cat([_masked_attention(*r, softcap=softcap, sliding_window=sw) for r in raw])
        out = K.decode_attention(q.cuda(), ck, cv, lens_d, num_splits=splits, max_len=max(lens), softcap=softcap,
                                 sliding_window=sw, **kw)
        torch.cuda.synchronize()
        assert out.shape == q.shape and out.dtype == q.dtype
        errs[(softcap, sw, splits)] = _rel(out, ref)
    return errs


@pytest.mark.parametrize("spec", MASK_SPECS)
@pytest.mark.parametrize("d,hkv,g", [(64, 2, 1), (128, 2, 4), (256, 1, 8)])
@pytest.mark.parametrize("window", [False, True])
def test_softcap_and_sliding_window(K, spec, d, hkv, g, window):
    """Soft cap alone, sliding window alone (inside the last split, across splits, width 1) and
    both, one decode token per sequence, 1 / 7 / automatic splits, vs the fp64 reference."""
    settings = [(c, w, s) for c, w in ((0.8, 0), (0.0, 37), (0.0, 150), (0.0, 1), (2.0, 20)) for s in (None, 1, 7)]
    errs = _masked_errors(K, spec, d, hkv, g, 1, [300, 77, 5], [6, 0, 3] if window else [], settings,
                          seed=d + g + len(spec) + window)
    bad = {k: e for k, e in errs.items() if not e < 2e-3}
    assert not bad, (spec, bad)


@pytest.mark.parametrize("spec", MASK_SPECS)
@pytest.mark.parametrize("tq", [1, 3, 17, 64])
@pytest.mark.parametrize("d,hkv,g", [(128, 2, 4), (64, 3, 3)])
def test_multi_query_causal(K, spec, tq, d, hkv, g):
    """Tq query tokens per sequence in one launch: causal per token, queries reaching back into
    the packed part and into the fp16 window; a sequence shorter than Tq (its first queries see
    nothing: zeros); then with a sliding window and a soft cap."""
    settings = [(0.0, 0, None), (0.0, 0, 1), (0.0, 0, 7), (1.5, 40, None), (1.5, 40, 5)]
    errs = _masked_errors(K, spec, d, hkv, g, tq, [300, 77, 5], [6, 0, 3], settings, seed=tq)
    bad = {k: e for k, e in errs.items() if not e < 2e-3}
    assert not bad, (spec, tq, bad)


@pytest.mark.parametrize("spec", ["fp16", "turbo:bits=3", "kivi:bits=2", "polar", "qjl"])
def test_last_query_token_equals_decode(K, spec):
    """The newest of Tq fused query tokens is bit-identical to a one-token decode of it (same
    splits): a row's scores, softmax and partials do not depend on the other rows of its tile."""
    torch.manual_seed(3)
    codec = codecs.from_spec(spec)
    d, hkv, g, lens, cap = 128, 2, 4, [200, 90], 224
    k = torch.randn(2, hkv, cap, d, dtype=torch.float16)
    v = torch.randn(2, hkv, cap, d, dtype=torch.float16)
    q = torch.randn(2, hkv * g, 5, d, dtype=torch.float16, device="cuda")
    ck, cv, _, _ = _caches(K, codec, k, v, lens, cap)
    lens_d = torch.tensor(lens, dtype=torch.int32, device="cuda")
    many = K.decode_attention(q, ck, cv, lens_d, num_splits=3)
    one = K.decode_attention(q[:, :, -1:].contiguous(), ck, cv, lens_d, num_splits=3)
    torch.cuda.synchronize()
    assert torch.equal(many[:, :, -1:], one)


def test_softcap_window_bad_arguments(K):
    codec = codecs.get("fp16")
    ck = K.KernelCache.allocate(codec, "key", 1, 2, 64, 16)
    cv = K.KernelCache.allocate(codec, "value", 1, 2, 64, 16)
    lens = torch.zeros(1, dtype=torch.int32, device="cuda")
    q = torch.zeros(1, 2, 1, 64, dtype=torch.float16, device="cuda")
    with pytest.raises(ValueError, match="softcap"):
        K.decode_attention(q, ck, cv, lens, softcap=-1.0)
    with pytest.raises(ValueError, match="softcap"):
        K.decode_attention(q, ck, cv, lens, softcap=float("inf"))
    with pytest.raises(ValueError, match="sliding_window"):
        K.decode_attention(q, ck, cv, lens, sliding_window=-3)
