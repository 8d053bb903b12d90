#!/usr/bin/env python
"""Export benchmark per codec: export time, file sizes, torch ↔ onnxruntime error, token agreement.

With ``--model M`` (``default``, ``tiny:llama``, ...): the whole decoder is exported per codec
(``kvexport.onnx.package.export_to_dir``) and a ``--steps``-token greedy decode runs in torch and in
onnxruntime (present cache fed back as past).  Per step onnxruntime runs on torch's exact inputs
(ids, positions, past cache): logit error max / mean / median of the last position, the max over
steps whose packed codes came out identical, how many steps had differing codes and the largest
mismatch fraction of the first layer that differed; the fraction of greedy tokens that agree
when each backend runs free on its own cache and the first step where they differ; and, teacher-forced
(onnxruntime on its own cache but fed torch's tokens), argmax agreement and logit error per step
(``kvexport.onnx.agreement``).

Without ``--model`` (op level): for each codec, a one-layer cache step (encode K, encode V, attend; the shapes of the
default model: 9 query / 3 KV heads, head_dim 64) goes through torch.onnx.export
(dynamo + kvexport translation table + reference functions) and runs in onnxruntime on
fresh inputs.  Reports max / mean / median |torch − ORT| of the attention output and
the fraction of packed bytes that differ between the torch encode and the ORT encode.

    python scripts/bench_export.py [--codecs fp16,kivi] [--tokens 512] OUT.json
    python scripts/bench_export.py --model default --steps 64 OUT.json
    python scripts/bench_export.py OUT.json --merge A.json B.json     # rows of parallel runs (same machine)
    python scripts/bench_export.py OUT.json --render OUT.json          # re-render OUT.md only

The JSON records the command, date, load average and machine; the Markdown is rendered from it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from _bench_io import bad_specs, write_atomic, write_pair  # noqa: E402
from kvexport import codecs  # noqa: E402
from kvexport.ops import torch_ops  # noqa: E402
from kvexport.ops.registry import all_ops  # noqa: E402
from kvexport.onnx.export import export_module  # noqa: E402
from kvexport.onnx.opmodels import session, single_op_model  # noqa: E402
from kvexport.tolerances import tolerance  # noqa: E402


class Step(torch.nn.Module):
    def __init__(self, codec: str):
        super().__init__()
        specs = [s for s in all_ops() if s.codec == codec]
        self.k = torch_ops.op(next(s.name for s in specs if s.role == "key"))
        self.v = torch_ops.op(next(s.name for s in specs if s.role == "value"))
        self.a = torch_ops.op(next(s.name for s in specs if s.kind == "attention"))

    def forward(self, q, k, v):
        return self.a(q, *self.k(k), *self.v(v))


def bench(codec: str, tokens: int, d: int = 64) -> dict:
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 9, 4, d, generator=g), torch.randn(1, 3, tokens, d, generator=g), \
        torch.randn(1, 3, tokens, d, generator=g)
    t, tq = torch.export.Dim("t", min=2, max=1 << 16), torch.export.Dim("tq", min=2, max=1 << 16)
    t0 = time.perf_counter()
    m = export_module(Step(codec), (q, k, v), dynamic_shapes=({2: tq}, {2: t}, {2: t}))
    export_s = time.perf_counter() - t0
    s = session(m)
    ref = Step(codec)(q, k, v).numpy()
    got = s.run(None, {i.name: a.numpy() for i, a in zip(m.graph.input, (q, k, v))})[0]
    err = np.abs(got - ref)
    enc = next(sp for sp in all_ops() if sp.codec == codec and sp.role == "key")
    es = session(single_op_model(enc, {}, d))
    mism = [float(np.mean(r.numpy().view(np.uint8) != o.view(np.uint8)))
            for r, o in zip(torch_ops.op(enc.name)(k), es.run(None, {"x": k.numpy()}))]
    tol = tolerance(codec, "torch-ort", "float32")
    return dict(codec=codec, export_s=round(export_s, 3), onnx_bytes=m.ByteSize(),
                nodes=len(m.graph.node), function_nodes=sum(len(f.node) for f in m.functions),
                max_err=float(err.max()), mean_err=float(err.mean()), median_err=float(np.median(err)),
                key_code_mismatch=max(mism), tol_atol=tol.atol, tol_rtol=tol.rtol,
                within_tol=bool((err <= tol.atol + tol.rtol * np.abs(ref)).all()))


def bench_model(model: str, codec: str, steps: int) -> dict:
    import tempfile
    from kvexport.onnx.package import export_to_dir
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        res = export_to_dir(model, codecs.from_spec(codec), Path(tmp), verify_steps=steps)
        total = time.perf_counter() - t0
    cfg, rep = res["config"], res["report"]
    return dict(codec=codec, export_s=cfg["export_seconds"], total_s=round(total, 1),
                onnx_bytes=cfg["files"]["model.onnx"]["bytes"],
                data_bytes=cfg["files"].get("model.onnx.data", {}).get("bytes", 0),
                max_err=rep["logit_error"]["max"], mean_err=rep["logit_error"]["mean"],
                median_err=rep["logit_error"]["median"],
                max_err_equal_codes=rep["logit_error_steps_with_equal_codes"]["max"],
                code_mismatch_steps=rep["code_mismatch_steps"],
                first_layer_code_mismatch=rep["first_layer_code_mismatch"]["max"],
                fp16_flip_steps=rep["fp16_flip_steps"],
                token_agreement=rep["token_agreement"], first_divergence=rep["first_divergence"],
                teacher_forced_agreement=rep["teacher_forced"]["token_agreement"],
                teacher_forced_max_err=rep["teacher_forced"]["logit_error"]["max"],
                teacher_forced_median_err=rep["teacher_forced"]["logit_error"]["median"],
                within_tol=rep["within_tolerance"])


# Shown for each mode; the rule ``within_tol`` applies is the one of the code that ran (op level:
# ``tolerance(codec, "torch-ort", "float32")`` on every element; whole model:
# ``kvexport.onnx.agreement``'s ``within_tolerance``).
MODE_TEXT = {
    "op": "One cache step (KeyEncode + ValueEncode + Attention) per codec, 9 query / 3 KV heads, head_dim 64 (the "
          "default model's shapes), fresh Gaussian inputs (seed 0), exported by torch.onnx (dynamo + the kvexport "
          "translation table + reference functions) and run by onnxruntime. Errors: |torch − onnxruntime| of the "
          "attention output; `key_code_mismatch`: fraction of packed key bytes that differ between the torch encode "
          "and the onnxruntime encode; `within_tol`: every element within `tolerance(codec, \"torch-ort\", "
          "\"float32\")` (`tol_atol`, `tol_rtol`). Times are wall-clock seconds on the machine above.",
    "model": "The whole decoder exported per codec (`kvexport.onnx.package.export_to_dir`) and a greedy decode of "
             "`steps` tokens run in torch and in onnxruntime (present cache fed back as past). Lock-step errors: "
             "|torch − onnxruntime| logits of the last position per step, onnxruntime on torch's exact inputs; "
             "`token_agreement` / `first_divergence`: the two free-running greedy loops; `teacher_forced_*`: "
             "onnxruntime on its own cache fed torch's tokens; `within_tol`: the report's `within_tolerance` "
             "(`kvexport.onnx.agreement`). Times are wall-clock seconds on the machine above.",
}


def machine() -> dict:
    """Where the rows ran (the times depend on it); two runs merge only if this is equal."""
    import importlib.metadata as md
    import os
    import platform

    def ver(dist):
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return None
    return dict(platform=platform.platform(), cpus=os.cpu_count(), python=platform.python_version(),
                torch=torch.__version__, onnx=ver("onnx"), onnxruntime=ver("onnxruntime"),
                transformers=ver("transformers"), torch_threads=torch.get_num_threads())


def render_md(data: dict, json_name: str) -> str:
    """Markdown of a bench_export JSON: header, the machine, one row per codec."""
    rows, m = data["rows"], data["machine"]
    mode = "model" if data.get("model") else "op"
    what = (f"whole model `{data['model']}`, {data['steps']}-step greedy decode" if mode == "model"
            else f"op level, {data['tokens']} cache tokens")
    keys = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else "—" if v is None else str(v)  # noqa: E731
    md = [f"# Export benchmark: {what}", "",
          f"Generated by `scripts/bench_export.py` from `{json_name}` (re-render: `python scripts/bench_export.py "
          f"--render {json_name} OUT.json`). Do not edit by hand.", "",
          f"Reproduce: `{data['command']}`", "",
          f"{data['date']} · {m['platform']}, {m['cpus']} CPUs ({m['torch_threads']} torch threads, load average "
          f"{' / '.join(f'{x:.1f}' for x in data['load_average'])} at the start) · torch {m['torch']} · onnx "
          f"{m['onnx']} · onnxruntime {m['onnxruntime']} · transformers {m['transformers']} · Python {m['python']}", "",
          MODE_TEXT[mode], "",
          "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    md += ["| " + " | ".join(fmt(r.get(k)) for k in keys) + " |" for r in rows]
    return "\n".join(md) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="JSON output path (a .md table is written beside it)")
    ap.add_argument("--codecs", default=",".join(codecs.names()))
    ap.add_argument("--tokens", type=int, default=512, help="op level: cache tokens")
    ap.add_argument("--model", default=None, help="whole-model mode: the model to export")
    ap.add_argument("--steps", type=int, default=64, help="whole-model mode: greedy decode steps")
    ap.add_argument("--merge", nargs="+", default=None, metavar="IN.json",
                    help="only merge the rows of earlier runs (same mode, settings and machine) into OUT")
    ap.add_argument("--render", metavar="IN.json", help="only re-render OUT's .md from a JSON this script wrote")
    a = ap.parse_args()
    out = Path(a.out)
    if a.render or a.merge:
        try:
            parts = [json.loads(Path(p).read_text()) for p in ([a.render] if a.render else a.merge)]
            same = lambda p: {k: v for k, v in p.items() if k not in ("rows", "date", "load_average", "command")}  # noqa: E731
            if any(same(p) != same(parts[0]) for p in parts):
                raise ValueError("the runs differ in mode, settings or machine; they are not one table")
            data = dict(parts[0], rows=[r for p in parts for r in p["rows"]],
                        command="; ".join(dict.fromkeys(p["command"] for p in parts)))
            md = render_md(data, out.name if a.merge else Path(a.render).name)
        except (OSError, ValueError, KeyError, TypeError) as e:
            print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
            return 2
        if a.render:
            out.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(out.with_suffix(".md"), md)
            return 0
        write_pair(out, data, lambda d: render_md(d, out.name), indent=2)
        return 0 if all(r["within_tol"] for r in data["rows"]) else 1
    specs = a.codecs.split(",")
    if bad_specs(specs, codecs.from_spec):
        return 2
    import datetime
    import os
    settings = dict(model=a.model, steps=a.steps) if a.model else dict(tokens=a.tokens, head_dim=64)
    data = dict(**settings, command="python scripts/bench_export.py " + " ".join(sys.argv[1:]),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                load_average=list(os.getloadavg()), machine=machine(), rows=[])
    for c in specs:
        data["rows"].append(bench_model(a.model, c, a.steps) if a.model else bench(c, a.tokens))
        write_pair(out, data, lambda d: render_md(d, out.name), indent=2)   # after each codec
    print(out.with_suffix(".md").read_text())
    return 0 if all(r["within_tol"] for r in data["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
