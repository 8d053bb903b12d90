"""decode_attention(kernel=...) rejects an unknown kernel and a codec without a v2 launcher with a
one-line ValueError before touching the GPU (CPU, CI)."""

from __future__ import annotations

import pytest
import torch

from kvexport import codecs
import kvexport.kernels as K


def _pair(spec):
    codec = codecs.from_spec(spec)
    return (K.KernelCache.allocate(codec, "key", 1, 1, 64, 32, device="cpu"),
            K.KernelCache.allocate(codec, "value", 1, 1, 64, 32, device="cpu"))


@pytest.mark.parametrize("spec,kernel,msg", [("fp16", "v3", "must be 'v1' or 'v2'"),
                                             ("kivi:bits=4", "v2", "no v2 decode kernel for codec 'kivi'")])
def test_bad_kernel_choice(spec, kernel, msg):
    ck, cv = _pair(spec)
    q = torch.zeros(1, 1, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match=msg):
        K.decode_attention(q, ck, cv, torch.zeros(1, dtype=torch.int32), kernel=kernel)


def test_v2_codecs_have_launchers():
    """Every codec V2_CODECS names defines kvx_<codec>_decode_v2 in its plugin sources."""
    from kvexport.kernels import _build
    text = {p.parent.name: p.read_text() for p in _build.sources()}
    for name in K.V2_CODECS:
        assert f'extern "C" int kvx_{name}_decode_v2(' in text[name], name
