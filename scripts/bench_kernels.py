"""Benchmark the fused decode-attention and append kernels on the GPU.

Writes OUT.json (machine, probes, raw medians) and OUT.md (rendered from that JSON). Per codec
and shape, in one run:

* decode attention time (median over CUDA-graph replays, inputs rotated so repeated calls do
  not run from L2) and its speed-up over the best fp16 ``scaled_dot_product_attention`` of the
  same shape (the fastest of the default dispatch and each backend that accepts the shape);
* the read rate on the compressed K+V bytes as a fraction of the measured read roofline:
  the highest read rate of the streaming probes (each reads a 2 GiB fp16 buffer once and writes
  ~nothing: a 16-byte-load NVRTC kernel, ``torch.amax``, ``torch.sum``) and of every fp16 SDPA
  and codec row of the run. A row that read faster than the probes sets the roofline (and the
  report says so), so no fraction exceeds 100 %;
* every decode kernel generation (``--kernels v1 v2``; v2 where the codec has one) on the same
  caches, as rows ``SPEC`` and ``SPEC [v2]``;
* append: the amortised cost per token (G tokens appended one by one from a group boundary,
  time / G, G = the codec's token group, 1 for per-token layouts) and the worst case (the
  group-completing token) as fractions of a decode step.

    python scripts/bench_kernels.py --contexts 4096 32768 131072 --batch 1 8 --shapes llama3-8b \\
        --grid smollm2-135m:8:4096,32768 --out docs/benchmarks
    python scripts/bench_kernels.py --render docs/benchmarks.json --out docs/benchmarks   # no GPU
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from _bench_io import add_render_out, render_only, write_pair  # noqa: E402
from kvexport import codecs  # noqa: E402
import kvexport.kernels as K  # noqa: E402

SHAPES = {"llama3-8b": (32, 8, 128), "smollm2-135m": (9, 3, 64)}
DEFAULT_CODECS = ["fp16", "kivi:bits=2", "kivi:bits=4", "turbo:bits=3", "turbo:bits=4", "fibquant",
                  "fibquant:k=4,N=16", "polar", "ternary", "qjl"]
ROTATE_BYTES = 256 << 20  # rotate input sets until they exceed the 50 MB L2 several times
MAX_SETS = 128            # up to 128 sets, so that small compressed caches rotate past L2 too
PROBE_BYTES = 2 << 30     # read probes stream a 2 GiB buffer
SDPA_BACKENDS = ("default", "flash", "efficient", "cudnn")

READ_KERNEL = r"""
extern "C" __global__ void kvx_read_probe(const uint4* __restrict__ src, int n16, unsigned* __restrict__ out) {
    // Each byte is read once with streaming 16-byte loads, 4 in flight per thread; the XOR keeps
    // the loads alive and is written only if it hits an arbitrary value (almost never).
    const int stride = gridDim.x * blockDim.x;
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    unsigned acc = 0;
    for (; i + 3 * stride < n16; i += 4 * stride) {
        uint4 a = __ldcs(src + i), b = __ldcs(src + i + stride);
        uint4 c = __ldcs(src + i + 2 * stride), d = __ldcs(src + i + 3 * stride);
        acc ^= a.x ^ a.y ^ a.z ^ a.w ^ b.x ^ b.y ^ b.z ^ b.w ^ c.x ^ c.y ^ c.z ^ c.w ^ d.x ^ d.y ^ d.z ^ d.w;
    }
    for (; i < n16; i += stride) {
        uint4 a = __ldcs(src + i);
        acc ^= a.x ^ a.y ^ a.z ^ a.w;
    }
    if (acc == 0x9E3779B9u) out[blockIdx.x] = acc;
}
"""


# ----- timing ------------------------------------------------------------------------------

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


def event_time(fn, reps: int = 20, trials: int = 7) -> float:
    """Median seconds per call of ``fn`` launched eagerly ``reps`` times between CUDA events (for
    code that graph capture refuses, and for timing two kernels the same way)."""
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


def read_probes(sms: int) -> dict:
    """Read rate (bytes/s) of streaming kernels that read each byte of a 2 GiB fp16 buffer once
    and write ~nothing; a probe that cannot run here is reported with its error."""
    n = PROBE_BYTES // 2
    buf = torch.empty(n, dtype=torch.float16, device="cuda").normal_()
    out: dict = {}

    def probe(name, fn):
        try:
            out[name] = dict(Bps=PROBE_BYTES / graph_time(fn, reps=3))
        except Exception as e:  # noqa: BLE001 - a probe that cannot run is reported, not fatal
            out[name] = dict(Bps=None, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")

    try:
        kern = torch.cuda._compile_kernel(READ_KERNEL, "kvx_read_probe")
        sink = torch.zeros(sms * 64, dtype=torch.int32, device="cuda")
        for blocks, threads in ((sms * 4, 1024), (sms * 8, 256), (sms * 16, 256)):
            probe(f"read kernel ({blocks}x{threads})",
                  lambda b=blocks, t=threads: kern(grid=(b, 1, 1), block=(t, 1, 1), args=[buf, PROBE_BYTES // 16, sink]))
    except Exception as e:  # noqa: BLE001 - NVRTC missing: the library probes still run
        out["read kernel"] = dict(Bps=None, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
    probe("torch.amax", lambda: torch.amax(buf))
    probe("torch.sum (fp32 accumulation)", lambda: torch.sum(buf, dtype=torch.float32))
    del buf
    torch.cuda.empty_cache()
    return out


# ----- inputs ------------------------------------------------------------------------------

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
    return max(1, min(MAX_SETS, math.ceil(ROTATE_BYTES / max(1, nbytes))))


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


def token_group(codec, d: int) -> int:
    """Tokens per quantization group of the layout (1 for per-token layouts): the smallest token
    count at which no role keeps a partial group in its fp16 ``residual``."""
    for t in range(1, 4097):
        if all(f.shape[0] == 0 for role in ("key", "value") for f in codec.layout(d, t, role)
               if f.name == "residual"):
            return t
    raise ValueError(f"{codec.name}: no token group ≤ 4096")


def decode_time(q, sets, ctx, sms, timer=graph_time, kernel: str = "v1") -> float:
    """Median seconds of one fused decode over a full cache of ``ctx`` tokens, rotating ``sets``
    (``kernel``: the decode generation, ``kvexport.kernels.decode_attention``)."""
    batch, hkv, d = q.shape[0], sets[0][0].heads, q.shape[-1]
    lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    it = [0]
    # Each generation with its own split rule; v1 is called as before the v2 kernels existed.
    kw = dict(num_splits=K.num_splits_for(batch, hkv, ctx, d, sms)) if kernel == "v1" else dict(kernel=kernel)

    def run():
        ck, cv = sets[it[0] % len(sets)]
        it[0] += 1
        K.decode_attention(q, ck, cv, lens, max_len=ctx, **kw)

    return timer(run, reps=4 * len(sets))


# ----- rows --------------------------------------------------------------------------------

def kernels_for(codec, wanted) -> list[str]:
    """The decode generations of ``wanted`` that exist for ``codec`` (v1 always)."""
    return [k for k in wanted if k == "v1" or codec.name in getattr(K, "V2_CODECS", ())]


def bench_codec(spec, hq, hkv, d, batch, ctx, sms, kernels=("v1",)):
    """Decode time per kernel generation, and the append costs, of one codec on one shape."""
    codec = codecs.from_spec(spec)
    nbytes = codec.nbytes(d, ctx, "key", batch, hkv) + codec.nbytes(d, ctx, "value", batch, hkv)
    sets = random_caches(codec, batch, hkv, d, ctx)
    q = torch.randn(batch, hq, 1, d, dtype=torch.float16, device="cuda")
    times = {k: decode_time(q, sets, ctx, sms, kernel=k) for k in kernels_for(codec, kernels)}
    # Append (keys + values, one token per sequence): G tokens one by one from a group
    # boundary (amortised), and the group-completing token alone (worst case).
    g = token_group(codec, d)
    start = (ctx // g - 1) * g
    if start < 0:
        raise ValueError(f"{spec}: context {ctx} is shorter than one token group ({g})")
    ck, cv = sets[0]
    xk = torch.randn(batch, hkv, 1, d, dtype=torch.float16, device="cuda")
    lens = [torch.full((batch,), start + i, dtype=torch.int32, device="cuda") for i in range(g)]

    def group():
        for i, n in enumerate(lens):  # max_len: lens cannot be read while a graph is captured
            K.append(ck, xk, n, max_len=start + i)
            K.append(cv, xk, n, max_len=start + i)

    last = start + g - 1
    t_group = graph_time(group, reps=max(1, 32 // g))
    t_last = graph_time(lambda: (K.append(ck, xk, lens[-1], max_len=last), K.append(cv, xk, lens[-1], max_len=last)),
                        reps=10)
    rotated = nbytes * len(sets)
    del sets
    common = dict(bytes=nbytes, rotation_bytes=rotated, token_group=g, append_amortised_s=t_group / g,
                  append_worst_s=t_last, splits=K.num_splits_for(batch, hkv, ctx, d, sms),
                  compression=codec.compression(d, ctx))
    return [dict(codec=spec if k == "v1" else f"{spec} [{k}]", kernel=k, time_s=t, **common) for k, t in times.items()]


def bench_sdpa(hq, hkv, d, batch, ctx) -> dict:
    """fp16 SDPA decode (one query token) per backend: seconds, or None with the refusal."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    nbytes = 2 * batch * hkv * ctx * d * 2
    sets = [(torch.randn(batch, hkv, ctx, d, dtype=torch.float16, device="cuda"),
             torch.randn(batch, hkv, ctx, d, dtype=torch.float16, device="cuda")) for _ in range(n_sets(nbytes))]
    q = torch.randn(batch, hq, 1, d, dtype=torch.float16, device="cuda")
    pick = dict(flash=SDPBackend.FLASH_ATTENTION, efficient=SDPBackend.EFFICIENT_ATTENTION,
                cudnn=SDPBackend.CUDNN_ATTENTION)
    times, errors = {}, {}
    for name in SDPA_BACKENDS:
        it = [0]

        def run():
            k, v = sets[it[0] % len(sets)]
            it[0] += 1
            F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

        try:
            if name == "default":
                times[name] = graph_time(run, reps=4 * len(sets))
            else:
                with sdpa_kernel([pick[name]]):
                    times[name] = graph_time(run, reps=4 * len(sets))
        except Exception as e:  # noqa: BLE001 - a backend that refuses the shape is reported, not fatal
            times[name] = None
            errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}" if str(e) else type(e).__name__
    sets.clear()
    torch.cuda.empty_cache()
    return dict(times_s=times, errors=errors, bytes=nbytes)


# ----- derived columns (also what --render recomputes) --------------------------------------

def read_roofline(probes: dict, rates: list[tuple[float, str]]) -> dict:
    """The highest read rate (bytes/s) among the streaming ``probes`` and the measured ``rates``
    ((bytes/s, label) of kernels that read a known number of bytes), with where it came from."""
    probe_rates = [(p["Bps"], f"probe: {name}") for name, p in probes.items() if p.get("Bps")]
    if not probe_rates + rates:
        raise ValueError("no read rate measured: nothing to normalise by")
    best_probe = max(probe_rates, default=(None, None))
    bps, source = max(probe_rates + rates)
    return dict(Bps=bps, source=source, best_probe_Bps=best_probe[0], best_probe=best_probe[1],
                from_probe=source.startswith("probe:"))


def roofline_md(probes: dict, roof: dict) -> list[str]:
    """The probe table and the roofline sentence (shared by the benchmark scripts' reports)."""
    lines = ["Streaming probes read every byte of a 2 GiB fp16 buffer once and write ~nothing (medians of "
             "CUDA-graph replays):", "", "| probe | read TB/s |", "|---|---|"]
    for name, p in probes.items():
        lines.append(f"| {name} | {_tb(p.get('Bps'))}{' (' + p['error'] + ')' if p.get('error') else ''} |")
    lines += ["", f"Read roofline used below: **{_tb(roof['Bps'])} TB/s**, the highest read rate measured in this "
              f"run ({roof['source']}).", ""]
    if not roof["from_probe"]:
        lines += [f"That row read faster than the best streaming probe ({_tb(roof['best_probe_Bps'])} TB/s, "
                  f"{roof['best_probe'] or 'none ran'}): the probes underestimate this GPU's read bandwidth, so the "
                  "fastest measured read is the roofline instead.", ""]
    return lines


def machine_line(m: dict) -> str:
    clocks = m.get("clocks") or {}
    clk = ", ".join(f"{k} {v}" for k, v in clocks.items() if k != "error") or \
        f"clocks not readable ({clocks.get('error', '?')})"
    return (f"{m['date']} · {m['gpu']} ({m['sms']} SMs, compute capability {m['compute_capability']}) · {clk} · "
            f"driver {m.get('driver') or '?'} · torch {m['torch']} · CUDA {m['cuda']} · Python {m['python']}")


def machine_meta(argv, script: str) -> dict:
    """GPU, clocks, versions and the command line, for the JSON of a GPU benchmark."""
    props = torch.cuda.get_device_properties(0)
    return dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), gpu=props.name,
                sms=props.multi_processor_count, compute_capability=f"{props.major}.{props.minor}",
                memory_bytes=props.total_memory, torch=torch.__version__, cuda=torch.version.cuda,
                python=platform.python_version(),
                command=" ".join([f"python scripts/{script}"] + list(sys.argv[1:] if argv is None else argv)),
                **nvidia_smi())


def derive(data: dict) -> dict:
    """Add the read roofline and every ratio to ``data`` (raw medians in, ratios out; idempotent)."""
    rates = []
    for c in data["configs"]:
        ok = {k: v for k, v in c["sdpa"]["times_s"].items() if v}
        c["sdpa_best"] = min(ok, key=ok.get) if ok else None
        c["sdpa_best_s"] = ok[c["sdpa_best"]] if ok else None
        tag = f"{c['shape']} B{c['batch']} {c['context']}"
        if ok:
            rates.append((c["sdpa"]["bytes"] / c["sdpa_best_s"], f"fp16 SDPA ({c['sdpa_best']}), {tag}"))
        for r in c["rows"]:
            rates.append((r["bytes"] / r["time_s"], f"{r['codec']}, {tag}"))
    data["read_roofline"] = read_roofline(data["probes"], rates)
    bps = data["read_roofline"]["Bps"]
    for c in data["configs"]:
        c["sdpa_read_fraction"] = c["sdpa"]["bytes"] / c["sdpa_best_s"] / bps if c["sdpa_best_s"] else None
        for r in c["rows"]:
            r["read_fraction"] = r["bytes"] / r["time_s"] / bps
            r["speedup_vs_sdpa_best"] = c["sdpa_best_s"] / r["time_s"] if c["sdpa_best_s"] else None
            r["append_amortised_fraction"] = r["append_amortised_s"] / r["time_s"]
            r["append_worst_fraction"] = r["append_worst_s"] / r["time_s"]
    return data


def _tb(bps) -> str:
    return "—" if bps is None else f"{bps / 1e12:.2f}"


def _ctx(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def render_md(data: dict) -> str:
    """Markdown of a bench_kernels JSON (derived columns recomputed from the raw medians)."""
    data = derive(json.loads(json.dumps(data)))
    m = data["meta"]
    lines = [
        "# Kernel benchmarks", "",
        f"Generated by `scripts/bench_kernels.py` from `{m['json_name']}` (re-render: "
        f"`python scripts/bench_kernels.py --render {m['json_name']} --out STEM`). Do not edit by hand.", "",
        machine_line(m), "", f"Reproduce: `{m['command']}`", "", "## Read roofline", "",
        *roofline_md(data["probes"], data["read_roofline"]),
    ]
    lines += ["Decode attention, one query token per sequence, full caches of `context` tokens; medians of CUDA-graph "
              "replays, inputs rotated past L2. Speed-up = the best fp16 `scaled_dot_product_attention("
              "enable_gqa=True)` of the same shape and run (fastest of: " + ", ".join(SDPA_BACKENDS) +
              ") / our time. Read = compressed K+V bytes / time / read roofline. Append (one key and value per "
              "sequence): amortised = G tokens appended one by one from a group boundary / G; worst = the "
              "group-completing token; both as % of the decode step of that row (G = tokens per quantization "
              "group, 1 for per-token layouts). `SPEC [v2]`: the second-generation decode kernel "
              "(`decode_attention(kernel=\"v2\")`) on the same caches in the same run; its append columns are "
              "the codec's.", ""]
    shapes = list(dict.fromkeys(c["shape"] for c in data["configs"]))
    for shape in shapes:
        cfgs = [c for c in data["configs"] if c["shape"] == shape]
        c0 = cfgs[0]
        keys = [(c["batch"], c["context"]) for c in cfgs]
        lines += [f"## {shape} ({c0['q_heads']} q / {c0['kv_heads']} kv heads, d = {c0['head_dim']}): speed-up over "
                  "the best fp16 SDPA · fraction of the read roofline on the compressed bytes", "",
                  "| codec | ×fp16 bytes | " + " | ".join(f"B{b} {_ctx(t)}" for b, t in keys) + " |",
                  "|---|---|" + "---|" * len(keys)]
        lines.append("| fp16 SDPA (best backend) | 1.00 | " + " | ".join(
            "—" if c["sdpa_best_s"] is None else f"1.00× · {c['sdpa_read_fraction'] * 100:.0f} %" for c in cfgs) + " |")
        specs = list(dict.fromkeys(r["codec"] for c in cfgs for r in c["rows"]))
        for spec in specs:
            cells, comp = [], None
            for c in cfgs:
                r = next((r for r in c["rows"] if r["codec"] == spec), None)
                comp = comp if r is None else r["compression"]
                cells.append("—" if r is None or r["speedup_vs_sdpa_best"] is None else
                             f"{r['speedup_vs_sdpa_best']:.2f}× · {r['read_fraction'] * 100:.0f} %")
            lines.append(f"| {spec} | {comp:.2f} | " + " | ".join(cells) + " |")
        lines += ["", "| B | context | codec | ×fp16 bytes | µs | speed-up vs best SDPA | read roofline | "
                      "append amortised | append worst | G |", "|---|---|---|---|---|---|---|---|---|---|"]
        for c in cfgs:
            if c["sdpa_best_s"]:
                lines.append(f"| {c['batch']} | {c['context']} | fp16 SDPA ({c['sdpa_best']}) | 1.00 | "
                             f"{c['sdpa_best_s'] * 1e6:.1f} | 1.00× | {c['sdpa_read_fraction'] * 100:.0f} % | — | — | — |")
            for r in c["rows"]:
                sp = "—" if r["speedup_vs_sdpa_best"] is None else f"{r['speedup_vs_sdpa_best']:.2f}×"
                lines.append(f"| {c['batch']} | {c['context']} | {r['codec']} | {r['compression']:.2f} | "
                             f"{r['time_s'] * 1e6:.1f} | {sp} | {r['read_fraction'] * 100:.0f} % | "
                             f"{r['append_amortised_fraction'] * 100:.1f} % | {r['append_worst_fraction'] * 100:.1f} % | "
                             f"{r['token_group']} |")
        lines.append("")
    errs = sorted({f"{b}: {e}" for c in data["configs"] for b, e in c["sdpa"]["errors"].items()})
    skipped = [s for c in data["configs"] for s in c.get("skipped", [])]
    if errs:
        lines += ["SDPA backends that refused a shape: " + "; ".join(errs), ""]
    if skipped:
        lines += ["Not measured: " + "; ".join(skipped), ""]
    return "\n".join(lines)


# ----- machine ------------------------------------------------------------------------------

def nvidia_smi() -> dict:
    """Driver and clocks from nvidia-smi (current and maximum), or the reason they are missing."""
    q = "driver_version,clocks.sm,clocks.mem,clocks.max.sm,clocks.max.mem,power.limit"
    try:
        line = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader", "-i", "0"],
                              capture_output=True, text=True, timeout=20, check=True).stdout.strip()
        v = [x.strip() for x in line.split(",")]
        return dict(driver=v[0], clocks=dict(zip(("SM clock", "memory clock", "max SM clock", "max memory clock",
                                                  "power limit"), v[1:])))
    except Exception as e:  # noqa: BLE001 - no nvidia-smi: say so in the report
        return dict(driver=None, clocks=dict(error=f"nvidia-smi: {type(e).__name__}"))


def parse_grid(text: str) -> tuple[str, list[int], list[int]]:
    """``SHAPE:B[,B..]:T[,T..]`` → (shape, batches, contexts)."""
    parts = text.split(":")
    if len(parts) != 3 or parts[0] not in SHAPES:
        raise ValueError(f"--grid {text!r}: expected SHAPE:BATCHES:CONTEXTS with SHAPE one of {', '.join(SHAPES)}")
    try:
        b, t = [int(x) for x in parts[1].split(",")], [int(x) for x in parts[2].split(",")]
    except ValueError:
        raise ValueError(f"--grid {text!r}: batches and contexts are comma-separated integers") from None
    if min(b + t) < 1:
        raise ValueError(f"--grid {text!r}: batches and contexts must be >= 1")
    return parts[0], b, t


def write(out: Path, data: dict) -> None:
    data["meta"]["json_name"] = out.with_suffix(".json").name
    write_pair(out.with_suffix(".json"), data, render_md, derive=derive)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--codecs", nargs="+", default=DEFAULT_CODECS)
    ap.add_argument("--shapes", nargs="+", default=["llama3-8b"], choices=list(SHAPES))
    ap.add_argument("--contexts", nargs="+", type=int, default=[4096, 32768, 131072])
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--grid", action="append", default=[], metavar="SHAPE:B,..:T,..",
                    help="more (shape, batch, context) cases beside --shapes × --batch × --contexts, "
                         "e.g. smollm2-135m:8:4096,32768 (repeatable)")
    ap.add_argument("--kernels", nargs="+", default=["v1", "v2"], choices=["v1", "v2"],
                    help="decode kernel generations to time, side by side (v2 where a codec has it)")
    add_render_out(ap, ROOT / "docs" / "benchmarks")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.render:
        return render_only(args.render, out.with_suffix(".md"), render_md)
    try:
        grid = [(s, args.batch, args.contexts) for s in args.shapes] + [parse_grid(g) for g in args.grid]
        for spec in args.codecs:
            codecs.from_spec(spec)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if min(args.batch + args.contexts) < 1:
        print("error: --batch and --contexts must be >= 1", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("error: bench_kernels needs a CUDA GPU (--render works without one)", file=sys.stderr)
        return 2
    K.library()
    meta = machine_meta(argv, "bench_kernels.py")
    sms = meta["sms"]
    data = dict(meta=meta, probes=read_probes(sms), configs=[])
    for name, p in data["probes"].items():
        print(f"read probe {name}: {_tb(p.get('Bps'))} TB/s {p.get('error', '')}", flush=True)
    for shape, batches, contexts in grid:
        hq, hkv, d = SHAPES[shape]
        for batch in batches:
            for ctx in contexts:
                cfg = dict(shape=shape, q_heads=hq, kv_heads=hkv, head_dim=d, batch=batch, context=ctx,
                           sdpa=bench_sdpa(hq, hkv, d, batch, ctx), rows=[], skipped=[])
                data["configs"].append(cfg)
                best = min((t for t in cfg["sdpa"]["times_s"].values() if t), default=None)
                for spec in args.codecs:
                    try:
                        rs = bench_codec(spec, hq, hkv, d, batch, ctx, sms, args.kernels)
                    except (torch.OutOfMemoryError, ValueError, RuntimeError) as e:  # reported, and exit 1
                        msg = "out of memory" if isinstance(e, torch.OutOfMemoryError) else \
                            f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
                        cfg["skipped"].append(f"{shape} B{batch} {ctx} {spec}: {msg}")
                        print(cfg["skipped"][-1], flush=True)
                        continue
                    finally:
                        torch.cuda.empty_cache()
                    cfg["rows"] += rs
                    for r in rs:
                        print(f"{shape} B={batch} T={ctx:6d} {r['codec']:27s} {r['time_s'] * 1e6:8.1f} us  "
                              f"x{(best / r['time_s']) if best else 0:5.2f} vs best SDPA  append amortised "
                              f"{r['append_amortised_s'] * 1e6:6.1f} us, worst {r['append_worst_s'] * 1e6:6.1f} us "
                              f"(G={r['token_group']})", flush=True)
                    write(out, data)  # after every row: a run stopped by a time limit keeps what it measured
    meta["clocks_after"] = nvidia_smi()["clocks"]
    write(out, data)
    print(f"wrote {out.with_suffix('.json')}, {out.with_suffix('.md')}")
    return 1 if any(c["skipped"] for c in data["configs"]) else 0


if __name__ == "__main__":
    sys.exit(main())
