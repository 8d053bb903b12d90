"""Fixtures of the TensorRT tests: the backend (TensorRT-RTX on CI) and the plugin library.

The library is built once per session for a single architecture (the first of
``$KVEXPORT_CUDA_ARCHS``, default 86) to keep CI fast; the architectures do not change what
is tested here (parse, build and serialization on the CPU).  A missing backend, nvcc or
header source skips locally and fails under CI (tests/conftest.py ``require``).
"""

from __future__ import annotations

import pytest

from kvexport._toolchain import env_archs

ARCH = (env_archs() or ["86"])[0]


@pytest.fixture(scope="session")
def trt(require):
    from kvexport.trt import TrtUnavailable, backend
    try:
        return backend()
    except TrtUnavailable as e:
        require(False, f"no TensorRT backend: {e}")


@pytest.fixture(scope="session")
def plugin_lib(trt, build_plugins):
    return build_plugins([ARCH])
