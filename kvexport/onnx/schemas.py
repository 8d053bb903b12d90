"""``onnx.defs.OpSchema`` for every registry op (domain ``kvexport``, since_version = op version).

Inputs keep registry order; the optional fp16 window follows the packed fields
and the codec constants (``c_<name>``, fp32) come last as one variadic input.
Attributes: the codec parameters, ``causal`` for attention, and the TensorRT
plugin matching strings ``plugin_namespace`` / ``plugin_version``.
"""

from __future__ import annotations

import onnx
from onnx.defs import OpSchema

from ..ops.registry import DOMAIN, OpSpec, known_ops

_ATTR = {"int": OpSchema.AttrType.INT, "float": OpSchema.AttrType.FLOAT, "bool": OpSchema.AttrType.INT,
         "ints": OpSchema.AttrType.INTS, "str": OpSchema.AttrType.STRING}
_TYPES = {"float": ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"],
          "float16": ["tensor(float16)"], "uint8": ["tensor(uint8)"], "int64": ["tensor(int64)"]}

_DONE: dict[str, bool] = {}


def _param(t, name_prefix: str = "") -> OpSchema.FormalParameter:
    opt = OpSchema.FormalParameterOption.Optional if t.optional else OpSchema.FormalParameterOption.Single
    tc = "T" if t.dtype == "float" else t.dtype
    return OpSchema.FormalParameter(name_prefix + t.name, tc, t.doc or t.name, param_option=opt)


def op_schema(spec: OpSpec, with_constants: bool = True) -> OpSchema:
    inputs = [_param(t) for t in spec.inputs]
    if with_constants:
        inputs.append(OpSchema.FormalParameter("constants", "tensor(float)", "codec constants, fp32",
                                               param_option=OpSchema.FormalParameterOption.Variadic,
                                               is_homogeneous=False, min_arity=0))
    outputs = [_param(t) for t in spec.outputs]
    used = {t.dtype for t in (*spec.inputs, *spec.outputs)}
    tcs = [("T", _TYPES["float"], "activations")] + [(d, _TYPES[d], d) for d in sorted(used - {"float"})]
    attrs = [OpSchema.Attribute(a.name, _ATTR[a.type], f"{a.doc} ({a.range})", required=False)
             for a in spec.attrs]
    attrs += [OpSchema.Attribute("plugin_namespace", OpSchema.AttrType.STRING, "TensorRT plugin namespace (\"kvexport\")"),
              OpSchema.Attribute("plugin_version", OpSchema.AttrType.STRING, "TensorRT plugin version (op version)")]
    return OpSchema(spec.name, DOMAIN, spec.version, doc=spec.doc, inputs=inputs, outputs=outputs,
                    type_constraints=tcs, attributes=attrs)


def register_schemas(with_constants: bool = True) -> None:
    """Register every known op's schema with ``onnx.defs`` (idempotent).

    ``with_constants=False`` is the export-time variant without the trailing
    ``constants`` input: the exporter's builder treats a variadic input as required,
    and the constants are only appended by :func:`~kvexport.onnx.finalize.finalize`,
    which switches back to the full schema before checking.
    """
    for spec in known_ops():   # default layouts + the variants named so far (ops_for)
        if _DONE.get(spec.name) == with_constants:
            continue
        if onnx.defs.has(spec.name, spec.version, DOMAIN):
            onnx.defs.deregister_schema(spec.name, spec.version, DOMAIN)
        onnx.defs.register_schema(op_schema(spec, with_constants))
        _DONE[spec.name] = with_constants
