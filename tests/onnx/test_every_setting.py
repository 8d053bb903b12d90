"""Every codec setting a user can ask for exports and runs in onnxruntime, or is refused up front.

Settings: each codec's defaults, its ``RATE_SWEEP``, every choice of a string parameter and the
lowest value of every numeric one (``qjl:outliers=0``, ``ternary:key_axis=token``,
``fibquant:k=1``, ``polar:levels=1``, ...), plus named rates (``fibquant:bits=4``).  For each,
the single-op models of :func:`kvexport.ops.registry.ops_for` (key encode, value encode,
attention) run in onnxruntime: packed bytes equal to the torch op's, attention within the
torch-ort tolerance.  A setting that cannot run is refused at construction with a one-line
``ValueError`` naming ``<codec>.<parameter>``.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest
import torch

from kvexport import codecs
from kvexport.ops import torch_ops
from kvexport.ops.registry import ops_for, probe_head_dim
from kvexport.onnx.opmodels import session, single_op_model
from kvexport.tolerances import tolerance

# Named by the issues that found them; the generic walk below covers them too.
EXTRA = {"fibquant": ({"bits": 4},), "qjl": ({"outliers": 0},), "ternary": ({"key_axis": "token"},)}
# Parameters that only set the cost of building constants, not the layout or the byte path:
# lowered so each setting's codebook fits in well under a second (the test compares bytes).
CHEAP = {"fibquant": {"iters": 2, "restarts": 1}}


@functools.lru_cache(maxsize=None)
def _build(name: str, items: tuple):
    """(codec, None) or (None, the ValueError text) for one setting."""
    try:
        return codecs.get(name, **dict(items)), None
    except ValueError as e:
        return None, str(e)


def _settings(name: str) -> list[dict]:
    cls = codecs.codec_class(name)
    out = [{}, *cls.RATE_SWEEP, *EXTRA.get(name, ())]
    for f in dataclasses.fields(cls.Params):
        meta = f.metadata
        if meta["choices"] is not None:
            out += [{f.name: c} for c in meta["choices"]]
        elif meta["lo"] is not None and meta["kind"] in (int, float):
            out.append({f.name: meta["kind"](meta["lo"])})
    uniq, seen = [], set()
    for s in out:
        s = {**CHEAP.get(name, {}), **s}
        codec, err = _build(name, tuple(sorted(s.items())))
        key = err if codec is None else codec.spec_hash    # one run per distinct codec
        if key not in seen:
            seen.add(key)
            uniq.append(s)
    return uniq


SETTINGS = [(n, s) for n in codecs.names() for s in _settings(n)]


def _id(case) -> str:
    n, s = case
    return n + (":" + ",".join(f"{k}={v}" for k, v in s.items()) if s else "")


def _rand(shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", SETTINGS, ids=[_id(c) for c in SETTINGS])
def test_setting_exports_and_runs_in_onnxruntime(case):
    name, setting = case
    codec, err = _build(name, tuple(sorted(setting.items())))
    if codec is None:     # refused up front: one line, naming a parameter of the setting
        assert "\n" not in err and any(f"{name}.{k}" in err for k in setting), err
        return
    d = 64
    try:
        codec.check_head_dim(d)
    except ValueError:
        d = probe_head_dim(codec)
    ops, attrs = ops_for(codec), torch_ops.op_attrs(codec)
    torch_op = torch_ops.ops_of(codec)
    b, h, hq, t, tq = 1, 2, 4, 37, 3       # t: not a multiple of any token group (residuals)
    packed = {}
    for i, role in enumerate(("key", "value")):
        spec = ops[role]
        x = _rand((b, h, t, d), 10 + i) * 3
        ref = torch_op[role](x, **attrs)
        got = session(single_op_model(spec, attrs, d)).run(None, {"x": x.numpy()})
        assert [f.name for f in spec.outputs] == [f.name for f in codec.layout(d, t, role)]
        for field, r, g in zip(spec.outputs, ref, got):
            r = r.numpy()
            assert r.shape == g.shape and r.dtype == g.dtype, (role, field.name, r.shape, g.shape)
            assert np.array_equal(r.view(np.uint8), g.view(np.uint8)), f"{spec.name}.{field.name} bytes differ"
        packed[role] = ref
    att = ops["attention"]
    q = _rand((b, hq, tq, d), 20)
    args = [q, *packed["key"], *packed["value"]]
    ref = torch_op["attention"](*args, **attrs).numpy()
    feed = {s.name: a.numpy() for s, a in zip(att.inputs, args)}
    got = session(single_op_model(att, attrs, d)).run(None, feed)[0]
    tol = tolerance(name, "torch-ort", "float32")
    err = np.abs(got - ref)
    assert (err <= tol.atol + tol.rtol * np.abs(ref)).all(), f"{att.name}: max |err| {err.max():.3e}"


def test_layout_variants_are_distinct_ops():
    """A setting whose tensor list differs from the defaults' gets its own op name; the same
    layout keeps the default name, and the default op refuses the other layout by name."""
    plain, no_out = ops_for(codecs.get("qjl")), ops_for(codecs.get("qjl", outliers=0))
    assert no_out["value"].name == plain["value"].name == "QjlValueEncode"
    assert no_out["key"].name.startswith("QjlKeyEncode_") and no_out["key"].name != plain["key"].name
    assert [t.name for t in no_out["key"].outputs] == ["bits", "norm"]
    assert ops_for(codecs.get("qjl", bits=1.0))["key"].name == "QjlKeyEncode"
    with pytest.raises(ValueError, match=r"QjlKeyEncode_[0-9a-f]{8}"):
        torch_ops.op("QjlKeyEncode")(_rand((1, 1, 4, 64), 0), outliers=0)
