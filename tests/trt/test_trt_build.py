"""TensorRT(-RTX) on the CPU: the plugin library loads, every kvexport node becomes a plugin
layer, engines build for single ops and tiny decoders, fields survive serialization, and
mismatches (no kernel, wrong plugin_version, no library) are clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from kvexport import codecs
from kvexport.onnx.opmodels import single_op_model
from kvexport.ops.registry import all_ops, get_op
from kvexport.trt import Limits, PluginCoverageError, engine, runtime
from kvexport.trt.codegen import generate

from .conftest import ARCH

# Codecs with CUDA kernels (plugins/<codec>/) and the parameter sets the tests build.
PLUGIN_CODECS = {"fp16": "fp16", "turbo": "turbo:bits=4", "fibquant": "fibquant:k=4,N=16", "polar": "polar:bits=3",
                 "kivi": "kivi:group=16", "ternary": "ternary", "qjl": "qjl"}
KV_HEADS, Q_HEADS, D = 2, 4, 64


def _fixed_dims(codec, model: onnx.ModelProto) -> dict[str, int]:
    """Static sizes for the symbolic head / field-width axes of a single-op model."""
    widths = {r: {f.name: f.shape[1:] for f in codec.layout(D, 8, r)} for r in ("key", "value")}
    out = {}
    for vi in model.graph.input:
        for k, d in enumerate(vi.type.tensor_type.shape.dim):
            p = d.dim_param
            if not p:
                continue
            if p.endswith("q_heads"):
                out[p] = Q_HEADS
            elif p.endswith("kv_heads"):
                out[p] = KV_HEADS
            elif "_dim" in p:
                role = "key" if vi.name.startswith("k_") else "value"
                out[p] = widths[role][vi.name[2:]][int(p.rsplit("_dim", 1)[1]) - 1]
    return out


def _op_model(codec, op: str, window=False) -> onnx.ModelProto:
    spec = next(o for o in all_ops() if o.codec == codec.name and o.name.endswith(op))
    params = {k: v for k, v in codec.spec()["params"].items() if v is not None}
    return single_op_model(spec, params, D, dtype="float16", window=window)


def test_creators_are_the_registry_ops(trt, plugin_lib):
    have = runtime.load_plugins(trt, plugin_lib)
    ops = [o for o in all_ops() if o.codec in PLUGIN_CODECS]
    assert have == {o.name: str(o.version) for o in ops}
    reg = trt.get_plugin_registry()
    for o in ops:
        c = reg.get_creator(o.name, str(o.version), "kvexport")
        assert [f.name for f in c.field_names] == [a.name for a in o.attrs], o.name
    assert "static OpDef const kOps[]" in generate()


@pytest.mark.parametrize("codec_name", PLUGIN_CODECS)
def test_single_op_engines(trt, plugin_lib, codec_name):
    """Key/value encode and attention (with and without the fp16 window) parse into plugin
    layers whose output shapes equal the codec's layout, and build into engines."""
    codec = codecs.from_spec(PLUGIN_CODECS[codec_name])
    for op, window in (("KeyEncode", False), ("ValueEncode", False), ("Attention", False), ("Attention", True)):
        model = engine.prepare(_op_model(codec, op, window))
        parsed = engine.parse(trt, model, plugin_lib)
        assert list(parsed.plugin_layers.values()) == [model.graph.node[0].op_type]
        if op.endswith("Encode"):
            # trailing dims and dtypes as the layout; token / token-group rows stay dynamic
            role = "key" if op.startswith("Key") else "value"
            want = [(tuple(f.shape[1:]), f.dtype) for f in codec.layout(D, 8, role)]
            net = parsed.network
            got = [net.get_output(i) for i in range(net.num_outputs)]
            assert [tuple(t.shape[3:]) for t in got] == [w for w, _ in want], (op, codec_name)
            assert [t.shape[2] for t in got] == [-1] * len(want), (op, codec_name)
            assert [str(t.dtype) for t in got] == [
                "DataType.HALF" if str(dt) == "torch.float16" else "DataType.INT8" for _, dt in want]
            # static x: the plugin's shape expressions give the layout's full shapes (token groups:
            # floor(T/g)·g tokens, floor(T/g) groups, T mod g residual rows)
            fixed = _op_model(codec, op, window)
            for k, n in enumerate((2, KV_HEADS, 100, D)):
                fixed.graph.input[0].type.tensor_type.shape.dim[k].dim_value = n
            net = engine.parse(trt, engine.prepare(fixed), plugin_lib).network
            assert [tuple(net.get_output(i).shape) for i in range(net.num_outputs)] == [
                (2, KV_HEADS, *f.shape) for f in codec.layout(D, 100, role)], (op, codec_name)
        res = engine.build(_op_model(codec, op, window), plugin_lib,
                           Limits(max_batch=2, max_prompt=16, max_context=256,
                                  fixed=_fixed_dims(codec, _op_model(codec, op, window))),
                           trt=trt, archs=[ARCH])
        assert len(res.engine) > 1000 and res.compute_capabilities


def test_op_without_kernel_is_named(trt, plugin_lib):
    # Every registered codec has plugins now: a node whose op the library lacks stands in.
    model = single_op_model(get_op("QjlAttention"), {}, D)
    model.graph.node[0].op_type = "NoKernelAttention"
    with pytest.raises(PluginCoverageError,
                       match=r"no TensorRT plugin \(no CUDA kernel yet\) for op\(s\) NoKernelAttention"):
        engine.build(model, plugin_lib, trt=trt)


def _with_version(model: onnx.ModelProto, version: str) -> onnx.ModelProto:
    for a in model.graph.node[0].attribute:
        if a.name == "plugin_version":
            a.s = version.encode()
    return model


def test_wrong_plugin_version_is_refused(trt, plugin_lib):
    codec = codecs.from_spec("turbo")
    model = _with_version(_op_model(codec, "KeyEncode"), "2")
    with pytest.raises(PluginCoverageError, match=r"asks plugin_version '2', the library has '1'"):
        engine.build(model, plugin_lib, trt=trt)
    # Without the up-front check the parser silently inlines the reference function where it
    # can (fp16's is a Cast); the post-parse check must still catch it.
    fp16 = _with_version(_op_model(codecs.from_spec("fp16"), "KeyEncode"), "2")
    with pytest.raises(PluginCoverageError, match=r"did not become plugin layers.*Fp16KeyEncode"):
        engine.parse(trt, engine.prepare(fp16), plugin_lib, check_first=False)


def test_missing_plugin_library_is_a_clear_error(trt, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="plugin library .*nope.so does not exist"):
        runtime.load_plugins(trt, tmp_path / "nope.so")
    from kvexport.trt import PluginBuildError, build_plugin_library
    monkeypatch.setenv("KVEXPORT_TRT_PLUGIN_LIB", str(tmp_path / "gone.so"))
    with pytest.raises(PluginBuildError, match="KVEXPORT_TRT_PLUGIN_LIB=.*gone.so does not exist"):
        build_plugin_library()
    r = subprocess.run([sys.executable, "-m", "kvexport", "build", "--model", "tiny:llama", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=600,
                       env={**__import__("os").environ, "KVEXPORT_TRT_PLUGIN_LIB": str(tmp_path / "gone.so")})
    assert r.returncode == 2 and "gone.so does not exist" in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def roundtrip(plugin_lib, cxx, tmp_path_factory):
    """The C++ creator harness (tests/trt/plugin_roundtrip.cpp), built with g++ against the same headers."""
    from kvexport.trt._build import header_dir
    exe = tmp_path_factory.mktemp("harness") / "plugin_roundtrip"
    src = Path(__file__).with_name("plugin_roundtrip.cpp")
    cuda_inc = [f"-I{p}" for p in ("/usr/local/cuda/include",) if Path(p).is_dir()]
    subprocess.run([cxx, "-std=c++17", "-O1", "-Wno-deprecated-declarations", f"-I{header_dir()}", *cuda_inc,
                    str(src), "-o", str(exe), "-ldl"], check=True, capture_output=True, text=True)

    def run(op: str, version: str, **fields):
        args = [f"{k}={','.join(map(str, v)) if isinstance(v, (list, tuple)) else v}" for k, v in fields.items()]
        r = subprocess.run([str(exe), str(plugin_lib), op, version, *args], capture_output=True, text=True, timeout=60)
        return r.returncode, json.loads(r.stdout), r.stderr
    return run


def _full(op: str, **fields) -> dict:
    """The fields the exporter writes for ``op`` at its codec's default parameters, then ``fields``."""
    from kvexport.onnx.translation import node_attributes
    spec = get_op(op)
    params = {k: v for k, v in codecs.codec_class(spec.codec)().spec()["params"].items() if v is not None}
    out = {k: v for k, v in node_attributes(spec, params).items() if not k.startswith("plugin_")}
    return {**out, **fields}


def _required(op: str) -> list[str]:
    return [a.name for a in get_op(op).attrs if a.default is not None]


PLUGIN_OPS = [o.name for o in all_ops() if o.codec in PLUGIN_CODECS]


@pytest.mark.parametrize("op", PLUGIN_OPS)
def test_empty_field_collection_is_refused(roundtrip, op):
    rc, out, err = roundtrip(op, str(get_op(op).version))
    assert rc == 1 and "refused the fields" in out["error"], (out, err)
    names = ", ".join(f"'{n}'" for n in _required(op))
    assert f"{op} v{get_op(op).version}: missing required field(s) {names}" in err, err


@pytest.mark.parametrize("op", PLUGIN_OPS)
def test_missing_required_field_is_refused_by_name(roundtrip, op):
    version = str(get_op(op).version)
    rc, out, err = roundtrip(op, version, **_full(op))
    assert rc == 0, (out, err)
    for name in _required(op):
        fields = _full(op)
        del fields[name]
        rc, out, err = roundtrip(op, version, **fields)
        assert rc == 1 and f"missing required field(s) '{name}' (" in err, (name, err)


@pytest.mark.parametrize("op", ["TurboKeyEncode", "TernaryAttention", "QjlValueEncode"])
def test_other_plugin_version_has_no_creator(roundtrip, op):
    v = get_op(op).version
    for other in (v - 1, v + 1):
        rc, out, _ = roundtrip(op, str(other), **_full(op))
        assert rc == 1 and f"no creator {op} version {other}" in out["error"]


@pytest.mark.parametrize("op,fields", [
    ("Fp16Attention", dict(window=0, causal=0)),
    ("TurboKeyEncode", dict(bits=2, seed=11, window=0)),
    ("TurboAttention", dict(bits=8, seed=3, causal=1)),
    ("FibQuantValueEncode", dict(k=8, N=256, bits=1.0, seed=5)),
    ("PolarAttention", dict(level_bits=[3, 2, 2, 1], levels=4, seed=2)),
    ("KiviKeyEncode", dict(bits=4, group=16, value_group=64, window=0)),
    ("TernaryAttention", dict(bits=4.0, key_planes=3, group=32, key_axis="channel", key_group=32, causal=1)),
    ("QjlValueEncode", dict(bits=2.5, outliers=8, outlier_m=64, group=64, value_bits=4, seed=9)),
])
def test_fields_round_trip_through_serialization(roundtrip, op, fields):
    spec = get_op(op)
    rc, out, err = roundtrip(op, str(spec.version), **_full(op, **fields))
    assert rc == 0, (out, err)
    assert out["name"] == op and out["namespace"] == "kvexport" and out["version"] == str(spec.version)
    assert out["build"] == out["runtime"]
    for k, v in fields.items():
        assert out["runtime"][k] == (v if isinstance(v, (list, str)) else [v]), k


def _refused(roundtrip, op, **fields) -> str:
    rc, out, err = roundtrip(op, str(get_op(op).version), **_full(op, **fields))
    assert rc == 1, (op, fields, out)
    return err


def test_out_of_range_fields_are_refused(roundtrip):
    assert "turbo.bits must be one of 1, 2, 3, 4, 8" in _refused(roundtrip, "TurboKeyEncode", bits=5)
    assert "fibquant (k=4, N=32) has no CUDA kernel" in _refused(roundtrip, "FibQuantKeyEncode", k=4, N=32)
    assert "polar needs level_bits with one entry per level" in _refused(roundtrip, "PolarKeyEncode",
                                                                          level_bits=[4, 2, 2], levels=4)
    assert "polar.levels must be one of 4" in _refused(roundtrip, "PolarKeyEncode", level_bits=[4, 2, 2], levels=3)
    assert "kivi.bits must be one of 2, 3, 4, 8" in _refused(roundtrip, "KiviAttention", bits=5)
    assert "ternary.key_axis must be 'channel'" in _refused(roundtrip, "TernaryKeyEncode", key_axis="token")
    assert "qjl.outliers must be >= 1" in _refused(roundtrip, "QjlKeyEncode", outliers=0)
    assert "qjl.outlier_m must be a multiple of 8 in [8, 4096]" in _refused(roundtrip, "QjlKeyEncode", outlier_m=8192)


def _sweep():
    """Every codec's rate sweep and default, plus settings the kernels lack, as codec specs."""
    out = []
    for name in PLUGIN_CODECS:
        cls = codecs.codec_class(name)
        out.append(name)
        out += [name + ":" + ",".join(f"{k}={'/'.join(map(str, v)) if isinstance(v, tuple) else v}"
                                      for k, v in p.items()) for p in cls.RATE_SWEEP]
    return out + ["turbo:bits=5", "turbo:bits=6", "fibquant:k=4,N=32", "fibquant:k=2,N=256", "kivi:bits=5",
                  "polar:levels=3", "qjl:outlier_m=8192,bits=1.0", "ternary:key_planes=8,value_planes=8"]


@pytest.mark.parametrize("spec", _sweep())
def test_plugin_support_agrees_with_the_creators(roundtrip, spec):
    """kvexport.trt.plugin_support (what ``kvexport build`` refuses up front) and the C++ creators
    (the generated tables) accept exactly the same settings, as the exporter writes them."""
    from kvexport.onnx.translation import node_attributes
    from kvexport.ops.registry import ops_for
    from kvexport.trt import plugin_support
    codec = codecs.from_spec(spec)
    why = plugin_support(codec)
    params = {k: v for k, v in codec.spec()["params"].items() if v is not None}
    for op in ops_for(codec).values():
        if op.name not in PLUGIN_OPS:
            assert why, (spec, op.name)  # a layout variant: no creator, so refused up front
            continue
        fields = {k: v for k, v in node_attributes(op, params).items() if not k.startswith("plugin_")}
        rc, out, err = roundtrip(op.name, str(op.version), **fields)
        assert (rc == 0) == (why is None), (spec, op.name, why, err)


def test_dlopen_without_tensorrt_registry_is_safe(trt, plugin_lib):
    """ctypes / Polygraphy --plugins style loading must not crash the host process."""
    code = (f"import ctypes, {trt.__name__} as t; ctypes.CDLL({str(plugin_lib)!r}); "
            f"t.get_plugin_registry().load_library({str(plugin_lib)!r}); print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


# Every family the export supports, every codec at least once (the whole family × codec matrix is
# 42 builds, too slow for CI; these rotate codecs across families).  mistral / qwen2 / gemma2 /
# gemma carry sliding windows and soft caps as Attention attributes the plugins read.
@pytest.mark.parametrize("model,codec", [("tiny:llama", "fp16"), ("tiny:llama", "turbo:bits=4"),
                                         ("tiny:llama", "fibquant:k=4,N=16"), ("tiny:llama", "polar"),
                                         ("tiny:llama", "kivi:group=16"), ("tiny:gpt2", "turbo"),
                                         ("tiny:mistral", "turbo:bits=3"), ("tiny:qwen2", "polar"),
                                         ("tiny:gemma2", "fibquant"), ("tiny:gemma", "kivi:group=16"),
                                         # grouped key layouts like kivi's; their single ops build above
                                         pytest.param("tiny:llama", "ternary", marks=pytest.mark.slow),
                                         pytest.param("tiny:llama", "qjl", marks=pytest.mark.slow)])
def test_kvexport_build_tiny_decoder(plugin_lib, tmp_path, model, codec, monkeypatch):
    monkeypatch.setenv("KVEXPORT_TRT_PLUGIN_LIB", str(plugin_lib))
    monkeypatch.setenv("KVEXPORT_CUDA_ARCHS", ARCH)
    from kvexport.cli import main
    out = tmp_path / "eng"
    assert main(["build", "--model", model, "--codec", codec, "--max-batch", "2", "--max-context", "512",
                 str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    cfg = json.loads((out / "config.json").read_text())
    assert (out / "engine.plan").stat().st_size == rep["engine_bytes"] > 10_000
    assert (out / "libkvexport_plugins.so").is_file() and (out / "onnx" / "model.onnx").is_file()
    assert rep["plugin_layers"] == rep["kvexport_nodes"] == 3 * cfg["geometry"]["layers"]
    kv = rep["kv_cache"]
    assert kv["compression_vs_fp16"] == pytest.approx(kv["fp16_bytes_per_token"] / kv["bytes_per_token"], rel=1e-3)
    assert (kv["compression_vs_fp16"] == 1.0) == (codec == "fp16")
    assert cfg["limits"]["max_batch"] == 2 and "report" not in cfg
    assert "| engine size |" in (out / "report.md").read_text()


@pytest.mark.parametrize("spec,named", [("fibquant:k=4,N=32", "(k=4, N=32)"),
                                        ("ternary:key_axis=token", "ternary.key_axis='token'"),
                                        ("qjl:outliers=0", "qjl.outliers=0")])
def test_build_refuses_settings_without_plugin_before_export(tmp_path, capsys, spec, named):
    """No model is loaded and nothing is written: one line naming the parameter, exit 2."""
    from kvexport.cli import main
    assert main(["build", "--codec", spec, str(tmp_path / "out")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and named in lines[0] and "no TensorRT plugin" in lines[0], lines
    assert list(tmp_path.iterdir()) == []


def test_build_turbo_bits5_exits_fast_naming_the_parameter(tmp_path):
    import time
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "kvexport", "build", "--codec", "turbo:bits=5", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    took = time.time() - t0
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "kvexport build: error: no TensorRT plugin: turbo.bits=5 has no CUDA kernel (compiled: 1, 2, 3, 4, 8)"], r.stderr
    assert list(tmp_path.iterdir()) == []
    assert took < 60, took  # no model load, no export (those take minutes)
