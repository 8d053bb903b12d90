"""Kernel ABI bounds (CPU): the Python binding refuses an append past the cache capacity and a
decode whose max_len is below some lens[b] (or above the capacity) before anything launches,
and the C header and its ctypes mirror agree on the ABI, capacity fields included."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import kvexport.kernels as K
from kvexport import codecs
from kvexport.kernels import _abi

HEADER = Path(__file__).resolve().parents[1] / "plugins" / "common" / "kvx_api.h"
B, H, D, CAP = 2, 2, 64, 16


def _caches(spec="fp16"):
    codec = codecs.from_spec(spec)
    return (K.KernelCache.allocate(codec, "key", B, H, D, CAP, device="cpu"),
            K.KernelCache.allocate(codec, "value", B, H, D, CAP, device="cpu"))


def _lens(*v):
    return torch.tensor(v, dtype=torch.int32)


@pytest.mark.parametrize("spec", ["fp16", "turbo:bits=4", "kivi:group=16"])
def test_append_past_capacity_is_refused_before_launch(spec):
    ck, _ = _caches(spec)
    x = torch.randn(B, H, 4, D)
    with pytest.raises(ValueError, match=r"append of 4 tokens at lens up to 14 exceeds the cache capacity of 16"):
        K.append(ck, x, _lens(3, 14))
    with pytest.raises(ValueError, match=r"append of 17 tokens at lens up to 0 exceeds the cache capacity of 16"):
        K.append(ck, torch.randn(B, H, 17, D), _lens(0, 0))
    with pytest.raises(ValueError, match=r"lens in \[-1, 3\] outside"):
        K.append(ck, x, _lens(-1, 3))


def test_append_bound_is_exact():
    assert K.check_append_bounds(CAP, 4, _lens(12, 0)) == 12      # fills the cache exactly
    assert K.check_append_bounds(CAP, 0, _lens(16, 16)) == 16
    with pytest.raises(ValueError, match="exceeds the cache capacity"):
        K.check_append_bounds(CAP, 5, _lens(12, 0))
    with pytest.raises(ValueError, match=r"lens in \[0, 12\] outside \[0, max_len 10\]"):
        K.check_append_bounds(CAP, 1, _lens(12, 0), max_len=10)
    # past the bounds check, a CPU tensor fails the device check, not the bound
    ck, _ = _caches()
    with pytest.raises(ValueError, match="CUDA"):
        K.append(ck, torch.randn(B, H, 4, D), _lens(12, 0))


def test_capture_needs_a_host_bound(monkeypatch):
    monkeypatch.setattr(K, "_capturing", lambda t: True)
    with pytest.raises(ValueError, match="CUDA-graph capture needs max_len="):
        K.check_append_bounds(CAP, 1, _lens(0, 0))
    assert K.check_append_bounds(CAP, 1, _lens(0, 0), max_len=15) == 15
    with pytest.raises(ValueError, match="exceeds the cache capacity"):
        K.check_append_bounds(CAP, 2, _lens(0, 0), max_len=15)


def test_decode_max_len_below_lens_is_refused():
    ck, cv = _caches()
    q = torch.randn(B, 4, D, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"lens in \[3, 9\] but max_len is 8"):
        K.decode_attention(q, ck, cv, _lens(3, 9), max_len=8)
    with pytest.raises(ValueError, match=r"max_len \(17\) must be in \[0, capacity 16\]"):
        K.decode_attention(q, ck, cv, _lens(3, 9), max_len=17)
    with pytest.raises(ValueError, match=r"lens in \[3, 17\] but max_len is 16"):
        K.decode_attention(q, ck, cv, _lens(3, 17))  # default max_len = capacity
    wk = torch.zeros(B, H, 4, D, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"window_lens in \[0, 5\] but the window holds 4 tokens"):
        K.decode_attention(q, ck, cv, _lens(3, 9), window_k=wk, window_v=wk, window_lens=_lens(0, 5))
    assert K.check_decode_bounds(CAP, _lens(16, 0), None) == CAP
    assert K.check_decode_bounds(CAP, _lens(8, 0), 8) == 8


def _c_fields(struct: str) -> list[str]:
    body = re.search(r"typedef struct \{([^{}]*)\}\s*" + struct + ";", HEADER.read_text()).group(1)
    body = re.sub(r"//[^\n]*", "", body)
    names = []
    for decl in body.split(";"):
        decl = decl.strip()
        if not decl:
            continue
        # "int32_t a, b" / "const void* q" / "KvxField k[KVX_MAX_FIELDS]" / "const float* consts[..]"
        for part in decl.split(","):
            names.append(re.sub(r"\[.*\]", "", part).replace("*", " ").split()[-1])
    return names


@pytest.mark.parametrize("struct", ["KvxDecodeArgs", "KvxAppendArgs"])
def test_ctypes_mirror_matches_header(struct):
    assert _c_fields(struct) == [f[0] for f in getattr(_abi, struct)._fields_]
    assert "capacity" in _c_fields(struct)
    ver = int(re.search(r"#define KVX_ABI_VERSION (\d+)", HEADER.read_text()).group(1))
    assert ver == _abi.ABI_VERSION
