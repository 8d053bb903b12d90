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
    python scripts/bench_export.py OUT.json --merge A.json B.json     # rows of parallel runs
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


def _write_table(out: Path, rows: list[dict]) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    md = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    md += ["| " + " | ".join(f"{r.get(k):.3g}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys)
           + " |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="JSON output path (a .md table is written beside it)")
    ap.add_argument("--codecs", default=",".join(codecs.names()))
    ap.add_argument("--tokens", type=int, default=512, help="op level: cache tokens")
    ap.add_argument("--model", default=None, help="whole-model mode: the model to export")
    ap.add_argument("--steps", type=int, default=64, help="whole-model mode: greedy decode steps")
    ap.add_argument("--machine", default=None, help="a label stored in every row (where it ran)")
    ap.add_argument("--merge", nargs="+", default=None, metavar="IN.json",
                    help="only merge the rows of earlier runs (same model / steps) into OUT")
    a = ap.parse_args()
    out = Path(a.out)
    if a.merge:
        parts = [json.loads(Path(p).read_text()) for p in a.merge]
        meta = {k: v for k, v in parts[0].items() if k != "rows"}
        if any({k: v for k, v in p.items() if k != "rows"} != meta for p in parts):
            raise SystemExit("--merge: the runs differ in model / steps / tokens")
        rows = [r for p in parts for r in p["rows"]]
        out.write_text(json.dumps(dict(**meta, rows=rows), indent=2) + "\n")
        _write_table(out, rows)
        return 0 if all(r["within_tol"] for r in rows) else 1
    rows = []
    for c in a.codecs.split(","):
        rows.append(bench_model(a.model, c, a.steps) if a.model else bench(c, a.tokens))
        if a.machine:
            rows[-1]["machine"] = a.machine
        meta = dict(model=a.model, steps=a.steps) if a.model else dict(tokens=a.tokens, head_dim=64)
        out.write_text(json.dumps(dict(**meta, rows=rows), indent=2) + "\n")   # after each codec
    _write_table(out, rows)
    return 0 if all(r["within_tol"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
