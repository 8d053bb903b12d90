"""``fibquant``: norm + Haar rotation + a shared radial–angular vector codebook.

Lee & Kim, "FibQuant: Universal Vector Quantization for Random-Access KV-Cache
Compression" (arXiv:2605.11478, 2026).  A vector x is stored as its norm (fp16
RMS ‖x‖/√d) and, for the rotated unit vector y = (x/‖x‖) Πᵀ split into d/k
blocks of k coordinates, one index per block into a shared codebook C (N, k):
x̂ = ‖x‖ · concat_j C[idx_j] Π.  Rate = log2(N)/k bits per coordinate, so
fractional (k=4, N=64 → 1.5) and sub-one-bit (k=8, N=16 → 0.5) rates exist.

After a Haar rotation a k-block of a unit vector is the "spherical-Beta"
source: direction uniform on S^{k−1}, ‖block‖² ~ Beta(k/2, (d−k)/2).  The
codebook is built for that source: radii at Beta quantiles × quasi-uniform
directions (Fibonacci circle / sphere for k = 2, 3, Roberts–Kronecker points
mapped to S^{k−1} for k ≥ 4), refined by multi-restart Lloyd–Max (k-means) on
deterministic samples of the exact source; the restart with the lowest
held-out MSE is kept.  With k = 1 and N = 2^b this is ``turbo``'s scalar code.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import sys
import time

import numpy as np
import torch

from ... import _cache
from .. import register
from .._core.base import Codec
from .._core.bitpack import pack_bits, packed_bytes, unpack_bits
from .._core.numerics import norm_from_rms, rms_side
from .._core.packed import Field, Packed
from .._core.params import param
from .._core.rng import generator, haar_rotation
from .._core.vq import RotatedCodebook, nearest_codeword

_MAX_N = 1 << 16
_DEFAULT_BITS = 2.0   # paper's headline comparison point: b = 2 (8x vs fp16), k = 4 → N = 256
_FIT_VERSION = 2      # bump when the codebook construction changes (names the disk cache)
_DISK_CACHE_AFTER_S = 2.0
_PROGRESS_AFTER_S = 3.0  # a codebook fit longer than this shows a progress bar (with ETA) on stderr
_AUTO_MAX_N = 256        # k chosen from bits keeps N here: Lloyd–Max on ~16k samples stays meaningful
_K_ORDER = (4, 2, 1, 8, 16, 3, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15)   # 4: the paper's block size


@dataclasses.dataclass(frozen=True)
class FibQuantParams:
    k: int = param(None, lo=1, hi=16, kind=int,
                   doc="block size: coordinates per codebook index (must divide head_dim); default 4, "
                       f"or for a given bits the largest of 2, 1 keeping N <= {_AUTO_MAX_N}")
    bits: float = param(None, lo=1 / 16, hi=16.0, kind=float,
                        doc="rate log2(N)/k in bits per coordinate; give bits or N (default 2)")
    N: int = param(None, lo=2, hi=_MAX_N, power_of_two=True, kind=int,
                   doc="codebook size (power of two); give bits or N")
    restarts: int = param(2, lo=1, hi=64, doc="Lloyd–Max restarts (lowest held-out MSE kept)")
    iters: int = param(30, lo=1, hi=1000, doc="Lloyd–Max iterations per restart")
    samples: int = param(16384, lo=1024, hi=1 << 22,
                         doc="training samples of the block source (at least 4·N are used)")
    seed: int = param(0, lo=0, hi=2**31 - 1, doc="seed of the rotation and the codebook fit")
    window: int = param(0, lo=0, hi=1 << 20, doc="fp16 window of newest tokens kept by the cache")

    def validate(self) -> None:
        """Resolve ``bits`` ↔ ``N`` (N = 2^(bits·k)) and store both, so equal codecs hash equal.

        Neither given → bits = 2.  Only N → bits = log2(N)/k.  Only bits → N = 2^(bits·k),
        which must be a power of two ≤ 65536.  Both → they must agree.  ``k`` not given: 4,
        unless ``bits`` (without N) would need N > 256 there; then the first k of 2, 1, 8, ...
        that gives a power-of-two N ≤ 256 (``bits=4`` → k = 2, N = 256).  N > samples is refused.
        """
        k = self.k
        if k is None:
            k = 4 if self.N is not None else _auto_k(_DEFAULT_BITS if self.bits is None else self.bits)
            object.__setattr__(self, "k", k)
        if self.N is None:
            bits = _DEFAULT_BITS if self.bits is None else self.bits
            e = bits * k
            if abs(e - round(e)) > 1e-9 or not 1 <= round(e) <= 16:
                raise ValueError(f"fibquant.bits must make N = 2^(bits·k) a power of two in [2, 65536] "
                                 f"(bits·k an integer in [1, 16]) for k={k}, got bits={bits}")
            n = 1 << int(round(e))
        else:
            n = self.N
            if self.bits is not None and abs(self.bits * k - math.log2(n)) > 1e-9:
                raise ValueError(f"fibquant.bits ({self.bits}) disagrees with fibquant.N ({n}) for k={k}: "
                                 f"need bits = log2(N)/k = {math.log2(n) / k}")
        if n > self.samples:
            raise ValueError(f"fibquant.N ({n}) exceeds fibquant.samples ({self.samples}): Lloyd–Max needs more "
                             "training samples than codewords; lower fibquant.N (or bits, k) or raise fibquant.samples")
        object.__setattr__(self, "N", n)
        object.__setattr__(self, "bits", math.log2(n) / k)


def _auto_k(bits: float) -> int:
    """Block size for rate ``bits``: the first of ``_K_ORDER`` with N = 2^(bits·k) a power of two
    ≤ ``_AUTO_MAX_N``, else the first with any N ≤ 65536, else 4 (validate names the bad bits)."""
    ok = [k for k in _K_ORDER if abs(bits * k - round(bits * k)) <= 1e-9 and 1 <= round(bits * k) <= 16]
    small = [k for k in ok if 1 << int(round(bits * k)) <= _AUTO_MAX_N]
    return (small or ok or [4])[0]


# ----- codebook construction ---------------------------------------------------
_PHI = (1 + 5 ** 0.5) / 2


def _roberts(k: int) -> float:
    """Generalised golden ratio: the positive root of x^(k+1) = x + 1 (Roberts 2018)."""
    x = 2.0
    for _ in range(64):
        x = (1 + x) ** (1.0 / (k + 1))
    return x


def _directions(k: int, m: int, shell: int) -> np.ndarray:
    """(m, k) float64 quasi-uniform unit vectors; ``shell`` staggers successive shells."""
    i = np.arange(m, dtype=np.float64)
    if k == 1:
        return np.where(i % 2 == 0, 1.0, -1.0)[:, None]
    if k == 2:  # Fibonacci (equal-angle) circle, shells offset by the golden fraction
        th = 2 * np.pi * (i + (shell / _PHI) % 1.0) / m
        return np.stack([np.cos(th), np.sin(th)], 1)
    if k == 3:  # Fibonacci sphere (equal-area latitudes, golden-angle longitudes)
        z = 1.0 - (2 * i + 1) / m
        th = 2 * np.pi * ((i / _PHI) + shell / _PHI) % (2 * np.pi)
        r = np.sqrt(np.maximum(0.0, 1 - z * z))
        return np.stack([r * np.cos(th), r * np.sin(th), z], 1)
    # k >= 4: Roberts–Kronecker points in [0,1)^k → Gaussian quantiles → normalise onto S^{k-1}
    from scipy.special import ndtri
    g = _roberts(k)
    alpha = (1.0 / g) ** np.arange(1, k + 1)
    u = (0.5 + np.outer(i + shell * m + 1, alpha)) % 1.0
    v = ndtri(np.clip(u, 1e-12, 1 - 1e-12))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _shell_counts(k: int, n: int, radii: np.ndarray) -> np.ndarray:
    """Directions per shell, ∝ r^(k−1) (the shell's surface), at least 1 each, summing to N."""
    if k == 1:
        return np.full(len(radii), 2)
    w = radii ** (k - 1)
    m = np.maximum(1, np.floor(n * w / w.sum())).astype(np.int64)
    order = np.argsort(-(n * w / w.sum() - m))  # largest remainders take the spare points
    i = 0
    while m.sum() < n:
        m[order[i % len(m)]] += 1
        i += 1
    while m.sum() > n:
        j = int(np.argmax(m))
        m[j] -= 1
    return m


def _shell_choices(k: int, n: int) -> list[int]:
    """Candidate radial shell counts L, best guess first: about N^(1/k) radii (rounded down)."""
    if k == 1:
        return [n // 2]
    base = 1 << max(0, math.floor(math.log2(n) / k - 0.5))
    out = []
    for s in (base, 2 * base, max(1, base // 2), 3 * base, 4 * base):
        if s not in out and (s == 1 or s <= n // 2):
            out.append(s)
    return out


def _beta_radii(d: int, k: int, shells: int) -> np.ndarray:
    """Mean radius of each of ``shells`` equal-probability bins of ρ² ~ Beta(k/2, (d−k)/2).

    E[ρ; ρ² ∈ (t0, t1)] = B(a+½, b)/B(a, b) · (I_{t1}(a+½, b) − I_{t0}(a+½, b)).
    """
    if d == k:
        return np.ones(shells)
    from scipy.special import betainc, betaincinv, betaln
    a, b = k / 2, (d - k) / 2
    edges = betaincinv(a, b, np.arange(shells + 1) / shells)  # Beta quantiles
    ratio = math.exp(betaln(a + 0.5, b) - betaln(a, b))
    return ratio * np.diff(betainc(a + 0.5, b, edges)) * shells


def _init_codebook(d: int, k: int, n: int, shells: int, rng: np.random.Generator | None) -> np.ndarray:
    """Radial–angular codebook (N, k): Beta-quantile radii × quasi-uniform directions.

    ``shells`` radii at the conditional means of equal-probability Beta bins; shell j holds
    M_j ∝ r_j^(k−1) directions.  ``rng`` given → each shell's directions get an
    independent Haar rotation (restart diversity).
    """
    radii = _beta_radii(d, k, shells)
    counts = _shell_counts(k, n, radii)
    out = []
    for j in range(shells):
        dirs = _directions(k, int(counts[j]), j)
        if rng is not None and k > 1:
            q, r = np.linalg.qr(rng.standard_normal((k, k)))
            dirs = dirs @ (q * np.sign(np.diag(r))).T
        out.append(radii[j] * dirs)
    return np.concatenate(out, 0)


def block_samples(d: int, k: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """(count, k) float64 draws of a k-block of a uniform unit vector in R^d: g/√(‖g‖² + χ²_{d−k})."""
    g = rng.standard_normal((count, k))
    rest = rng.chisquare(d - k, count) if d > k else np.zeros(count)
    return g / np.sqrt((g * g).sum(1) + rest)[:, None]


def _lloyd(x: torch.Tensor, c: torch.Tensor, iters: int, step=lambda n: None) -> torch.Tensor:
    """k-means (Lloyd–Max on samples) in float64; empty cells keep their codeword.
    ``step(n)`` is told each finished iteration (and the skipped ones on convergence)."""
    n, k = c.shape
    prev = math.inf
    x32 = x.float()
    for it in range(iters):
        step(1)
        idx = nearest_codeword(x32, c.float())  # fp32 search, fp64 centroid sums
        cnt = torch.bincount(idx, minlength=n).to(x.dtype)
        s = torch.zeros_like(c).index_add_(0, idx, x)
        c = torch.where(cnt[:, None] > 0, s / cnt.clamp_min(1)[:, None], c)
        mse = float(((x - c[idx]) ** 2).sum(1).mean())
        if prev - mse <= 1e-9 * mse:  # converged (prev = inf on the first pass)
            step(iters - it - 1)
            break
        prev = mse
    return c


def _mse(x: torch.Tensor, c: torch.Tensor) -> float:
    return float(((x - c[nearest_codeword(x, c)]) ** 2).sum(1).mean())


def _fit(d: int, k: int, n: int, restarts: int, iters: int, samples: int, seed: int) -> np.ndarray:
    rng = generator(seed, f"fibquant/codebook/{d}/{k}/{n}")
    count = max(samples, 4 * n)
    train = torch.from_numpy(block_samples(d, k, count, rng))
    held = torch.from_numpy(block_samples(d, k, max(count // 2, 2 * n), rng))
    best, best_mse = None, math.inf
    choices = _shell_choices(k, n)
    from tqdm.auto import tqdm
    with tqdm(total=restarts * iters, desc=f"fibquant codebook (d={d}, k={k}, N={n})", unit="iter",
              file=sys.stderr, delay=_PROGRESS_AFTER_S, leave=False) as bar:
        for r in range(restarts):
            # restart r: shell count choices[r % len], rotated directions after the first pass
            shells = choices[r % len(choices)]
            c0 = torch.from_numpy(_init_codebook(d, k, n, shells, None if r < len(choices) else rng))
            c = _lloyd(train, c0, iters, bar.update)
            e = _mse(held, c)
            if e < best_mse:
                best, best_mse = c, e
    return best.numpy()


def _cache_path(key: dict):
    h = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return _cache.cache_dir() / "codebooks" / f"fibquant-{h}.safetensors"


@functools.lru_cache(maxsize=64)
def fit_codebook(d: int, k: int, n: int, restarts: int, iters: int, samples: int, seed: int) -> torch.Tensor:
    """(N, k) fp32 codebook for k-blocks of rotated unit vectors in R^d (deterministic).

    Cached in-process; fits slower than 2 s are also cached on disk (safetensors,
    written atomically with a digest checked before reuse) under ``cache_dir()/codebooks``.
    """
    key = dict(fit=_FIT_VERSION, d=d, k=k, N=n, restarts=restarts, iters=iters, samples=samples, seed=seed)
    path = _cache_path(key)
    if _cache.verified(path):
        from safetensors.torch import load_file
        cb = load_file(str(path)).get("codebook")
        if cb is not None and tuple(cb.shape) == (n, k) and cb.dtype == torch.float32:
            return cb
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matmuls: one thread is faster and thread-count independent
    try:
        cb = torch.from_numpy(_fit(d, k, n, restarts, iters, samples, seed).astype(np.float32))
    finally:
        torch.set_num_threads(threads)
    if time.perf_counter() - t0 > _DISK_CACHE_AFTER_S:
        try:
            from safetensors.torch import save_file
            meta = {k_: str(v) for k_, v in key.items()}
            _cache.atomic_write(path, lambda tmp: save_file({"codebook": cb.contiguous()}, str(tmp), metadata=meta))
        except OSError:
            pass  # a read-only cache only costs a refit
    return cb


# ----- the codec ------------------------------------------------------------------
@register
class FibQuantCodec(RotatedCodebook, Codec):
    name = "fibquant"
    Params = FibQuantParams
    version = 1
    op_prefix = "FibQuant"
    paper = "FibQuant (Lee & Kim, arXiv:2605.11478, 2026)"
    RATE_SWEEP = ({"k": 8, "N": 16}, {"k": 4, "N": 16}, {"k": 4, "N": 64}, {"k": 4, "N": 256})

    @property
    def index_bits(self) -> int:
        return int(math.log2(self.params.N))

    def check_head_dim(self, head_dim: int) -> None:
        super().check_head_dim(head_dim)
        if head_dim % self.params.k:
            raise ValueError(f"fibquant.k ({self.params.k}) must divide head_dim ({head_dim})")

    # ----- constants ------------------------------------------------------
    def _rotation(self, d: int) -> torch.Tensor:
        return haar_rotation(self.params.seed, d, "fibquant")

    def _codebook(self, d: int) -> torch.Tensor:
        p = self.params
        return fit_codebook(d, p.k, p.N, p.restarts, p.iters, p.samples, p.seed)

    def constants(self, head_dim: int) -> dict[str, torch.Tensor]:
        """{"rotation": Π (d, d), "codebook": C (N, k)}, fp32."""
        self.check_head_dim(head_dim)
        return {"rotation": self._rotation(head_dim).clone(), "codebook": self._codebook(head_dim).clone()}

    def constant_names(self, head_dim: int) -> tuple[str, ...]:
        return ("rotation", "codebook")   # without fitting the codebook

    # ----- layout ---------------------------------------------------------
    def layout(self, head_dim: int, tokens: int, role: str = "key") -> list[Field]:
        self.check_head_dim(head_dim)
        nb = head_dim // self.params.k
        return [
            Field("norm", torch.float16, (tokens, 1), "fp16 RMS ‖x‖/√d of each vector"),
            Field("codes", torch.uint8, (tokens, packed_bytes(nb, self.index_bits)),
                  "log2(N)-bit codeword index per k-block of the rotated unit vector, LSB-first per token"),
        ]

    # ----- encode / decode ------------------------------------------------
    def _encode(self, x: torch.Tensor, role: str) -> dict[str, torch.Tensor]:
        b, h, t, d = x.shape
        k = self.params.k
        nrm = x.to(torch.float64).norm(dim=-1, keepdim=True)
        unit = torch.where(nrm > 0, x.to(torch.float64) / nrm.clamp_min(1e-300), torch.zeros_like(nrm)).float()
        y = unit @ self._rotation(d).to(x.device).T
        idx = nearest_codeword(y.reshape(b, h, t, d // k, k), self._codebook(d).to(x.device))
        return {"norm": rms_side(x), "codes": pack_bits(idx, self.index_bits)}

    def _parts(self, packed: Packed) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(idx (B, H, T, D/k) int64, norm (B, H, T) fp32, codebook (N, k) fp32)."""
        d = packed.head_dim
        idx = unpack_bits(packed["codes"], self.index_bits, d // self.params.k)
        norm = norm_from_rms(packed["norm"], d).squeeze(-1)
        return idx, norm, self._codebook(d).to(idx.device)
