"""Each kvexport op's ONNX reference function (run in onnxruntime) against its torch op."""

from __future__ import annotations

import functools

import numpy as np
import onnx
import pytest
import torch

from kvexport import codecs
from kvexport.ops import torch_ops
from kvexport.ops.registry import all_ops
from kvexport.onnx import IR_VERSION
from kvexport.onnx.opmodels import session, single_op_model
from kvexport.tolerances import tolerance

pytestmark = pytest.mark.requires("onnxruntime")

HEAD_DIMS = (64, 128, 256)
SPECS = {s.name: s for s in all_ops()}


def _spec(codec: str, kind: str, role: str | None = None):
    return next(s for s in SPECS.values() if s.codec == codec and s.kind == kind and s.role == role)


@functools.lru_cache(maxsize=None)
def _sess(name: str, d: int, window: bool, dtype: str = "float32"):
    m = single_op_model(SPECS[name], {}, d, window=window, dtype=dtype)
    assert m.ir_version <= IR_VERSION
    return m, session(m)


def _rand(shape, seed, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _mismatch(ref: torch.Tensor, got: np.ndarray) -> float:
    r = ref.numpy()
    assert r.shape == got.shape and r.dtype == got.dtype, (r.shape, got.shape, r.dtype, got.dtype)
    return float(np.mean(r.view(np.uint8) != got.view(np.uint8))) if r.size else 0.0


@pytest.mark.parametrize("codec", codecs.names())
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("role", ["key", "value"])
def test_encode_matches_torch(codec, d, role):
    spec = _spec(codec, "encode", role)
    _, s = _sess(spec.name, d, False)
    allowed = tolerance(codec, "codes", "float32").atol
    for i, (b, h, t) in enumerate([(1, 1, 1), (2, 3, 45), (1, 2, 7), (1, 1, 70), (1, 2, 300), (1, 2, 0)]):
        x = _rand((b, h, t, d), 100 * i + d) * (1 + 3 * i)
        ref = torch_ops.op(spec.name)(x)
        got = s.run(None, {"x": x.numpy()})
        for field, r, g in zip(spec.outputs, ref, got):
            frac = _mismatch(r, g)
            assert frac <= allowed, f"{spec.name} d={d} {(b, h, t)} field {field.name}: {frac:.2e} of bytes differ"


@pytest.mark.parametrize("codec", codecs.names())
def test_encode_fp16_input_and_awkward_numbers(codec):
    d = 64
    spec = _spec(codec, "encode", "key")
    _, s = _sess(spec.name, d, False, "float16")
    x = _rand((1, 2, 33, d), 7).half()
    x[0, 0, 3, 5] = float("inf")
    x[0, 1, 4, 6] = float("nan")
    x[0, 1, 8, :] = 0.0
    ref = torch_ops.op(spec.name)(x)
    got = s.run(None, {"x": x.numpy()})
    for field, r, g in zip(spec.outputs, ref, got):
        assert _mismatch(r, g) <= tolerance(codec, "codes", "float16").atol, field.name


def _packed_args(codec: str, spec, b, hkv, t, d, seed):
    c = codecs.get(codec)
    pk = c.encode(_rand((b, hkv, t, d), seed), "key")
    pv = c.encode(_rand((b, hkv, t, d), seed + 1), "value")
    return [pk[n.name[2:]] if n.name.startswith("k_") else pv[n.name[2:]]
            for n in spec.inputs if n.name[:2] in ("k_", "v_")]


@pytest.mark.parametrize("codec", codecs.names())
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("window", [False, True])
def test_attention_matches_torch(codec, d, window):
    spec = _spec(codec, "attention")
    _, s = _sess(spec.name, d, window)
    tol = tolerance(codec, "torch-ort", "float32")
    cases = [(1, 1, 1, 1, 1), (2, 2, 4, 5, 45), (1, 1, 8, 3, 33), (2, 3, 6, 1, 70), (1, 2, 16, 7, 7), (1, 1, 2, 4, 300)]
    for i, (b, hkv, hq, tq, t) in enumerate(cases):    # GQA ratios 1, 2, 8, 2, 8
        q = _rand((b, hq, tq, d), 10 * i + d)
        args = [q] + _packed_args(codec, spec, b, hkv, t, d, 10 * i + 1)
        if window:
            args += [_rand((b, hkv, 3, d), 10 * i + 5).half(), _rand((b, hkv, 3, d), 10 * i + 6).half()]
        ref = torch_ops.op(spec.name)(*args)
        names = [n.name for n in spec.inputs][: len(args)]
        got = s.run(None, {n: a.numpy() for n, a in zip(names, args)})[0]
        err = np.abs(got - ref.numpy())
        bound = tol.atol + tol.rtol * np.abs(ref.numpy())
        assert (err <= bound).all(), f"{spec.name} d={d} case {i}: max err {err.max():.3e}"


@pytest.mark.parametrize("codec", ["kivi", "turbo"])
def test_attention_fp16_queries(codec):
    spec = _spec(codec, "attention")
    _, s = _sess(spec.name, 64, False, "float16")
    q = _rand((1, 4, 2, 64), 3).half()
    args = [q] + _packed_args(codec, spec, 1, 2, 40, 64, 4)
    ref = torch_ops.op(spec.name)(*args)
    got = s.run(None, {n.name: a.numpy() for n, a in zip(spec.inputs, args)})[0]
    tol = tolerance(codec, "torch-ort", "float16")
    assert got.dtype == np.float16
    np.testing.assert_allclose(got.astype(np.float32), ref.float().numpy(), atol=tol.atol, rtol=tol.rtol)


@pytest.mark.parametrize("codec", ["kivi", "polar"])
def test_attention_softcap_and_sliding_window(codec):
    """softcap / sliding_window: the function reads them from each node (attribute references)."""
    spec = _spec(codec, "attention")
    assert spec.version == 2 and SPECS[spec.name.replace("Attention", "KeyEncode")].version == 1
    tol = tolerance(codec, "torch-ort", "float32")
    d, b, hkv, hq, tq, t = 64, 1, 2, 4, 5, 30
    q = _rand((b, hq, tq, d), 41) * 4
    args = [q] + _packed_args(codec, spec, b, hkv, t, d, 42)
    args += [_rand((b, hkv, 3, d), 43).half(), _rand((b, hkv, 3, d), 44).half()]
    names = [n.name for n in spec.inputs]
    plain = torch_ops.op(spec.name)(*args)
    for softcap, sw in [(0.5, 0), (0.0, 4), (2.0, 9)]:
        m = single_op_model(spec, {"softcap": softcap, "sliding_window": sw}, d, window=True)
        ref = torch_ops.op(spec.name)(*args, softcap=softcap, sliding_window=sw)
        assert (ref - plain).abs().max() > 1e-2        # the attribute changes the result
        got = session(m).run(None, {n: a.numpy() for n, a in zip(names, args)})[0]
        err = np.abs(got - ref.numpy())
        assert (err <= tol.atol + tol.rtol * np.abs(ref.numpy())).all(), (softcap, sw, err.max())


def test_sliding_window_mask_semantics():
    """Query at position p sees key j iff j <= p and j > p - S (kvexport.models.cache._probs)."""
    from kvexport.codecs._core.attention import visible
    m = visible(torch.arange(5, 8), torch.arange(8), True, 3)
    assert m.tolist() == [[j <= p and j > p - 3 for j in range(8)] for p in range(5, 8)]
    assert visible(torch.arange(3), torch.arange(3), True, 0).tolist() == torch.ones(3, 3).tril().bool().tolist()


def test_every_node_carries_plugin_strings_and_checks():
    for name in ("KiviAttention", "TurboKeyEncode"):
        m, _ = _sess(name, 64, False)
        onnx.checker.check_model(m, full_check=True)
        node = next(n for n in m.graph.node if n.domain == "kvexport")
        attrs = {a.name: a for a in node.attribute}
        assert attrs["plugin_namespace"].type == onnx.AttributeProto.STRING
        assert attrs["plugin_namespace"].s == b"kvexport"
        assert attrs["plugin_version"].s == str(SPECS[name].version).encode()
        assert [f.name for f in m.functions] == [name]


def test_constants_travel_as_initializers():
    m, _ = _sess("TurboAttention", 64, False)
    inits = {i.name: i for i in m.graph.initializer}
    node = m.graph.node[0]
    consts = [n for n in node.input if n.startswith("kvexport.turbo.")]
    assert [c.rsplit(".", 1)[-1] for c in consts] == ["rotation", "centroids", "boundaries"]
    rot = onnx.numpy_helper.to_array(inits[consts[0]])
    np.testing.assert_array_equal(rot, codecs.get("turbo").constants(64)["rotation"].numpy())


def test_bad_attribute_is_rejected_with_the_parameter_name():
    with pytest.raises(ValueError, match=r"kivi\.bits"):
        single_op_model(SPECS["KiviKeyEncode"], {"bits": 9}, 64)
    with pytest.raises(ValueError, match=r"fibquant\.k"):
        single_op_model(SPECS["FibQuantKeyEncode"], {"k": 3}, 64)


def _set_plugin_version(m: onnx.ModelProto, version: str) -> onnx.ModelProto:
    for a in m.graph.node[0].attribute:
        if a.name == "plugin_version":
            a.s = version.encode()
    return m


def test_graph_of_another_format_version_is_refused_by_name():
    """A graph whose kvexport nodes carry another op version than the installed codec's packed
    format gives (ternary: format 2 → encode ops 2) is refused where a graph is loaded."""
    from kvexport.onnx.finalize import check_versions, finalize
    spec = SPECS["TernaryKeyEncode"]
    assert spec.version == codecs.codec_class("ternary").version == 2
    m = single_op_model(spec, {}, 64)
    check_versions(m)                                    # as written: accepted
    old = _set_plugin_version(onnx.ModelProto.FromString(m.SerializeToString()), "1")
    with pytest.raises(ValueError, match=r"TernaryKeyEncode has version 1.*ternary packed format \(version 2\)") as e:
        check_versions(old)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"has version 1"):
        finalize(old, head_dim=64)
    low = onnx.ModelProto.FromString(m.SerializeToString())
    next(o for o in low.opset_import if o.domain == "kvexport").version = 1
    with pytest.raises(ValueError, match=r"imports domain kvexport at version 1, its ops need 2"):
        check_versions(low)


def test_node_of_another_layout_is_refused_by_name():
    """A default-layout node whose parameters give another layout (qjl outliers=0) is refused."""
    from kvexport.onnx.finalize import check_versions
    m = single_op_model(SPECS["QjlKeyEncode"], {}, 64)
    next(a for a in m.graph.node[0].attribute if a.name == "outliers").i = 0
    with pytest.raises(ValueError, match=r"QjlKeyEncode does not match the layout.*QjlKeyEncode_[0-9a-f]{8}"):
        check_versions(m)
