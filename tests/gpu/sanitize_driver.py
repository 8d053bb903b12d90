"""Small driver for ``compute-sanitizer``: every codec's decode (with window, ragged
lengths, several splits; one and five query tokens, soft cap, sliding window) and append
once, on tiny shapes.  Exit code 0 = clean.

    compute-sanitizer --tool memcheck --error-exitcode 1 python tests/gpu/sanitize_driver.py [spec ...]
"""

import torch

from kvexport import codecs
import kvexport.kernels as K

SPECS = ["fp16", "kivi:bits=2", "turbo:bits=3", "fibquant", "fibquant:k=8,N=16", "polar", "ternary",
         "ternary:key_axis=token,bits=2.4,group=16", "qjl", "qjl:outliers=0",
         "qjl:m=200,outliers=3,outlier_m=40,group=24,value_bits=4,value_group=16"]


def main(specs=None):
    for spec in specs or SPECS:
        codec = codecs.from_spec(spec)
        for d, hkv, g in ((64, 3, 3), (128, 2, 16), (256, 1, 2)):
            b, cap, w = 3, 70, 4
            ck = K.KernelCache.allocate(codec, "key", b, hkv, d, cap)
            cv = K.KernelCache.allocate(codec, "value", b, hkv, d, cap)
            lens = torch.tensor([0, 33, 69], dtype=torch.int32, device="cuda")
            # Exact-size buffers: any read or write past them is an error the sanitizer reports.
            K.append(ck, torch.randn(b, hkv, 1, d, device="cuda", dtype=torch.float16), lens)
            K.append(cv, torch.randn(b, hkv, 1, d, device="cuda", dtype=torch.float16), lens)
            lens += 1
            for name, buf in list(ck.fields.items()) + list(cv.fields.items()):
                if name == "outlier_idx":  # channel indices must be < head_dim
                    buf.random_(0, d)
                elif buf.dtype == torch.uint8:
                    buf.random_(0, 256)
                else:
                    buf.uniform_(0.01, 0.1)
            q = torch.randn(b, hkv * g, 1, d, device="cuda", dtype=torch.bfloat16)
            wk = torch.randn(b, hkv, w, d, device="cuda", dtype=torch.float16)
            wl = torch.tensor([4, 0, 2], dtype=torch.int32, device="cuda")
            for splits in (1, 5):
                out = K.decode_attention(q, ck, cv, lens, window_k=wk, window_v=wk.clone(), window_lens=wl,
                                         max_len=cap, num_splits=splits)
            torch.cuda.synchronize()
            assert torch.isfinite(out.float()).all(), spec
            # Several query tokens (two row tiles at G = 16), soft cap, sliding window.
            q5 = torch.randn(b, hkv * g, 5, d, device="cuda", dtype=torch.float16)
            for splits, sw in ((1, 0), (5, 9)):
                out = K.decode_attention(q5, ck, cv, lens, window_k=wk, window_v=wk.clone(), window_lens=wl,
                                         max_len=cap, num_splits=splits, softcap=3.0, sliding_window=sw)
            torch.cuda.synchronize()
            assert torch.isfinite(out.float()).all(), spec
    print("sanitize driver done")


if __name__ == "__main__":
    import sys
    main(sys.argv[1:])  # optional codec specs (default: all of SPECS)
