"""The plugin library in the real TensorRT 11.4 plugin registry (PyPI's runtime-only
``tensorrt-lean-cu13-*`` wheels, CPU): every creator registers at its op's version and no
other, an empty or incomplete field collection is refused (naming the missing field), the
full collection the exporter writes makes a plugin.  Runs in a child process: the lean
runtime and TensorRT-RTX are not loaded into one process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kvexport.ops.registry import all_ops

from .test_trt_build import PLUGIN_CODECS, _full, _required

_CHILD = r"""
import json, sys
import numpy as np
import tensorrt_lean_bindings as t
lib, cases = sys.argv[1], json.loads(sys.argv[2])
reg = t.get_plugin_registry()
reg.load_library(lib)
out = []
for op, version, fields in cases:
    c = reg.get_creator(op, version, "kvexport")
    if c is None:
        out.append(None)
        continue
    fs = []
    for k, v in fields.items():
        if isinstance(v, str):
            fs.append(t.PluginField(k, np.frombuffer(v.encode(), np.int8), t.PluginFieldType.CHAR))
        elif isinstance(v, float):
            fs.append(t.PluginField(k, np.array([v], np.float32), t.PluginFieldType.FLOAT32))
        else:
            fs.append(t.PluginField(k, np.array(v if isinstance(v, list) else [v], np.int32), t.PluginFieldType.INT32))
    p = c.create_plugin("lean", t.PluginFieldCollection(fs), t.TensorRTPhase.RUNTIME)
    core = None if p is None else p.get_capability_interface(t.PluginCapabilityType.CORE)
    out.append(None if p is None else [core.plugin_name, core.plugin_version, core.plugin_namespace])
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def lean(plugin_lib, require):
    require(subprocess.run([sys.executable, "-c", "import tensorrt_lean_bindings"], capture_output=True).returncode
            == 0, "tensorrt_lean_bindings (PyPI tensorrt-lean-cu13-bindings) is not installed")

    def run(cases):
        r = subprocess.run([sys.executable, "-c", _CHILD, str(plugin_lib), json.dumps(cases)], capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads(r.stdout.strip().splitlines()[-1]), r.stderr
    return run


def test_lean_registry_refuses_what_it_should(lean):
    ops = [o for o in all_ops() if o.codec in PLUGIN_CODECS]
    cases = []
    for o in ops:
        v, full = str(o.version), _full(o.name)
        drop = _required(o.name)[0]
        cases += [(o.name, v, full), (o.name, v, {}), (o.name, v, {k: x for k, x in full.items() if k != drop}),
                  (o.name, str(o.version + 1), full)]
    got, err = lean(cases)
    for i, o in enumerate(ops):
        made, empty, partial, other = got[4 * i:4 * i + 4]
        assert made == [o.name, str(o.version), "kvexport"], (o.name, err[-2000:])
        assert empty is None and partial is None and other is None, o.name
        assert f"{o.name} v{o.version}: missing required field(s) '{_required(o.name)[0]}' (" in err
