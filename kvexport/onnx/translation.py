"""``custom_translation_table`` for ``torch.onnx.export(dynamo=True)``.

Each ``kvexport::<Name>`` call becomes one node ``<Name>`` in domain
``kvexport`` carrying every attribute explicitly (the exporter passes only the
non-default ones), plus ``plugin_namespace="kvexport"`` and ``plugin_version``
as strings (what the TensorRT ONNX parser matches plugin creators on).  The
codec constants are added as inputs afterwards by :mod:`.finalize`.
"""

from __future__ import annotations

from typing import Any, Callable

import onnxscript

from . import PLUGIN_NAMESPACE
from ..ops import torch_ops
from ..ops.registry import DOMAIN, OpSpec
from .schemas import register_schemas


def node_attributes(spec: OpSpec, given: dict[str, Any]) -> dict[str, Any]:
    """Full attribute dict of a node: registry defaults, the given values, plugin strings."""
    attrs: dict[str, Any] = {}
    for a in spec.attrs:
        v = given.get(a.name, a.default)
        if v is None:
            continue  # optional parameter left to the codec (e.g. derived from another)
        if a.type == "bool":
            v = int(bool(v))
        elif a.type == "ints":
            v = [int(i) for i in v]
        attrs[a.name] = v
    attrs["plugin_namespace"] = PLUGIN_NAMESPACE
    attrs["plugin_version"] = str(spec.version)
    return attrs


def _translation(spec: OpSpec) -> Callable:
    opset = onnxscript.values.Opset(DOMAIN, spec.version)
    n_out = len(spec.outputs)
    names = [t.name for t in spec.inputs]

    def translate(*args, **kwargs):
        tensors = dict(zip(names, args))
        for k in list(kwargs):
            if k in names:
                tensors[k] = kwargs.pop(k)
        ins = [tensors.get(n) for n in names]
        while ins and ins[-1] is None:   # trailing optional inputs (the window) left out
            ins.pop()
        res = getattr(opset, spec.name)(*ins, **node_attributes(spec, kwargs), _outputs=n_out)
        if spec.kind == "encode":
            return list(res) if isinstance(res, (tuple, list)) else [res]
        return res[0] if isinstance(res, (tuple, list)) else res
    translate.__name__ = f"translate_{spec.name}"
    return translate


def translation_table() -> dict:
    """``{torch.ops.kvexport.<Name>.default: translation}`` for every op defined in torch
    (default layouts and the layout variants of codecs used so far)."""
    specs = torch_ops.register_all()
    register_schemas(with_constants=False)
    return {torch_ops.op(name): _translation(spec) for name, spec in specs.items()}
