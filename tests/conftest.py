"""Shared fixtures, and the one rule for missing dependencies.

:func:`require` is how a test says "I need X": where X is missing it skips locally but
*fails* under CI (``CI=true``), because every check the README says CI makes must run
there.  Use it as a module marker, ``pytestmark = pytest.mark.requires("onnxruntime")``, or
through the ``require`` fixture, ``require(shutil.which("g++"), "no C++ compiler")``
(``require_module`` for an import inside a fixture).  Never
``pytest.importorskip`` / ``pytest.skip`` for a dependency.

GPU tests carry ``@pytest.mark.gpu`` and skip cleanly without CUDA (CI has no GPU); on a GPU
machine a kernel or plugin *build* failure is a failure, never a skip.  Tests needing the
installed default model carry ``@pytest.mark.model``.
"""

from __future__ import annotations

import importlib
import os
import shutil

import pytest
import torch

pytest_plugins = ("pytester",)


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def require(need, why: str):
    """Return ``need`` when it is truthy (a found path, a module, True); otherwise the check
    cannot run here: ``pytest.fail`` under CI, ``pytest.skip`` elsewhere, saying ``why``."""
    if need:
        return need
    if in_ci():
        pytest.fail(f"CI=true and {why}: CI must run this check, not skip it", pytrace=False)
    pytest.skip(why)


def require_module(name: str):
    """The imported module ``name``, or :func:`require`'s skip / CI failure."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        return require(None, f"{name} is not installed ({e})")


def pytest_configure(config):
    config.addinivalue_line("markers", "requires(*modules): needs these importable modules "
                                       "(skipped without them, failed under CI=true)")


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available()
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


def pytest_runtest_setup(item):
    for mark in item.iter_markers("requires"):
        for module in mark.args:
            require_module(module)


@pytest.fixture(name="require", scope="session")
def require_fixture():
    """:func:`require`, for fixtures and tests."""
    return require


@pytest.fixture(scope="session")
def cuda_kernels():
    """The CUDA kernel library, built for this GPU (only GPU tests reach this)."""
    import kvexport.kernels as kernels
    from kvexport._toolchain import find_nvcc
    require(find_nvcc(), "nvcc not found (set KVEXPORT_NVCC or CUDA_HOME): cannot build the CUDA kernels")
    kernels.library()  # a compile, link or ABI failure raises here: a failure, not a skip
    return kernels


@pytest.fixture(scope="session")
def build_plugins():
    """``build(archs) -> Path`` of libkvexport_plugins.so (or ``$KVEXPORT_TRT_PLUGIN_LIB``).
    A missing nvcc or unreachable TensorRT headers are missing dependencies; a compile or
    link failure is a failure."""
    from kvexport._toolchain import find_nvcc
    from kvexport.trt import PluginBuildError, build_plugin_library
    from kvexport.trt._build import header_dir

    def build(archs):
        if not os.environ.get("KVEXPORT_TRT_PLUGIN_LIB"):
            require(find_nvcc(), "nvcc not found (set KVEXPORT_NVCC or CUDA_HOME): cannot build "
                                 "libkvexport_plugins.so")
            try:
                header_dir()
            except PluginBuildError as e:
                require(False, str(e).splitlines()[0])
        return build_plugin_library(list(archs))
    return build


@pytest.fixture(scope="session")
def cxx():
    """A C++ compiler for the small test harnesses."""
    return require(shutil.which("g++") or shutil.which("c++"), "no C++ compiler (g++ or c++)")


@pytest.fixture(scope="session")
def default_model_path():
    from kvexport.data import DataNotFound, default_model_path as find
    try:
        return find()
    except DataNotFound as e:
        require(False, str(e))


@pytest.fixture(scope="session")
def real_kv():
    """Real post-RoPE keys and values of the default model (see kvexport.realkv)."""
    from kvexport.realkv import load_real_kv
    from kvexport.data import DataNotFound
    try:
        return load_real_kv()
    except DataNotFound as e:
        require(False, str(e))
