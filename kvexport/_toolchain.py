"""The CUDA toolchain: one nvcc search and one reading of target architectures.

The kernel library (:mod:`kvexport.kernels._build`), the plugin library
(:mod:`kvexport.trt._build`), the test harnesses and ``kvexport env`` all ask
:func:`find_nvcc`, so the nvcc that ``env`` reports is the one a build uses.  A new source
of nvcc (for example NVIDIA's PyPI ``nvidia-cuda-nvcc`` in the venv) is one more entry in
:func:`nvcc_candidates`.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess

ARCHS_ENV = "KVEXPORT_CUDA_ARCHS"
_ARCH = re.compile(r"(?:sm_|compute_)?(\d+)(?:\.(\d))?([af]?)")


def nvcc_candidates() -> list[tuple[str, str]]:
    """(where it came from, path) in search order; the first executable one is used."""
    out = []
    if os.environ.get("KVEXPORT_NVCC"):
        out.append(("KVEXPORT_NVCC", os.environ["KVEXPORT_NVCC"]))
    if os.environ.get("CUDA_HOME"):
        out.append(("CUDA_HOME", os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")))
    which = shutil.which("nvcc")
    if which:
        out.append(("PATH", which))
    out.append(("default", "/usr/local/cuda/bin/nvcc"))
    return out


def find_nvcc() -> str | None:
    """``$KVEXPORT_NVCC``, ``$CUDA_HOME/bin/nvcc``, ``nvcc`` on PATH, /usr/local/cuda/bin/nvcc."""
    for _, c in nvcc_candidates():
        if os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


@functools.lru_cache(maxsize=8)
def _version(nvcc: str, stamp: tuple) -> str:
    return subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True,
                          timeout=60).stdout.strip()


def nvcc_version(nvcc: str) -> str:
    """``nvcc --version`` text (part of every build cache key); asked once per nvcc file."""
    st = os.stat(nvcc)
    return _version(nvcc, (st.st_mtime_ns, st.st_size))


def nvcc_release(nvcc: str) -> str | None:
    """"13.0" from ``nvcc --version``, or None."""
    m = re.search(r"release ([0-9.]+)", nvcc_version(nvcc))
    return m.group(1) if m else None


def parse_archs(text: str, what: str = ARCHS_ENV) -> list[str]:
    """Compute capabilities from "80;90", "80,86", "sm_90a" or "8.6" → ["80", "90"], in order,
    without repeats.  Anything else is a ValueError naming ``what`` and the bad entry."""
    out: list[str] = []
    for tok in re.split(r"[;,\s]+", text.strip()):
        if not tok:
            continue
        m = _ARCH.fullmatch(tok)
        if not m or (m.group(2) is None and len(m.group(1)) < 2):
            raise ValueError(f"{what}: {tok!r} is not a compute capability (examples: 86, 90a, 8.6, sm_90)")
        arch = m.group(1) + (m.group(2) or "") + m.group(3)
        if arch not in out:
            out.append(arch)
    if not out:
        raise ValueError(f"{what}: no compute capability in {text!r} (examples: 86, 80;90)")
    return out


def env_archs() -> list[str] | None:
    """``$KVEXPORT_CUDA_ARCHS`` parsed, or None when it is unset or empty."""
    env = os.environ.get(ARCHS_ENV, "").strip()
    return parse_archs(env) if env else None


def gencode(archs) -> list[str]:
    """nvcc ``-gencode`` flags: SASS for each architecture."""
    out = []
    for a in archs:
        out += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    return out
