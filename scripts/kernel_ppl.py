"""Default-model perplexity per codec: torch reference path vs the CUDA kernels, same windows.

For each codec spec and dtype, both paths run every window as a prefill of ``--decode-from``
tokens followed by teacher-forced one-token decode steps (``kvexport.models.evaluate``), so the
kernel path exercises the fused decode kernel and the append kernel on every step, and the wall
time per token of the two paths is measured on the same schedule (model forward included,
synchronized).  Writes ``kernel_ppl.json`` and ``kernel_ppl.md``; the check column applies
``kvexport.tolerances.tolerance(codec, "ppl", dtype)``.

    python scripts/kernel_ppl.py --out out/kernel_ppl                 # 2 windows × 256, fp16 + bf16
    python scripts/kernel_ppl.py --codecs kivi:bits=2 fibquant --windows 8 --window-len 512 --dtypes float16
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kvexport import codecs  # noqa: E402
from kvexport.models.cache import LayerPlan  # noqa: E402
from kvexport.tolerances import tolerance  # noqa: E402

DEFAULT_CODECS = ["fp16", "kivi:bits=2", "kivi:bits=4", "turbo:bits=3", "turbo:bits=4", "fibquant",
                  "fibquant:k=4,N=16", "polar", "ternary", "qjl"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--codecs", nargs="+", default=DEFAULT_CODECS, metavar="SPEC")
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--window-len", type=int, default=256)
    ap.add_argument("--decode-from", type=int, default=None,
                    help="prefill length before the one-token decode steps (default: half the window)")
    ap.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"], choices=("float16", "bfloat16"))
    ap.add_argument("--out", required=True, help="output directory (kernel_ppl.json, kernel_ppl.md)")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("kernel_ppl: needs a CUDA GPU", file=sys.stderr)
        return 2
    from kvexport.data import read_text
    from kvexport.envinfo import collect
    from kvexport.models.evaluate import evaluate, text_windows
    from kvexport.models.loading import load_model
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    lm = load_model(a.model)
    wins = text_windows(lm, read_text(None), a.windows, a.window_len)
    decode_from = a.decode_from or max(1, a.window_len // 2)
    rows = []

    def write():  # after every row: a run stopped by a time limit keeps what it measured
        rep = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), model=lm.name,
                   windows=int(len(wins)), window_len=a.window_len, decode_from=decode_from,
                   text="default (exllamav2 wiki.utf8, English Wikipedia)", rows=rows, environment=collect())
        (out / "kernel_ppl.json").write_text(json.dumps(rep, indent=2, default=str) + "\n")
        md = [f"# Perplexity: torch reference vs CUDA kernels — {lm.name}", "",
              f"{rep['windows']} windows × {a.window_len} tokens of the default text; each window: prefill of "
              f"{decode_from} tokens, then {a.window_len - decode_from} teacher-forced one-token decode steps, on "
              f"both paths. ms/token: wall time of the model forward (synchronized) per predicted token. "
              f"{rep['date']}, {torch.cuda.get_device_name()}.", "",
              "| dtype | codec spec | bits/coord | ppl reference | ppl kernels | rel. diff | tolerance | "
              "ms/token reference | ms/token kernels |", "|---|---|---|---|---|---|---|---|---|"]
        md += [f"| {r['dtype']} | {r['spec']} | {r['bits_per_coordinate']:.3f} | {r['ppl_reference']:.4f} | "
               f"{r['ppl_kernels']:.4f} | {r['rel_diff']:.2e} | {'≤' if r['ok'] else '>'} {r['tolerance']:g} | "
               f"{r['ms_per_token_reference']:.2f} | {r['ms_per_token_kernels']:.2f} |" for r in rows]
        (out / "kernel_ppl.md").write_text("\n".join(md) + "\n")

    for dt in a.dtypes:
        dtype = getattr(torch, dt)
        if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            continue
        lm.model.to(device="cuda", dtype=dtype)
        w = wins.cuda()
        for spec in a.codecs:
            plan = LayerPlan(codecs.from_spec(spec))
            ref = evaluate(lm, spec, plan, w, decode_from=decode_from)
            ker = evaluate(lm, spec, plan, w, backend="cuda", decode_from=decode_from)
            rel = abs(ker.ppl - ref.ppl) / ref.ppl
            tol = tolerance(plan.default.name, "ppl", dt).rtol
            rows.append(dict(spec=spec, dtype=dt, bits_per_coordinate=ref.bits_per_coordinate,
                             ppl_reference=ref.ppl, ppl_kernels=ker.ppl, rel_diff=rel, tolerance=tol, ok=rel <= tol,
                             ms_per_token_reference=1e3 * ref.seconds / ref.tokens,
                             ms_per_token_kernels=1e3 * ker.seconds / ker.tokens,
                             attn_cosine_reference=ref.attn_cosine, attn_cosine_kernels=ker.attn_cosine))
            r = rows[-1]
            print(f"{dt:9s} {spec:22s} ppl ref {ref.ppl:9.4f} kernels {ker.ppl:9.4f} rel {rel:.2e} "
                  f"({'ok' if r['ok'] else 'OVER ' + str(tol)})  ms/token ref {r['ms_per_token_reference']:.2f} "
                  f"kernels {r['ms_per_token_kernels']:.2f}", flush=True)
            write()
    write()
    print(f"wrote {out / 'kernel_ppl.json'}, {out / 'kernel_ppl.md'}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
