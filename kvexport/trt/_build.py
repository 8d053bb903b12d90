"""Build ``libkvexport_plugins.so``: the TensorRT plugin shells + the CUDA kernels they call.

The library holds the kernel sources of ``plugins/<codec>/`` and ``plugins/common/``
(the same translation units as :mod:`kvexport.kernels`, compiled again into this
library, never copied) and the plugin shells of ``plugins/trt/src/``.  It is linked
against the static CUDA runtime only — not against libnvinfer or libtensorrt_rtx —
so one file loads into TensorRT and TensorRT-RTX alike.

TensorRT headers come from ``$TENSORRT_ROOT/include`` or a system install; otherwise
the public TensorRT 10.14 headers (Apache-2.0) of the PyPI wheel ``kernel-lens==2.0.1``
are fetched with ``pip download`` into the build cache (never into the repository).
Builds are cached under ``cache_dir()/trt-plugins/<key>/`` (objects under ``objects/``, keyed
by source, dependencies, command, nvcc version and archs), installed atomically with a
recorded digest that is checked before the library is handed out (see :mod:`kvexport._cache`).
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
import zipfile
from pathlib import Path

from .. import _cache
from .._cache import cache_dir, cached
from .._toolchain import env_archs, find_nvcc, gencode, nvcc_version
from ..kernels import _build as kbuild

PLUGINS = kbuild.PLUGINS
TRT_SRC = PLUGINS / "trt" / "src"
LIB_NAME = "libkvexport_plugins.so"
# Compute capabilities the plugin library is compiled for unless $KVEXPORT_CUDA_ARCHS says otherwise.
DEFAULT_ARCHS = ("80", "86", "89", "90")
HEADER_WHEEL = "kernel-lens==2.0.1"
HEADER_WHEEL_SHA256 = "07cc714e8b5e7f34b672f7c7fad93febe7c747be5837ba276b1527370134ffe0"
HEADER_WHEEL_DIR = "kernel_lens/include/tensorrt/"
CXX_FLAGS = ("-std=c++17", "-O2", "-fPIC", "-fvisibility=hidden", "-Wall", "-Wno-deprecated-declarations")


class PluginBuildError(RuntimeError):
    """The plugin library cannot be built here (no nvcc, no headers, a compile error)."""


def _log(msg: str, progress) -> None:
    if progress:
        progress(msg)


def archs() -> list[str]:
    """``$KVEXPORT_CUDA_ARCHS`` parsed, else :data:`DEFAULT_ARCHS`."""
    return env_archs() or list(DEFAULT_ARCHS)


def _system_header_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("TENSORRT_ROOT"):
        dirs.append(Path(os.environ["TENSORRT_ROOT"]) / "include")
    dirs += [Path("/usr/include/x86_64-linux-gnu"), Path("/usr/include/aarch64-linux-gnu"), Path("/usr/include"),
             Path("/usr/local/tensorrt/include"), Path("/opt/tensorrt/include")]
    return dirs


def library_archs(lib: str | os.PathLike) -> list[str]:
    """The CUDA architectures a built plugin library holds kernels for (``kvx_trt_archs()``)."""
    import ctypes
    fn = ctypes.CDLL(str(lib)).kvx_trt_archs
    fn.restype = ctypes.c_char_p
    return [a for a in fn().decode().split(";") if a]


def _fetch_headers(stage: Path, progress=None) -> None:
    """Extract the pinned wheel's TensorRT headers into the new directory ``stage``."""
    _log(f"fetching TensorRT public headers ({HEADER_WHEEL}) with pip download", progress)
    with tempfile.TemporaryDirectory(dir=stage.parent) as tmp:
        r = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", HEADER_WHEEL, "-d", tmp],
                           capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if r.returncode or not wheels:
            raise PluginBuildError(f"no TensorRT headers: set TENSORRT_ROOT to a TensorRT install, or allow "
                                   f"`pip download {HEADER_WHEEL}` (failed: {r.stderr.strip()[-500:]})")
        digest = hashlib.sha256(wheels[0].read_bytes()).hexdigest()
        if digest != HEADER_WHEEL_SHA256:
            raise PluginBuildError(f"{wheels[0].name}: sha256 {digest} != pinned {HEADER_WHEEL_SHA256}")
        stage.mkdir()
        with zipfile.ZipFile(wheels[0]) as z:
            for name in z.namelist():
                if name.startswith(HEADER_WHEEL_DIR) and name.endswith(".h"):
                    (stage / Path(name).name).write_bytes(z.read(name))


def header_dir(progress=None) -> Path:
    """A directory with ``NvInferRuntime.h``: a TensorRT install, else the kernel-lens wheel's copy
    (fetched once into the cache, verified against its recorded digest on every use)."""
    for d in _system_header_dirs():
        if (d / "NvInferRuntime.h").is_file() and (d / "NvInferPluginBase.h").is_file():
            return d
    inc = cache_dir() / "trt-headers" / HEADER_WHEEL.replace("==", "-") / "include"
    if _cache.verified(inc):
        return inc
    inc.parent.mkdir(parents=True, exist_ok=True)
    with _cache.locked(inc):
        if _cache.verified(inc):
            return inc
        stage = inc.parent / f".include.{uuid.uuid4().hex}"
        aside = inc.parent / f".include.old.{uuid.uuid4().hex}"
        try:
            _fetch_headers(stage, progress)
            # A damaged copy is moved aside before the new one goes in (a directory cannot be
            # replaced in one rename), and removed only after.
            if inc.exists():
                inc.replace(aside)
            stage.replace(inc)
            _cache.record(inc)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
            shutil.rmtree(aside, ignore_errors=True)
    return inc


def trt_sources() -> list[Path]:
    return sorted(TRT_SRC.glob("*.cpp")) + sorted(TRT_SRC.glob("*.cu"))


def _trt_headers_digest(hdr: Path) -> str:
    return _cache.files_digest(hdr.glob("NvInfer*.h"), hdr)


def _hash(nvcc: str, arch_list, hdr: Path, ops_inc: str) -> str:
    h = hashlib.sha256()
    for p in kbuild.sources() + kbuild.headers() + trt_sources() + sorted(TRT_SRC.glob("*.h")):
        h.update(f"{p.parent.name}/{p.name}".encode())
        h.update(p.read_bytes())
    h.update(ops_inc.encode())
    h.update(_trt_headers_digest(hdr).encode())
    h.update(repr((kbuild.NVCC_FLAGS, CXX_FLAGS, tuple(arch_list), nvcc_version(nvcc))).encode())
    return h.hexdigest()[:16]


def _run(cmd: list[str], what: str) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise PluginBuildError(f"{what} failed:\n{' '.join(cmd)}\n{(r.stderr or r.stdout)[-4000:]}")


def build(arch_list=None, progress=None, force: bool = False) -> Path:
    """Path of the cached, verified plugin library, building it if needed (minutes on 2 cores).

    ``$KVEXPORT_TRT_PLUGIN_LIB`` names a prebuilt library instead; it must be a file, and is
    used as named (it is the user's, not checked against a digest of ours)."""
    from . import codegen
    env_lib = os.environ.get("KVEXPORT_TRT_PLUGIN_LIB")
    if env_lib:
        if not Path(env_lib).exists():
            raise PluginBuildError(f"KVEXPORT_TRT_PLUGIN_LIB={env_lib} does not exist")
        if not Path(env_lib).is_file():
            raise PluginBuildError(f"KVEXPORT_TRT_PLUGIN_LIB={env_lib} is not a file")
        return Path(env_lib)
    nvcc = find_nvcc()
    if nvcc is None:
        raise PluginBuildError("nvcc not found (set KVEXPORT_NVCC or CUDA_HOME): building the TensorRT plugin "
                               "library needs the CUDA toolkit >= 12 (no GPU needed); or point "
                               "KVEXPORT_TRT_PLUGIN_LIB at a prebuilt libkvexport_plugins.so")
    arch_list = list(arch_list or archs())
    hdr = header_dir(progress)
    ops_inc = codegen.generate()
    root = cache_dir() / "trt-plugins"
    lib = root / _hash(nvcc, arch_list, hdr, ops_inc) / LIB_NAME
    if not force and _cache.verified(lib):
        return lib
    # The generated op table lives at a path named by its contents, so the compile commands
    # (part of each object's cache key) are the same in every build.
    ops_hash = hashlib.sha256(ops_inc.encode()).hexdigest()[:16]
    gen = root / "generated" / ops_hash / "kvx_trt_ops.inc"
    cached(gen, lambda tmp: tmp.write_text(ops_inc))
    inc = ["-I", str(PLUGINS / "common"), "-I", str(hdr), "-I", str(gen.parent)]
    jobs = []
    for s in kbuild.sources():
        jobs.append((s, [nvcc, *kbuild.NVCC_FLAGS, *gencode(arch_list), "-c", str(s)]))
    for s in trt_sources():
        if s.suffix == ".cu":
            jobs.append((s, [nvcc, *kbuild.NVCC_FLAGS, *gencode(arch_list), *inc, "-c", str(s)]))
        else:
            jobs.append((s, [nvcc, "-x", "c++", "-std=c++17", "-O2", "-Xcompiler", ",".join(CXX_FLAGS[2:]),
                             f"-DKVX_TRT_ARCHS=\"{';'.join(arch_list)}\"", *inc, "-c", str(s)]))
    # Objects are cached per source (keyed by its text, every header it may include, the command
    # and the nvcc version), so editing a plugin shell does not recompile the kernels.
    obj_cache = root / "objects"
    obj_cache.mkdir(parents=True, exist_ok=True)
    kernel_deps = b"".join(p.read_bytes() for p in kbuild.headers())
    shell_deps = (b"".join(p.read_bytes() for p in sorted(TRT_SRC.glob("*.h"))) + ops_inc.encode()
                  + _trt_headers_digest(hdr).encode())
    objs = []
    for s, cmd in jobs:
        deps = kernel_deps + (shell_deps if s.parent == TRT_SRC else b"")
        key = hashlib.sha256(s.read_bytes() + deps + repr((cmd[1:], nvcc_version(nvcc))).encode())
        objs.append((s, cmd, obj_cache / f"{s.parent.name}_{s.stem}_{key.hexdigest()[:16]}.o"))

    def make(out: Path) -> None:
        t0 = time.time()
        todo = [j for j in objs if not _cache.verified(j[2])]
        _log(f"compiling {len(todo)} of {len(objs)} sources for sm_{',sm_'.join(arch_list)} with "
             f"{Path(nvcc).name}", progress)

        def one(s, cmd, obj):
            cached(obj, lambda tmp: _run(cmd + ["-o", str(tmp)], f"compiling {s.parent.name}/{s.name}"))

        with cf.ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as ex:
            for f in [ex.submit(one, *t) for t in todo]:
                f.result()
        _run([nvcc, "-shared", *gencode(arch_list), "-o", str(out), *(str(o) for _, _, o in objs),
              "-Xlinker", "--exclude-libs,ALL", "-ldl"], f"linking {LIB_NAME}")
        _log(f"built {LIB_NAME} in {time.time() - t0:.0f} s", progress)

    lib.parent.mkdir(parents=True, exist_ok=True)
    try:
        cached(lib, make, force=force)
    except OSError as e:
        raise PluginBuildError(f"cannot install {lib}: {e}") from e
    return lib
