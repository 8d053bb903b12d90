"""Property-based tests of every codec (issue 10 item 13), with hypothesis.

Over shapes (batch, kv heads, GQA ratio, tokens including 0, 1 and non-multiples of the
group sizes, every head dim a codec allows and some it refuses), dtypes (fp16 / bf16 /
fp32) and magnitudes (tiny, ordinary, beyond fp16, with NaN / ±Inf sprinkled), for each
codec at two settings:

- a refused head dim is a ``ValueError``, never another exception;
- encode / decode / append / attend do not raise; packed float fields, decodes and attention
  outputs hold no NaN / Inf (docs/FORMATS.md "Numerics");
- bits == bytes: ``bits_per_coordinate · numel / 8`` == the packed tensors' bytes ==
  ``codec.nbytes``;
- append of a random split == one-shot encode, byte for byte (any input for per-token
  layouts; fp16 inputs for layouts with token-group fields, as ``Codec.append`` promises).

Derandomized, no example database: CI runs the same examples every time.  Each bug the
fuzzer found is pinned as an explicit ``@example``.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings, strategies as st

from kvexport import codecs
from kvexport.codecs._core.numerics import store_fp16

# Two settings per codec, small groups so that short sequences cover full groups and remainders.
SETTINGS = {
    "fp16": [{}, {"window": 2}],
    "kivi": [{"bits": 2, "group": 4, "value_group": 4}, {"bits": 3, "group": 3, "value_group": 2}],
    "turbo": [{"bits": 1}, {"bits": 4}],
    "qjl": [{"bits": 1.0, "group": 4, "outliers": 2, "outlier_m": 16, "value_group": 4, "value_bits": 3},
            {"outliers": 0, "m": 16, "value_group": 2}],
    "polar": [{"levels": 2, "level_bits": (3, 2)}, {"levels": 1, "level_bits": (2,)}],
    "ternary": [{"group": 4, "key_group": 3, "bits": 2.4}, {"group": 2, "key_axis": "token", "bits": 4.0}],
    "fibquant": [{"k": 2, "N": 16, "samples": 1024, "restarts": 1, "iters": 5},
                 {"k": 1, "N": 4, "samples": 1024, "restarts": 1, "iters": 5}],
}
CASES = [(n, p) for n, ps in SETTINGS.items() for p in ps]
HEAD_DIMS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 64)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
MAGNITUDES = (1e-30, 1e-4, 1.0, 300.0, 1e5, 1e30)   # 1e5, 1e30: beyond fp16 (Inf once cast to fp16)


@dataclasses.dataclass(frozen=True)
class Case:
    head_dim: int
    batch: int
    kv_heads: int
    gqa: int          # query heads per kv head
    tokens: int
    dtype: str
    magnitude: float
    poison: str       # "none" | "nan" | "inf" | "both": ~10 % of the entries
    outlier: bool     # one channel 30× the others (what kivi / qjl / ternary exist for)
    splits: tuple     # append boundaries, sorted, in [0, tokens]
    q_tokens: int
    window: int       # fp16 window tokens given to attend
    seed: int


@st.composite
def cases(draw) -> Case:
    t = draw(st.integers(0, 13))
    return Case(head_dim=draw(st.sampled_from(HEAD_DIMS)), batch=draw(st.integers(1, 2)),
                kv_heads=draw(st.integers(1, 3)), gqa=draw(st.sampled_from((1, 2, 3))), tokens=t,
                dtype=draw(st.sampled_from(tuple(DTYPES))), magnitude=draw(st.sampled_from(MAGNITUDES)),
                poison=draw(st.sampled_from(("none", "nan", "inf", "both"))), outlier=draw(st.booleans()),
                splits=tuple(sorted(draw(st.lists(st.integers(0, t), max_size=2)))),
                q_tokens=draw(st.integers(1, 3)), window=draw(st.integers(0, 3)), seed=draw(st.integers(0, 2**16)))


def _tensor(c: Case, g: torch.Generator, heads: int, tokens: int, poison: bool) -> torch.Tensor:
    x = torch.randn(c.batch, heads, tokens, c.head_dim, generator=g, dtype=torch.float64) * c.magnitude
    if c.outlier:
        x[..., 0] *= 30
    if poison and c.poison != "none":
        hit = torch.rand(x.shape, generator=g) < 0.1
        bad = {"nan": [float("nan")], "inf": [float("inf"), -float("inf")],
               "both": [float("nan"), float("inf"), -float("inf")]}[c.poison]
        pick = torch.randint(0, len(bad), x.shape, generator=g)
        x = torch.where(hit, torch.tensor(bad, dtype=x.dtype)[pick], x)
    return x.to(DTYPES[c.dtype])


def _finite(t: torch.Tensor, what: str) -> None:
    if t.is_floating_point():
        assert torch.isfinite(t.float()).all(), f"{what} holds NaN/Inf"


def _same_bytes(a: codecs.Packed, b: codecs.Packed, what: str) -> None:
    assert a.tensors.keys() == b.tensors.keys(), what
    for k in a.tensors:
        x, y = a[k], b[k]
        assert x.shape == y.shape and x.dtype == y.dtype, (what, k, x.shape, y.shape)
        if x.dtype == torch.float16:
            x, y = x.view(torch.int16), y.view(torch.int16)
        assert torch.equal(x, y), f"{what}: field {k} differs"


def _check(codec: codecs.Codec, c: Case) -> None:
    g = torch.Generator().manual_seed(c.seed)
    try:
        codec.check_head_dim(c.head_dim)
    except ValueError:
        with pytest.raises(ValueError):
            codec.encode(_tensor(c, g, c.kv_heads, max(c.tokens, 1), False))
        return
    numel = c.batch * c.kv_heads * c.tokens * c.head_dim
    grouped = any(not f.token_axis for r in ("key", "value") for f in codec.layout(c.head_dim, max(c.tokens, 1), r))
    packed = {}
    for role in ("key", "value"):
        x = _tensor(c, g, c.kv_heads, c.tokens, True)
        p = codec.encode(x, role)
        packed[role] = p
        for k, t in p.tensors.items():
            _finite(t, f"{role} field {k}")
        # bits == bytes
        assert p.nbytes == codec.nbytes(c.head_dim, c.tokens, role, c.batch, c.kv_heads)
        if c.tokens:
            bits = codec.bits_per_coordinate(c.head_dim, c.tokens, role)
            assert bits * numel / 8 == pytest.approx(p.nbytes, rel=1e-12, abs=0)
        y = codec.decode(p)
        assert y.shape == x.shape and y.dtype == x.dtype
        _finite(y, f"{role} decode")
        # append of a split == one-shot encode
        xs = store_fp16(x) if grouped else x
        want = codec.encode(xs, role)
        bounds = [0, *c.splits, c.tokens]
        got = codec.encode(xs[:, :, :bounds[1]], role)
        for lo, hi in zip(bounds[1:], bounds[2:]):
            got = codec.append(got, xs[:, :, lo:hi])
        assert got.shape == want.shape
        _same_bytes(got, want, f"{role} append at {c.splits}")
    # attention on the packed form, with and without an fp16 window
    q = _tensor(dataclasses.replace(c, magnitude=1.0, outlier=False), g, c.kv_heads * c.gqa, c.q_tokens, False)
    win = {}
    if c.window:
        win = {f"window_{r}": store_fp16(_tensor(c, g, c.kv_heads, c.window, True)) for r in "kv"}
    out = codec.attend(q, packed["key"], packed["value"], **win)
    assert out.shape == q.shape and out.dtype == q.dtype
    _finite(out, "attend")


def _pin(**kw) -> Case:
    """A small explicit case (one token, fp16, one head) with ``kw`` changed."""
    base = dict(head_dim=4, batch=1, kv_heads=1, gqa=1, tokens=1, dtype="fp16", magnitude=1.0, poison="none",
                outlier=False, splits=(), q_tokens=1, window=0, seed=0)
    return Case(**{**base, **kw})


def test_settings_cover_every_codec():
    assert sorted(SETTINGS) == sorted(codecs.names())


@pytest.mark.parametrize("name,params", CASES, ids=[f"{n}-{i}" for n, ps in SETTINGS.items() for i in range(len(ps))])
@settings(max_examples=25, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=cases())
# Found by this fuzzer (each failed on the code before its fix):
@example(case=_pin(tokens=0))          # attend over an empty cache: IndexError in softmax's amax
@example(case=_pin(head_dim=1))        # turbo: 'math domain error' from the codebook, now a ValueError
@example(case=_pin(magnitude=1e5, seed=4))  # kivi: the fp16 scale of a ±65504 group decodes to 65536 = Inf
@example(case=_pin(head_dim=2, magnitude=1e5))  # turbo / ternary: attend output / decode beyond ±65504
@example(case=_pin(head_dim=6, magnitude=1e-30, poison="inf"))   # qjl: key reconstruction of a saturated key
@example(case=_pin(head_dim=6, magnitude=1e-30, poison="inf", seed=2))  # qjl: value decode (uniform, as kivi)
def test_codec_properties(name, params, case):
    _check(codecs.get(name, **params), case)
