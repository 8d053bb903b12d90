"""``ternary``: KVTQ fine-grained dynamic ternary digit planes.

"KVTQ: Compressing the KV Cache to Hardware Efficient Ternary Digits by
Fine-Grained Dynamic Quantization" (ICLR 2024 submission, OpenReview
eZAlb8fX5y).  Each step group is approximated by a sum of ternary digit
planes with their own dynamic steps (ABC-Net-style residual compensation)::

    x_g ≈ Σ_{p=1..P} s_{g,p} · t_{g,p},   t_{g,p} ∈ {−1, 0, +1}^n.

Values: a group is ``group`` channels of one token.  Keys: by default
(``key_axis='channel'``) a group is one channel over ``key_group`` tokens,
since key outliers sit in fixed channels (KIVI, Liu et al. 2024); the last
``tokens % key_group`` keys stay fp16 until their group fills.  With
``key_axis='token'`` keys are grouped like values.  The paper's operating point
is 4 planes for keys and 3 for values (keys have the larger range).  Planes are
fitted greedily on the residual; each plane is the least-squares optimal
(step, ternary vector) pair for the current residual (:func:`fit_plane`).
Trits are packed 5 per byte in base 3 (docs/formats/ternary.md).
Attention works on the packed form: scores are Σ_p s_p·<q_g, t_p> and the value
sum accumulates step-scaled weights per trit plane, never decoding the cache.
"""

from __future__ import annotations

import dataclasses

import torch

from .. import register
from .._core.base import Codec
from .._core.numerics import FP16_MAX, to_fp16
from .._core.packed import Field, Packed
from .._core.params import param

TRITS_PER_BYTE = 5            # 3^5 = 243 <= 256
NOMINAL_BITS_PER_PLANE = 8.0 / TRITS_PER_BYTE  # 1.6 code bits per coordinate per plane
MAX_PLANES = 8
_POW3 = (1, 3, 9, 27, 81)


@dataclasses.dataclass(frozen=True)
class TernaryParams:
    bits: float = param(5.6, lo=1.6, hi=12.8,
                        doc="nominal code bits per coordinate, mean of K and V: 0.8·(key_planes + value_planes), "
                            "a multiple of 0.8; sets the plane counts not given explicitly (odd plane to keys)")
    key_planes: int = param(None, lo=1, hi=MAX_PLANES, kind=int,
                            doc="ternary planes for keys; wins over the split of bits")
    value_planes: int = param(None, lo=1, hi=MAX_PLANES, kind=int,
                              doc="ternary planes for values; wins over the split of bits")
    group: int = param(64, lo=1, hi=1024, doc="channels per step group (per token, along head_dim); must divide head_dim")
    key_axis: str = param("channel", choices=("token", "channel"),
                          doc="key step groups: 'token' = per token over `group` channels, "
                              "'channel' = per channel over `key_group` tokens (KIVI: outlier channels)")
    key_group: int = param(64, lo=1, hi=4096, doc="tokens per key step group when key_axis='channel'")
    window: int = param(0, lo=0, hi=1 << 20, doc="fp16 window of newest tokens kept by the cache")

    def validate(self) -> None:
        total = self.bits / (NOMINAL_BITS_PER_PLANE / 2)
        if abs(total - round(total)) > 1e-6:
            raise ValueError(f"ternary.bits must be a multiple of 0.8 in [1.6, 12.8] "
                             f"(0.8 x total K+V planes), got {self.bits}")


def split_planes(total: int) -> tuple[int, int]:
    """Total K+V planes → (key planes, value planes); keys get the odd plane (KVTQ: keys need more)."""
    return (total + 1) // 2, total // 2


# ----- the plane fit (reference rule every backend reproduces) ----------------
def fit_plane(r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares ternary plane of fp32 residual groups ``r`` (..., n).

    For a support of size k the best step is the mean of the k largest |r|,
    and the error drops by S_k²/k with S_k their sum; so (KVTQ ternary fit, exact):

    1. a = |r| sorted descending; S_k = prefix sums of a, accumulated sequentially
       in fp64 (exact, so order-free, while the nonzero |r| span < 2^(29 − log2 n));
    2. k* = argmax_k S_k²/k in fp64 (ties → smallest k);
    3. step = fp16(fp32(S_k* / k*)) (fp64 divide, round to nearest even twice, saturating at 65504);
    4. t_i = sign(r_i) if |r_i| > step/2 else 0, with the *stored* fp16 step
       (the optimal trits for that step).

    Returns (step fp16 (..., 1), trits int8 (..., n) in {−1, 0, +1}).
    """
    n = r.shape[-1]
    a = r.abs().sort(dim=-1, descending=True).values
    s = a.to(torch.float64).cumsum(dim=-1)
    k = torch.arange(1, n + 1, dtype=torch.float64, device=r.device)
    kstar = (s.square() / k).argmax(dim=-1, keepdim=True)  # first maximum
    step = to_fp16((s.gather(-1, kstar) / (kstar + 1).to(torch.float64)).to(torch.float32))
    half = step.to(torch.float32) * 0.5
    trits = torch.where(r.abs() > half, torch.sign(r), torch.zeros_like(r)).to(torch.int8)
    return step, trits


def fit_planes(x: torch.Tensor, planes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy residual fit of ``planes`` ternary planes on fp32 groups ``x`` (..., n).

    Residual update r ← r − step·t in fp32 (exact product; one rounding).
    Returns (steps fp16 (..., P), trits int8 (..., P, n)).
    """
    r = x.clone()
    steps, trits = [], []
    for _ in range(planes):
        s, t = fit_plane(r)
        r = r - s.to(torch.float32) * t.to(torch.float32)
        steps.append(s)
        trits.append(t)
    return torch.cat(steps, dim=-1), torch.stack(trits, dim=-2)


# ----- base-3 trit packing ----------------------------------------------------
def trit_bytes(n: int) -> int:
    """Bytes of one packed row of ``n`` trits."""
    return (n + TRITS_PER_BYTE - 1) // TRITS_PER_BYTE


def pack_trits(t: torch.Tensor) -> torch.Tensor:
    """(..., n) trits in {−1, 0, +1} → (..., ceil(n/5)) uint8.

    Digit d = t mod 3 (0 → 0, +1 → 1, −1 → 2); trit j is base-3 digit j % 5
    (least significant first) of byte j // 5; padding digits are 0.
    """
    n = t.shape[-1]
    nb = trit_bytes(n)
    d = torch.remainder(t.to(torch.int64), 3)
    d = torch.nn.functional.pad(d, (0, nb * TRITS_PER_BYTE - n)).reshape(*t.shape[:-1], nb, TRITS_PER_BYTE)
    w = torch.tensor(_POW3, dtype=torch.int64, device=t.device)
    return (d * w).sum(-1).to(torch.uint8)


def unpack_trits(b: torch.Tensor, n: int) -> torch.Tensor:
    """(..., nbytes) uint8 → (..., n) int8 trits (inverse of :func:`pack_trits`)."""
    w = torch.tensor(_POW3, dtype=torch.int64, device=b.device)
    d = torch.div(b.to(torch.int64).unsqueeze(-1), w, rounding_mode="floor") % 3
    d = d.reshape(*b.shape[:-1], b.shape[-1] * TRITS_PER_BYTE)[..., :n]
    return (d == 1).to(torch.int8) - (d == 2).to(torch.int8)


@register
class TernaryCodec(Codec):
    name = "ternary"
    Params = TernaryParams
    version = 2  # 2: key_axis / key_group (per-channel keys by default)
    paper = ("KVTQ: Compressing the KV Cache to Hardware Efficient Ternary Digits by "
             "Fine-Grained Dynamic Quantization (ICLR 2024 submission, OpenReview eZAlb8fX5y)")
    RATE_SWEEP = ({"bits": 2.4}, {"bits": 4.0}, {"bits": 5.6}, {"bits": 7.2})  # planes K/V 2/1 … 5/4

    def planes(self, role: str) -> int:
        """Ternary planes used for ``role``: the explicit count, else the split of ``bits``."""
        p = self.params
        k, v = split_planes(int(round(p.bits / (NOMINAL_BITS_PER_PLANE / 2))))
        if role == "key":
            return p.key_planes if p.key_planes is not None else k
        return p.value_planes if p.value_planes is not None else v

    def _by_channel(self, role: str) -> bool:
        return role == "key" and self.params.key_axis == "channel"

    def check_head_dim(self, head_dim: int) -> None:
        super().check_head_dim(head_dim)
        if head_dim % self.params.group:
            raise ValueError(f"ternary.group ({self.params.group}) must divide head_dim ({head_dim})")

    def layout(self, head_dim: int, tokens: int, role: str = "key") -> list[Field]:
        pl, nb = self.planes(role), trit_bytes(head_dim)
        if self._by_channel(role):
            kg = self.params.key_group
            full, rest = divmod(tokens, kg)
            return [
                Field("trits", torch.uint8, (full * kg, pl, nb),
                      "ternary digits per (grouped token, plane): base 3, 5 per byte, digit t mod 3, LSD first",
                      token_axis=False),
                Field("steps", torch.float16, (full, pl, head_dim),
                      "step per (token group, plane, channel)", token_axis=False),
                Field("residual", torch.float16, (rest, head_dim), "newest tokens % key_group keys, fp16",
                      token_axis=False),
            ]
        return [
            Field("trits", torch.uint8, (tokens, pl, nb),
                  "ternary digits per (token, plane): base 3, 5 per byte, digit t mod 3, LSD first"),
            Field("steps", torch.float16, (tokens, pl, head_dim // self.params.group),
                  "step per (token, plane, channel group)"),
        ]

    def _encode(self, x: torch.Tensor, role: str) -> dict[str, torch.Tensor]:
        b, h, t, d = x.shape
        pl = self.planes(role)
        if self._by_channel(role):
            kg = self.params.key_group
            nfull = t // kg
            # (B,H,NG,kg,D) → groups of kg tokens of one channel: (B,H,NG,D,kg)
            xg = x[:, :, :nfull * kg].reshape(b, h, nfull, kg, d).transpose(-1, -2)
            steps, trits = fit_planes(xg, pl)  # (B,H,NG,D,P), (B,H,NG,D,P,kg)
            trits = trits.permute(0, 1, 2, 5, 4, 3).reshape(b, h, nfull * kg, pl, d)
            return {"trits": pack_trits(trits), "steps": steps.transpose(-1, -2).contiguous(),
                    "residual": to_fp16(x[:, :, nfull * kg:])}
        g = self.params.group
        steps, trits = fit_planes(x.reshape(b, h, t, d // g, g), pl)
        # steps (B,H,T,G,P) → (B,H,T,P,G); trits (B,H,T,G,P,g) → (B,H,T,P,D)
        trits = trits.permute(0, 1, 2, 4, 3, 5).reshape(b, h, t, pl, d)   # pl, not -1: t may be 0
        return {"trits": pack_trits(trits), "steps": steps.transpose(-1, -2).contiguous()}

    def _planes(self, packed: Packed) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token keys/values: (trits fp32 (B,H,T,P,G,g), steps fp32 (B,H,T,P,G)).
        Per-channel keys: (trits fp32 (B,H,NG,kg,P,D) of the grouped tokens, steps fp32 (B,H,NG,P,D))."""
        b, h, t, d = packed.shape
        tr = unpack_trits(packed["trits"], d).to(torch.float32)
        st = packed["steps"].to(torch.float32)
        if self._by_channel(packed.role):
            kg = self.params.key_group
            return tr.reshape(b, h, st.shape[2], kg, st.shape[3], d), st
        g = self.params.group
        return tr.reshape(b, h, t, st.shape[3], d // g, g), st

    def _decode(self, packed: Packed) -> torch.Tensor:
        b, h, t, d = packed.shape
        tr, st = self._planes(packed)
        if self._by_channel(packed.role):
            full = (tr * st.unsqueeze(3)).sum(dim=4).reshape(b, h, tr.shape[2] * tr.shape[3], d)
            full = full.clamp(-FP16_MAX, FP16_MAX)  # plane sums of saturated steps overshoot ±65504
            return torch.cat([full, packed["residual"].to(torch.float32)], dim=2)
        return (tr * st.unsqueeze(-1)).sum(dim=3).reshape(b, h, t, d).clamp(-FP16_MAX, FP16_MAX)

    def _scores(self, qg: torch.Tensor, packed_k: Packed) -> torch.Tensor:
        """Per token: Σ_p Σ_g s_{t,p,g} · <q_g, t_{t,p,g}> (trit dots are adds/subtracts, times the step).
        Per channel: Σ_p <q ⊙ s_{n,p}, t_{t,p}>, the query scaled once per (token group n, plane);
        the fp16 residual keys are a plain dot product."""
        b, h, m, d = qg.shape
        tr, st = self._planes(packed_k)
        if self._by_channel(packed_k.role):
            # Σ_p Σ_c (q_c · s_{grp,p,c}) · t_{tok,p,c}: one step-scaled query per (token group, plane)
            out = qg.new_zeros(b, h, m, tr.shape[2], tr.shape[3])
            for p in range(tr.shape[4]):
                qs = qg[:, :, :, None, :] * st[:, :, None, :, p]  # (B,H,M,NG,D)
                out += torch.einsum("bhmnd,bhnkd->bhmnk", qs, tr[:, :, :, :, p])
            res = qg @ packed_k["residual"].to(torch.float32).transpose(-1, -2)
            return torch.cat([out.reshape(b, h, m, -1), res], dim=-1)
        ng = tr.shape[4]
        qr = qg.reshape(b, h, m, ng, -1)
        out = qg.new_zeros(b, h, m, packed_k.tokens)
        for p in range(tr.shape[3]):
            dots = torch.einsum("bhmgc,bhtgc->bhmtg", qr, tr[:, :, :, p])
            out += (dots * st[:, :, None, :, p]).sum(-1)
        return out

    def _weighted_sum(self, pg: torch.Tensor, packed_v: Packed) -> torch.Tensor:
        """Σ_p Σ_t (p_t · s_{t,p,g}) · t_{t,p,g}: step-scaled weights accumulated per trit plane."""
        b, h, m, t = pg.shape
        d = packed_v.head_dim
        tr, st = self._planes(packed_v)
        ng = tr.shape[4]
        out = pg.new_zeros(b, h, m, ng, d // ng)
        for p in range(tr.shape[3]):
            w = pg.unsqueeze(-1) * st[:, :, None, :, p]  # (B,H,M,T,G)
            out += torch.einsum("bhmtg,bhtgc->bhmgc", w, tr[:, :, :, p])
        return out.reshape(b, h, m, d)
