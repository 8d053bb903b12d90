"""Prompt attention on the packed cache, on the GPU: the fused multi-query launch (q_tokens = Tq)
vs the per-row layout the TensorRT plugin used before ABI 4 (the Tq queries as Tq one-token
"sequences" over the same cache, batch stride 0, per-row visible lengths): agreement and time
(medians of CUDA-graph replays).  Prints a Markdown table (docs/KERNELS.md "Prefill cost").

    PYTHONPATH=. python scripts/bench_prefill.py
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import fill_random, graph_time  # noqa: E402

import kvexport.kernels as K  # noqa: E402
from kvexport import codecs  # noqa: E402


def per_row_cache(cache, rows):
    """The same buffers seen as `rows` sequences (batch stride 0), as enqueueAttention does."""
    f = {n: t[:1].expand(rows, *t.shape[1:]) for n, t in cache.fields.items()}
    return K.KernelCache(cache.codec, cache.role, rows, cache.heads, cache.head_dim, cache.capacity, f, cache.consts)


def main():
    hq, hkv, d = 32, 8, 128
    print(f"{torch.cuda.get_device_name()}  Hq={hq} Hkv={hkv} D={d}, B=1, fused vs per-row (plugin) layout")
    print("| codec | ctx | Tq | sliding | fused µs | per-row µs | speed-up | rel diff |")
    print("|---|---|---|---|---|---|---|---|")
    for spec in ["fp16", "turbo:bits=3", "kivi:bits=2", "qjl"]:
        codec = codecs.from_spec(spec)
        for ctx, tq, sw in ((4096, 64, 0), (4096, 16, 0), (32768, 64, 0), (32768, 64, 4096)):
            if spec == "kivi:bits=2" and ctx % codec.params.group:
                continue
            ck = K.KernelCache.allocate(codec, "key", 1, hkv, d, ctx)
            cv = K.KernelCache.allocate(codec, "value", 1, hkv, d, ctx)
            fill_random(ck)
            fill_random(cv)
            q = torch.randn(1, hq, tq, d, dtype=torch.float16, device="cuda")
            lens = torch.tensor([ctx], dtype=torch.int32, device="cuda")
            fused = lambda: K.decode_attention(q, ck, cv, lens, softcap=0.0, sliding_window=sw)
            # Per row: query t sees the first ctx - tq + t + 1 tokens (grouped layouts: the plugin
            # refuses rows inside a quantized group; the timing is still representative).
            rk, rv = per_row_cache(ck, tq), per_row_cache(cv, tq)
            rlens = torch.arange(ctx - tq + 1, ctx + 1, dtype=torch.int32, device="cuda")
            qr = q[0].transpose(0, 1).contiguous()  # (Tq, Hq, D): rows as sequences
            rows = lambda: K.decode_attention(qr, rk, rv, rlens, max_len=ctx, sliding_window=sw)
            a = fused()[0].transpose(0, 1).float()
            b = rows().float()
            torch.cuda.synchronize()
            grouped = "residual" in ck.fields  # per-row lengths inside a group read the wrong residual
            diff = "n/a (grouped)" if grouped else f"{float((a - b).norm() / b.norm()):.1e}"
            tf, tr = graph_time(fused), graph_time(rows)
            print(f"| {spec} | {ctx} | {tq} | {sw} | {tf * 1e6:.1f} | {tr * 1e6:.1f} | {tr / tf:.2f}× | {diff} |")


if __name__ == "__main__":
    main()
