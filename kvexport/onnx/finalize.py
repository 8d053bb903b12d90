"""Post-export pass: constants as initializers, reference functions, IR pin, checks.

``finalize(model)`` takes a graph whose ``kvexport`` nodes came from the
translation table (or were made by hand with :func:`make_node`) and

1. appends the codec constants (``Codec.constants(head_dim)``: rotations,
   codebooks, sketches) as inputs ``c_<name>`` fed by fp32 initializers named
   ``kvexport.<codec>.<spec hash>.d<head_dim>.<name>`` (shared by all nodes),
2. attaches one model-local function per kvexport op type (``model.functions``;
   attaching after export keeps the exporter from inlining them); nodes of one op
   type must agree on every attribute but ``softcap`` / ``sliding_window``,
3. imports domain ``kvexport`` at the newest of the ops' versions, pins IR version 10 and runs
   ``onnx.checker.check_model(full_check=True)``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from . import IR_VERSION, OPSET
from ..ops.registry import DOMAIN, OpSpec, spec_for_node
from .functions import build_function
from .schemas import register_schemas
from .translation import node_attributes

PER_NODE_ATTRS = ("softcap", "sliding_window")


def _attr_dict(node: onnx.NodeProto) -> dict[str, Any]:
    out = {}
    for a in node.attribute:
        v = helper.get_attribute_value(a)
        out[a.name] = v.decode() if isinstance(v, bytes) else (list(v) if isinstance(v, (list, tuple)) else v)
    return out


def _static_shapes(graph: onnx.GraphProto) -> dict[str, list]:
    shapes = {}
    for vi in (*graph.input, *graph.value_info, *graph.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    for init in graph.initializer:
        shapes[init.name] = list(init.dims)
    return shapes


def make_node(spec: OpSpec, inputs: list[str], outputs: list[str], params: dict[str, Any] | None = None,
              **extra: Any) -> onnx.NodeProto:
    """A kvexport node with every attribute set (what the translation table emits)."""
    attrs = node_attributes(spec, {**(params or {}), **extra})
    return helper.make_node(spec.name, inputs, outputs, domain=DOMAIN, **attrs)


def finalize(model: onnx.ModelProto, *, head_dim: int | None = None, check: bool = True) -> onnx.ModelProto:
    """Attach constants and reference functions to ``model`` in place; returns it."""
    graph = model.graph
    shapes = _static_shapes(graph)
    have_init = {i.name for i in graph.initializer}
    seen: dict[str, tuple] = {}
    versions: dict[str, int] = {}
    functions: list[onnx.FunctionProto] = []
    for node in graph.node:
        if node.domain != DOMAIN:
            continue
        attrs = _attr_dict(node)
        try:
            spec, codec = spec_for_node(node.op_type, attrs)
        except ValueError as e:
            raise ValueError(f"node {node.name or node.op_type}: {e}") from None
        first = node.input[0]
        d = (shapes.get(first) or [None])[-1] or head_dim
        if not d:
            raise ValueError(f"node {node.name or node.op_type}: head_dim of input {first!r} is not static; "
                             "pass head_dim=")
        n_core = len(spec.inputs)
        core = list(node.input[:n_core])
        window = spec.kind == "attention" and len(core) > n_core - 2 and any(core[n_core - 2:])
        consts = codec.constants(int(d))
        names = []
        for cname, value in consts.items():
            init_name = f"kvexport.{codec.name}.{codec.spec_hash}.d{d}.{cname}"
            if init_name not in have_init:
                graph.initializer.append(numpy_helper.from_array(
                    value.detach().cpu().numpy().astype(np.float32), init_name))
                have_init.add(init_name)
            names.append(init_name)
        core += [""] * (n_core - len(core))
        del node.input[:]
        node.input.extend(core + names)
        # per-node attributes (read by the function through attribute references) may differ
        fixed = {k: v for k, v in attrs.items() if k not in PER_NODE_ATTRS}
        key = (tuple(sorted((k, str(v)) for k, v in fixed.items())), int(d), window, tuple(consts))
        if node.op_type in seen:
            if seen[node.op_type] != key:
                raise ValueError(f"{node.op_type}: nodes of one model must share attributes, head_dim and "
                                 f"window use (the reference function is specialised): {seen[node.op_type]} vs {key}")
            continue
        seen[node.op_type] = key
        versions[node.op_type] = spec.version
        functions.append(build_function(spec, codec, int(d), list(consts), window=window,
                                        causal=bool(attrs.get("causal", 1))))
    existing = {(f.domain, f.name) for f in model.functions}
    for f in functions:
        if (f.domain, f.name) in existing:
            raise ValueError(f"model already has a function {f.domain}::{f.name}")
        model.functions.append(f)
    # one domain import: the newest op version (an op of an older since_version stays valid)
    _set_opset(model, DOMAIN, max(versions.values(), default=1))
    _set_opset(model, "", None)
    model.ir_version = IR_VERSION
    if check:
        register_schemas()   # after the nodes named their layout variants
        onnx.checker.check_model(model, full_check=True)
    return model


def check_versions(model: onnx.ModelProto) -> None:
    """Refuse (``ValueError``, one line) a graph whose kvexport nodes were written for another
    packed-format version, or another layout, than the installed codecs give their
    parameters (:func:`~kvexport.ops.registry.spec_for_node`).  Call it where a graph is loaded."""
    newest = 0
    for node in model.graph.node:
        if node.domain != DOMAIN:
            continue
        attrs = _attr_dict(node)
        if "plugin_version" not in attrs:
            raise ValueError(f"node {node.name or node.op_type}: kvexport op {node.op_type} has no "
                             "plugin_version attribute (not written by kvexport)")
        try:
            spec, _ = spec_for_node(node.op_type, attrs)
        except ValueError as e:
            raise ValueError(f"node {node.name or node.op_type}: {e}") from None
        newest = max(newest, spec.version)
    have = next((o.version for o in model.opset_import if o.domain == DOMAIN), None)
    if newest and have != newest:
        raise ValueError(f"the graph imports domain {DOMAIN} at version {have}, its ops need {newest}: "
                         "re-export the model")


def _set_opset(model: onnx.ModelProto, domain: str, version: int | None) -> None:
    for o in model.opset_import:
        if o.domain == domain:
            if version is not None:
                o.version = version
            return
    model.opset_import.append(helper.make_opsetid(domain, version if version is not None else OPSET))
