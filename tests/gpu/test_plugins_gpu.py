"""TensorRT plugins' runtime side on the GPU vs onnxruntime (run on the GPU machine: ``pytest -m gpu``).

No TensorRT library is involved: ``tests/trt/plugin_harness.cpp`` dlopens
``libkvexport_plugins.so`` and plays TensorRT's part — creator → plugin from the
node's attributes, output types/shapes, format checks, configure, workspace,
serialize → re-create at runtime → attach, ``onShapeChange``, ``enqueue`` on
cudaMalloc'd buffers, once directly and once under CUDA-graph capture.  Each case
is the single-op ONNX model of :func:`kvexport.onnx.opmodels.single_op_model` (the
exporter's node: same attributes, constants as initializers) run by onnxruntime on
the same inputs:

* encode ops: packed bytes may differ in at most ``tolerance(codec, "codes")`` of bytes
  (grouped key layouts — kivi, ternary, qjl — include the ``T mod group`` fp16 residual, copied
  out of the append kernel's ring);
* attention (decode ``Tq = 1`` and prompt ``Tq > 1``, with and without the fp16
  window): ``tolerance(codec, "ort-engine", dtype)`` — the plugin is the engine's side.

``KVEXPORT_PLUGIN_REPORT=DIR`` writes each test's per-codec errors there as JSON (one file per
test, so that pytest-xdist workers do not overwrite each other).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

from kvexport import codecs
from kvexport.ops.registry import all_ops
from kvexport.onnx.opmodels import session, single_op_model
from kvexport.tolerances import tolerance

pytestmark = pytest.mark.gpu

# Every codec with plugins (kvx_codecs.cpp), at its default and at other kernel parameter sets.
SPECS = ["fp16", "turbo:bits=3", "turbo:bits=4", "turbo:bits=2", "fibquant", "fibquant:k=4,N=16",
         "fibquant:k=8,N=16", "polar", "polar:level_bits=3/1/1/1", "kivi", "kivi:bits=4,group=16,value_group=64",
         "ternary", "ternary:bits=4.0,key_group=32,group=32", "qjl", "qjl:outliers=8,outlier_m=64,group=64,value_bits=4"]
B, HKV, HQ, T, W = 2, 2, 8, 300, 7
_NP = {np.dtype(np.float32): "f32", np.dtype(np.float16): "f16", np.dtype(np.uint8): "i8",
       np.dtype(np.int8): "i8", np.dtype(np.int64): "i64", np.dtype(np.int32): "i32"}


@pytest.fixture(scope="module")
def plugin_lib(build_plugins):
    major, minor = torch.cuda.get_device_capability()
    return build_plugins([f"{major}{minor}"])  # a build failure here fails, never skips


@pytest.fixture(scope="module")
def harness(plugin_lib, require, tmp_path_factory):
    """``run(case_dirs) -> [result dict]``: the C++ harness, compiled with nvcc (static cudart)."""
    from kvexport._toolchain import find_nvcc
    from kvexport.trt._build import header_dir
    exe = os.environ.get("KVEXPORT_TRT_HARNESS")
    if not exe:
        nvcc = require(find_nvcc(), "nvcc not found: cannot build the plugin harness")
        exe = str(tmp_path_factory.mktemp("harness") / "plugin_harness")
        src = Path(__file__).resolve().parents[1] / "trt" / "plugin_harness.cpp"
        subprocess.run([nvcc, "-std=c++17", "-O2", "-Xcompiler", "-Wno-deprecated-declarations",
                        f"-I{header_dir()}", str(src), "-o", exe, "-ldl"], check=True, capture_output=True, text=True)

    def run(dirs: list[Path]) -> list[dict]:
        r = subprocess.run([exe, str(plugin_lib), *map(str, dirs)], capture_output=True, text=True, timeout=300)
        lines = [json.loads(s) for s in r.stdout.splitlines() if s.startswith("{")]
        assert len(lines) == len(dirs), (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
        return lines
    return run


def _spec(codec_name: str, kind: str, role: str | None = None):
    return next(s for s in all_ops() if s.codec == codec_name and s.kind == kind and s.role == role)


def _model(codec, kind, role, d, dtype="float32", window=False) -> onnx.ModelProto:
    """The exporter's node for ``codec``: every parameter as an attribute (as kvexport build emits)."""
    params = {k: v for k, v in codec.spec()["params"].items() if v is not None}
    return single_op_model(_spec(codec.name, kind, role), params, d, dtype=dtype, window=window)


class Case:
    """One single-op model, its onnxruntime outputs, and the harness's case directory."""

    def __init__(self, root: Path, label: str, model: onnx.ModelProto, feeds: dict[str, np.ndarray]):
        self.label, self.dir = label, root / label
        self.dir.mkdir(parents=True)
        self.ref = session(model).run(None, feeds)
        node = model.graph.node[0]
        inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        lines = [f"op {node.op_type} {helper.get_attribute_value(next(a for a in node.attribute if a.name == 'plugin_version')).decode()}"]
        for a in node.attribute:
            if a.name in ("plugin_version", "plugin_namespace"):
                continue  # the parser's matching keys, not plugin fields
            v = helper.get_attribute_value(a)
            if a.type == onnx.AttributeProto.INT:
                lines.append(f"field {a.name} i 1 {v}")
            elif a.type == onnx.AttributeProto.INTS:
                lines.append(f"field {a.name} i {len(v)} " + " ".join(map(str, v)))
            elif a.type == onnx.AttributeProto.FLOAT:
                lines.append(f"field {a.name} f 1 {v!r}")
            elif a.type == onnx.AttributeProto.STRING:
                lines.append(f"field {a.name} s 1 {v.decode()}")
            else:
                raise AssertionError(f"attribute {a.name}: unexpected type {a.type}")
        # engine.prepare drops absent optional inputs ("" names); the rest in node order.
        for k, name in enumerate(x for x in node.input if x):
            arr = np.ascontiguousarray(feeds[name] if name in feeds else inits[name])
            lines.append(f"input {_NP[arr.dtype]} {arr.ndim} " + " ".join(map(str, arr.shape)))
            arr.tofile(self.dir / f"in{k}.bin")
        (self.dir / "case.txt").write_text("\n".join(lines) + "\n")

    def outputs(self, res: dict) -> list[np.ndarray]:
        assert res["ok"], f"{self.label}: {res.get('error')}"
        assert res["graph"] and res["run_differ_bytes"] == 0, \
            f"{self.label}: {res['run_differ_bytes']} output bytes unwritten or nondeterministic"
        got = []
        for i, (meta, ref) in enumerate(zip(res["outputs"], self.ref)):
            dt = {"f32": np.float32, "f16": np.float16, "i8": np.uint8}[meta["type"]]
            assert np.dtype(dt) == ref.dtype and tuple(meta["dims"]) == ref.shape, (self.label, i, meta, ref.shape)
            got.append(np.fromfile(self.dir / f"out{i}.bin", dtype=dt).reshape(ref.shape))
        assert len(got) == len(self.ref)
        return got


def _randn(shape, seed, dtype=np.float32) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).numpy().astype(dtype)


def _key_group(codec) -> int:
    """Tokens per group of a grouped key layout (kivi, ternary, qjl), 0 for per-token keys."""
    p = codec.params
    return {"kivi": getattr(p, "group", 0), "qjl": getattr(p, "group", 0),
            "ternary": getattr(p, "key_group", 0)}.get(codec.name, 0)


def _cases(codec, root: Path, kv: dict | None = None):
    """Encode and attention cases for one codec: random inputs, or real q/k/v (``kv``)."""
    enc, att = [], []
    if kv is None:
        shapes = [(d, "float32", (B, HKV, T, d)) for d in (64, 128, 256)] + [(128, "float16", (1, 3, 1, 128))]
        for i, (d, dt, shape) in enumerate(shapes):
            for role in ("key", "value"):
                x = _randn(shape, 10 * i + (role == "value"), np.float16 if dt == "float16" else np.float32) * 2
                enc.append(Case(root, f"enc_{role}_{dt}_d{d}_{i}", _model(codec, "encode", role, d, dt), {"x": x}))
        att_cfg = [(d, "float16", tq, w) for d in (64, 128, 256) for tq in (1, 5) for w in (False, True)]
        att_cfg += [(128, "float32", tq, w) for tq in (1, 5) for w in (False, True)]
        src = {}
        for d in (64, 128, 256):
            k, v = _randn((B, HKV, T, d), 1000 + d), _randn((B, HKV, T, d), 2000 + d)
            src[d] = (k, v)
    else:
        d = kv["k"].shape[-1]
        src = {d: (kv["k"], kv["v"])}
        for role, x in (("key", kv["k"]), ("value", kv["v"])):
            enc.append(Case(root, f"real_enc_{role}", _model(codec, "encode", role, d), {"x": x}))
        att_cfg = [(d, "float16", tq, w) for tq in (1, 12) for w in (False, True)]
    # The packed cache the attention cases read: onnxruntime's encoding of k and v.
    packed = {}
    for d, (k, v) in src.items():
        fields = {}
        for role, x in (("key", k), ("value", v)):
            spec = _spec(codec.name, "encode", role)
            out = session(_model(codec, "encode", role, d)).run(None, {"x": x})
            fields.update({f"{role[0]}_{t.name}": o for t, o in zip(spec.outputs, out)})
        packed[d] = fields
    for j, (d, dt, tq, w) in enumerate(att_cfg):
        npdt = np.float16 if dt == "float16" else np.float32
        hkv = src[d][0].shape[1]
        hq = kv["q"].shape[1] if kv else HQ
        b = src[d][0].shape[0]
        q = (kv["q"][:, :, -tq:] if kv else _randn((b, hq, tq, d), 3000 + j)).astype(npdt)
        feeds = {"q": q, **packed[d]}
        if w:
            feeds["window_k"] = _randn((b, hkv, W, d), 4000 + j, np.float16)
            feeds["window_v"] = _randn((b, hkv, W, d), 5000 + j, np.float16)
        label = f"{'real_' if kv else ''}att_{dt}_d{d}_tq{tq}_{'win' if w else 'nowin'}"
        att.append((Case(root, label, _model(codec, "attention", None, d, dt, window=w), feeds), dt))
    return enc, att


def _check(codec, harness, enc, att, tag: str) -> dict:
    res = harness([c.dir for c in enc] + [c.dir for c, _ in att])
    stats = {"encode_max_mismatch": 0.0, "cases": len(res)}
    allowed = tolerance(codec.name, "codes").atol
    for c, r in zip(enc, res):
        for ref, got in zip(c.ref, c.outputs(r)):
            if ref.size == 0:  # e.g. no complete token group in a single-token encode
                continue
            frac = float(np.mean(ref.view(np.uint8) != got.view(np.uint8)))
            stats["encode_max_mismatch"] = max(stats["encode_max_mismatch"], frac)
            assert frac <= allowed, f"{_label(codec)} " \
                                    f"{c.label}: {frac:.2e} of bytes differ (allowed {allowed})"
    for dt in ("float16", "float32"):
        errs, rels, worst = [], [], 0.0
        for (c, cdt), r in zip(att, res[len(enc):]):
            if cdt != dt:
                continue
            ref, = c.ref
            got, = c.outputs(r)
            ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
            assert np.isfinite(got64).all(), f"{c.label}: non-finite plugin output"
            err = np.abs(got64 - ref64)
            tol = tolerance(codec.name, "ort-engine", dt)
            excess = float((err - (tol.atol + tol.rtol * np.abs(ref64))).max())
            worst = max(worst, excess)
            assert excess <= 0, f"{c.label}: max |err| {err.max():.3e} over the ort-engine tolerance {tol}"
            errs.append(err.ravel())
            rels.append(float(np.linalg.norm(got64 - ref64) / max(np.linalg.norm(ref64), 1e-30)))
        if errs:
            e = np.concatenate(errs)
            stats[f"attention_{dt}"] = {"max": float(e.max()), "mean": float(e.mean()), "median": float(np.median(e)),
                                        "max_rel_l2": max(rels), "cases": len(errs)}
    stats["workspace_bytes_max"] = max(r["workspace"] for r in res)
    out = os.environ.get("KVEXPORT_PLUGIN_REPORT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        name = "".join(ch if ch.isalnum() else "_" for ch in f"{tag}_{_label(codec)}")
        (Path(out) / f"{name}.json").write_text(json.dumps({"set": tag, "codec": _label(codec), **stats}))
    return stats


def _label(codec) -> str:
    p = {k: v for k, v in codec.spec()["params"].items() if v is not None}
    return f"{codec.name}:" + ",".join(f"{k}={'/'.join(map(str, v)) if isinstance(v, list) else v}"
                                       for k, v in p.items())


@pytest.mark.parametrize("spec", SPECS)
def test_plugin_runtime_matches_onnxruntime(harness, spec, tmp_path):
    codec = codecs.from_spec(spec)
    enc, att = _cases(codec, tmp_path)
    stats = _check(codec, harness, enc, att, "random")
    print(spec, json.dumps(stats))


@pytest.mark.parametrize("spec", ["fp16", "turbo:bits=3", "fibquant", "polar", "kivi", "ternary", "qjl"])
def test_plugin_runtime_real_kv(harness, real_kv, spec, tmp_path):
    """Real post-RoPE q/k/v of the default model (layers 0 and 29; 9 q / 3 kv heads, d = 64)."""
    codec = codecs.from_spec(spec)
    enc, att = [], []
    for layer in (0, 29):
        kv = {n: real_kv[f"{n}.{layer}"].numpy().astype(np.float32) for n in ("q", "k", "v")}
        e, a = _cases(codec, tmp_path / f"l{layer}", kv)
        enc += e
        att += a
    stats = _check(codec, harness, enc, att, "real_kv")
    print(spec, json.dumps(stats))


def test_harness_reports_refused_fields(harness, tmp_path):
    """The harness fails loudly (the plugin's own message) when the creator refuses the fields."""
    codec = codecs.from_spec("turbo:bits=3")
    c = Case(tmp_path, "bad", _model(codec, "encode", "key", 64), {"x": _randn((1, 1, 4, 64), 0)})
    txt = (c.dir / "case.txt").read_text().replace("field bits i 1 3", "field bits i 1 5")
    (c.dir / "case.txt").write_text(txt)
    res, = harness([c.dir])
    assert not res["ok"] and "turbo.bits must be one of 1, 2, 3, 4, 8" in res["error"]


@pytest.mark.parametrize("spec", ["kivi", "ternary", "qjl"])
def test_grouped_causal_prompt_across_groups(harness, spec, tmp_path):
    """A causal prompt longer than a key group over a cache of whole groups: most queries see
    only part of the quantized groups, so the kernels must keep the group split of the whole
    cache and mask per query (one fused launch, KvxDecodeArgs.q_tokens), not cut the cache at
    each query's visible length.  With and without the fp16 window; fp32 and fp16 queries."""
    codec = codecs.from_spec(spec)
    g, d = _key_group(codec), 64
    tc, tq = 4 * g, g + 5
    fields = {}
    for role in ("key", "value"):
        out = session(_model(codec, "encode", role, d)).run(None, {"x": _randn((B, HKV, tc, d), 7 + (role == "value"))})
        fields.update({f"{role[0]}_{t.name}": o for t, o in zip(_spec(codec.name, "encode", role).outputs, out)})
    assert fields["k_residual"].shape[2] == 0  # every key in a quantized group
    cases = []
    for dt in ("float16", "float32"):
        npdt = np.float16 if dt == "float16" else np.float32
        q = _randn((B, HQ, tq, d), 9, npdt)
        win = {"window_k": _randn((B, HKV, W, d), 10, np.float16), "window_v": _randn((B, HKV, W, d), 11, np.float16)}
        cases.append((Case(tmp_path, f"prompt_{dt}", _model(codec, "attention", None, d, dt), {"q": q, **fields}), dt))
        cases.append((Case(tmp_path, f"prompt_win_{dt}", _model(codec, "attention", None, d, dt, window=True),
                           {"q": q, **fields, **win}), dt))
    for (c, dt), r in zip(cases, harness([c.dir for c, _ in cases])):
        got, = c.outputs(r)
        ref, = c.ref
        tol = tolerance(codec.name, "ort-engine", dt)
        err = np.abs(got.astype(np.float64) - ref.astype(np.float64))
        assert (err <= tol.atol + tol.rtol * np.abs(ref.astype(np.float64))).all(), (c.label, float(err.max()))
