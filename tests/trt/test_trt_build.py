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
def roundtrip(plugin_lib, tmp_path_factory):
    """The C++ creator harness (tests/trt/plugin_roundtrip.cpp), built with g++ against the same headers."""
    import shutil
    from kvexport.trt._build import header_dir
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
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
    rc, out, err = roundtrip(op, str(spec.version), **fields)
    assert rc == 0, (out, err)
    assert out["name"] == op and out["namespace"] == "kvexport" and out["version"] == str(spec.version)
    assert out["build"] == out["runtime"]
    for k, v in fields.items():
        assert out["runtime"][k] == (v if isinstance(v, (list, str)) else [v]), k
    # fields the node omits take the registry default
    for a in spec.attrs:
        if a.name not in fields and a.default is not None and a.type not in ("ints", "str"):
            assert out["runtime"][a.name] == [a.default], a.name


def test_out_of_range_fields_are_refused(roundtrip):
    rc, out, err = roundtrip("TurboKeyEncode", "1", bits=5)
    assert rc == 1 and "turbo.bits must be one of 1, 2, 3, 4, 8" in err
    rc, out, err = roundtrip("FibQuantKeyEncode", "1", k=4, N=32)
    assert rc == 1 and "fibquant (k=4, N=32) has no CUDA kernel" in err
    rc, out, err = roundtrip("PolarKeyEncode", "1", level_bits=[4, 2, 2], levels=4)
    assert rc == 1 and "polar needs levels = 4 and level_bits with 4 entries" in err
    rc, out, err = roundtrip("KiviAttention", str(get_op("KiviAttention").version), bits=5)
    assert rc == 1 and "kivi.bits must be one of 2, 3, 4, 8" in err
    rc, out, err = roundtrip("TernaryKeyEncode", "1", key_axis="token")
    assert rc == 1 and "ternary.key_axis must be 'channel'" in err
    rc, out, err = roundtrip("QjlKeyEncode", "1", outliers=0)
    assert rc == 1 and "qjl.outliers must be >= 1" in err
    rc, out, _ = roundtrip("TurboKeyEncode", "2", bits=3)
    assert rc == 1 and "no creator TurboKeyEncode version 2" in out["error"]


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
