"""Decode attention v1 vs v2 vs fp16 SDPA, in one run (docs/KERNELS.md, "Decode v2").

Per codec, shape, batch and context: median seconds of one decode over a full cache (CUDA-graph
replays, input sets rotated past L2; the timing helpers of scripts/bench_kernels.py), for each
``--kernel``; the fp16 SDPA backends of the same run; speed-up = best SDPA / ours; the read rate
on the compressed bytes.  Also checks, on the first set, that v2 and v1 agree (relative L2).

    python scripts/bench_decode_v2.py --out v2.json --contexts 4096 32768 --batch 1 8
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from kvexport import codecs  # noqa: E402
import kvexport.kernels as K  # noqa: E402
from bench_kernels import SHAPES, bench_sdpa, graph_time, random_caches  # noqa: E402

DEFAULT_CODECS = ["fp16", "turbo:bits=4", "turbo:bits=3", "fibquant", "fibquant:k=4,N=16"]


def decode_time(q, sets, ctx, splits, kernel) -> float:
    lens = torch.full((q.shape[0],), ctx, dtype=torch.int32, device="cuda")
    it = [0]

    def run():
        ck, cv = sets[it[0] % len(sets)]
        it[0] += 1
        K.decode_attention(q, ck, cv, lens, max_len=ctx, num_splits=splits, kernel=kernel)

    return graph_time(run, reps=4 * len(sets))


def bench(spec, hq, hkv, d, batch, ctx, kernels, sms) -> dict:
    codec = codecs.from_spec(spec)
    nbytes = codec.nbytes(d, ctx, "key", batch, hkv) + codec.nbytes(d, ctx, "value", batch, hkv)
    sets = random_caches(codec, batch, hkv, d, ctx)
    q = torch.randn(batch, hq, 1, d, dtype=torch.float16, device="cuda")
    splits = K.num_splits_for(batch, hkv, ctx, d, sms)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    outs = {k: K.decode_attention(q, *sets[0], lens, max_len=ctx, num_splits=splits, kernel=k).float()
            for k in kernels}
    base = outs[kernels[0]]
    agree = {k: float((o - base).norm() / base.norm().clamp_min(1e-30)) for k, o in outs.items()}
    finite = {k: bool(torch.isfinite(o).all()) for k, o in outs.items()}
    times = {k: decode_time(q, sets, ctx, splits, k) for k in kernels}
    del sets
    torch.cuda.empty_cache()
    return dict(times_s=times, bytes=nbytes, splits_v1=splits, rel_vs_first=agree, finite=finite)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--codecs", nargs="+", default=DEFAULT_CODECS)
    ap.add_argument("--shapes", nargs="+", default=["llama3-8b"], choices=list(SHAPES))
    ap.add_argument("--contexts", nargs="+", type=int, default=[4096, 32768, 131072])
    ap.add_argument("--batch", nargs="+", type=int, default=[8])
    ap.add_argument("--kernel", nargs="+", default=["v1", "v2"], choices=["v1", "v2"])
    ap.add_argument("--out", required=True, help="JSON file to write")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_decode_v2: no CUDA GPU", file=sys.stderr)
        return 2
    for s in args.codecs:
        if codecs.from_spec(s).name not in K.V2_CODECS and "v2" in args.kernel:
            print(f"bench_decode_v2: no v2 kernel for {s}; have {', '.join(K.V2_CODECS)}", file=sys.stderr)
            return 2
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for shape in args.shapes:
        hq, hkv, d = SHAPES[shape]
        for batch in args.batch:
            for ctx in args.contexts:
                sd = bench_sdpa(hq, hkv, d, batch, ctx)
                best = min(t for t in sd["times_s"].values() if t is not None)
                for spec in args.codecs:
                    r = bench(spec, hq, hkv, d, batch, ctx, args.kernel, sms)
                    r.update(shape=shape, batch=batch, ctx=ctx, codec=spec, sdpa=sd, sdpa_best_s=best,
                             speedup={k: best / t for k, t in r["times_s"].items()},
                             read_tbps={k: r["bytes"] / t / 1e12 for k, t in r["times_s"].items()})
                    rows.append(r)
                    cols = "  ".join(f"{k} {t * 1e6:8.1f} us ({best / t:4.2f}x, {r['bytes'] / t / 1e12:4.2f} TB/s)"
                                     for k, t in r["times_s"].items())
                    print(f"{shape} B{batch} {ctx:>6} {spec:<20} sdpa {best * 1e6:8.1f} us  {cols}  "
                          f"rel {max(r['rel_vs_first'].values()):.1e}", flush=True)
    Path(args.out).write_text(json.dumps(dict(gpu=torch.cuda.get_device_name(0), torch=torch.__version__,
                                              rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
