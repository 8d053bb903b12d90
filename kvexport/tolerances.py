"""Every tolerance in one table, keyed by (codec, stage, dtype).

Stages: ``torch-ort`` (reference torch op vs the onnxruntime run of its ONNX
function), ``ort-kernel`` (onnxruntime vs CUDA kernel), ``ort-engine``
(onnxruntime vs a TensorRT engine), ``end-to-end`` (logits of a whole model
against the same model on the reference path), ``codes`` (fraction of packed
bytes allowed to differ across backends: rounding at a cell boundary), ``ppl`` (rtol of a
whole model's perplexity on another backend, e.g. the CUDA kernels, vs the reference path on
the same windows and schedule, paired per window: ``kvexport.models.paired``).
Each entry states its error model beside it: a multiple of the unit roundoff of the format
involved, or a rate derived from one, never the worst measurement.
Tests, ``kvexport compare`` and reports import :func:`tolerance`.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Tol:
    atol: float
    rtol: float = 0.0


STAGES = ("torch-ort", "ort-kernel", "ort-engine", "end-to-end", "codes", "ppl")
DTYPES = ("float32", "float16", "bfloat16")

# Unit roundoff u of each storage format: rounding a value to the format moves it by at most u·|x|.
# Every bound below is a stated multiple of these; "N-term sum" means a dot product or reduction of
# N terms summed in another order on the other side (error ≲ sqrt(N)·u·Σ|terms| for random
# rounding, Higham, Accuracy and Stability of Numerical Algorithms, §2.8 / §3.1).
U32, U16, UBF16 = 2.0 ** -24, 2.0 ** -11, 2.0 ** -8

# Defaults per (stage, dtype); codec-specific rows below override them.
_DEFAULT: dict[tuple[str, str], Tol] = {
    # torch op vs its ONNX reference function in onnxruntime, same inputs, the same fp32 math in
    # another summation order: q·k over D ≤ 256 terms and P·V over T ≤ 4096 terms → sqrt(T)·u32
    # ≈ 4e-6 relative, times the softmax's condition (|score| ≲ 25 in real models) → 1e-4.
    ("torch-ort", "float32"): Tol(1e-4, 1e-4),
    # fp16 / bf16 outputs: both sides round the (1e-4-close) fp32 result, so they may land one ulp
    # apart, and the inputs were rounded too: 4u.
    ("torch-ort", "float16"): Tol(4 * U16, 4 * U16),           # 1.95e-3
    ("torch-ort", "bfloat16"): Tol(4 * UBF16, 4 * UBF16),      # 1.56e-2
    # onnxruntime vs the CUDA kernels, element-wise: the kernel stages q and the dequantized K/V
    # tiles in fp16 (u each), rounds the softmax probabilities P to fp16 (u), combines split partials
    # (u) and rounds the output (u); element-wise that is ≤ 10u (KERNEL_REL_L2: 4u in norm).
    ("ort-kernel", "float32"): Tol(4 * U16, 4 * U16),          # fp32 activations staged in fp16
    ("ort-kernel", "float16"): Tol(10 * U16, 10 * U16),        # 4.9e-3
    ("ort-kernel", "bfloat16"): Tol(7 * UBF16, 7 * UBF16),     # 2.7e-2: those five, in bf16, plus the
                                                               # bf16 rounding of q and the new K/V
    # onnxruntime vs a TensorRT engine: the plugin (ort-kernel) plus TensorRT's own GEMMs, which may
    # accumulate in fp16 / TF32 (u = 2^-11 for both): N-term sums with N = hidden ≤ 576 in the
    # engines we build → sqrt(N)·u ≈ 1.2e-2 for fp16 (20u, the plugin's 10u inside); fp32 (TF32)
    # half of that; bf16: the plugin's 7u plus 5 bf16 roundings of the surrounding layers.
    ("ort-engine", "float32"): Tol(10 * U16, 10 * U16),        # 4.9e-3
    ("ort-engine", "float16"): Tol(20 * U16, 20 * U16),        # 9.8e-3
    ("ort-engine", "bfloat16"): Tol(12 * UBF16, 12 * UBF16),   # 4.7e-2
    # logits of a whole model vs the same model on another backend, identical packed caches.
    # float32: fp32 GEMM-order noise sqrt(N)·u32 ≈ 2.4e-6 per layer (N ≤ 1536, the MLP), compounded
    # over ≤ 32 layers with a whole-stack gain taken as ≤ 10 → ≤ 1e-3 of |logit| (atol the same, for
    # logits near 0).  float16: one fp16 ulp in a cached value (u16 relative) reaching the logits
    # through the remaining layers with gain ≤ 100 → 100·u16 (SmolLM2-135M, 30 layers, fp16 codec:
    # 3.7e-3 = 8·u16 measured, so the gain assumption has 12× margin).  bfloat16: the same gain on
    # u_bf16 would be 0.39, past any use; 25·u_bf16 ≈ 0.1 holds a bf16 run to about one bf16 step of
    # its largest logits.
    ("end-to-end", "float32"): Tol(1e-3, 1e-3),
    ("end-to-end", "float16"): Tol(100 * U16, 100 * U16),      # 4.9e-2
    ("end-to-end", "bfloat16"): Tol(25 * UBF16, 25 * UBF16),   # 9.8e-2
    # fraction of packed bytes that may differ: an input within δ of a cell boundary gets the
    # neighbouring code; δ = a few fp32 ulps of GEMM-order noise (3·u32·|x|) and a cell is
    # range / 2^bits, so the expected rate 3·u32·2^bits·|x| / range is < 1e-4 for ≤ 8 bits; 1e-3
    # leaves 10× for clustered values.  0 for the exact codecs.
    ("codes", "float32"): Tol(1e-3),
    ("codes", "float16"): Tol(1e-3),
    ("codes", "bfloat16"): Tol(1e-3),
    # perplexity, kernel path vs reference path: SAME windows and SAME schedule (prefill + one-token
    # decode steps, kvexport.models.paired), rtol on exp(mean d_w) − 1 of the paired per-window NLL
    # differences d_w.  Model: with a correct kernel the d_w are zero-mean noise (a value near a cell
    # boundary takes the neighbouring code on one path, in either direction), so what is bounded is
    # a bias, and the bound is half the project's 1 % fidelity bar.  A test of it must resolve it:
    # standard error of mean d ≤ rtol / PPL_Z (else more windows, never a wider bound).
    ("ppl", "float32"): Tol(0.0, 5e-3),
    ("ppl", "float16"): Tol(0.0, 5e-3),
    ("ppl", "bfloat16"): Tol(0.0, 5e-3),
}

# The ppl bias bound above is PPL_Z standard errors of the paired mean wide (3σ: a correct kernel
# fails by chance with probability 0.3 %).
PPL_Z = 3.0
# Relative L2 error of one attention output, kernel vs reference on fixed packed bytes: four of the
# five fp16 roundings of the ort-kernel entry are independent per element and add in quadrature
# over a vector, so 4u in norm (tests/gpu/test_kernels_gpu.py).
KERNEL_REL_L2 = 4 * U16   # 1.95e-3

# Packed codes, torch ↔ onnxruntime (measured, the session-2 default-model export run (scripts/bench_export.py)): every reference
# function reproduces its torch op bit for bit on identical inputs (real K/V of the default model
# and random inputs, tests/onnx/test_agreement.py).  Inside a whole model the K / V reaching an
# encode op differ: onnxruntime's GEMMs sum in another order than torch's (a few fp32 ulp after
# layer 0, SmolLM2-135M prefill: max |ΔK| 3.3e-6 at |K| 9.4), and a value within that distance of
# a rounding boundary gets the neighbouring code (or fp16 value, one unit in the last place).  On
# the default model's 12-token prompt the first such flip was one value code of one layer (kivi:
# layer 7, 1 of 576 value-code bytes = 1.7e-3); later layers then see inputs moved by a code step
# and differ more.  A flip of one value changes at most this many bytes (a code that straddles
# a byte boundary), so the first differing layer may always differ in this many bytes:
CODE_FLIP_BYTES = 2
# ...and its fp16 fields by at most one fp16 ulp, or this much absolutely: near zero the fp32
# noise of the model's layers (kivi export, 64 steps: up to 8 subnormal fp16 ulps ≈ 5e-7 in the
# first differing layer) exceeds fp16's spacing (6e-8 below 2^-14).
FP16_NOISE_FLOOR = 1e-5

_CODEC: dict[tuple[str, str, str], Tol] = {
    ("fp16", "codes", "float32"): Tol(0.0),
    ("fp16", "codes", "float16"): Tol(0.0),
    ("fp16", "codes", "bfloat16"): Tol(0.0),
    # nothing to flip, so no boundary noise: the paths differ by the attention arithmetic alone, one
    # rounding of the model dtype per attention output, which the next layers carry to the NLL with
    # gain ≲ 2 → 2u (a float32 model is staged in fp16 by the kernels, hence u16).  Measured (H100,
    # default model, 510 tokens): 1.3e-4 fp16, 3.0e-3 bf16.
    ("fp16", "ppl", "float32"): Tol(0.0, 2 * U16),     # 9.8e-4
    ("fp16", "ppl", "float16"): Tol(0.0, 2 * U16),
    ("fp16", "ppl", "bfloat16"): Tol(0.0, 2 * UBF16),  # 7.8e-3
}


def tolerance(codec: str, stage: str, dtype: str = "float32") -> Tol:
    """The tolerance for ``codec`` at ``stage`` and activation ``dtype``."""
    if stage not in STAGES:
        raise ValueError(f"unknown tolerance stage {stage!r}; known: {', '.join(STAGES)}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPES)}")
    return _CODEC.get((codec, stage, dtype), _DEFAULT[(stage, dtype)])


def table() -> list[dict]:
    """Rows for docs and reports."""
    from . import codecs
    return [dict(codec=c, stage=s, dtype=d, **dataclasses.asdict(tolerance(c, s, d)))
            for c in codecs.names() for s in STAGES for d in DTYPES]
