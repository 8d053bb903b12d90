"""torch ↔ onnxruntime agreement: the encode reference functions reproduce the torch ops' packed
codes bit for bit (real K/V, random inputs, values exactly at rounding boundaries), and the
agreement report's building blocks (the whole report: tests/test_cli.py, compare --backend
onnxruntime)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvexport.ops import torch_ops
from kvexport.ops.registry import all_ops

pytest.importorskip("onnxruntime")

CODECS = ("kivi", "qjl", "ternary", "turbo", "polar", "fibquant")


def _encode_both(codec: str, role: str, xs: list[torch.Tensor]) -> list[tuple[str, np.ndarray, np.ndarray]]:
    from kvexport.onnx.opmodels import session, single_op_model
    torch_ops.register_all()
    spec = next(s for s in all_ops() if s.codec == codec and s.role == role)
    sess = session(single_op_model(spec, {}, xs[0].shape[-1]))
    out = []
    for x in xs:
        ref = torch_ops.op(spec.name)(x)
        got = sess.run(None, {"x": x.numpy()})
        out += [(t.name, r.numpy(), g) for t, r, g in zip(spec.outputs, ref, got)]
    return out


def _boundary_values(g: torch.Generator) -> torch.Tensor:
    """(1, 2, 64, 64) fp32 whose KIVI groups (32 tokens per channel, 32 channels per token) have
    min 0 and max 3, i.e. scale exactly 1 at 2 bits, and whose other entries lie exactly on the
    half-way points 0.5 / 1.5 / 2.5 or one fp32 ulp either side of them."""
    halves = torch.tensor([0.5, 1.5, 2.5])
    x = halves[torch.randint(0, 3, (1, 2, 64, 64), generator=g)]
    x = x + torch.randint(-1, 2, x.shape, generator=g) * torch.finfo(torch.float32).eps * x
    x[..., ::32, :], x[..., 1::32, :] = 0.0, 3.0     # key groups: per channel over tokens
    x[..., ::32], x[..., 1::32] = 0.0, 3.0           # value groups: per token over channels
    return x


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("role", ["key", "value"])
def test_encode_function_is_bit_exact(codec, role, real_kv):
    """ORT's reference function gives the torch op's bytes exactly (no tolerance): real K/V of
    layers 0 and 29, Gaussian inputs at two scales, fp16-representable inputs, exact halves."""
    g = torch.Generator().manual_seed(4)
    xs = [real_kv[f"{role[0]}.{layer}"][:, :, :160] for layer in (0, 29)]
    xs += [torch.randn(1, 2, 70, 64, generator=g) * s for s in (0.05, 40.0)]
    xs += [torch.randn(2, 2, 45, 64, generator=g).half().float(), _boundary_values(g)]
    for name, ref, got in _encode_both(codec, role, xs):
        assert ref.shape == got.shape, (name, ref.shape, got.shape)
        n = int((ref.view(np.uint8) != got.view(np.uint8)).sum())
        assert n == 0, f"{codec} {role} field {name}: {n} of {ref.nbytes} bytes differ"


def test_boundary_values_round_half_to_even():
    """The boundary input really probes ties: kivi codes of exact halves are even (0.5 → 0, 2.5 → 2)."""
    from kvexport.codecs._core.uniform import asym_quantize
    x = torch.tensor([[0.0, 0.5, 1.5, 2.5, 3.0]])
    codes, scale, zero = asym_quantize(x, 2, dim=1)
    assert scale.item() == 1.0 and zero.item() == 0.0
    assert codes.tolist() == [[0, 0, 2, 2, 3]]


def test_ulps_counts_fp16_units_with_a_noise_floor():
    from kvexport.onnx.agreement import _ulps
    from kvexport.tolerances import FP16_NOISE_FLOOR
    a = np.array([1.0, -2.0, 0.0, 5.0], np.float16)
    assert _ulps(a, a.copy()) == 0
    b = a.copy()
    b[0] = np.nextafter(np.float16(1.0), np.float16(2.0))
    assert _ulps(a, b) == 1
    b[1] = np.nextafter(np.float16(-2.0), np.float16(0.0))
    b[2] = -np.float16(0.0)                                  # −0 == +0: not a difference
    assert _ulps(a, b) == 1
    b[2] = 8 * np.finfo(np.float16).smallest_subnormal       # fp32 noise near zero: within the floor
    assert _ulps(a, b) == 1
    b[3] = np.float16(5.0078125)                             # two units above 5 (ulp 2^-8 in [4, 8))
    assert _ulps(a, b) == 2
    b[2] = np.float16(3 * FP16_NOISE_FLOOR)
    assert _ulps(a, b) == 3


def test_stats_of_fields_that_stayed_empty():
    """qjl's outlier norms have no element before the first complete group (a 12-token prompt)."""
    from kvexport.onnx.agreement import _stats
    assert _stats([np.zeros((1, 3, 0)), np.zeros((1, 3, 0))]) == dict(max=0.0, mean=0.0, median=0.0, elements=0)
    s = _stats([np.zeros((2, 0)), np.array([1.0, 3.0])])
    assert (s["max"], s["mean"], s["elements"]) == (3.0, 2.0, 2)
