"""The split-K rule has one C definition (plugins/common/kvx_splits.cu, used by the TensorRT
plugins) and one Python definition (kvexport.kernels.num_splits_for): they must agree."""

from __future__ import annotations

import ctypes
import subprocess
from pathlib import Path

import pytest

from kvexport.kernels import num_splits_for

SRC = Path(__file__).resolve().parents[2] / "plugins" / "common" / "kvx_splits.cu"


@pytest.fixture(scope="module")
def c_rule(cxx, tmp_path_factory):
    lib = tmp_path_factory.mktemp("splits") / "libkvx_splits.so"
    subprocess.run([cxx, "-x", "c++", "-O1", "-shared", "-fPIC", str(SRC), "-o", str(lib)], check=True,
                   capture_output=True, text=True)
    fn = ctypes.CDLL(str(lib)).kvx_num_splits
    fn.restype = ctypes.c_int32
    fn.argtypes = [ctypes.c_int32] * 5
    return fn


def test_c_and_python_split_rules_agree(c_rule):
    n = 0
    for sms in (0, 1, 20, 108, 132, 1 << 20):
        for batch in (0, 1, 3, 8, 64):
            for heads in (1, 2, 8, 32):
                for tokens in (0, 1, 511, 512, 513, 4096, 32768, 131072):
                    for d in (64, 256):
                        want = num_splits_for(batch, heads, tokens, d, sms)
                        assert c_rule(batch, heads, tokens, d, sms) == want, (batch, heads, tokens, d, sms)
                        n += 1
    assert n == 6 * 5 * 4 * 8 * 2
    # Spot values of the rule: one wave of 4 blocks per SM, >= 8 x 64 tokens per split.
    assert c_rule(1, 1, 32768, 128, 132) == 64 and c_rule(4, 8, 32768, 128, 132) == 16
    assert c_rule(64, 32, 32768, 128, 132) == 1 and c_rule(1, 1, 100, 128, 132) == 1
