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

pytestmark = pytest.mark.requires("onnxruntime")

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


# ----- the pass rule and the fixed-bytes check (issue 10, item 4) ------------------------------

def _row(err: float, *, first=None, code_flip=False):
    """A lock-step row: logits 1.0 everywhere, |Δ| ``err``; ``first`` the first differing layer."""
    return dict(logits=np.ones((1, 3, 8), np.float32), err=np.full((1, 3, 8), err, np.float32),
                first_difference=first, first_code_mismatch=dict(layer=0, bytes=1, fraction=1e-3) if code_flip else None)


FIXED_OK = dict(within_tolerance=True)
FLIP = dict(layer=7, code_bytes=1, code_fraction=1 / 576, fp16_ulps=0, code_total=576)


def test_verdict_holds_boundary_flips_to_the_float16_bound():
    """A one-code boundary flip whose logits move by 1.3 (the kivi row of the session-2 default-model export run (scripts/bench_export.py):
    within tolerance under the old rule, which stopped checking at the first flip) is outside; the same
    flip moving them by 1e-2 is inside; a step with identical present is held to the float32 entry."""
    from kvexport.onnx.agreement import verdict
    from kvexport.tolerances import tolerance
    t32, t16 = tolerance("kivi", "end-to-end", "float32"), tolerance("kivi", "end-to-end", "float16")
    ok = [_row(0.5 * t32.atol)]
    harmful = verdict("kivi", ok + [_row(1.3, first=FLIP, code_flip=True)], [], [], FIXED_OK)
    assert not harmful["within_tolerance"] and harmful["steps_outside_tolerance"] == [1]
    mild = verdict("kivi", ok + [_row(0.5 * t16.atol, first=FLIP, code_flip=True)], [], [], FIXED_OK)
    assert mild["within_tolerance"], mild
    assert not verdict("kivi", [_row(2 * (t32.atol + t32.rtol))], [], [], FIXED_OK)["within_tolerance"]
    wide = dict(FLIP, code_bytes=100)                     # not a boundary: many codes differ at once
    assert not verdict("kivi", ok + [_row(0.0, first=wide, code_flip=True)], [], [], FIXED_OK)["within_tolerance"]


def test_verdict_needs_fixed_bytes_free_running_and_a_code_identical_step():
    from kvexport.onnx.agreement import verdict
    good = [_row(0.0)]
    assert verdict("kivi", good, [np.zeros(8)], [np.ones(8)], FIXED_OK)["within_tolerance"]
    assert not verdict("kivi", good, [], [], dict(within_tolerance=False))["within_tolerance"]
    # free-running: the loops diverged at a step whose logits were 0.74 apart, not a near-tie
    far = verdict("kivi", good, [np.zeros(8), np.full(8, 0.74)], [np.ones(8), np.ones(8)], FIXED_OK)
    assert not far["within_tolerance"] and not far["free_running"]
    # every step had a code flip: nothing was held to the tight bound
    flips = [_row(0.0, first=FLIP, code_flip=True)] * 4
    assert not verdict("kivi", flips, [], [], FIXED_OK)["within_tolerance"]


class _OneBitOff:
    """``torch_ops`` as the decoder sees it, except that ``target``'s first output (the packed codes)
    gets one bit of its newest token flipped outside ONNX export: an exporter whose encode differs
    from torch in one byte per step and layer, which a whole-model comparison calls a boundary flip."""

    def __init__(self, real, target):
        self.real, self.target = real, target

    def __getattr__(self, k):
        return getattr(self.real, k)

    def op(self, name):
        f = self.real.op(name)
        if name != self.target:
            return f

        def g(x, **kw):
            out = list(f(x, **kw))
            if not torch.onnx.is_in_onnx_export() and out[0].shape[2]:
                out[0] = out[0].clone()
                out[0][0, 0, -1, 0] ^= 1
            return tuple(out)
        return g


def test_one_byte_encode_bug_fails_the_report_and_the_cli(tmp_path, monkeypatch, capsys):
    """compare --backend onnxruntime on tiny:llama with a one-byte encode difference per layer and
    step: the fixed-bytes check names the field, the verdict is OUTSIDE and the exit status 1 (the
    old rule passed it: the first differing layer differed in one code byte, a "boundary flip").
    The same run without the sabotage: tests/test_cli.py::test_compare_backend_onnxruntime_writes_agreement_report."""
    import json
    import kvexport.onnx.decoder as decoder
    from kvexport.cli import main
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    target = next(s.name for s in all_ops() if s.codec == "kivi" and s.role == "value")
    monkeypatch.setattr(decoder, "torch_ops", _OneBitOff(torch_ops, target))
    rc = main(["compare", "--backend", "onnxruntime", "--model", "tiny:llama", "--codec", "kivi:group=8",
               "--text", str(text), "--windows", "1", "--window-len", "11", "--steps", "4", "--no-progress",
               str(tmp_path / "bad")])
    out = capsys.readouterr().out
    assert rc == 1, out
    rep = json.loads((tmp_path / "bad" / "report.json").read_text())["codecs"][0]
    fx = rep["fixed_bytes"]
    assert not rep["within_tolerance"] and not fx["within_tolerance"] and fx["layer_steps"] == 4 * 3
    assert fx["present_bytes_differing"] >= 4 * 3 and fx["failures"][0]["what"] == "present.value.codes", fx
    assert "OUTSIDE tolerance" in out and "within tolerance" not in out
    assert out.count("|Δ| max") == 1 and f"{rep['logit_error']['max']:.2e}" in out
    assert "| NO |" in (tmp_path / "bad" / "report.md").read_text()
