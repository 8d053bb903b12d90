"""torch ↔ onnxruntime agreement of an exported packed-cache decoder.

:func:`agreement` runs a prefill and ``steps − 1`` greedy decode steps three ways:

- **lock-step**: every step, onnxruntime runs on torch's exact inputs (ids, positions, past
  cache); its logits and every present field are compared with torch's: max / mean / median
  |Δ| per output (logits of all positions of the step; float fields per field name over all
  layers), and for packed uint8 fields the fraction of bytes that differ;
- **free-running**: each backend feeds its own argmax and its own present cache back
  (``greedy_ort``): token agreement and the first step where the tokens differ;
- **teacher-forced**: onnxruntime keeps its own cache but is fed torch's tokens, so one
  early divergence does not shift every later comparison: per-step argmax agreement and
  logit error on the same prefix.

Why packed codes can differ although every reference function reproduces its torch op
bit for bit on identical inputs (``tests/onnx/test_agreement.py``): the model's float layers
(projections, norms, MLP) run in onnxruntime's kernels with another summation order, so the
K / V reaching an encode op differ by a few ulp, and a value that lies within that distance of
a rounding boundary gets the neighbouring code.  How often is recorded in
:mod:`kvexport.tolerances` (stage ``codes``).
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import torch

from ..tolerances import CODE_FLIP_BYTES, FP16_NOISE_FLOOR, tolerance


def _stats(parts: list[np.ndarray]) -> dict[str, float]:
    """max / mean / median over every element; a field that stayed empty (qjl's outlier norms
    before the first complete group) counts as 0 with ``elements`` 0."""
    parts = [p.ravel() for p in parts if p.size]
    e = np.concatenate(parts) if parts else np.zeros(1)
    return dict(max=float(e.max()), mean=float(e.mean()), median=float(np.median(e)),
                elements=int(sum(p.size for p in parts)))


def _ulps(a: np.ndarray, b: np.ndarray) -> int:
    """Largest difference between equal-shaped fp16 arrays in units of one fp16 ulp at the larger
    magnitude, the unit floored at ``FP16_NOISE_FLOOR`` (0 if equal; −0 == +0)."""
    ne = a != b
    if not ne.any():
        return 0
    x, y = a[ne].astype(np.float64), b[ne].astype(np.float64)
    unit = np.maximum(np.spacing(np.maximum(np.abs(x), np.abs(y)).astype(np.float16)).astype(np.float64),
                      FP16_NOISE_FLOOR)
    return int(np.ceil(np.abs(x - y) / unit).max())


def _field(name: str) -> str:
    """``present.3.key.codes`` → ``key.codes`` (errors pool over layers)."""
    return re.sub(r"^\w+\.\d+\.", "", name)


def lockstep(sess, dec, prompt: torch.Tensor, steps: int) -> dict[str, Any]:
    """Per step, onnxruntime on torch's exact inputs; see the module doc.

    ``prompt`` (B, P) int64.  Returns torch's tokens (B, steps), per-step rows (logits of the
    last position, their |Δ|, the first layer whose packed codes differ and by what fraction of
    its code bytes) and per-output pooled errors / code-mismatch fractions."""
    names, pnames = dec.cache_names("past"), dec.cache_names("present")
    per_layer = len(names) // dec.layers
    past = dec.empty_past(prompt.shape[0])
    ids, n, toks, rows = prompt, 0, [], []
    errs: dict[str, list[np.ndarray]] = {"logits": []}
    diff_bytes: dict[str, list[int]] = {}
    with torch.no_grad():
        for _ in range(steps):
            pos = torch.arange(n, n + ids.shape[1]).unsqueeze(0).expand(ids.shape[0], -1)
            lg, *pres = dec(ids, pos, *past)
            o = sess.run(None, {"input_ids": ids.numpy(), "position_ids": pos.numpy(),
                                **{k: v.numpy() for k, v in zip(names, past)}})
            errs["logits"].append(np.abs(o[0] - lg.numpy()))
            first, first_diff, fp16_ulps = None, None, 0
            for name, a, b in zip(pnames, pres, o[1:]):
                a = a.numpy()
                if a.dtype == np.uint8:
                    acc = diff_bytes.setdefault(_field(name), [0, 0])
                    acc[0], acc[1] = acc[0] + int((a != b).sum()), acc[1] + a.size
                else:
                    errs.setdefault(_field(name), []).append(np.abs(a.astype(np.float32) - b.astype(np.float32)))
            for layer in range(dec.layers):
                sl = slice(layer * per_layer, (layer + 1) * per_layer)
                pairs = [(a.numpy(), b) for a, b in zip(pres[sl], o[1:][sl])]
                codes = [(a, b) for a, b in pairs if a.dtype == np.uint8]
                diff = sum(int((a != b).sum()) for a, b in codes)
                ulps = max((_ulps(a, b) for a, b in pairs if a.dtype == np.float16), default=0)
                fp16_ulps = max(fp16_ulps, ulps)
                total = max(sum(a.size for a, _ in codes), 1)
                if (diff or ulps) and first_diff is None:
                    first_diff = dict(layer=layer, code_bytes=diff, code_fraction=diff / total, fp16_ulps=ulps,
                                      code_total=total)
                if diff and first is None:
                    first = dict(layer=layer, bytes=diff, fraction=diff / total)
            rows.append(dict(logits=lg[:, -1].numpy(), err=np.abs(o[0][:, -1] - lg[:, -1].numpy()),
                             first_code_mismatch=first, first_difference=first_diff, fp16_ulps=fp16_ulps))
            n += ids.shape[1]
            past = pres
            ids = lg[:, -1].argmax(-1, keepdim=True)
            toks.append(ids)
    outputs = {k: _stats(v) for k, v in errs.items()}
    for k, (d, total) in diff_bytes.items():
        outputs[k] = dict(code_mismatch=d / max(total, 1), bytes_compared=total)
    return dict(torch_tokens=torch.cat(toks, 1).numpy(), steps=rows, outputs=outputs)


def agreement(sess, dec, prompt: torch.Tensor, steps: int) -> dict[str, Any]:
    """Lock-step, free-running and teacher-forced comparison (module doc) → a JSON-able report.

    ``within_tolerance``, per lock-step step: (a) every present field identical → last-position
    logits within ``tolerance(codec, "end-to-end", "float32")``; (b) packed codes identical but
    fp16 fields (scales, residual keys, the fp16 cache) differ → logits within the ``float16``
    entry (an fp32 value at an fp16 rounding boundary moves by one fp16 ulp);
    (c) packed codes differ somewhere → the first layer where torch and onnxruntime differ at
    all differs only at boundaries: fp16 fields by at most one ulp (or ``FP16_NOISE_FLOOR``), codes in
    at most ``max(tolerance(codec, "codes").atol × its code bytes, CODE_FLIP_BYTES)`` bytes;
    later layers then see other inputs and the logits legitimately move by a code step, so they
    are reported (teacher-forced errors too), not held to a tolerance."""
    from .decoder import greedy_ort
    name = dec.codec.name
    ls = lockstep(sess, dec, prompt, steps)
    tt = ls["torch_tokens"]
    ot, _ = greedy_ort(sess, dec, prompt, steps)
    _, tf_logits = greedy_ort(sess, dec, prompt, steps, force=tt)
    tf_tok = np.stack([lg.argmax(-1) for lg in tf_logits], 1)
    tf_err = [np.abs(a - r["logits"]) for a, r in zip(tf_logits, ls["steps"])]
    tol, tol16 = tolerance(name, "end-to-end", "float32"), tolerance(name, "end-to-end", "float16")
    code_tol = tolerance(name, "codes", "float32").atol
    clean = [r for r in ls["steps"] if r["first_code_mismatch"] is None]
    flips = [r["first_code_mismatch"] for r in ls["steps"] if r["first_code_mismatch"] is not None]
    within = lambda r, t: bool(np.all(r["err"] <= t.atol + t.rtol * np.abs(r["logits"])))

    def boundary(d):   # the first differing layer of a step with differing codes
        return d["fp16_ulps"] <= 1 and d["code_bytes"] <= max(code_tol * d["code_total"], CODE_FLIP_BYTES)
    ok = all(within(r, tol) if r["fp16_ulps"] == 0 else within(r, tol16) for r in clean) \
        and all(boundary(r["first_difference"]) for r in ls["steps"] if r["first_code_mismatch"] is not None)
    same = (tt == ot).all(0)
    first_div = None if same.all() else int(np.argmin(same))
    return dict(
        steps=steps, batch=int(prompt.shape[0]), prompt_tokens=int(prompt.shape[1]),
        token_agreement=float((tt == ot).mean()), first_divergence=first_div,
        teacher_forced=dict(token_agreement=float((tf_tok == tt).mean()), logit_error=_stats(tf_err)),
        logit_error=_stats([r["err"] for r in ls["steps"]]),
        logit_error_steps_with_equal_codes=dict(max=_stats([r["err"] for r in clean])["max"] if clean else 0.0,
                                                steps=len(clean)),
        fp16_flip_steps=sum(r["fp16_ulps"] > 0 for r in clean), code_mismatch_steps=len(flips),
        first_difference=[r["first_difference"] for r in ls["steps"]],
        first_layer_code_mismatch=dict(max=max((f["fraction"] for f in flips), default=0.0), tolerance=code_tol),
        outputs=ls["outputs"],
        tolerance=dict(atol=tol.atol, rtol=tol.rtol), within_tolerance=bool(ok),
        torch_tokens=tt.tolist(), ort_tokens=ot.tolist())


# ----- kvexport compare --backend onnxruntime -------------------------------------------------

def compare_onnxruntime(lm, model_spec: str, specs, prompts: torch.Tensor, steps: int,
                        progress: bool = True) -> dict[str, Any]:
    """Export ``lm`` once per codec spec (into a temporary directory, :func:`~.package.export_decoder_files`)
    and measure :func:`agreement` on ``prompts`` (N, L) int64 (the text windows, one batch)."""
    import tempfile
    import time
    from pathlib import Path
    from tqdm.auto import tqdm
    from .. import codecs
    from .package import export_decoder_files, verify_dir
    rows = []
    t0 = time.perf_counter()
    for spec in tqdm(list(specs), desc="compare (onnxruntime)", unit="codec", disable=not progress):
        codec = codecs.from_spec(spec)
        with tempfile.TemporaryDirectory(prefix="kvx-agree-") as tmp:
            dec, cfg = export_decoder_files(lm, codec, Path(tmp), model_spec)
            t1 = time.perf_counter()
            rep = verify_dir(Path(tmp), dec, prompts, steps)
        rows.append(dict(spec=spec, codec=codec.name, export_seconds=cfg["export_seconds"],
                         verify_seconds=round(time.perf_counter() - t1, 3),
                         files={k: v["bytes"] for k, v in cfg["files"].items()},
                         **{k: v for k, v in rep.items() if k not in ("torch_tokens", "ort_tokens")}))
    from ..envinfo import collect
    try:
        env = collect()
    except Exception as e:   # the report must not fail on an environment probe
        env = {"error": str(e)}
    return dict(backend="onnxruntime", model=lm.name, windows=int(prompts.shape[0]),
                window_len=int(prompts.shape[1]), steps=steps, codecs=rows,
                seconds=round(time.perf_counter() - t0, 3), environment=env)


def write_reports(rep: dict[str, Any], out) -> None:
    """``report.json`` (everything) and ``report.md`` (one table per codec) into ``out``."""
    from pathlib import Path
    from ..cli.common import write_json
    out = Path(out)
    write_json(out / "report.json", rep)
    g = lambda x: f"{x:.3g}"
    md = [f"# kvexport compare --backend onnxruntime — {rep['model']}", "",
          f"{rep['windows']} text window(s) × {rep['window_len']} tokens as prompts (one batch), prefill + "
          f"{rep['steps'] - 1} greedy decode steps. Lock-step: onnxruntime runs on torch's exact inputs each step; "
          "errors are |torch − onnxruntime| (logits: every position of every step; float fields pooled over "
          "layers), packed uint8 fields give the fraction of bytes that differ. Free-running: each backend "
          "feeds back its own tokens and cache. Teacher-forced: onnxruntime keeps its own cache but gets "
          "torch's tokens.", "",
          "| codec | export s | model bytes | logits max | mean | median | code mismatch (max over fields) | "
          "steps with differing codes | token agreement | first divergence | teacher-forced agreement | "
          "teacher-forced logit max | within tolerance |", "|" + "---|" * 13]
    for r in rep["codecs"]:
        lo = r["outputs"]["logits"]
        cm = max((v["code_mismatch"] for v in r["outputs"].values() if "code_mismatch" in v), default=0.0)
        md.append(f"| {r['spec']} | {r['export_seconds']:.1f} | {sum(r['files'].values())} | {g(lo['max'])} | "
                  f"{g(lo['mean'])} | {g(lo['median'])} | {g(cm)} | {r['code_mismatch_steps']}/{r['steps']} | "
                  f"{r['token_agreement']:.3f} | {r['first_divergence']} | "
                  f"{r['teacher_forced']['token_agreement']:.3f} | {g(r['teacher_forced']['logit_error']['max'])} | "
                  f"{r['within_tolerance']} |")
    for r in rep["codecs"]:
        md += ["", f"## {r['spec']}: per output", "", "| output | max | mean | median | code mismatch |",
               "|---|---|---|---|---|"]
        for k, v in r["outputs"].items():
            md.append(f"| {k} | {g(v['max']) if 'max' in v else '—'} | {g(v['mean']) if 'mean' in v else '—'} | "
                      f"{g(v['median']) if 'median' in v else '—'} | "
                      f"{g(v['code_mismatch']) if 'code_mismatch' in v else '—'} |")
    (out / "report.md").write_text("\n".join(md) + "\n")
