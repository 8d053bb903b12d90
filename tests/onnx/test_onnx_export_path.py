"""The torch → ONNX path: kvexport ops in a module go through torch.onnx.export (dynamo) with
the translation table, come out as kvexport nodes with plugin strings, and run in onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from kvexport.ops import torch_ops
from kvexport.ops.registry import all_ops, get_op
from kvexport.onnx.export import export_module
from kvexport.onnx.opmodels import session
from kvexport.tolerances import tolerance

pytestmark = pytest.mark.requires("onnxruntime")


class EncodeAttend(torch.nn.Module):
    """Encode new K/V with the codec's ops and attend over them (a one-layer cache step)."""

    def __init__(self, codec: str, params: dict):
        super().__init__()
        specs = [s for s in all_ops() if s.codec == codec]
        self.kenc = torch_ops.op(next(s.name for s in specs if s.role == "key"))
        self.venc = torch_ops.op(next(s.name for s in specs if s.role == "value"))
        self.att = torch_ops.op(next(s.name for s in specs if s.kind == "attention"))
        self.params = params

    def forward(self, q, k, v):
        kf = self.kenc(k, **self.params)
        vf = self.venc(v, **self.params)
        return self.att(q, *kf, *vf, **self.params)


@pytest.mark.parametrize("codec,params", [("fp16", {}), ("kivi", {"bits": 3, "group": 16}),
                                          ("turbo", {"bits": 2}), ("fibquant", {}), ("qjl", {}),
                                          ("polar", {}), ("ternary", {})])
def test_export_runs_in_onnxruntime(codec, params):
    d = 64
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 9, d, generator=g), torch.randn(1, 2, 40, d, generator=g),
               torch.randn(1, 2, 40, d, generator=g))
    t = torch.export.Dim("t", min=2, max=4096)
    tq = torch.export.Dim("tq", min=2, max=4096)
    b = torch.export.Dim("b", min=1, max=64)
    m = export_module(EncodeAttend(codec, params), (q, k, v),
                      dynamic_shapes=({0: b, 2: tq}, {0: b, 2: t}, {0: b, 2: t}))
    kv_nodes = [n for n in m.graph.node if n.domain == "kvexport"]
    assert sorted(n.op_type for n in kv_nodes) == sorted(s.name for s in all_ops() if s.codec == codec)
    for n in kv_nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        assert attrs["plugin_namespace"] == b"kvexport"
        assert attrs["plugin_version"] == str(get_op(n.op_type).version).encode()
        for key, val in params.items():
            assert attrs[key] == val
    assert m.ir_version <= 10
    s = session(m)
    ref_mod = EncodeAttend(codec, params)
    for shape_q, shape_kv in (((1, 4, 9, d), (1, 2, 40, d)), ((2, 4, 3, d), (2, 2, 70, d))):
        q, k, v = torch.randn(*shape_q, generator=g), torch.randn(*shape_kv, generator=g), torch.randn(*shape_kv, generator=g)
        ref = ref_mod(q, k, v).numpy()
        got = s.run(None, dict(zip([i.name for i in m.graph.input], (q.numpy(), k.numpy(), v.numpy()))))[0]
        tol = tolerance(codec, "torch-ort", "float32")
        np.testing.assert_allclose(got, ref, atol=tol.atol, rtol=tol.rtol)
