"""``qjl``: 1-bit quantized Johnson–Lindenstrauss sketch of keys, low-bit values.

Zandieh, Daliri, Han, "QJL: 1-Bit Quantized JL Transform for KV Cache
Quantization with Zero Overhead" (arXiv:2406.03482, AAAI 2025).

Keys.  With a Gaussian sketch S ∈ R^{m×d} (i.i.d. N(0, 1)) a key k is stored as
the m sign bits sign(S k) and its norm; a query q is sketched without
quantization and the inner product is estimated asymmetrically (paper, Def. 3.1
/ Lemma 3.2, unbiased, variance ≤ (π/2)·‖q‖²‖k‖²/m):

    <q, k>  ≈  sqrt(π/2) / m · ‖k‖ · <S q, sign(S k)>.

Outliers (paper §4, "outliers in key embeddings"): per group of ``group``
tokens the ``outliers`` channels of largest norm over the group's keys are
sketched separately, with their own sketch S_o (``outlier_m`` rows) and their
own norm; the inliers are sketched with those channels zeroed, and the score is
the sum of both estimates.  The keys of the last, incomplete group stay fp16 in
``residual`` until the group fills (the authors' streaming code keeps such a
full-precision buffer).  Values: per-token asymmetric integer quantization over
groups of ``value_group`` channels (KIVI-style, as in the authors' code).

Defaults are the authors' LongBench configuration (head_dim 128: m = 256 sketch
bits, 8 outlier channels, 256 outlier sketch bits, groups of 32 tokens, 2-bit
values in groups of 32 channels) scaled to our head_dim 64: ``bits`` = m/d = 2,
``outliers`` = 4, ``outlier_m`` = 128.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from .. import register
from .._core import rng
from .._core.base import Codec
from .._core.bitpack import pack_bits, packed_bytes, unpack_bits
from .._core.numerics import FP16_MAX, norm_from_rms, rms_side, to_fp16
from .._core.packed import Field, Packed
from .._core.params import param
from .._core.uniform import asym_dequantize, asym_quantize

SQRT_HALF_PI = math.sqrt(math.pi / 2.0)


@dataclasses.dataclass(frozen=True)
class QjlParams:
    bits: float = param(2.0, lo=0.125, hi=64.0,
                        doc="key sketch bits per coordinate: m = bits*head_dim (ignored when m is given)")
    m: int = param(None, lo=8, hi=8192, multiple_of=8, kind=int,
                   doc="key sketch rows m (sign bits per key); overrides bits when given")
    outliers: int = param(4, lo=0, hi=255, doc="outlier channels per token group (< head_dim); 0 disables")
    outlier_m: int = param(128, lo=8, hi=8192, multiple_of=8, doc="sketch rows for the outlier channels")
    group: int = param(32, lo=1, hi=4096, doc="tokens per outlier-selection group")
    value_bits: int = param(2, lo=1, hi=8, doc="code bits per value coordinate")
    value_group: int = param(32, lo=1, hi=1024, doc="channels per value quantization group (per token)")
    seed: int = param(0, lo=0, hi=2**31 - 1, doc="seed of the sketches S and S_o")
    window: int = param(0, lo=0, hi=1 << 20, doc="fp16 window of newest tokens kept by the cache")

    def validate(self) -> None:
        """Precedence: an explicit ``m`` wins over ``bits``; giving both (bits not at its
        default) is ambiguous and rejected.  m = bits*head_dim is checked per head_dim."""
        if self.m is not None and self.bits != QjlParams.bits:
            raise ValueError(f"qjl.m ({self.m}) and qjl.bits ({self.bits}) both set: give one of them")


@register
class QjlCodec(Codec):
    name = "qjl"
    Params = QjlParams
    version = 1
    paper = "QJL (Zandieh, Daliri, Han, arXiv:2406.03482, AAAI 2025)"
    # m and value_bits rise together; outlier_m follows m.
    RATE_SWEEP = ({"bits": 1.0, "outlier_m": 64, "value_bits": 2},
                  {"bits": 2.0, "outlier_m": 128, "value_bits": 3},
                  {"bits": 4.0, "outlier_m": 256, "value_bits": 4})

    # ----- shapes ----------------------------------------------------------
    def sketch_rows(self, head_dim: int) -> int:
        """m: ``params.m`` if given, else bits*head_dim (must be an integer multiple of 8)."""
        p = self.params
        if p.m is not None:
            return p.m
        m = p.bits * head_dim
        if not float(m).is_integer() or int(m) % 8 or int(m) < 8:
            raise ValueError(f"qjl.bits ({p.bits}) * head_dim ({head_dim}) = {m} must be a positive "
                             f"integer multiple of 8 (or give qjl.m)")
        return int(m)

    def check_head_dim(self, head_dim: int) -> None:
        super().check_head_dim(head_dim)
        p = self.params
        self.sketch_rows(head_dim)
        if head_dim % p.value_group:
            raise ValueError(f"qjl.value_group ({p.value_group}) must divide head_dim ({head_dim})")
        if p.outliers >= head_dim:
            raise ValueError(f"qjl.outliers must be in [0, {head_dim - 1}] for head_dim {head_dim}, "
                             f"got {p.outliers}")

    def _grouped(self) -> bool:
        return self.params.outliers > 0

    def _split(self, tokens: int) -> tuple[int, int]:
        """(sketched tokens, residual tokens): whole outlier groups are sketched."""
        if not self._grouped():
            return tokens, 0
        full = (tokens // self.params.group) * self.params.group
        return full, tokens - full

    def layout(self, head_dim: int, tokens: int, role: str = "key") -> list[Field]:
        p = self.params
        if role == "value":
            g = head_dim // p.value_group
            return [
                Field("codes", torch.uint8, (tokens, packed_bytes(head_dim, p.value_bits)),
                      "value_bits-bit codes, LSB-first per token"),
                Field("scale", torch.float16, (tokens, g), "per (token, channel group) scale"),
                Field("zero", torch.float16, (tokens, g), "per (token, channel group) minimum"),
            ]
        m = self.sketch_rows(head_dim)
        full, rest = self._split(tokens)
        fields = [
            Field("bits", torch.uint8, (full, m // 8), "sign bits of S·k_inlier, bit j = [(S k)_j >= 0], LSB-first"),
            Field("norm", torch.float16, (full,), "RMS of the inlier key over head_dim: ‖k_in‖/sqrt(d)"),
        ]
        if self._grouped():
            fields += [
                Field("outlier_bits", torch.uint8, (full, p.outlier_m // 8),
                      "sign bits of S_o·k_outlier, LSB-first"),
                Field("outlier_norm", torch.float16, (full,), "RMS of the outlier channels: ‖k_o‖/sqrt(outliers)"),
                Field("outlier_idx", torch.uint8, (full // p.group, p.outliers),
                      "outlier channel indices per token group, ascending", token_axis=False),
                Field("residual", torch.float16, (rest, head_dim),
                      "newest tokens % group keys, fp16", token_axis=False),
            ]
        return fields

    def constants(self, head_dim: int) -> dict[str, torch.Tensor]:
        """{"sketch": S (m, d), "outlier_sketch": S_o (outlier_m, d)}, fp32 N(0, 1) entries."""
        self.check_head_dim(head_dim)
        p = self.params
        return {"sketch": rng.gaussian_matrix(p.seed, self.sketch_rows(head_dim), head_dim, "qjl/sketch"),
                "outlier_sketch": rng.gaussian_matrix(p.seed, p.outlier_m, head_dim, "qjl/outlier_sketch")}

    def _consts(self, head_dim: int, device: torch.device) -> dict[str, torch.Tensor]:
        return {k: v.to(device) for k, v in self.constants(head_dim).items()}

    # ----- encode / decode -------------------------------------------------
    def outlier_channels(self, x: torch.Tensor) -> torch.Tensor:
        """Outlier channels of whole groups: x (B, H, G*group, D) fp32 → (B, H, G, outliers) int64.

        The ``outliers`` channels of largest fp32 sum of squares over the group's
        tokens; ties go to the lower channel index; returned in ascending order.
        """
        p = self.params
        b, h, t, d = x.shape
        energy = x.reshape(b, h, t // p.group, p.group, d).pow(2).sum(3)
        order = torch.sort(energy, dim=-1, descending=True, stable=True).indices
        return order[..., : p.outliers].sort(dim=-1).values

    def _encode(self, x: torch.Tensor, role: str) -> dict[str, torch.Tensor]:
        p = self.params
        b, h, t, d = x.shape
        if role == "value":
            xg = x.reshape(b, h, t, d // p.value_group, p.value_group)
            codes, scale, zero = asym_quantize(xg, p.value_bits, dim=4)
            return {"codes": pack_bits(codes.reshape(b, h, t, d), p.value_bits),
                    "scale": scale.squeeze(4), "zero": zero.squeeze(4)}
        c = self._consts(d, x.device)
        full, _ = self._split(t)
        k = x[:, :, :full]
        if not self._grouped():
            return {"bits": pack_bits(k @ c["sketch"].T >= 0, 1), "norm": rms_side(k).squeeze(-1)}
        idx = self.outlier_channels(k)                               # (B, H, G, o)
        mask = self._mask(idx, d).repeat_interleave(p.group, dim=2)  # (B, H, full, D) True = outlier
        k_in = k.masked_fill(mask, 0.0)
        k_out = k.masked_fill(~mask, 0.0)
        k_o = torch.gather(k, 3, idx.repeat_interleave(p.group, dim=2))
        return {"bits": pack_bits(k_in @ c["sketch"].T >= 0, 1),
                "norm": rms_side(k_in).squeeze(-1),
                "outlier_bits": pack_bits(k_out @ c["outlier_sketch"].T >= 0, 1),
                "outlier_norm": rms_side(k_o).squeeze(-1),
                "outlier_idx": idx.to(torch.uint8),
                "residual": to_fp16(x[:, :, full:])}

    @staticmethod
    def _mask(idx: torch.Tensor, d: int) -> torch.Tensor:
        """(…, o) channel indices → (…, d) bool, True on those channels."""
        m = torch.zeros(*idx.shape[:-1], d, dtype=torch.bool, device=idx.device)
        return m.scatter(-1, idx.long(), True)

    def _signs(self, packed: Packed, name: str, rows: int) -> torch.Tensor:
        """Stored bits → ±1 fp32 (B, H, full, rows)."""
        return unpack_bits(packed[name], 1, rows).to(torch.float32) * 2.0 - 1.0

    def _decode(self, packed: Packed) -> torch.Tensor:
        """Values: code·scale + zero.  Keys: the linear reconstruction (paper, Def. 3.1)
        k̂ = sqrt(π/2)/m·‖k_in‖·(Sᵀ s)|_inliers + sqrt(π/2)/m_o·‖k_o‖·(S_oᵀ s_o)|_outliers,
        so that <q, k̂> equals the score estimator exactly (short of the ±65504 clamp that keeps
        the reconstruction of a saturated key finite in fp16)."""
        p = self.params
        b, h, t, d = packed.shape
        if packed.role == "value":
            codes = unpack_bits(packed["codes"], p.value_bits, d).reshape(b, h, t, d // p.value_group, p.value_group)
            deq = asym_dequantize(codes, packed["scale"].unsqueeze(4), packed["zero"].unsqueeze(4))
            return deq.reshape(b, h, t, d)
        c = self._consts(d, packed.device)
        m = self.sketch_rows(d)
        full, _ = self._split(t)
        k_in = (self._signs(packed, "bits", m) @ c["sketch"]) * (
            norm_from_rms(packed["norm"], d) * (SQRT_HALF_PI / m)).unsqueeze(-1)
        if not self._grouped():
            return k_in.clamp(-FP16_MAX, FP16_MAX)
        mask = self._mask(packed["outlier_idx"], d).repeat_interleave(p.group, dim=2)
        k_out = (self._signs(packed, "outlier_bits", p.outlier_m) @ c["outlier_sketch"]) * (
            norm_from_rms(packed["outlier_norm"], p.outliers) * (SQRT_HALF_PI / p.outlier_m)).unsqueeze(-1)
        k = torch.where(mask, k_out, k_in).clamp(-FP16_MAX, FP16_MAX)
        return torch.cat([k, packed["residual"].to(torch.float32)], dim=2)

    # ----- attention on the packed form ------------------------------------
    def _scores(self, qg: torch.Tensor, packed_k: Packed) -> torch.Tensor:
        """Estimator on the bits: (B, H, M, D) fp32 → (B, H, M, T).

        S q is computed once per query; per group the outlier channels' share
        S[:, idx] q[idx] is moved from the inlier sketch to the outlier sketch
        (S_o[:, idx] q[idx]), then each score is a ±1 dot product scaled by
        sqrt(π/2)/m·‖k‖.  Residual keys are exact fp16."""
        p = self.params
        b, h, t, d = packed_k.shape
        mq = qg.shape[2]
        c = self._consts(d, qg.device)
        m = self.sketch_rows(d)
        full, _ = self._split(t)
        sq = qg @ c["sketch"].T                                           # (B, H, M, m)
        s = self._signs(packed_k, "bits", m)                              # (B, H, full, m)
        w = norm_from_rms(packed_k["norm"], d) * (SQRT_HALF_PI / m)       # (B, H, full)
        if not self._grouped():
            return (sq @ s.transpose(-1, -2)) * w.unsqueeze(2)
        ng, o = full // p.group, p.outliers
        idx = packed_k["outlier_idx"].long()                               # (B, H, G, o)
        q_o = torch.gather(qg.unsqueeze(2).expand(b, h, ng, mq, d), 4,
                           idx.unsqueeze(3).expand(b, h, ng, mq, o))       # (B, H, G, M, o)
        sq_in = sq.unsqueeze(2) - q_o @ c["sketch"].T[idx]                 # S q_inlier per group
        sq_o = q_o @ c["outlier_sketch"].T[idx]                            # S_o q_outlier per group
        s_o = self._signs(packed_k, "outlier_bits", p.outlier_m)
        w_o = norm_from_rms(packed_k["outlier_norm"], o) * (SQRT_HALF_PI / p.outlier_m)
        grp = (b, h, ng, p.group)
        inl = (sq_in @ s.reshape(*grp, m).transpose(-1, -2)) * w.reshape(*grp).unsqueeze(3)
        out = (sq_o @ s_o.reshape(*grp, p.outlier_m).transpose(-1, -2)) * w_o.reshape(*grp).unsqueeze(3)
        sc = (inl + out).permute(0, 1, 3, 2, 4).reshape(b, h, mq, full)
        res = qg @ packed_k["residual"].to(torch.float32).transpose(-1, -2)
        return torch.cat([sc, res], dim=-1)

    def _weighted_sum(self, pg: torch.Tensor, packed_v: Packed) -> torch.Tensor:
        """Σ_t p_t (code_t·scale_t + zero_t), accumulated per channel group: (B, H, M, T) → (B, H, M, D)."""
        p = self.params
        b, h, t, d = packed_v.shape
        ng = d // p.value_group
        codes = unpack_bits(packed_v["codes"], p.value_bits, d).to(torch.float32).reshape(b, h, t, ng, p.value_group)
        scale = packed_v["scale"].to(torch.float32)                       # (B, H, T, ng)
        zero = packed_v["zero"].to(torch.float32)
        acc = torch.einsum("bhmt,bhtn,bhtnc->bhmnc", pg, scale, codes)
        acc = acc + (pg @ zero).unsqueeze(-1)
        return acc.reshape(b, h, pg.shape[2], d)
