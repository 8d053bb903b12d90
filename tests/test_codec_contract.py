"""Every registered codec honours the shared contract (walks the registry)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvexport import codecs
from kvexport.codecs import CODEC_NAMES
from kvexport.ops.registry import ATTENTION_VERSION_BUMP, all_ops, ops_for

ROOT = Path(__file__).resolve().parents[1]


def _x(shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def test_every_codec_is_registered_with_all_pieces():
    assert codecs.names() == list(CODEC_NAMES)
    for n in CODEC_NAMES:
        folder = ROOT / "kvexport" / "codecs" / n
        for f in ("__init__.py", "codec.py"):
            assert (folder / f).is_file(), f"codec {n} lacks {f}"
        ops = [o for o in all_ops() if o.codec == n]
        assert [(o.kind, o.role) for o in ops] == [("encode", "key"), ("encode", "value"), ("attention", None)], n
        cls = codecs.codec_class(n)
        assert cls.paper, n
        assert hasattr(cls, "RATE_SWEEP") and len(cls.RATE_SWEEP) >= 2 or n == "fp16", n


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_op_versions_follow_the_packed_format(name):
    """Every op's version moves with ``Codec.version`` (ternary's format is 2), so a graph or
    engine of another format is refused by name."""
    c = codecs.get(name)
    ops = ops_for(c)
    assert ops["key"].version == ops["value"].version == c.version, name
    assert ops["attention"].version == c.version + ATTENTION_VERSION_BUMP, name
    from kvexport.trt.codegen import generate    # the TensorRT creators' table carries them
    table = generate()
    for o in ops.values():
        assert f'"{o.name}", "{o.version}"' in table, o.name


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_op_tensors_follow_the_instance_layout(name):
    """An op's packed tensors are the codec object's layout fields (in order) at every head_dim
    it accepts, for each setting of its rate sweep."""
    for setting in ({}, *codecs.codec_class(name).RATE_SWEEP):
        c = codecs.get(name, **setting)
        ops = ops_for(c)
        for d in (64, 128, 256):
            for role in ("key", "value"):
                fields = [f.name for f in c.layout(d, 70, role)]
                assert [t.name for t in ops[role].outputs] == fields, (name, setting, d)
                assert [t.name[2:] for t in ops["attention"].inputs if t.name[:2] == role[0] + "_"] == fields


@pytest.mark.parametrize("name", CODEC_NAMES)
@pytest.mark.parametrize("role", ["key", "value"])
@pytest.mark.parametrize("tokens", [1, 7, 64, 130])
def test_bits_per_coordinate_equals_packed_bytes(name, role, tokens):
    c = codecs.get(name)
    for d in (64, 128):
        x = _x((2, 3, tokens, d), seed=tokens)
        p = c.encode(x, role)
        assert p.nbytes == c.nbytes(d, tokens, role, 2, 3)
        assert math.isclose(c.bits_per_coordinate(d, tokens, role), 8 * p.nbytes / x.numel(), rel_tol=1e-12)
        for t in p.tensors.values():
            assert t.dtype in (torch.uint8, torch.float16), (name, t.dtype)


@pytest.mark.parametrize("name", CODEC_NAMES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_decode_shape_dtype_and_attend_matches_decoded_reference(name, dtype):
    c = codecs.get(name)
    x = _x((2, 2, 33, 64), 1, dtype)
    v = _x((2, 2, 33, 64), 2, dtype)
    pk, pv = c.encode(x, "key"), c.encode(v, "value")
    kd, vd = c.decode(pk), c.decode(pv)
    assert kd.shape == x.shape and kd.dtype == dtype and torch.isfinite(kd).all()
    for hq in (2, 4, 16):
        q = _x((2, hq, 5, 64), 3, dtype)
        got = c.attend(q, pk, pv)
        g = hq // 2
        kr = kd.float().repeat_interleave(g, 1)
        vr = vd.float().repeat_interleave(g, 1)
        s = q.float() @ kr.transpose(-1, -2) / 8.0
        mask = torch.arange(33)[None, :] <= (torch.arange(5)[:, None] + 28)
        ref = torch.softmax(s.masked_fill(~mask, -math.inf), -1) @ vr
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        assert torch.allclose(got.float(), ref, atol=tol, rtol=tol), (name, hq)


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_window_and_causality(name):
    c = codecs.get(name)
    k, v = _x((1, 2, 20, 64), 4), _x((1, 2, 20, 64), 5)
    wk, wv = _x((1, 2, 6, 64), 6).half(), _x((1, 2, 6, 64), 7).half()
    q = _x((1, 4, 6, 64), 8)
    out = c.attend(q, c.encode(k), c.encode(v, "value"), window_k=wk, window_v=wv)
    kd = torch.cat([c.decode(c.encode(k)).float(), wk.float()], 2).repeat_interleave(2, 1)
    vd = torch.cat([c.decode(c.encode(v, "value")).float(), wv.float()], 2).repeat_interleave(2, 1)
    s = q @ kd.transpose(-1, -2) / 8.0
    mask = torch.arange(26)[None, :] <= (torch.arange(6)[:, None] + 20)
    ref = torch.softmax(s.masked_fill(~mask, -math.inf), -1) @ vd
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)
    # the first query must not see the last window token
    q1 = c.attend(q[:, :, :1], c.encode(k), c.encode(v, "value"), window_k=wk, window_v=wv, q_start=20)
    assert torch.allclose(q1, out[:, :, :1], atol=1e-5)


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_append_equals_one_shot_encode(name):
    c = codecs.get(name)
    x = _x((1, 2, 75, 64), 9).half()
    for role in ("key", "value"):
        p = c.encode(x[:, :, :1], role)
        for a, b in ((1, 30), (30, 31), (31, 75)):
            p = c.append(p, x[:, :, a:b])
        one = c.encode(x, role)
        assert p.shape == one.shape
        for k in one.tensors:
            assert torch.equal(p[k], one[k]), (name, role, k)


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_awkward_numbers_never_reach_the_cache(name):
    c = codecs.get(name)
    x = _x((1, 1, 8, 64), 10)
    x[0, 0, 0] = 0.0                              # zero vector
    x[0, 0, 1] = 60000.0                          # fp16-overflow-range norm
    x[0, 0, 2, 3] = float("nan")
    x[0, 0, 3, 5] = float("inf")
    x[0, 0, 4, 7] = float("-inf")
    x16 = x.clone().half()
    for inp in (x, x16, x.bfloat16()):
        for role in ("key", "value"):
            p = c.encode(inp, role)
            for t in p.tensors.values():
                if t.dtype == torch.float16:
                    assert torch.isfinite(t).all(), name
            d = c.decode(p).float()
            assert torch.isfinite(d).all(), name
            assert d[0, 0, 0].abs().max() < 1e-3, f"{name}: zero vector must decode to ~0"
            assert (d[0, 0, 1] > 0).float().mean() > 0.9, f"{name}: huge vector must keep its sign"


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_same_seed_same_bytes_across_processes(name):
    code = (
        "import torch,hashlib;from kvexport import codecs;"
        "g=torch.Generator().manual_seed(5);x=torch.randn(1,2,40,64,generator=g);"
        f"c=codecs.get('{name}');h=hashlib.sha256();"
        "[h.update(t.numpy().tobytes()) for r in ('key','value') for t in c.encode(x,r).tensors.values()];"
        "[h.update(t.numpy().tobytes()) for t in c.constants(64).values()];print(h.hexdigest())"
    )
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
            for _ in range(2)}
    assert len(outs) == 1


@pytest.mark.parametrize("name", [n for n in CODEC_NAMES if n != "fp16"])
def test_distortion_falls_with_rate(name):
    cls = codecs.codec_class(name)
    x = _x((1, 2, 256, 64), 11)
    errs, rates = [], []
    for prm in cls.RATE_SWEEP:
        c = codecs.get(name, **prm)
        for role in ("key", "value"):
            p = c.encode(x, role)
            errs.append(((c.decode(p) - x) ** 2).sum().item() / (x ** 2).sum().item())
            rates.append(c.bits_per_coordinate(64, 256, role))
    for role_i in (0, 1):
        e = errs[role_i::2]
        r = rates[role_i::2]
        assert r == sorted(r), (name, r)
        assert all(a > b for a, b in zip(e, e[1:])), (name, e)


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_bad_parameters_are_rejected_with_the_name(name):
    cls = codecs.codec_class(name)
    with pytest.raises(ValueError, match="no parameter 'nonsense'"):
        codecs.get(name, nonsense=1)
    import dataclasses
    for f in dataclasses.fields(cls.Params):
        meta = f.metadata
        bad = None
        if meta.get("hi") is not None:
            bad = meta["hi"] + 1 if meta["kind"] in (int, tuple) else meta["hi"] * 2 + 1
        elif meta.get("lo") is not None:
            bad = meta["lo"] - 1
        if bad is None:
            continue
        if meta["kind"] is tuple:
            bad = (int(bad),)
        with pytest.raises(ValueError, match=rf"{name}\.{f.name}"):
            codecs.get(name, **{f.name: bad})


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_bad_inputs(name):
    c = codecs.get(name)
    with pytest.raises(ValueError, match="shape"):
        c.encode(torch.zeros(3, 64))
    with pytest.raises(ValueError, match="float16"):
        c.encode(torch.zeros(1, 1, 2, 64, dtype=torch.int32))
    with pytest.raises(ValueError, match="role"):
        c.encode(torch.zeros(1, 1, 2, 64), "query")
    p = c.encode(_x((1, 2, 4, 64), 1))
    with pytest.raises(ValueError, match="multiple"):
        c.scores(_x((1, 3, 1, 64), 2), p)
