"""QJL key scoring: our fused decode kernel vs the official QJL CUDA kernels, on the GPU.

The official kernels (github.com/amirzandieh/QJL, ``qjl_kernel/csrc``) are never part
of this repository: pass the folder of a copy kept elsewhere; it is JIT-built with
``torch.utils.cpp_extension.load`` into a temporary directory.  Same sketch sizes on
both sides: m sketch rows, ``outlier_m`` rows for the outlier channels, ``outliers``
outlier channels per group of ``group`` tokens, head_dim 128 (the official GQA kernel
is fixed to head_dim 128 and at most 4 query heads per kv head).

Timed (median over CUDA-graph replays, inputs rotated past L2, the same run):
  official   ``qjl_gqa_score``: scores only (B, Hq, T), its query sketch precomputed;
             timed with CUDA events around plain launches (it uses the legacy
             default stream, which CUDA-graph capture refuses); its output is
             checked against its own formula first
  ours       ``kvexport`` fused qjl decode: query sketch + scores + online softmax +
             weighted sum over 2-bit values + combine (strictly more work)
  bf16 q·Kᵀ  a plain bf16 batched matmul of the queries with uncompressed keys
Writes JSON + Markdown.

    python scripts/bench_qjl_official.py --official /tmp/QJL/qjl_kernel --out docs/bench_qjl_official
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from kvexport import codecs  # noqa: E402
import kvexport.kernels as K  # noqa: E402
from bench_kernels import copy_bandwidth, decode_time, graph_time, n_sets, random_caches  # noqa: E402


def build_official(src: Path):
    from torch.utils.cpp_extension import load
    cu = src / "csrc" / "qjl_gqa_score_kernel.cu"
    if not cu.is_file():
        raise SystemExit(f"error: {cu} not found (pass the official qjl_kernel folder)")
    build = Path(tempfile.mkdtemp(prefix="qjl_official_"))
    return load(name="cuda_qjl_gqa_score", sources=[str(cu)], build_directory=str(build),
                extra_cuda_cflags=["-O3", "-std=c++17", "--use_fast_math", "--expt-relaxed-constexpr"],
                verbose=False)


def event_time(fn, reps: int = 20, trials: int = 7) -> float:
    """Median seconds per call of ``fn`` launched ``reps`` times between CUDA events (no graph:
    the official extension launches on the legacy default stream, which graph capture refuses)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(trials):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            fn()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b) / 1e3 / reps)
    return statistics.median(out)


def official_reference(kq, koq, kn, kon, idx, qs, q, prj):
    """The official kernel's score formula in fp32 torch (to check the timed launches compute)."""
    b, hkv, n, group, _ = kq.shape
    hq, m, om = q.shape[1], prj.shape[1], koq.shape[-1] * 8
    bits = lambda x: ((x.unsqueeze(-1) >> torch.arange(8, device=x.device)) & 1).flatten(-2).float() * 2 - 1
    qg = q.float().squeeze(2).reshape(b, hkv, hq // hkv, -1)                       # (B, Hkv, G, D)
    onehot = torch.zeros(b, hkv, n, q.shape[-1], device=q.device)
    onehot.scatter_(-1, idx.long(), 1.0)
    qos = torch.einsum("bhgd,bhnd,dm->bhngm", qg, onehot, prj.float())            # outlier part of the sketch
    qsg = qs.reshape(b, hkv, hq // hkv, m)
    inl = torch.einsum("bhntm,bhngm->bhngt", bits(kq), qsg.unsqueeze(2) - qos)
    out = torch.einsum("bhntm,bhngm->bhngt", bits(koq), qos[..., :om])
    nk = (kn.float() ** 2 - kon.float() ** 2).clamp_min(0).sqrt().unsqueeze(3)
    s = (math.sqrt(math.pi / 2) / m) * nk * inl + (math.sqrt(math.pi / 2) / om) * kon.float().unsqueeze(3) * out
    return s.permute(0, 1, 3, 2, 4).reshape(b, hq, n * group)


def official_inputs(b, hkv, hq, d, ctx, m, om, outliers, group):
    n = ctx // group
    dev = "cuda"
    kq = torch.randint(0, 256, (b, hkv, n, group, m // 8), dtype=torch.uint8, device=dev)
    koq = torch.randint(0, 256, (b, hkv, n, group, om // 8), dtype=torch.uint8, device=dev)
    kn = torch.rand(b, hkv, n, group, device=dev).add_(1.0).half()
    kon = torch.rand(b, hkv, n, group, device=dev).mul_(0.5).half()
    idx = torch.rand(b, hkv, n, d, device=dev).argsort(-1)[..., :outliers].to(torch.uint8)   # distinct channels
    return kq, koq, kn, kon, idx


def run(args):
    mod = build_official(Path(args.official))
    K.library()
    props = torch.cuda.get_device_properties(0)
    sms = props.multi_processor_count
    bw = copy_bandwidth()
    hq, hkv, d = 32, 8, 128
    m, om, outl, group = args.m, args.outlier_m, args.outliers, args.group
    spec = f"qjl:m={m},outliers={outl},outlier_m={om},group={group}"
    codec = codecs.from_spec(spec)
    rows = []
    for b in args.batch:
        for ctx in args.contexts:
            g = torch.Generator(device="cuda").manual_seed(0)
            q = torch.randn(b, hq, 1, d, dtype=torch.float16, device="cuda", generator=g)
            prj = torch.randn(d, m, dtype=torch.float16, device="cuda", generator=g)
            qs = (q.float().squeeze(2) @ prj.float()).contiguous()        # (B, Hq, m) fp32, as the authors feed it
            key_bytes = b * hkv * ctx * (m // 8 + om // 8 + 4) + b * hkv * (ctx // group) * outl
            sets = [official_inputs(b, hkv, hq, d, ctx, m, om, outl, group) for _ in range(n_sets(key_bytes))]
            it = [0]

            def official():
                s = sets[it[0] % len(sets)]
                it[0] += 1
                mod.qjl_gqa_score_cuda_half_half(*s, qs, q, prj)

            got = mod.qjl_gqa_score_cuda_half_half(*sets[0], qs, q, prj)
            torch.cuda.synchronize()
            if ctx <= 8192:   # the timed launches compute the official formula
                ref = official_reference(*sets[0], qs, q, prj)
                err = (got.reshape(ref.shape) - ref).abs().max().item() / ref.abs().max().item()
                if not err < 1e-2:
                    raise SystemExit(f"error: official kernel output differs from its formula (rel {err:.2e})")
            t_off = event_time(official, reps=2 * len(sets))
            sets.clear()
            # Ours: full fused decode on the same sketch sizes.
            nbytes = codec.nbytes(d, ctx, "key", b, hkv) + codec.nbytes(d, ctx, "value", b, hkv)
            ours = random_caches(codec, b, hkv, d, ctx)
            t_ours = decode_time(q, ours, ctx, sms)
            key_ours = codec.nbytes(d, ctx, "key", b, hkv)
            ours.clear()
            torch.cuda.empty_cache()
            # bf16 q·Kᵀ on uncompressed keys, GQA as a batched matmul.
            kb = [torch.randn(b, hkv, ctx, d, dtype=torch.bfloat16, device="cuda")
                  for _ in range(n_sets(b * hkv * ctx * d * 2))]
            qb = q.to(torch.bfloat16).reshape(b, hkv, hq // hkv, d)
            kt = [0]

            def mm():
                k = kb[kt[0] % len(kb)]
                kt[0] += 1
                torch.matmul(qb, k.transpose(-1, -2))

            t_mm = graph_time(mm, reps=4 * len(kb))
            kb.clear()
            torch.cuda.empty_cache()
            row = dict(batch=b, context=ctx, spec=spec, official_score_s=t_off, ours_fused_s=t_ours,
                       bf16_qk_s=t_mm, official_key_bytes=key_bytes, ours_key_bytes=key_ours, ours_total_bytes=nbytes,
                       official_bw_fraction=key_bytes / t_off / bw, ours_bw_fraction=nbytes / t_ours / bw,
                       speedup_ours_vs_official=t_off / t_ours)
            rows.append(row)
            print(f"B={b} T={ctx:6d} official score {t_off * 1e6:9.1f} us ({row['official_bw_fraction'] * 100:4.1f}% bw) | "
                  f"ours fused {t_ours * 1e6:8.1f} us ({row['ours_bw_fraction'] * 100:4.1f}% bw) | bf16 qK {t_mm * 1e6:7.1f} us "
                  f"| ours/official x{row['speedup_ours_vs_official']:.2f}", flush=True)
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), gpu=props.name,
                copy_bandwidth_Bps=bw, torch=torch.__version__, cuda=torch.version.cuda,
                python=platform.python_version(), official_source=str(args.official),
                command="python scripts/bench_qjl_official.py " + " ".join(sys.argv[1:]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    lines = [f"# QJL scoring vs the official kernels ({props.name}, {meta['date']})", "",
             f"`{meta['command']}`; torch {meta['torch']}, CUDA {meta['cuda']}; copy bandwidth "
             f"{bw / 1e12:.2f} TB/s. 32 q / 8 kv heads, d = 128, `{spec}`. Official: scores only; ours: the whole "
             "fused decode (sketch + scores + softmax + 2-bit values). Medians: ours over CUDA-graph replays, "
             "the official kernel over plain launches between CUDA events (it launches on the legacy default "
             "stream, which graph capture refuses); its output is first checked against its own formula.", "",
             "| batch | context | official score µs | ours fused µs | ours / official | official bw | ours bw | bf16 q·Kᵀ µs |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['context']} | {r['official_score_s'] * 1e6:.1f} | {r['ours_fused_s'] * 1e6:.1f} | "
                     f"{r['speedup_ours_vs_official']:.2f}× | {r['official_bw_fraction'] * 100:.1f}% | "
                     f"{r['ours_bw_fraction'] * 100:.1f}% | {r['bf16_qk_s'] * 1e6:.1f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--official", required=True, help="folder of the official qjl_kernel sources (kept outside the repo)")
    ap.add_argument("--contexts", nargs="+", type=int, default=[4096, 32768])
    ap.add_argument("--batch", nargs="+", type=int, default=[8])
    ap.add_argument("--m", type=int, default=256)
    ap.add_argument("--outlier-m", type=int, default=128)
    ap.add_argument("--outliers", type=int, default=4)
    ap.add_argument("--group", type=int, default=32)
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench_qjl_official"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("error: needs a CUDA GPU")
    if args.group % 32:
        raise SystemExit("error: --group must be a multiple of 32 for the official kernel")
    run(args)


if __name__ == "__main__":
    main()
