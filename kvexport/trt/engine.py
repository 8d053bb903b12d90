"""ONNX → TensorRT(-RTX) engine with the kvexport plugins.

:func:`prepare` makes a parser-ready copy of an exported model, :func:`parse`
runs the ONNX parser with our plugin library loaded and checks that **every**
kvexport node became a plugin layer (when a node also carries its reference
function, the parser silently inlines the function if it finds no creator), and
:func:`build` adds one optimisation profile and serialises the engine.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path
from types import ModuleType
from typing import Callable

import onnx

from ..ops.registry import DOMAIN
from .runtime import NAMESPACE, backend_label, load_plugins


class PluginCoverageError(RuntimeError):
    """A kvexport node did not become a TensorRT plugin layer (no kernel, wrong version, parser fallback)."""


def plugin_support(codec, head_dim: int | None = None) -> str | None:
    """None if the TensorRT plugins run ``codec`` (at ``head_dim`` if given), else a one-line
    reason naming the parameter: a setting the CUDA kernels are not compiled for
    (:mod:`kvexport.kernels.support`), or a parameter whose packed layout is an op variant
    (:func:`kvexport.ops.registry.ops_for`) no creator implements.  For ``kvexport build``
    to refuse before exporting anything."""
    from ..kernels.cache import supported
    from ..kernels.support import kernel_support
    from ..ops.registry import all_ops, ops_for
    if not supported(codec):
        return f"{codec.name} has no CUDA kernels, so no TensorRT plugins"
    why = kernel_support(codec, head_dim)
    if why:
        return f"no TensorRT plugin: {why}"
    have = {o.name for o in all_ops()}
    variants = sorted(s.name for s in ops_for(codec).values() if s.name not in have)
    if not variants:
        return None
    cls, base = type(codec), dataclasses.asdict(type(codec)().params)
    changed = {k: v for k, v in dataclasses.asdict(codec.params).items() if v != base[k]}
    culprits = []
    for k, v in changed.items():  # the parameters that alone change the layout
        try:
            one = cls(**{k: tuple(v) if isinstance(v, list) else v})
        except (TypeError, ValueError):
            continue
        if any(s.name not in have for s in ops_for(one).values()):
            culprits.append(f"{codec.name}.{k}={v!r}")
    named = ", ".join(culprits) or ", ".join(f"{codec.name}.{k}={v!r}" for k, v in changed.items())
    return (f"no TensorRT plugin for the packed layout of {named} (op {', '.join(variants)}); "
            f"the plugins implement {codec.name}'s default layout")


def kvexport_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.domain == DOMAIN]


def _node_label(n: onnx.NodeProto) -> str:
    return f"{n.name or n.output[0]} ({n.op_type})"


def _attr(n: onnx.NodeProto, name: str, default: str) -> str:
    for a in n.attribute:
        if a.name == name:
            v = onnx.helper.get_attribute_value(a)
            return v.decode() if isinstance(v, bytes) else str(v)
    return default


def prepare(model: onnx.ModelProto) -> onnx.ModelProto:
    """Copy of ``model`` for the parser: absent optional inputs ("" names, e.g. no fp16
    window) are dropped from kvexport nodes — the plugin tells the cases apart by its
    input count — and every kvexport node gets a name (layer names in reports)."""
    m = copy.deepcopy(model)
    _uint8_as_int8(m)
    for i, n in enumerate(kvexport_nodes(m)):
        names = [x for x in n.input if x]
        del n.input[:]
        n.input.extend(names)
        if not n.name:
            n.name = f"{n.op_type}_{i}"
    return m


def _uint8_as_int8(m: onnx.ModelProto) -> None:
    """TensorRT has no uint8 intermediate tensors: packed cache bytes travel as int8 (same
    bits) through the network, its inputs and outputs."""
    u8, i8 = onnx.TensorProto.UINT8, onnx.TensorProto.INT8
    for vi in (*m.graph.input, *m.graph.output, *m.graph.value_info):
        if vi.type.tensor_type.elem_type == u8:
            vi.type.tensor_type.elem_type = i8
    for n in m.graph.node:
        if n.domain != DOMAIN:
            for a in n.attribute:
                if a.name in ("to", "dtype") and a.type == onnx.AttributeProto.INT and a.i == u8:
                    raise ValueError(f"node {n.name or n.op_type} casts to uint8, which TensorRT cannot carry")


def check_versions(model: onnx.ModelProto, have: dict[str, str]) -> None:
    """Fail before parsing, naming each kvexport node that has no plugin in the library
    (no CUDA kernel for its codec yet) or asks for another ``plugin_version``."""
    missing, wrong, ns = [], [], []
    for n in kvexport_nodes(model):
        ver = _attr(n, "plugin_version", "1")
        if _attr(n, "plugin_namespace", "") != NAMESPACE:
            ns.append(_node_label(n))
        elif n.op_type not in have:
            missing.append(_node_label(n))
        elif have[n.op_type] != ver:
            wrong.append(f"{_node_label(n)} asks plugin_version {ver!r}, the library has {have[n.op_type]!r}")
    msgs = []
    if missing:
        ops = sorted({m.split("(")[-1].rstrip(")") for m in missing})
        msgs.append(f"no TensorRT plugin (no CUDA kernel yet) for op(s) {', '.join(ops)}: nodes {', '.join(missing)}")
    if wrong:
        msgs.append("plugin version mismatch: " + "; ".join(wrong) + " (re-export the model with this kvexport)")
    if ns:
        msgs.append(f"nodes without plugin_namespace={NAMESPACE!r}: {', '.join(ns)}")
    if msgs:
        raise PluginCoverageError(" | ".join(msgs))


@dataclasses.dataclass
class Parsed:
    trt: ModuleType
    builder: object
    network: object
    parser: object
    plugin_layers: dict[str, str]     # node name -> op type
    layers: int


def parse(trt: ModuleType, model: onnx.ModelProto, plugin_lib: str | Path, logger=None, *,
          check_first: bool = True) -> Parsed:
    """Parse ``model`` (already :func:`prepare`-d) with the plugins of ``plugin_lib`` loaded.

    ``check_first`` names missing / mismatched plugins before parsing; either way every
    kvexport node is checked to be a plugin layer afterwards."""
    have = load_plugins(trt, plugin_lib)
    if check_first:
        check_versions(model, have)
    logger = logger or trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    ok = parser.parse(model.SerializeToString())
    if not ok:
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"{backend_label(trt)} ONNX parser failed: {errs}")
    produced: dict[str, str] = {}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type == trt.LayerType.PLUGIN_V3:
            for j in range(layer.num_outputs):
                produced[layer.get_output(j).name] = layer.name
    plugin_layers, bad = {}, []
    for n in kvexport_nodes(model):
        if all(o in produced for o in n.output if o):
            plugin_layers[n.name] = n.op_type
        else:
            bad.append(_node_label(n))
    if bad:
        raise PluginCoverageError(f"{len(bad)} kvexport node(s) did not become plugin layers (the parser fell back "
                                  f"to the reference function): {', '.join(bad)}")
    return Parsed(trt, builder, network, parser, plugin_layers, network.num_layers)


def _axis_kind(input_name: str, axis: int, dim_param: str) -> str:
    """Which build limit bounds a dynamic axis: by the exported decoder's input names
    (``input_ids`` / ``position_ids`` (batch, prompt); ``past.*`` (batch, heads, context, ...)),
    else by the symbolic name ("batch", "*tokens*", ...)."""
    name = input_name.lower()
    if name in ("input_ids", "position_ids", "attention_mask") or name.startswith("inputs_embeds"):
        return {0: "batch", 1: "prompt"}.get(axis, "unknown")
    if name.startswith("past"):
        return {0: "batch", 2: "past"}.get(axis, "unknown")
    n = dim_param.lower()
    if "batch" in n:
        return "batch"
    if n.startswith("q_") and "token" in n or "prompt" in n or "query" in n:
        return "prompt"
    if any(k in n for k in ("token", "seq", "len", "context", "past", "window", "cache", "group")):
        return "context"
    return "unknown"


@dataclasses.dataclass
class Limits:
    """Bounds of the optimisation profile: batch, new tokens per step (prompt) and cached context."""
    max_batch: int = 1
    max_prompt: int = 128
    max_context: int = 2048
    fixed: dict[str, int] = dataclasses.field(default_factory=dict)  # symbolic axis -> fixed size

    def range(self, kind: str, label: str) -> tuple[int, int, int]:
        if kind == "batch":
            return 1, max(1, self.max_batch // 2), self.max_batch
        if kind == "prompt":
            return 1, 1, self.max_prompt
        if kind == "past":     # a fresh sequence has an empty past
            return 0, max(1, self.max_context // 2), self.max_context
        if kind == "context":
            return 1, max(1, self.max_context // 2), self.max_context
        raise ValueError(f"cannot bound the dynamic axis {label}: pass its symbolic name in Limits.fixed")


def profile_shapes(network, limits: Limits, model: onnx.ModelProto) -> dict[str, tuple[tuple, tuple, tuple]]:
    """(min, opt, max) shape of every network input with dynamic axes."""
    dims = {vi.name: [d.dim_param if d.dim_param else d.dim_value for d in vi.type.tensor_type.shape.dim]
            for vi in model.graph.input}
    out = {}
    for i in range(network.num_inputs):
        t = network.get_input(i)
        shape = list(t.shape)
        if all(s >= 0 for s in shape):
            continue
        sym = dims.get(t.name, [])
        lo, op, hi = [], [], []
        for k, s in enumerate(shape):
            param = sym[k] if k < len(sym) and isinstance(sym[k], str) else ""
            if s >= 0 or param in limits.fixed:
                v = s if s >= 0 else limits.fixed[param]
                lo.append(v), op.append(v), hi.append(v)
                continue
            a, b, c = limits.range(_axis_kind(t.name, k, param), f"{k} of input {t.name!r} ({param or '?'})")
            lo.append(a), op.append(b), hi.append(c)
        out[t.name] = (tuple(lo), tuple(op), tuple(hi))
    return out


@dataclasses.dataclass
class BuildResult:
    engine: bytes
    backend: str
    build_seconds: float
    parse_seconds: float
    plugin_layers: dict[str, str]
    layers: int
    profile: dict[str, tuple]
    compute_capabilities: list[str]


def build(model: onnx.ModelProto, plugin_lib: str | Path, limits: Limits | None = None, *,
          trt: ModuleType | None = None, progress: Callable[[str], None] | None = None,
          archs: list[str] | None = None) -> BuildResult:
    """Parse + check + build one engine (one optimisation profile) for ``model``."""
    from .runtime import backend
    trt = trt or backend()
    limits = limits or Limits()
    say = progress or (lambda s: None)
    t0 = time.time()
    m = prepare(model)
    say(f"parsing with {backend_label(trt)} and {Path(plugin_lib).name}")
    p = parse(trt, m, plugin_lib)
    t1 = time.time()
    say(f"{len(p.plugin_layers)} kvexport node(s) are plugin layers; {p.layers} layers in all")
    config = p.builder.create_builder_config()
    prof = p.builder.create_optimization_profile()
    shapes = profile_shapes(p.network, limits, m)
    for name, (lo, op, hi) in shapes.items():
        prof.set_shape(name, lo, op, hi)
    if shapes:
        config.add_optimization_profile(prof)
    ccs = _set_targets(trt, config, archs)
    say("building engine")
    plan = p.builder.build_serialized_network(p.network, config)
    if plan is None:
        raise RuntimeError(f"{backend_label(trt)} failed to build the engine (see the log above)")
    t2 = time.time()
    return BuildResult(bytes(plan), backend_label(trt), t2 - t1, t1 - t0, p.plugin_layers, p.layers,
                       {k: [list(s) for s in v] for k, v in shapes.items()}, ccs)


def _set_targets(trt, config, archs: list[str] | None) -> list[str]:
    """TensorRT-RTX builds ahead of time for listed compute capabilities: the ones it supports
    that the plugin library was compiled for (``archs``, e.g. ["80", "86"]).  Full TensorRT
    builds for the GPU it runs on."""
    cc_enum = getattr(trt, "ComputeCapability", None)
    if cc_enum is None or not hasattr(config, "set_compute_capability"):
        return ["the build machine's GPU"]
    from ._build import archs as lib_archs
    want = [a for a in (archs or lib_archs()) if f"SM{a}" in cc_enum.__members__]
    if not want:
        raise ValueError(f"none of the plugin library's archs {archs or lib_archs()} is a TensorRT-RTX target "
                         f"({', '.join(m for m in cc_enum.__members__ if m.startswith('SM'))})")
    config.num_compute_capabilities = len(want)
    for i, a in enumerate(want):
        config.set_compute_capability(cc_enum.__members__[f"SM{a}"], i)
    return [f"{a[:-1]}.{a[-1]}" for a in want]
