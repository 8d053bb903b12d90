"""``kvexport build`` as a library call: export → plugins → parse/check → engine → reports.

The output directory holds ``engine.plan``, ``libkvexport_plugins.so`` (load it in trtexec
``--dynamicPlugins``, Polygraphy ``--plugins`` or a Triton-style server), the exported
``onnx/`` model, ``config.json`` and ``report.json`` / ``report.md``.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import onnx

from .. import __version__
from . import _build, engine, runtime


def codec_label(codec) -> str:
    """``name:k=v,...`` of the parameters that differ from the defaults (``kvexport build --codec`` syntax)."""
    sp = codec.spec()
    default = type(codec)().spec()["params"] if callable(type(codec)) else {}
    diff = {k: v for k, v in sp["params"].items() if default.get(k) != v}
    return sp["codec"] + (":" + ",".join(f"{k}={v}" for k, v in diff.items()) if diff else "")


def kv_bytes_per_token(codec, layers: int, kv_heads: int, head_dim: int, tokens: int = 4096) -> dict[str, float]:
    """Packed K+V bytes per token over all layers and KV heads, and the ratio to fp16."""
    per = sum(codec.nbytes(head_dim, tokens, r) for r in ("key", "value")) / tokens
    total = per * layers * kv_heads
    fp16 = 2 * 2 * head_dim * layers * kv_heads
    return dict(bytes_per_token=round(total, 3), fp16_bytes_per_token=fp16, compression_vs_fp16=round(fp16 / total, 3))


def build_to_dir(model_spec: str, codec, out: Path, *, limits: engine.Limits | None = None,
                 onnx_path: str | Path | None = None, progress: Callable[[str], None] | None = None,
                 backend_name: str | None = None) -> dict[str, Any]:
    """Build ``model_spec`` with ``codec`` into the (existing, empty) directory ``out``.

    With ``onnx_path`` the model is not exported again (a ``kvexport export`` directory or
    its model.onnx).  Raises :class:`~.engine.PluginCoverageError` naming every kvexport
    node that would not run as a plugin.
    """
    say = progress or (lambda s: None)
    limits = limits or engine.Limits()
    trt = runtime.backend(backend_name)
    t_all = time.perf_counter()
    t_lib = time.perf_counter()
    work: list[str] = []  # _build reports only work it does: nothing reported is a cache hit
    lib = _build.build(progress=lambda s: (work.append(s), say(s)))  # before the export: fail fast
    lib_s = time.perf_counter() - t_lib
    if os.environ.get("KVEXPORT_TRT_PLUGIN_LIB"):
        say(f"using the plugin library KVEXPORT_TRT_PLUGIN_LIB={lib}")
    else:
        say(f"plugin library {lib} ready in {lib_s:.0f} s" if work else f"using the cached plugin library {lib}")
    shutil.copy2(lib, out / _build.LIB_NAME)
    onnx_dir = out / "onnx"
    onnx_dir.mkdir()
    if onnx_path is None:
        from ..onnx.package import export_to_dir
        say(f"exporting {model_spec} with {codec_label(codec)} to ONNX")
        exported = export_to_dir(model_spec, codec, onnx_dir)["config"]
    else:
        src = Path(onnx_path)
        src_dir = src if src.is_dir() else src.parent
        model_file = src / "model.onnx" if src.is_dir() else src
        if not model_file.is_file():
            raise FileNotFoundError(f"no ONNX model at {model_file}")
        for p in src_dir.iterdir():
            if p.is_file() and (p == model_file or p.name.startswith(model_file.name) or p.name == "config.json"):
                shutil.copy2(p, onnx_dir / p.name)
        cfg = onnx_dir / "config.json"
        exported = json.loads(cfg.read_text()) if cfg.is_file() else {}
        got = (exported.get("codec") or {}) if isinstance(exported.get("codec"), dict) else {}
        if got.get("hash") and got["hash"] != codec.spec_hash:
            raise ValueError(f"{model_file} was exported with codec {got.get('codec')} {got.get('params')}; "
                             f"pass the same --codec (got {codec_label(codec)})")
        if model_file.name != "model.onnx":
            (onnx_dir / model_file.name).rename(onnx_dir / "model.onnx")
    model = onnx.load(str(onnx_dir / "model.onnx"))
    archs = _build.library_archs(lib)
    res = engine.build(model, lib, limits, trt=trt, progress=say, archs=archs)
    (out / "engine.plan").write_bytes(res.engine)
    geo = exported.get("geometry") or {}
    kv = kv_bytes_per_token(codec, geo["layers"], geo["kv_heads"], geo["head_dim"]) if geo else None
    ops = sorted(set(res.plugin_layers.values()))
    config = dict(kvexport_version=__version__, model=exported.get("model", model_spec), codec=codec_label(codec),
                  codec_spec=codec.spec(), backend=res.backend, engine="engine.plan", plugin_library=_build.LIB_NAME,
                  plugin_namespace=runtime.NAMESPACE, plugins={o: runtime.creators(trt).get(o) for o in ops},
                  onnx="onnx/model.onnx", profile=res.profile,
                  limits=dict(max_batch=limits.max_batch, max_prompt=limits.max_prompt,
                              max_context=limits.max_context),
                  inputs=[i.name for i in model.graph.input], outputs=[o.name for o in model.graph.output],
                  geometry=geo)
    report = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        backend=res.backend, target_compute_capabilities=res.compute_capabilities,
        plugin_library_archs=[f"sm_{a}" for a in archs],
        engine_bytes=len(res.engine), layers=res.layers, plugin_layers=len(res.plugin_layers),
        kvexport_nodes=len(engine.kvexport_nodes(model)), plugin_ops=ops,
        kv_cache=kv, parse_seconds=round(res.parse_seconds, 3), build_seconds=round(res.build_seconds, 3),
        plugin_library_seconds=round(lib_s, 3), total_seconds=round(time.perf_counter() - t_all, 3),
        host=dict(python=platform.python_version(), machine=platform.machine()),
        verified=("engine built and serialized; running it needs TensorRT on a data-center GPU or TensorRT-RTX "
                  "on an RTX-class GPU (compute capability 8.x or 12.x)"))
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(report_markdown(config, report))
    return dict(config=config, report=report)


def report_markdown(config: dict, rep: dict) -> str:
    kv = rep.get("kv_cache") or {}
    rows = [("backend", rep["backend"]), ("target compute capabilities", ", ".join(rep["target_compute_capabilities"])),
            ("plugin library archs", ", ".join(rep["plugin_library_archs"])),
            ("engine size", f"{rep['engine_bytes'] / 1e6:.2f} MB"),
            ("layers (plugin layers)", f"{rep['layers']} ({rep['plugin_layers']} of {rep['kvexport_nodes']} "
                                       "kvexport nodes)"),
            ("plugin ops", ", ".join(rep["plugin_ops"])),
            ("KV bytes per token", f"{kv.get('bytes_per_token', '—')} (fp16 {kv.get('fp16_bytes_per_token', '—')}, "
                                   f"{kv.get('compression_vs_fp16', '—')}× smaller)"),
            ("parse / build / total", f"{rep['parse_seconds']:.1f} s / {rep['build_seconds']:.1f} s / "
                                      f"{rep['total_seconds']:.1f} s")]
    lines = [f"# kvexport build — {config['model']} · {config['codec']}", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    lines += ["", rep["verified"] + ".", ""]
    return "\n".join(lines)
