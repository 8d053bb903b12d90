"""Benchmark the fused decode-attention and append kernels on the GPU.

Writes docs/benchmarks.md and docs/benchmarks.json (date, GPU, versions).  Per codec
and shape: decode attention time at each context (median over CUDA-graph replays,
inputs rotated so repeated calls do not run from L2), achieved bandwidth on the
compressed bytes as a fraction of the device-to-device copy bandwidth measured in
the same run, speed-up over fp16 SDPA decode (default dispatch and the flash
backend), and the cost of appending one token per sequence.

    python scripts/bench_kernels.py                       # full run
    python scripts/bench_kernels.py --contexts 4096 --batch 8 --quick
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kvexport import codecs  # noqa: E402
import kvexport.kernels as K  # noqa: E402

SHAPES = {"llama3-8b": (32, 8, 128), "smollm2-135m": (9, 3, 64)}
DEFAULT_CODECS = ["fp16", "kivi:bits=2", "kivi:bits=4", "turbo:bits=3", "turbo:bits=4", "fibquant",
                  "fibquant:k=4,N=16", "polar", "ternary", "qjl"]
ROTATE_BYTES = 256 << 20  # rotate input sets until they exceed the 50 MB L2 several times


def graph_time(fn, reps: int = 20, trials: int = 7) -> float:
    """Median seconds per call of ``fn`` (captured ``reps`` times in one CUDA graph)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    torch.cuda.synchronize()
    out = []
    for _ in range(trials):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b) / 1e3 / reps)
    return statistics.median(out)


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second (1 GiB buffers)."""
    n = 1 << 29
    a = torch.empty(n, dtype=torch.float16, device="cuda").normal_()
    b = torch.empty_like(a)
    t = graph_time(lambda: b.copy_(a), reps=5)
    return 2 * n * 2 / t   # the 2 GiB of buffers are freed on return


def fill_random(cache: K.KernelCache) -> None:
    """Valid random packed bytes: random codes, positive norms / scales (timing only)."""
    for name, t in cache.fields.items():
        if name == "outlier_idx":  # qjl channel indices must be < head_dim
            t.random_(0, cache.head_dim)
        elif t.dtype == torch.uint8:
            t.random_(0, 256)
        elif name in ("norm", "scale"):
            t.uniform_(0.01, 0.1)
        else:
            t.normal_()


def n_sets(nbytes: int) -> int:
    return max(1, min(8, math.ceil(ROTATE_BYTES / max(1, nbytes))))


def random_caches(codec, batch, hkv, d, ctx) -> list:
    """(key, value) KernelCache pairs of random valid bytes, enough sets to rotate past L2."""
    nbytes = codec.nbytes(d, ctx, "key", batch, hkv) + codec.nbytes(d, ctx, "value", batch, hkv)
    sets = []
    for _ in range(n_sets(nbytes)):
        ck = K.KernelCache.allocate(codec, "key", batch, hkv, d, ctx)
        cv = K.KernelCache.allocate(codec, "value", batch, hkv, d, ctx)
        fill_random(ck)
        fill_random(cv)
        sets.append((ck, cv))
    return sets


def decode_time(q, sets, ctx, sms) -> float:
    """Median seconds of one fused decode over a full cache of ``ctx`` tokens, rotating ``sets``."""
    batch, hkv, d = q.shape[0], sets[0][0].heads, q.shape[-1]
    lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    splits = K.num_splits_for(batch, hkv, ctx, d, sms)
    it = [0]

    def run():
        ck, cv = sets[it[0] % len(sets)]
        it[0] += 1
        K.decode_attention(q, ck, cv, lens, max_len=ctx, num_splits=splits)

    return graph_time(run, reps=4 * len(sets))


def bench_codec(spec, hq, hkv, d, batch, ctx, sms):
    codec = codecs.from_spec(spec)
    nbytes = (codec.nbytes(d, ctx, "key", batch, hkv) + codec.nbytes(d, ctx, "value", batch, hkv))
    sets = random_caches(codec, batch, hkv, d, ctx)
    q = torch.randn(batch, hq, 1, d, dtype=torch.float16, device="cuda")
    splits = K.num_splits_for(batch, hkv, ctx, d, sms)
    t = decode_time(q, sets, ctx, sms)
    # Append one token per sequence (keys + values) at the end of the cache.
    ck, cv = sets[0]
    xk = torch.randn(batch, hkv, 1, d, dtype=torch.float16, device="cuda")
    lens_a = torch.full((batch,), ctx - 1, dtype=torch.int32, device="cuda")
    ta = graph_time(lambda: (K.append(ck, xk, lens_a), K.append(cv, xk, lens_a)), reps=10)
    del sets
    return dict(time_s=t, bytes=nbytes, append_s=ta, splits=splits,
                compression=codec.compression(d, ctx))


def bench_sdpa(hq, hkv, d, batch, ctx):
    out = {}
    nbytes = 2 * batch * hkv * ctx * d * 2
    sets = [(torch.randn(batch, hkv, ctx, d, dtype=torch.float16, device="cuda"),
             torch.randn(batch, hkv, ctx, d, dtype=torch.float16, device="cuda")) for _ in range(n_sets(nbytes))]
    q = torch.randn(batch, hq, 1, d, dtype=torch.float16, device="cuda")
    from torch.nn.attention import SDPBackend, sdpa_kernel
    for name, backends in (("sdpa_default", None), ("sdpa_flash", [SDPBackend.FLASH_ATTENTION])):
        it = [0]

        def run():
            k, v = sets[it[0] % len(sets)]
            it[0] += 1
            F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

        try:
            if backends is None:
                out[name] = graph_time(run, reps=4 * len(sets))
            else:
                with sdpa_kernel(backends):
                    out[name] = graph_time(run, reps=4 * len(sets))
        except Exception as e:  # a backend that refuses the shape is reported, not fatal
            out[name] = None
            out[name + "_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    out["sdpa_bytes"] = nbytes
    sets.clear()
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--codecs", nargs="+", default=DEFAULT_CODECS)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--contexts", nargs="+", type=int, default=[4096, 8192, 16384, 32768, 65536, 131072])
    ap.add_argument("--batch", nargs="+", type=int, default=[8])
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks"))
    args = ap.parse_args(argv)
    K.library()
    props = torch.cuda.get_device_properties(0)
    sms = props.multi_processor_count
    bw = copy_bandwidth()
    print(f"GPU {props.name}, copy bandwidth {bw / 1e12:.2f} TB/s (read + write)", flush=True)
    rows = []
    for shape in args.shapes:
        hq, hkv, d = SHAPES[shape]
        for batch in args.batch:
            for ctx in args.contexts:
                base = bench_sdpa(hq, hkv, d, batch, ctx)
                for spec in args.codecs:
                    try:
                        r = bench_codec(spec, hq, hkv, d, batch, ctx, sms)
                    except torch.OutOfMemoryError:
                        print(f"{shape} B={batch} T={ctx} {spec}: out of memory", flush=True)
                        continue
                    finally:
                        torch.cuda.empty_cache()
                    bw_frac = r["bytes"] / r["time_s"] / bw
                    sdpa = [x for x in (base.get("sdpa_default"), base.get("sdpa_flash")) if x]
                    row = dict(shape=shape, q_heads=hq, kv_heads=hkv, head_dim=d, batch=batch, context=ctx,
                               codec=spec, **r, bw_fraction=bw_frac, **base,
                               speedup_vs_sdpa_default=(base["sdpa_default"] / r["time_s"]) if base.get("sdpa_default") else None,
                               speedup_vs_sdpa_best=(min(sdpa) / r["time_s"]) if sdpa else None,
                               append_fraction=r["append_s"] / r["time_s"])
                    rows.append(row)
                    print(f"{shape} B={batch} T={ctx:6d} {spec:22s} {r['time_s'] * 1e6:8.1f} us  "
                          f"bw {bw_frac * 100:5.1f}%  x{row['speedup_vs_sdpa_best'] or 0:5.2f} vs best SDPA  "
                          f"append {r['append_s'] * 1e6:6.1f} us ({row['append_fraction'] * 100:.1f}%)", flush=True)
                    write(args, props, sms, bw, rows, argv)
    write(args, props, sms, bw, rows, argv)


def write(args, props, sms, bw, rows, argv):
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), gpu=props.name,
                sms=sms, copy_bandwidth_Bps=bw, torch=torch.__version__, cuda=torch.version.cuda,
                python=platform.python_version(), command=" ".join(["python scripts/bench_kernels.py"] + (argv or sys.argv[1:])))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    out.with_suffix(".md").write_text(render_md(meta, rows))



def render_md(meta, rows) -> str:
    us = lambda s: f"{s * 1e6:.1f}" if s else "—"  # noqa: E731
    lines = [
        "# Kernel benchmarks", "",
        f"{meta['date']} · {meta['gpu']} ({meta['sms']} SMs) · torch {meta['torch']} · CUDA {meta['cuda']} · "
        f"copy bandwidth {meta['copy_bandwidth_Bps'] / 1e12:.2f} TB/s (read + write, measured in the same run)", "",
        f"Reproduce: `{meta['command']}`", "",
        "Decode attention, one query token per sequence; medians of CUDA-graph replays. "
        "`bw` = compressed K+V bytes read / time / copy bandwidth. SDPA columns are fp16 "
        "`scaled_dot_product_attention(enable_gqa=True)` on the same shape (default dispatch; flash backend). "
        "`append` = encoding one new key and value per sequence into the packed cache.", "",
        "| shape | B | context | codec | ×fp16 bytes | time µs | bw | SDPA default µs | SDPA flash µs | speed-up vs best SDPA | append µs | append / attn |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['batch']} | {r['context']} | {r['codec']} | {r['compression']:.2f} | "
                     f"{us(r['time_s'])} | {r['bw_fraction'] * 100:.0f}% | {us(r.get('sdpa_default'))} | "
                     f"{us(r.get('sdpa_flash'))} | {r['speedup_vs_sdpa_best'] or 0:.2f}× | {us(r['append_s'])} | "
                     f"{r['append_fraction'] * 100:.1f}% |")
    errs = {k: v for r in rows for k, v in r.items() if k.endswith("_error")}
    if errs:
        lines += ["", "SDPA backends that refused a shape: " + "; ".join(f"{k}: {v}" for k, v in errs.items())]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
