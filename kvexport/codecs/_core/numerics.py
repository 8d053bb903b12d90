"""Input checks and the documented handling of awkward numbers.

Policy (docs/FORMATS.md, "Numerics"): encoders compute in fp32; NaN becomes 0
and ±Inf becomes ±65504 (fp16's largest finite value) before encoding, so a
packed cache never holds NaN or Inf. Norm-like side values are stored as fp16 of
an RMS (‖x‖/√n), which cannot overflow for fp16 inputs; larger values (fp32 /
bf16 inputs beyond fp16 range) saturate at 65504.
"""

from __future__ import annotations

import torch

FP16_MAX = 65504.0
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_kv(x: torch.Tensor, what: str = "x") -> None:
    """Raise a one-line ``ValueError`` unless ``x`` is a (batch, heads, tokens, dim) float tensor."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{what} must have shape (batch, heads, tokens, head_dim), got {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{what} must be float16, bfloat16 or float32, got {x.dtype}")


def sanitize(x: torch.Tensor) -> torch.Tensor:
    """fp32 copy with NaN → 0 and ±Inf → ±65504."""
    x = x.to(torch.float32)
    return torch.nan_to_num(x, nan=0.0, posinf=FP16_MAX, neginf=-FP16_MAX)


def to_fp16(x: torch.Tensor) -> torch.Tensor:
    """Saturating cast to fp16 (no Inf is ever produced)."""
    return x.to(torch.float32).clamp(-FP16_MAX, FP16_MAX).to(torch.float16)


def store_fp16(x: torch.Tensor) -> torch.Tensor:
    """fp16 copy of K/V under the policy (NaN → 0, ±Inf and |x| > 65504 → ±65504): the one
    conversion for every fp16 tail, window or residual a session, export or kernel path stores."""
    return to_fp16(sanitize(x))


def count_sanitized(x: torch.Tensor) -> torch.Tensor:
    """int64 (2,) on x's device (no host sync): [NaN that :func:`store_fp16` zeroes, values it
    clamps to ±65504 (±Inf included)]."""
    a = x.to(torch.float32).abs()  # fp32: a bf16 65504 would round to 65536; NaN compares False
    return torch.stack([a.isnan().sum(), (a > FP16_MAX).sum()])


def rms_side(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """fp16 RMS ‖x‖/√n along ``dim`` (keepdim), computed in fp64 to avoid overflow."""
    r = x.to(torch.float64).pow(2).mean(dim=dim, keepdim=True).sqrt()
    return to_fp16(r)


def norm_from_rms(rms16: torch.Tensor, n: int) -> torch.Tensor:
    """fp32 norm reconstructed from a stored fp16 RMS side value."""
    return rms16.to(torch.float32) * (n ** 0.5)
