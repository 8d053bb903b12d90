"""What this machine has: Python, torch/CUDA/GPU, onnx, onnxruntime, TensorRT(-RTX), nvcc, data."""

from __future__ import annotations

import importlib
import importlib.metadata as md
import platform
import sys
from typing import Any


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def _torch() -> dict[str, Any]:
    try:
        import torch
    except Exception as e:  # torch is a hard dependency, but report rather than crash
        return dict(version=None, error=str(e).splitlines()[0])
    info: dict[str, Any] = dict(version=torch.__version__, cuda_build=torch.version.cuda,
                                cuda_available=torch.cuda.is_available(), gpus=[])
    if info["cuda_available"]:
        for i in range(torch.cuda.device_count()):
            cc = torch.cuda.get_device_capability(i)
            info["gpus"].append(dict(index=i, name=torch.cuda.get_device_name(i),
                                     compute_capability=f"{cc[0]}.{cc[1]}"))
    return info


def _tensorrt() -> dict[str, Any]:
    for mod, label in (("tensorrt", "TensorRT"), ("tensorrt_rtx", "TensorRT-RTX")):
        try:
            m = importlib.import_module(mod)
            return dict(backend=label, module=mod, version=getattr(m, "__version__", "unknown"))
        except Exception:
            continue
    for dist, label in (("tensorrt-rtx-cu13-libs", "TensorRT-RTX"), ("tensorrt", "TensorRT")):
        v = _version(dist)
        if v:
            return dict(backend=label, module=None, version=v, note="libraries installed, Python module not importable")
    return dict(backend=None, version=None)


def _nvcc() -> dict[str, Any]:
    """The nvcc the kernel and plugin builds use (kvexport._toolchain.find_nvcc)."""
    from ._toolchain import env_archs, find_nvcc, nvcc_candidates, nvcc_release
    exe = find_nvcc()
    out: dict[str, Any] = dict(path=exe, version=None,
                               source=next((w for w, p in nvcc_candidates() if p == exe), None))
    try:
        out["archs"] = env_archs()
    except ValueError as e:
        out["archs_error"] = str(e)
    if exe:
        try:
            out["version"] = nvcc_release(exe)
        except Exception as e:  # a broken toolkit is reported, not raised
            out["error"] = str(e).splitlines()[0] if str(e) else type(e).__name__
    return out


def _model() -> dict[str, Any]:
    from .data import DataNotFound, default_model_path, default_text_path
    out: dict[str, Any] = {}
    try:
        p = default_model_path()
        out["default_model"] = dict(path=str(p), bytes=p.stat().st_size)
    except DataNotFound as e:
        out["default_model"] = dict(path=None, error=str(e))
    try:
        out["default_text"] = dict(path=str(default_text_path()))
    except DataNotFound as e:
        out["default_text"] = dict(path=None, error=str(e))
    return out


def collect() -> dict[str, Any]:
    from . import __version__
    return dict(
        kvexport=__version__,
        python=sys.version.split()[0],
        platform=platform.platform(),
        torch=_torch(),
        onnx=_version("onnx"),
        onnxruntime=_version("onnxruntime") or _version("onnxruntime-gpu"),
        transformers=_version("transformers"),
        tensorrt=_tensorrt(),
        nvcc=_nvcc(),
        **_model(),
    )


def format_text(info: dict[str, Any]) -> str:
    t = info["torch"]
    gpus = ", ".join(f"{g['name']} (cc {g['compute_capability']})" for g in t.get("gpus", [])) or "none"
    trt = info["tensorrt"]
    trt_s = f"{trt['backend']} {trt['version']}" if trt.get("backend") else "not installed"
    dm = info["default_model"]
    dt = info["default_text"]
    rows = [
        ("kvexport", info["kvexport"]),
        ("python", info["python"]),
        ("platform", info["platform"]),
        ("torch", f"{t.get('version')} (CUDA build {t.get('cuda_build') or 'none'}, "
                  f"CUDA available: {'yes' if t.get('cuda_available') else 'no'})"),
        ("gpu", gpus),
        ("onnx", info["onnx"] or "not installed"),
        ("onnxruntime", info["onnxruntime"] or "not installed"),
        ("transformers", info["transformers"] or "not installed"),
        ("tensorrt", trt_s),
        ("nvcc", f"{info['nvcc']['version']} ({info['nvcc']['path']})" if info["nvcc"]["path"] else "not found"),
        ("default model", dm["path"] or f"not installed ({dm['error']})"),
        ("default text", dt["path"] or f"not installed ({dt['error']})"),
    ]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)
