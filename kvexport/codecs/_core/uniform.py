"""Asymmetric uniform (min / scale) integer quantization over groups, KIVI-style.

For a group g of values: ``zero = min g``, ``scale = (max g − min g) / (2^b − 1)``,
both stored fp16; codes are ``round((x − zero) / scale)`` clamped to [0, 2^b − 1],
computed with the *stored* fp16 scale and zero so that decode = ``code·scale + zero``
(saturated at ±65504) is exactly what every backend reproduces.  A constant group has scale 0 and
decodes to its minimum.
"""

from __future__ import annotations

import torch

from .numerics import FP16_MAX, to_fp16


def asym_quantize(x: torch.Tensor, bits: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize fp32 ``x`` with one (scale, zero) per slice reduced over ``dim``.

    Returns (codes int64 like x, scale fp16 keepdim, zero fp16 keepdim).
    """
    levels = (1 << bits) - 1
    lo = x.amin(dim=dim, keepdim=True)
    hi = x.amax(dim=dim, keepdim=True)
    zero = to_fp16(lo)
    scale = to_fp16((hi - lo) / levels)
    s32, z32 = scale.to(torch.float32), zero.to(torch.float32)
    safe = torch.where(s32 > 0, s32, torch.ones_like(s32))
    codes = torch.round((x - z32) / safe).clamp(0, levels)
    codes = torch.where(s32 > 0, codes, torch.zeros_like(codes)).to(torch.int64)
    return codes, scale, zero


def asym_dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """fp32 ``code·scale + zero`` (scale, zero broadcast), clamped to ±65504: the fp16-rounded
    scale of a group spanning ±65504 overshoots (top code gives 65536, fp16 Inf)."""
    x = codes.to(torch.float32) * scale.to(torch.float32) + zero.to(torch.float32)
    return x.clamp(-FP16_MAX, FP16_MAX)
