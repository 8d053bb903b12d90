"""Every CUDA kernel source compiles for sm_80, sm_86, sm_89 and sm_90 (compile only, CPU).

Each translation unit goes through nvcc with all four targets (ptxas included, so
register / shared-memory limits of each architecture are checked); sources build in
parallel.  About 3 minutes on a 2-core machine.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import subprocess

import pytest

from kvexport import _toolchain
from kvexport.kernels import _build


@pytest.fixture(scope="module")
def nvcc(require):
    return require(_build.find_nvcc(), "nvcc not found (set KVEXPORT_NVCC or CUDA_HOME)")


def test_every_codec_with_kernels_has_sources():
    from kvexport.kernels.cache import SLOTS
    have = {p.parent.name for p in _build.sources()}
    assert "common" in have
    assert set(SLOTS) <= have, set(SLOTS) - have


def test_kernels_compile_for_all_archs(nvcc, tmp_path):
    srcs = _build.sources()
    assert srcs
    jobs = max(2, os.cpu_count() or 2)
    with cf.ThreadPoolExecutor(max_workers=jobs) as ex:
        futs = {ex.submit(_build.compile_one, nvcc, s, tmp_path / f"{s.parent.name}_{s.stem}.o", _build.CI_ARCHS): s
                for s in srcs}
        errors = []
        for f in cf.as_completed(futs):
            try:
                f.result()
            except _build.KernelsUnavailable as e:
                errors.append(str(e))
    assert not errors, "\n\n".join(errors)
    objs = sorted(tmp_path.glob("*.o"))
    r = subprocess.run([nvcc, "-shared", *_build.gencode(_build.CI_ARCHS), "-o", str(tmp_path / "lib.so"),
                        *map(str, objs)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    # The extern "C" launchers the ctypes binding calls are all exported.
    syms = subprocess.run(["nm", "-D", "--defined-only", str(tmp_path / "lib.so")], capture_output=True,
                          text=True).stdout
    from kvexport.kernels.cache import SLOTS
    for name in ["kvx_last_error", "kvx_abi_version", "kvx_args_sizes"] + \
            [f"kvx_{c}_{op}" for c in SLOTS for op in ("decode", "append")]:
        assert f" T {name}\n" in syms, name


def test_unavailable_message_without_toolkit(monkeypatch):
    monkeypatch.setenv("KVEXPORT_NVCC", "/nonexistent/nvcc")
    monkeypatch.setattr(_toolchain.shutil, "which", lambda _: None)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.setattr(_toolchain.os.path, "isfile", lambda p: False)
    with pytest.raises(_build.KernelsUnavailable, match="nvcc not found"):
        _build.build(archs=["90"])
