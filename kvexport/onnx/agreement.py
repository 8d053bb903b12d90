"""torch ↔ onnxruntime agreement of an exported packed-cache decoder.

:func:`agreement` runs a prefill and ``steps − 1`` greedy decode steps three ways:

- **lock-step**: every step, onnxruntime runs on torch's exact inputs (ids, positions, past
  cache); its logits and every present field are compared with torch's: max / mean / median
  |Δ| per output (logits of all positions of the step; float fields per field name over all
  layers), and for packed uint8 fields the fraction of bytes that differ;
- **fixed bytes** (inside the lock-step): every layer of every step, the exported layer step
  alone runs in onnxruntime on torch's own q / k / v and torch's packed past of that layer, so no
  float layer of the model sits in between: its present must be torch's byte for byte and its
  attention output within the ``torch-ort`` tolerance.  This is the check a broken exporter cannot
  pass by blaming GEMM order;
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


def _within(err: np.ndarray, ref: np.ndarray, t) -> bool:
    return bool(np.all(err <= t.atol + t.rtol * np.abs(ref)))


class _FixedBytes:
    """The fixed-bytes check (one per :func:`lockstep` run): every layer of every step, the
    exported layer step (:func:`~.decoder.export_layer_step`, one graph per distinct
    ``softcap`` / ``sliding_window``) runs in onnxruntime on torch's own q / k / v and torch's
    packed past of that layer; its present must be torch's present byte for byte and its
    attention output within ``tolerance(codec, "torch-ort", "float32")``.  No float layer of
    the model is in between, so nothing here can be blamed on GEMM order."""

    def __init__(self, dec):
        self.dec, self.sessions = dec, {}
        self.tol = tolerance(dec.codec.name, "torch-ort", "float32")
        self.layer_steps = self.bytes = self.bytes_differing = 0
        self.errs: list[np.ndarray] = []
        self.failures: list[dict] = []

    def _session(self, softcap: float, window: int, q_heads: int):
        key = (softcap, window)
        if key not in self.sessions:
            from .decoder import export_layer_step
            from .opmodels import session
            self.sessions[key] = session(export_layer_step(self.dec, softcap, window, q_heads=q_heads))
        return self.sessions[key]

    def check(self, step: int, tap: dict, past: list[torch.Tensor], present: list[torch.Tensor]) -> None:
        """``tap`` one layer's record (``dec.tap``), ``past`` / ``present`` torch's entries of that layer."""
        s = self._session(tap["softcap"], tap["sliding_window"], tap["q"].shape[1])
        feed = {"q": tap["q"].numpy(), "k": tap["k"].numpy(), "v": tap["v"].numpy()}
        names = [i.name for i in s.get_inputs()][3:]
        feed.update({n: t.numpy() for n, t in zip(names, past)})
        out, *got = s.run(None, feed)
        ref = tap["out"].numpy()
        err = np.abs(out - ref)
        self.errs.append(err)
        self.layer_steps += 1
        for n, a, b in zip(names, present, got):
            a = np.ascontiguousarray(a.numpy())
            d = int((a.view(np.uint8) != np.ascontiguousarray(b).view(np.uint8)).sum()) if a.shape == b.shape \
                else a.nbytes
            self.bytes += a.nbytes
            self.bytes_differing += d
            if d:
                self.failures.append(dict(step=step, layer=tap["layer"], what=n.replace("past.", "present."),
                                          bytes_differing=d, bytes=a.nbytes))
        if not _within(err, ref, self.tol):   # after the bytes: a present that differs explains it
            self.failures.append(dict(step=step, layer=tap["layer"], what="attention output",
                                      max_abs=float(err.max())))

    def report(self) -> dict[str, Any]:
        return dict(layer_steps=self.layer_steps, graphs=len(self.sessions), present_bytes=self.bytes,
                    present_bytes_differing=self.bytes_differing, attention_error=_stats(self.errs),
                    attention_tolerance=dict(atol=self.tol.atol, rtol=self.tol.rtol),
                    failures=self.failures[:10], within_tolerance=not self.failures and self.layer_steps > 0)


def lockstep(sess, dec, prompt: torch.Tensor, steps: int, *, fixed_bytes: bool = False) -> dict[str, Any]:
    """Per step, onnxruntime on torch's exact inputs; see the module doc.

    ``prompt`` (B, P) int64.  Returns torch's tokens (B, steps), per-step rows (logits of all
    positions and their |Δ|, the first layer whose packed codes differ and by what fraction of its
    code bytes) and per-output pooled errors / code-mismatch fractions; with ``fixed_bytes``, also
    the report of the per-layer check on torch's own inputs (:class:`_FixedBytes`)."""
    names, pnames = dec.cache_names("past"), dec.cache_names("present")
    per_layer = len(names) // dec.layers
    past = dec.empty_past(prompt.shape[0])
    ids, n, toks, rows = prompt, 0, [], []
    errs: dict[str, list[np.ndarray]] = {"logits": []}
    diff_bytes: dict[str, list[int]] = {}
    fixed = _FixedBytes(dec) if fixed_bytes else None
    with torch.no_grad():
        for step in range(steps):
            pos = torch.arange(n, n + ids.shape[1]).unsqueeze(0).expand(ids.shape[0], -1)
            dec.tap = [] if fixed else None
            try:
                lg, *pres = dec(ids, pos, *past)
                taps = dec.tap
            finally:
                dec.tap = None
            o = sess.run(None, {"input_ids": ids.numpy(), "position_ids": pos.numpy(),
                                **{k: v.numpy() for k, v in zip(names, past)}})
            err = np.abs(o[0] - lg.numpy())
            errs["logits"].append(err)
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
                if fixed:
                    fixed.check(step, taps[layer], past[sl], pres[sl])
            rows.append(dict(logits=lg.numpy(), err=err, first_code_mismatch=first, first_difference=first_diff,
                             fp16_ulps=fp16_ulps))
            n += ids.shape[1]
            past = pres
            ids = lg[:, -1].argmax(-1, keepdim=True)
            toks.append(ids)
    outputs = {k: _stats(v) for k, v in errs.items()}
    for k, (d, total) in diff_bytes.items():
        outputs[k] = dict(code_mismatch=d / max(total, 1), bytes_compared=total)
    out = dict(torch_tokens=torch.cat(toks, 1).numpy(), steps=rows, outputs=outputs)
    if fixed:
        out["fixed_bytes"] = fixed.report()
    return out


def verdict(codec: str, steps: list[dict], free_err: list[np.ndarray], free_ref: list[np.ndarray],
            fixed: dict) -> dict[str, Any]:
    """The pass rule of :func:`agreement`.  ``steps``: :func:`lockstep` rows; ``free_err`` /
    ``free_ref``: free-running |Δ| logits and torch's logits of the steps up to and including the
    first divergence; ``fixed``: the fixed-bytes report.

    ``within_tolerance`` needs all of
    (1) the fixed-bytes check (:class:`_FixedBytes`): every layer, every step, present bytes equal,
        attention output within the ``torch-ort`` entry;
    (2) every lock-step step's logits within ``tolerance(codec, "end-to-end", "float32")`` when every
        present field is identical, else within the ``float16`` entry: an fp32 value at a rounding
        boundary moves an fp16 field by one ulp or a code by one step; that is allowed only where
        the first layer whose present differs at all differs at boundaries alone (fp16 fields
        ≤ 1 ulp or ``FP16_NOISE_FLOOR``; codes in at most ``max(codes.atol × its code bytes,
        CODE_FLIP_BYTES)`` bytes), and only if its effect on the logits stays inside the float16
        entry: a flip that moves the logits further is a real disagreement of the outputs, whatever
        its cause (the fixed-bytes verdict says whether the ops are to blame);
    (3) free-running, up to and including the first step whose greedy tokens differ: logits within
        the float16 entry (both loops have the same token prefix there), so a divergence counts
        only as a near-tie (torch's top-2 margin ≤ twice the bound), never as a free pass;
    (4) at least one code-identical lock-step step, so the tight fp32 / fp16 part of (2) was tested.
    Teacher-forced errors beyond the first divergence are reported, not bounded: onnxruntime's own
    cache then holds other codes and the difference compounds."""
    tol, tol16 = tolerance(codec, "end-to-end", "float32"), tolerance(codec, "end-to-end", "float16")
    code_tol = tolerance(codec, "codes", "float32").atol

    def boundary(d):   # the first differing layer of a step whose present differs
        return d["fp16_ulps"] <= 1 and d["code_bytes"] <= max(code_tol * d["code_total"], CODE_FLIP_BYTES)
    outside = [i for i, r in enumerate(steps)
               if not (_within(r["err"], r["logits"], tol) if r["first_difference"] is None
                       else boundary(r["first_difference"]) and _within(r["err"], r["logits"], tol16))]
    free_ok = all(_within(e, b, tol16) for e, b in zip(free_err, free_ref))
    identical = sum(r["first_code_mismatch"] is None for r in steps)
    ok = bool(fixed["within_tolerance"]) and not outside and free_ok and identical > 0
    return dict(within_tolerance=ok, steps_outside_tolerance=outside, free_running=free_ok,
                code_identical_steps=identical,
                present_identical_steps=sum(r["first_difference"] is None for r in steps),
                tolerance=dict(atol=tol.atol, rtol=tol.rtol, float16=dict(atol=tol16.atol, rtol=tol16.rtol),
                               codes=code_tol))


def agreement(sess, dec, prompt: torch.Tensor, steps: int) -> dict[str, Any]:
    """Lock-step (with the fixed-bytes check), free-running and teacher-forced comparison (module
    doc) → a JSON-able report.

    ``logit_error``: |torch − onnxruntime| logits in lock-step (onnxruntime on torch's exact inputs),
    every position of every step: the one logit figure the verdict bounds.

    ``within_tolerance``: :func:`verdict`."""
    from .decoder import greedy_ort
    name = dec.codec.name
    ls = lockstep(sess, dec, prompt, steps, fixed_bytes=True)
    tt = ls["torch_tokens"]
    ot, ot_logits = greedy_ort(sess, dec, prompt, steps)
    _, tf_logits = greedy_ort(sess, dec, prompt, steps, force=tt)
    tf_tok = np.stack([lg.argmax(-1) for lg in tf_logits], 1)
    last = [r["logits"][:, -1] for r in ls["steps"]]
    tf_err = [np.abs(a - b) for a, b in zip(tf_logits, last)]
    same = (tt == ot).all(0)
    first_div = None if same.all() else int(np.argmin(same))
    upto = steps if first_div is None else first_div + 1
    free_err = [np.abs(a - b) for a, b in zip(ot_logits[:upto], last[:upto])]
    v = verdict(name, ls["steps"], free_err, last[:upto], ls["fixed_bytes"])
    flips = [r["first_code_mismatch"] for r in ls["steps"] if r["first_code_mismatch"] is not None]
    identical = v["code_identical_steps"]
    return dict(
        steps=steps, batch=int(prompt.shape[0]), prompt_tokens=int(prompt.shape[1]),
        token_agreement=float((tt == ot).mean()), first_divergence=first_div,
        free_running=dict(steps_compared=upto, logit_error=_stats(free_err), within_tolerance=v["free_running"]),
        teacher_forced=dict(token_agreement=float((tf_tok == tt).mean()), logit_error=_stats(tf_err)),
        logit_error=ls["outputs"]["logits"],
        logit_error_steps_with_equal_codes=dict(
            max=_stats([r["err"] for r in ls["steps"] if r["first_code_mismatch"] is None])["max"]
            if identical else None, steps=identical),
        code_identical_steps=identical, present_identical_steps=v["present_identical_steps"],
        fp16_flip_steps=identical - v["present_identical_steps"], code_mismatch_steps=len(flips),
        code_mismatch_at=[i for i, r in enumerate(ls["steps"]) if r["first_code_mismatch"] is not None],
        steps_outside_tolerance=v["steps_outside_tolerance"],
        first_difference=[r["first_difference"] for r in ls["steps"]],
        first_layer_code_mismatch=dict(max=max((f["fraction"] for f in flips), default=0.0),
                                       tolerance=v["tolerance"]["codes"]),
        fixed_bytes=ls["fixed_bytes"], outputs=ls["outputs"], tolerance=v["tolerance"],
        within_tolerance=v["within_tolerance"], torch_tokens=tt.tolist(), ort_tokens=ot.tolist())


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
          f"{rep['steps'] - 1} greedy decode steps. **logit |Δ| max** (the one logit figure): "
          "|torch − onnxruntime| logits in lock-step (onnxruntime on torch's exact inputs: ids, positions, "
          "past cache), every position of every step. **fixed bytes**: every layer of every step, the "
          "exported layer step on torch's own q / k / v and packed past; bytes of its present that differ "
          "from torch's (must be 0) and its attention output's max |Δ|. Code mismatch: fraction of packed "
          "bytes that differ in the whole-model lock-step (max over fields). Free-running: each backend feeds "
          "back its own tokens and cache; teacher-forced: onnxruntime keeps its own cache, gets torch's "
          "tokens. **within tolerance**: the rule of `kvexport.onnx.agreement.verdict`.", "",
          "| codec | export s | model bytes | logit \\|Δ\\| max | mean | median | fixed bytes: differing / "
          "attention max | code mismatch | steps with differing codes | steps outside tolerance | "
          "token agreement | first divergence | teacher-forced agreement | within tolerance |", "|" + "---|" * 14]
    for r in rep["codecs"]:
        lo, fx = r["logit_error"], r["fixed_bytes"]
        cm = max((v["code_mismatch"] for v in r["outputs"].values() if "code_mismatch" in v), default=0.0)
        md.append(f"| {r['spec']} | {r['export_seconds']:.1f} | {sum(r['files'].values())} | {g(lo['max'])} | "
                  f"{g(lo['mean'])} | {g(lo['median'])} | {fx['present_bytes_differing']} / "
                  f"{g(fx['attention_error']['max'])} | {g(cm)} | {r['code_mismatch_steps']}/{r['steps']} | "
                  f"{len(r['steps_outside_tolerance'])}/{r['steps']} | {r['token_agreement']:.3f} | "
                  f"{r['first_divergence']} | {r['teacher_forced']['token_agreement']:.3f} | "
                  f"{'yes' if r['within_tolerance'] else 'NO'} |")
    for r in rep["codecs"]:
        md += ["", f"## {r['spec']}: per output", "", "| output | max | mean | median | code mismatch |",
               "|---|---|---|---|---|"]
        for k, v in r["outputs"].items():
            md.append(f"| {k} | {g(v['max']) if 'max' in v else '—'} | {g(v['mean']) if 'mean' in v else '—'} | "
                      f"{g(v['median']) if 'median' in v else '—'} | "
                      f"{g(v['code_mismatch']) if 'code_mismatch' in v else '—'} |")
    (out / "report.md").write_text("\n".join(md) + "\n")
