"""Build the CUDA kernels of ``plugins/`` into one shared library on first use.

The library is cached as ``cache_dir()/kernels/<key>/libkvexport_kernels.so`` where the key
covers every source and header, the flags, the nvcc version and the target architectures,
so an edit or another GPU triggers exactly one rebuild.  Sources compile in parallel; the
library is installed atomically with a recorded digest, checked before every load, and
concurrent builders of one key wait for each other (see :mod:`kvexport._cache`).
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import os
import subprocess
import tempfile
from pathlib import Path

from .._cache import cache_dir, cached
from .._toolchain import env_archs, find_nvcc, gencode, nvcc_version

__all__ = ["KernelsUnavailable", "build", "compile_one", "device_archs", "find_nvcc", "gencode",
           "headers", "nvcc_version", "sources"]

PLUGINS = Path(__file__).resolve().parents[2] / "plugins"
LIB_NAME = "libkvexport_kernels.so"
# Architectures CI compiles for (compute capability × 10).
CI_ARCHS = ("80", "86", "89", "90")
NVCC_FLAGS = ("-std=c++17", "-O3", "-lineinfo", "-Xcompiler", "-fPIC", "--expt-relaxed-constexpr")


class KernelsUnavailable(RuntimeError):
    """No CUDA toolkit, no GPU, or the kernels failed to build; the pure-Python path still works."""


def sources() -> list[Path]:
    """Every kernel translation unit (plugins/<codec>/*.cu, plugins/common/*.cu)."""
    return sorted(PLUGINS.glob("*/*.cu"))


def headers() -> list[Path]:
    return sorted(list(PLUGINS.glob("*/*.cuh")) + list(PLUGINS.glob("*/*.h")))


def compile_one(nvcc: str, src: Path, obj: Path, archs, extra=()) -> None:
    cmd = [nvcc, *NVCC_FLAGS, *gencode(archs), *extra, "-c", str(src), "-o", str(obj)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise KernelsUnavailable(f"nvcc failed on {src.relative_to(PLUGINS.parent)}:\n{r.stderr[-4000:]}")


def _hash(nvcc: str, archs) -> str:
    h = hashlib.sha256()
    for p in sources() + headers():
        h.update(str(p.relative_to(PLUGINS)).encode())
        h.update(p.read_bytes())
    h.update(repr((NVCC_FLAGS, tuple(archs), nvcc_version(nvcc))).encode())
    return h.hexdigest()[:16]


def device_archs() -> list[str]:
    """``$KVEXPORT_CUDA_ARCHS`` (e.g. "90" or "80;90"), else the current GPU's capability."""
    env = env_archs()
    if env:
        return env
    import torch
    if not torch.cuda.is_available():
        raise KernelsUnavailable("no CUDA GPU visible to torch; set KVEXPORT_CUDA_ARCHS to build anyway")
    major, minor = torch.cuda.get_device_capability()
    return [f"{major}{minor}"]


def build(archs=None, verbose: bool = False) -> Path:
    """Path of the cached, verified library for ``archs``, building it if needed."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise KernelsUnavailable("nvcc not found (set KVEXPORT_NVCC or CUDA_HOME); "
                                 "the CUDA kernels need the CUDA toolkit >= 12")
    archs = list(archs or device_archs())
    lib = cache_dir() / "kernels" / _hash(nvcc, archs) / LIB_NAME

    def make(out: Path) -> None:
        with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
            objs = [Path(tmp) / (s.parent.name + "_" + s.stem + ".o") for s in sources()]
            with cf.ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as ex:
                for f in [ex.submit(compile_one, nvcc, s, o, archs) for s, o in zip(sources(), objs)]:
                    f.result()
            r = subprocess.run([nvcc, "-shared", *gencode(archs), "-o", str(out), *map(str, objs)],
                               capture_output=True, text=True)
            if r.returncode:
                raise KernelsUnavailable(f"linking {LIB_NAME} failed:\n{r.stderr[-4000:]}")

    lib.parent.mkdir(parents=True, exist_ok=True)
    try:
        built = cached(lib, make)
    except OSError as e:
        raise KernelsUnavailable(f"cannot install {lib}: {e}") from e
    if verbose and built:
        print(f"built {lib}")
    return lib
