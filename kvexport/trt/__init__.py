"""TensorRT plugins for the kvexport ops and ``kvexport build``.

- :mod:`.codegen`: the plugin creators' op table, generated from the op registry.
- :mod:`._build`: ``libkvexport_plugins.so`` (plugin shells + the CUDA kernels), built with
  nvcc on first use and cached; TensorRT headers from an install or the kernel-lens wheel.
- :mod:`.runtime`: import TensorRT or TensorRT-RTX, load the plugin library.
- :mod:`.engine`: parse with the plugins, check every kvexport node is a plugin layer, build.
- :mod:`.package`: a whole ``kvexport build`` output directory with its reports.
"""

from ._build import LIB_NAME, PluginBuildError
from ._build import build as build_plugin_library
from .engine import Limits, PluginCoverageError, plugin_support
from .runtime import TrtUnavailable, backend

__all__ = ["LIB_NAME", "Limits", "PluginBuildError", "PluginCoverageError", "TrtUnavailable", "backend",
           "build_plugin_library", "plugin_support"]
