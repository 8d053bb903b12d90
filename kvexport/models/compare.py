"""``kvexport compare``: every codec on the same windows of one model and text → reports.

Writes ``report.json`` (everything), ``report.md`` (tables), ``report.html``
(tables + embedded PNG plots) and the plots themselves: ``frontier.png`` (the
rate–fidelity frontier: compression vs Δppl and vs attention cosine, one curve
per codec) and ``layer_cosine.png`` (attention-output cosine per layer).
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
import math
import time
from pathlib import Path
from typing import Any, Sequence

from .. import codecs
from .cache import LayerPlan, parse_overrides
from .evaluate import baseline, evaluate, result_row, run_window, text_windows
from .loading import LoadedModel
from .rewrite import CompressedSession

# Codecs whose rate sweep the default run adds (the baselines FibQuant is compared with, and FibQuant).
SWEPT = ("kivi", "turbo", "fibquant")


def default_specs() -> list[str]:
    """fp16 (path check), every codec at its paper point, and the rate sweeps of :data:`SWEPT`."""
    specs = []
    for name in codecs.names():
        specs.append(name)
        if name in SWEPT:
            for sweep in codecs.codec_class(name).RATE_SWEEP:
                specs.append(name + ":" + ",".join(f"{k}={'/'.join(map(str, v)) if isinstance(v, (list, tuple)) else v}"
                                                   for k, v in sweep.items()))
    return specs


@dataclasses.dataclass
class CompareConfig:
    specs: Sequence[str]
    windows: int = 32
    window_len: int = 512
    fp16_window: int | None = None       # overrides every codec's ``window``
    layer_overrides: Sequence[str] = ()  # "LAYERS=SPEC", applied to every codec except fp16
    compress: str = "kv"                 # "kv" | "k" (keys only) | "v" (values only), every codec


def build_plans(cfg: CompareConfig, num_layers: int) -> list[tuple[str, LayerPlan]]:
    """(spec label, plan) per requested spec, validated before any model work; duplicates dropped."""
    plans, seen = [], set()
    overrides = parse_overrides(cfg.layer_overrides, num_layers)
    for spec in cfg.specs:
        name, given = codecs._core.params.parse_spec(spec)
        if cfg.fp16_window is not None and name != "fp16":
            given = {**given, "window": cfg.fp16_window}
        codec = codecs.get(name, **given)
        key = (codec.spec_hash, tuple(sorted((i, c.spec_hash) for i, c in overrides.items())))
        if key in seen:
            continue
        seen.add(key)
        plan = LayerPlan(codec, {} if name == "fp16" else dict(overrides), compress=cfg.compress)
        label = spec + (f" [window={codec_window_of(codec)}]" if cfg.fp16_window else "")
        if cfg.compress != "kv":
            label += f" [{'keys' if cfg.compress == 'k' else 'values'} only]"
        if plan.overrides:
            label += f" [{plan.describe()}]"
        plans.append((label, plan))
    return plans


def codec_window_of(codec) -> int:
    return int(getattr(codec.params, "window", 0) or 0)


def _timed(fn, device) -> float:
    """Wall seconds of ``fn()``, the device drained before and after (CUDA work, not its launch)."""
    import torch
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def _own_attention(lm: LoadedModel, w, decode_from: int | None) -> None:
    """The model with its own attention and cache on the schedule the codec rows run."""
    if decode_from is None:
        lm.model(input_ids=w, use_cache=False)
        return
    pkv = lm.model(input_ids=w[:, :decode_from], use_cache=True).past_key_values
    for t in range(decode_from, w.shape[1]):
        pkv = lm.model(input_ids=w[:, t:t + 1], past_key_values=pkv, use_cache=True).past_key_values


def time_window(lm: LoadedModel, w, plan: LayerPlan | None, device, codec_device=None, backend="torch") -> float:
    """Seconds of one window (1, L), timed alike for the baseline (``plan`` None: the model's own
    attention) and every codec: synchronized, no cosine reference in the timed region, the same
    schedule (one prefill; backend "cuda": prefill L/2 + one-token decode steps, as ``evaluate``)."""
    import torch
    decode_from = max(1, w.shape[1] // 2) if backend == "cuda" else None
    with torch.no_grad():
        if plan is None:
            return _timed(lambda: _own_attention(lm, w, decode_from), device)
        with CompressedSession(lm.model, plan, recipe=lm.recipe, compute_device=codec_device, backend=backend,
                               capacity=w.shape[1]) as s:
            return _timed(lambda: run_window(s, w, decode_from), device)


def run_compare(lm: LoadedModel, text: str, text_name: str, cfg: CompareConfig,
                progress: bool = True, device: str = "cpu",
                codec_device: str | None = None, backend: str = "torch") -> dict[str, Any]:
    """Measure the baseline and every spec on the same windows; returns the report dict.

    ``backend="cuda"``: every spec's attention on the CUDA kernels (prefill of half a window,
    then teacher-forced decode steps; see :func:`kvexport.models.evaluate.evaluate`)."""
    from tqdm.auto import tqdm
    geo = lm.recipe.geometry(lm.model.config)
    plans = build_plans(cfg, geo.layers)
    for _, plan in plans:  # head_dim problems surface before the long run
        for i in range(geo.layers):
            plan.codec(i).check_head_dim(geo.head_dim)
    wins = text_windows(lm, text, cfg.windows, cfg.window_len).to(device)
    bar = tqdm(total=len(wins) * (len(plans) + 1), desc="compare", unit="win", disable=not progress)
    t0 = time.perf_counter()
    bar.set_postfix_str("baseline")
    base = baseline(lm, wins, progress=lambda: bar.update(1))
    # Speed: window 0 once more per row, timed alike (see time_window); the measurement passes
    # above include the cosine reference and, for the baseline, no synchronization.
    tw = wins[:1]
    base["seconds_per_window"] = time_window(lm, tw, None, device, backend=backend)
    rows = []
    for label, plan in plans:
        bar.set_postfix_str(label)
        r = evaluate(lm, label, plan, wins, progress=lambda: bar.update(1), codec_device=codec_device,
                     backend=backend)
        row = result_row(r, base["ppl"])
        row["seconds_per_window"] = time_window(lm, tw, plan, device, codec_device, backend)
        row["ms_per_token"] = 1e3 * row["seconds_per_window"] / (tw.shape[1] - 1)
        rows.append(row)
    bar.close()
    from ..envinfo import collect  # versions, GPU: for the record
    rep = dict(model=lm.name, device=device, codec_device=codec_device or device, backend=backend, text=text_name, windows=int(len(wins)), window_len=cfg.window_len,
               geometry=dataclasses.asdict(geo), family=lm.recipe.family,
               fp16_window=cfg.fp16_window, layer_overrides=list(cfg.layer_overrides), compress=cfg.compress,
               baseline=dict(ppl=base["ppl"], nll=base["nll"], seconds=base["seconds"], tokens=base["tokens"],
                             seconds_per_window=base["seconds_per_window"]),
               timing="window 0 run once more per row, synchronized, no cosine reference, the same "
                      "schedule for the baseline and every codec",
               codecs=rows, targets=targets(rows, base["ppl"]), seconds=time.perf_counter() - t0,
               environment=_safe_env(collect))
    return rep


def _safe_env(collect) -> Any:
    try:
        return collect()
    except Exception as e:  # the report must not fail on an environment probe
        return {"error": str(e)}


def summary(rep: dict) -> dict:
    """The ``--json`` summary."""
    keys = ("spec", "bits_per_coordinate", "compression", "ppl", "delta_ppl", "attn_cosine", "window",
            "overrides", "compress", "kv_bytes_per_token", "seconds_per_window", "sanitized")
    return dict(model=rep["model"], text=rep["text"], windows=rep["windows"], window_len=rep["window_len"],
                compress=rep.get("compress", "kv"), baseline=dict(ppl=rep["baseline"]["ppl"]),
                codecs=[{k: r.get(k, "kv" if k == "compress" else None) for k in keys} for r in rep["codecs"]], targets=rep["targets"])


# ----- targets of issue 3 ------------------------------------------------------

def _interp(points: list[tuple[float, float]], x: float) -> float | None:
    """Linear interpolation of y at x in log-compression over points sorted by x; None outside."""
    pts = sorted(points)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            if x1 == x0:
                return min(y0, y1)
            t = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return y0 + t * (y1 - y0)
    for xx, yy in pts:
        if abs(xx - x) / x < 0.03:  # matched rate within 3 %
            return yy
    return None


def targets(rows: list[dict], base_ppl: float) -> list[dict]:
    """Evaluate the issue's relative targets on the measured rows (met / missed / n/a + numbers)."""
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["codec"], []).append(r)
    out = []

    def add(name, met, detail):
        out.append(dict(target=name, status=("n/a" if met is None else "met" if met else "missed"), detail=detail))

    fib, tur = by.get("fibquant", []), by.get("turbo", [])
    if fib and tur:
        fpts = [(r["compression"], r["delta_ppl"]) for r in fib]
        cmp_, ok = [], True
        for t in sorted(tur, key=lambda r: r["compression"]):
            f = _interp(fpts, t["compression"])
            if f is None:
                continue
            cmp_.append(f"{t['compression']:.2f}x: fibquant {f:+.3f} vs turbo {t['delta_ppl']:+.3f}")
            ok &= f < t["delta_ppl"]
        add("fibquant dominates turbo at matched rates", ok if cmp_ else None, "; ".join(cmp_) or "no overlap")
        hi = [t for t in tur if 6.5 <= t["compression"] <= 8.5]
        if hi:
            t = hi[0]
            f = _interp(fpts, t["compression"])
            add("fibquant Δppl ≤ turbo/3 at ≈7–8×", None if f is None else f <= t["delta_ppl"] / 3,
                f"at {t['compression']:.2f}x: fibquant {f if f is None else round(f, 3)} vs turbo {t['delta_ppl']:.3f}")
    good = [r for r in rows if r["codec"] != "fp16" and r["compression"] >= 3.75]
    if good:
        best = min(good, key=lambda r: r["delta_ppl"])
        add("best Δppl ≤ 1% of fp16 ppl at ≥ 3.75×", best["delta_ppl"] <= 0.01 * base_ppl,
            f"{best['spec']}: {best['compression']:.2f}x Δppl {best['delta_ppl']:+.3f} (limit {0.01 * base_ppl:.3f})")
    kivi = by.get("kivi", [])
    for name in ("qjl", "polar", "ternary"):
        paper = [r for r in by.get(name, []) if ":" not in r["spec"].split(" ")[0]]
        if paper and kivi:
            r = paper[0]
            dom = [k for k in kivi if k["compression"] >= r["compression"] and k["delta_ppl"] < r["delta_ppl"]]
            add(f"{name} (paper point) not dominated by kivi", not dom,
                f"{r['compression']:.2f}x Δppl {r['delta_ppl']:+.3f}" +
                (f"; dominated by {dom[0]['spec']} ({dom[0]['compression']:.2f}x, {dom[0]['delta_ppl']:+.3f})" if dom else ""))
    five = [r for r in rows if r["codec"] != "fp16" and r["compression"] >= 5.0]
    if five:
        best = max(five, key=lambda r: r["attn_cosine"])
        add("attention cosine ≥ 0.99 at ≥ 5×", best["attn_cosine"] >= 0.99,
            f"{best['spec']}: {best['compression']:.2f}x cosine {best['attn_cosine']:.4f}")
    return out


# ----- report files --------------------------------------------------------------

def _plots(rep: dict, out: Path) -> dict[str, Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in rep["codecs"] if r["codec"] != "fp16"]
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["codec"], []).append(r)
    files = {}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, rs in by.items():
        rs = sorted(rs, key=lambda r: r["compression"])
        x = [r["compression"] for r in rs]
        axes[0].plot(x, [max(r["delta_ppl"], 1e-3) for r in rs], "o-", label=name)
        axes[1].plot(x, [r["attn_cosine"] for r in rs], "o-", label=name)
    axes[0].set_yscale("log")
    axes[0].axhline(0.01 * rep["baseline"]["ppl"], color="gray", ls=":", lw=1, label="1% of fp16 ppl")
    axes[0].set(xlabel="compression vs fp16 (×)", ylabel="Δppl vs fp16 (log)", title="rate–fidelity: perplexity")
    axes[1].set(xlabel="compression vs fp16 (×)", ylabel="mean attention-output cosine",
                title="rate–fidelity: attention")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{rep['model']} — {rep['windows']} windows × {rep['window_len']} tokens", fontsize=10)
    fig.tight_layout()
    files["frontier"] = out / "frontier.png"
    fig.savefig(files["frontier"], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(12, 4.5))
    for r in rows:
        ax.plot(range(len(r["layer_cosine"])), r["layer_cosine"], ".-", lw=1, label=f"{r['spec']} ({r['compression']:.1f}×)")
    ax.set(xlabel="layer", ylabel="attention-output cosine", title="per-layer attention cosine vs exact attention")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    files["layer_cosine"] = out / "layer_cosine.png"
    fig.savefig(files["layer_cosine"], dpi=110)
    plt.close(fig)
    return files


def _table(rep: dict) -> tuple[list[str], list[list[str]]]:
    head = ["codec spec", "bits/coord", "compression", "ppl", "Δppl", "attn cosine", "min layer cos",
            "KV bytes/token", "s/window"]
    body = [["fp16 (model's own attention)", "16.000", "1.00×", f"{rep['baseline']['ppl']:.3f}", "—", "—", "—",
             f"{rep['codecs'][0]['kv_bytes_per_token'] * rep['codecs'][0]['compression'] if rep['codecs'] else 0:.0f}",
             f"{rep['baseline']['seconds_per_window']:.2f}"]]
    for r in rep["codecs"]:
        body.append([r["spec"], f"{r['bits_per_coordinate']:.3f}", f"{r['compression']:.2f}×", f"{r['ppl']:.3f}",
                     f"{r['delta_ppl']:+.3f}", f"{r['attn_cosine']:.4f}", f"{min(r['layer_cosine']):.4f}",
                     f"{r['kv_bytes_per_token']:.0f}", f"{r['seconds_per_window']:.2f}"])
    return head, body


def write_reports(rep: dict, out: Path) -> None:
    from ..cli.common import write_json
    files = _plots(rep, out)
    rep = dict(rep, plots={k: v.name for k, v in files.items()})
    write_json(out / "report.json", rep)
    head, body = _table(rep)
    md = [f"# kvexport compare — {rep['model']}", "",
          f"Text: {rep['text']}; {rep['windows']} windows × {rep['window_len']} tokens (the same for every codec). "
          f"fp16 perplexity {rep['baseline']['ppl']:.3f}. Attention cosine: per layer, compressed-cache attention "
          f"output vs exact fp32 attention on the same q/k/v, mean over heads and positions.", "",
          f"Spec applied to every codec: fp16 window {rep.get('fp16_window') if rep.get('fp16_window') is not None else 'per codec'}; "
          f"layer overrides {', '.join(rep.get('layer_overrides') or []) or 'none'}; compressed half "
          f"{ {'kv': 'keys and values', 'k': 'keys only (values fp16)', 'v': 'values only (keys fp16)'}[rep.get('compress', 'kv')]}.", "",
          f"s/window: {rep['timing']}.", "",
          "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    md += ["| " + " | ".join(row) + " |" for row in body]
    for r in rep["codecs"]:  # values fp16 cannot hold: the model's bug, not the codec's, but shown
        san = r.get("sanitized") or {}
        if san.get("nan_zeroed") or san.get("clamped"):
            md += ["", f"**{r['spec']}: the model gave the cache {san['nan_zeroed']} NaN (stored as 0) and "
                       f"{san['clamped']} values beyond ±65504 (stored as ±65504), layers "
                       f"{', '.join(map(str, san['layers']))}.**"]
    md += ["", "## Targets (issue 3)", "", "| target | status | numbers |", "|---|---|---|"]
    md += [f"| {t['target']} | {t['status']} | {t['detail']} |" for t in rep["targets"]]
    md += ["", f"![frontier]({files['frontier'].name})", "", f"![per-layer cosine]({files['layer_cosine'].name})", ""]
    (out / "report.md").write_text("\n".join(md))

    def img(p: Path) -> str:
        return f'<img alt="{p.stem}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'

    esc = html.escape
    rows_html = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in body)
    t_html = "".join(f"<tr><td>{esc(t['target'])}</td><td class='{t['status'].replace('/', '')}'>{esc(t['status'])}"
                     f"</td><td>{esc(t['detail'])}</td></tr>" for t in rep["targets"])
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>kvexport compare</title>
<style>body{{font-family:sans-serif;max-width:1300px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}td:first-child{{text-align:left}}
.met{{color:#070}}.missed{{color:#a00}}img{{max-width:100%}}</style></head><body>
<h1>kvexport compare — {esc(rep['model'])}</h1>
<p>Text: {esc(rep['text'])}; {rep['windows']} windows × {rep['window_len']} tokens; fp16 perplexity
{rep['baseline']['ppl']:.3f}.</p>
<table><tr>{''.join(f'<th>{esc(h)}</th>' for h in head)}</tr>{rows_html}</table>
<h2>Targets</h2><table><tr><th>target</th><th>status</th><th>numbers</th></tr>{t_html}</table>
<h2>Rate–fidelity frontier</h2>{img(files['frontier'])}
<h2>Per-layer attention cosine</h2>{img(files['layer_cosine'])}
<h2>Raw</h2><pre>{esc(json.dumps(summary(rep), indent=1))}</pre></body></html>"""
    (out / "report.html").write_text(page)


def merge_reports(parts: Sequence[dict]) -> dict:
    """One report from runs of the same model, text and windows that split the codec list
    (parallel shards); refuses parts whose baseline or windows differ."""
    if not parts:
        raise ValueError("no reports to merge")
    first = parts[0]
    for p in parts[1:]:
        same = (p["model"], p["text"], p["windows"], p["window_len"]) == \
               (first["model"], first["text"], first["windows"], first["window_len"])
        if not same or abs(p["baseline"]["ppl"] - first["baseline"]["ppl"]) > 1e-6 * first["baseline"]["ppl"]:
            raise ValueError("reports differ in model, text, windows or baseline; they are not one run")
    rows = [r for p in parts for r in p["codecs"]]
    return dict(first, codecs=rows, targets=targets(rows, first["baseline"]["ppl"]),
                seconds=max(p["seconds"] for p in parts), shards=len(parts))
