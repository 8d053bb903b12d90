"""QJL key scoring: our fused decode kernel vs the official QJL CUDA kernels, on the GPU.

The official kernels (github.com/amirzandieh/QJL, ``qjl_kernel/csrc``) are never part
of this repository: pass the folder of a copy kept elsewhere; it is JIT-built with
``torch.utils.cpp_extension.load`` into a temporary directory.  Same sketch sizes on
both sides: m sketch rows, ``outlier_m`` rows for the outlier channels, ``outliers``
outlier channels per group of ``group`` tokens, head_dim 128 (the official GQA kernel
is fixed to head_dim 128 and at most 4 query heads per kv head).

Timed the same way on both sides (median of eager launches between CUDA events, inputs rotated
past L2, the same run: the official extension launches on the legacy default stream, which
CUDA-graph capture refuses, so graphs cannot be used for it):
  official   ``qjl_gqa_score``: scores only (B, Hq, T), its query sketch precomputed; its
             output is checked against its own formula first
  ours       ``kvexport`` fused qjl decode: query sketch + scores + online softmax +
             weighted sum over 2-bit values + combine (strictly more work); also reported
             over CUDA-graph replays, as scripts/bench_kernels.py times it
  bf16 q·Kᵀ  a plain bf16 batched matmul of the queries with uncompressed keys (eager too)
Read rates are fractions of the read roofline measured in the same run (scripts/bench_kernels.py
``read_probes``). Writes OUT.json and OUT.md (``--render OUT.json`` re-renders without a GPU).

    python scripts/bench_qjl_official.py --official /tmp/QJL/qjl_kernel --out docs/bench_qjl_official
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from _bench_io import add_render_out, render_only, write_pair  # noqa: E402
from kvexport import codecs  # noqa: E402
import kvexport.kernels as K  # noqa: E402
from bench_kernels import (decode_time, event_time, machine_line, machine_meta, n_sets,  # noqa: E402
                           random_caches, read_probes, read_roofline, roofline_md)


def build_official(src: Path):
    from torch.utils.cpp_extension import load
    cu = src / "csrc" / "qjl_gqa_score_kernel.cu"
    if not cu.is_file():
        raise SystemExit(f"error: {cu} not found (pass the official qjl_kernel folder)")
    build = Path(tempfile.mkdtemp(prefix="qjl_official_"))
    return load(name="cuda_qjl_gqa_score", sources=[str(cu)], build_directory=str(build),
                extra_cuda_cflags=["-O3", "-std=c++17", "--use_fast_math", "--expt-relaxed-constexpr"],
                verbose=False)


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


def run(args, argv=None) -> dict:
    mod = build_official(Path(args.official))
    K.library()
    meta = machine_meta(argv, "bench_qjl_official.py")
    sms = meta["sms"]
    probes = read_probes(sms)
    hq, hkv, d = 32, 8, 128
    m, om, outl, group = args.m, args.outlier_m, args.outliers, args.group
    spec = f"qjl:m={m},outliers={outl},outlier_m={om},group={group}"
    codec = codecs.from_spec(spec)
    meta.update(official_source=str(args.official), spec=spec, q_heads=hq, kv_heads=hkv, head_dim=d)
    data = dict(meta=meta, probes=probes, rows=[])
    out = Path(args.out)
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
            # Ours: full fused decode on the same sketch sizes, eager like the official kernel (and by graph).
            nbytes = codec.nbytes(d, ctx, "key", b, hkv) + codec.nbytes(d, ctx, "value", b, hkv)
            ours = random_caches(codec, b, hkv, d, ctx)
            t_ours = decode_time(q, ours, ctx, sms, timer=event_time)
            t_graph = decode_time(q, ours, ctx, sms)
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

            t_mm = event_time(mm, reps=4 * len(kb))
            kb.clear()
            torch.cuda.empty_cache()
            data["rows"].append(dict(batch=b, context=ctx, official_score_s=t_off, ours_fused_s=t_ours,
                                     ours_fused_graph_s=t_graph, bf16_qk_s=t_mm, bf16_key_bytes=b * hkv * ctx * d * 2,
                                     official_key_bytes=key_bytes, ours_key_bytes=key_ours, ours_total_bytes=nbytes))
            derive(data)
            r = data["rows"][-1]
            print(f"B={b} T={ctx:6d} official score {t_off * 1e6:9.1f} us ({r['official_read_fraction'] * 100:4.1f}% read) | "
                  f"ours fused {t_ours * 1e6:8.1f} us eager, {t_graph * 1e6:8.1f} us graph | bf16 qK {t_mm * 1e6:7.1f} us "
                  f"| ours/official x{r['speedup_ours_vs_official']:.2f}", flush=True)
            write(out, data)
    return data


def derive(data: dict) -> dict:
    """Read roofline and ratios from the raw medians (idempotent; --render recomputes them)."""
    rates = []
    for r in data["rows"]:
        tag = f"B{r['batch']} {r['context']}"
        rates += [(r["official_key_bytes"] / r["official_score_s"], f"official score, {tag}"),
                  (r["ours_total_bytes"] / r["ours_fused_s"], f"ours eager, {tag}"),
                  (r["ours_total_bytes"] / r["ours_fused_graph_s"], f"ours graph, {tag}"),
                  (r["bf16_key_bytes"] / r["bf16_qk_s"], f"bf16 q·Kᵀ, {tag}")]
    data["read_roofline"] = read_roofline(data["probes"], rates)
    bps = data["read_roofline"]["Bps"]
    for r in data["rows"]:
        r["official_read_fraction"] = r["official_key_bytes"] / r["official_score_s"] / bps
        r["ours_read_fraction"] = r["ours_total_bytes"] / r["ours_fused_s"] / bps
        r["speedup_ours_vs_official"] = r["official_score_s"] / r["ours_fused_s"]
    return data


def render_md(data: dict) -> str:
    data = derive(json.loads(json.dumps(data)))
    m = data["meta"]
    lines = ["# QJL scoring vs the official kernels", "",
             f"Generated by `scripts/bench_qjl_official.py` from `{m['json_name']}` (re-render: "
             f"`python scripts/bench_qjl_official.py --render {m['json_name']} --out STEM`). Do not edit by hand.", "",
             machine_line(m), "", f"Reproduce: `{m['command']}` (the official sources are kept outside the repository)",
             "", "## Read roofline", "", *roofline_md(data["probes"], data["read_roofline"]),
             f"{m['q_heads']} q / {m['kv_heads']} kv heads, d = {m['head_dim']}, `{m['spec']}`. Official: scores only; "
             "ours: the whole fused decode (sketch + scores + softmax + 2-bit values). Both timed the same way: median "
             "of eager launches between CUDA events, inputs rotated past L2 (the official extension launches on the "
             "legacy default stream, which CUDA-graph capture refuses); ours over CUDA-graph replays for reference. "
             "The official output is first checked against its own formula. Read = bytes read (official: its key "
             "bytes; ours: key + value bytes) / time / read roofline.", "",
             "| batch | context | official score µs | ours fused µs | ours / official | official read | ours read | "
             "ours fused µs (graph) | bf16 q·Kᵀ µs |", "|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        lines.append(f"| {r['batch']} | {r['context']} | {r['official_score_s'] * 1e6:.1f} | {r['ours_fused_s'] * 1e6:.1f} | "
                     f"{r['speedup_ours_vs_official']:.2f}× | {r['official_read_fraction'] * 100:.1f} % | "
                     f"{r['ours_read_fraction'] * 100:.1f} % | {r['ours_fused_graph_s'] * 1e6:.1f} | {r['bf16_qk_s'] * 1e6:.1f} |")
    return "\n".join(lines) + "\n"


def write(out: Path, data: dict) -> None:
    data["meta"]["json_name"] = out.with_suffix(".json").name
    write_pair(out.with_suffix(".json"), data, render_md, derive=derive)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--official", help="folder of the official qjl_kernel sources (kept outside the repo)")
    ap.add_argument("--contexts", nargs="+", type=int, default=[4096, 32768])
    ap.add_argument("--batch", nargs="+", type=int, default=[8])
    ap.add_argument("--m", type=int, default=256)
    ap.add_argument("--outlier-m", type=int, default=128)
    ap.add_argument("--outliers", type=int, default=4)
    ap.add_argument("--group", type=int, default=32)
    add_render_out(ap, ROOT / "docs" / "bench_qjl_official")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.render:
        return render_only(args.render, out.with_suffix(".md"), render_md)
    if not args.official:
        print("error: --official DIR is required (the official qjl_kernel sources)", file=sys.stderr)
        return 2
    if args.group % 32 or min(args.batch + args.contexts) < 1 or any(c % args.group for c in args.contexts):
        print("error: --group must be a multiple of 32 (the official kernel) dividing every context; "
              "--batch and --contexts >= 1", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("error: bench_qjl_official needs a CUDA GPU (--render works without one)", file=sys.stderr)
        return 2
    run(args, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
