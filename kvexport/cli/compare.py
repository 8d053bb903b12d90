"""``kvexport compare``: perplexity, attention fidelity and memory of codecs on one model and text."""

from __future__ import annotations

import json

from .common import add_json, add_output_dir, check_device, open_output


def add_model_args(p) -> None:
    p.add_argument("--model", default="default",
                   help="'default' (installed SmolLM2-135M), a .gguf file, a local HF directory, or tiny:<family>")
    p.add_argument("--device", default="cpu", help="torch device to run on (default cpu)")
    p.add_argument("--codec-device", default=None,
                   help="device for the cache and codec math (default: --device), e.g. cpu beside a cuda model")
    p.add_argument("--fp16-window", type=int, default=None, metavar="W",
                   help="keep the newest W tokens in fp16 for every codec (overrides each codec's window)")
    p.add_argument("--layer-codec", action="append", default=[], metavar="LAYERS=SPEC",
                   help="per-layer override, e.g. 0,-1=fp16 or 0-1=kivi:bits=4 (repeatable; applied to every codec)")


def add_parser(sub) -> None:
    p = sub.add_parser("compare", help="compare codecs on a model: perplexity, attention cosine, KV bytes")
    add_model_args(p)
    p.add_argument("--text", default=None, metavar="FILE", help="UTF-8 text file (default: the Wikipedia text)")
    p.add_argument("--codec", action="append", default=None, metavar="SPEC",
                   help="codec spec name[:key=value,...] (repeatable; default: every codec + rate sweeps)")
    p.add_argument("--windows", type=int, default=32, help="number of windows (default 32)")
    p.add_argument("--window-len", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--compress", choices=("kv", "k", "v"), default="kv",
                   help="which half of the cache the codec compresses: kv (default), k (keys only, values fp16) "
                        "or v (values only, keys fp16); applied to every codec")
    p.add_argument("--backend", choices=tuple(BACKENDS), default="torch",
                   help="torch (default): perplexity / attention fidelity / memory of each codec with the reference "
                        "math; cuda: the same with attention on the compressed cache in the CUDA kernels (needs "
                        "--device cuda; half of each window prefilled, then one-token decode steps); onnxruntime: "
                        "export the model with each codec and report torch ↔ onnxruntime agreement (errors per "
                        "output, code mismatch, greedy token agreement) on the text windows")
    p.add_argument("--steps", type=int, default=64,
                   help="onnxruntime backend: greedy tokens generated after each window (prefill included; default 64)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_json(p)
    add_output_dir(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from . import CliError
    if args.windows < 1 or args.window_len < 2:
        raise CliError("--windows must be >= 1 and --window-len >= 2")
    return BACKENDS[args.backend](args)


def _run_torch(args) -> int:
    from ..data import read_text
    from ..models.compare import CompareConfig, build_plans, default_specs, run_compare, summary, write_reports
    from ..models.loading import load_model
    from . import CliError
    cfg = CompareConfig(specs=args.codec or default_specs(), windows=args.windows, window_len=args.window_len,
                        fp16_window=args.fp16_window, layer_overrides=args.layer_codec,
                        compress=args.compress)
    if args.windows < 1 or args.window_len < 2:
        raise CliError("--windows must be >= 1 and --window-len >= 2")
    if args.backend == "cuda" and not str(args.device).startswith("cuda"):
        raise CliError(f"--backend cuda runs the model on the GPU: add --device cuda (got --device {args.device})")
    if args.fp16_window is not None and args.fp16_window < 0:
        raise CliError(f"--fp16-window must be >= 0, got {args.fp16_window}")
    check_device(args.device)
    if args.codec_device:
        check_device(args.codec_device, "--codec-device")
    text = read_text(args.text)
    text_name = args.text or "default (exllamav2 wiki.utf8, English Wikipedia)"
    with open_output(args) as out:
        lm = load_model(args.model)
        lm.model.to(args.device)
        geo = lm.recipe.geometry(lm.model.config)
        build_plans(cfg, geo.layers)  # bad specs fail before the windows are tokenized
        rep = run_compare(lm, text, text_name, cfg, progress=not args.no_progress, device=args.device,
                          codec_device=args.codec_device, backend=args.backend)
        write_reports(rep, out)
    if args.json:
        print(json.dumps(summary(rep), indent=2))
    else:
        print(f"fp16 ppl {rep['baseline']['ppl']:.3f} over {rep['windows']} windows × {rep['window_len']}")
        for r in rep["codecs"]:
            print(f"{r['spec']:<34} {r['bits_per_coordinate']:6.3f} b/c {r['compression']:5.2f}x  "
                  f"ppl {r['ppl']:8.3f}  Δ {r['delta_ppl']:+8.3f}  cos {r['attn_cosine']:.4f}")
        print(f"wrote {args.out_dir}/report.json, report.md, report.html")
    return 0


def _run_onnxruntime(args) -> int:
    from .. import codecs
    from ..data import read_text
    from ..models.compare import default_specs
    from ..models.evaluate import text_windows
    from ..models.loading import load_model
    from ..onnx.agreement import compare_onnxruntime, write_reports
    from . import CliError
    unsupported = [f for f, bad in (("--fp16-window", args.fp16_window is not None),
                                    ("--layer-codec", args.layer_codec), ("--compress", args.compress != "kv"),
                                    ("--codec-device", args.codec_device), ("--device", args.device != "cpu")) if bad]
    if unsupported:
        raise CliError(f"{', '.join(unsupported)} not supported with --backend onnxruntime")
    if args.steps < 1:
        raise CliError(f"--steps must be >= 1, got {args.steps}")
    specs = list(dict.fromkeys(args.codec or default_specs()))
    for s in specs:
        codecs.from_spec(s)                       # bad specs fail before the model loads
    text = read_text(args.text)
    with open_output(args) as out:
        lm = load_model(args.model)
        prompts = text_windows(lm, text, args.windows, args.window_len)
        rep = compare_onnxruntime(lm, args.model, specs, prompts, args.steps, progress=not args.no_progress)
        rep["text"] = args.text or "default (exllamav2 wiki.utf8, English Wikipedia)"
        write_reports(rep, out)
    if args.json:
        print(json.dumps(rep, indent=2, default=str))
    else:
        print("logit |Δ| = |torch − onnxruntime| logits, onnxruntime on torch's exact inputs, every position "
              "of every step; fixed bytes = per-layer present bytes differing on torch's own inputs")
        for r in rep["codecs"]:
            lo, fx = r["logit_error"], r["fixed_bytes"]
            print(f"{r['spec']:<28} logit |Δ| max {lo['max']:.2e} median {lo['median']:.2e}  "
                  f"fixed bytes {fx['present_bytes_differing']} differ  "
                  f"steps outside {len(r['steps_outside_tolerance'])}/{r['steps']}  "
                  f"tokens {r['token_agreement']:.3f} (first divergence {r['first_divergence']})  "
                  f"{'within tolerance' if r['within_tolerance'] else 'OUTSIDE tolerance'}")
        print(f"wrote {args.out_dir}/report.json, report.md")
    return 0 if all(r["within_tolerance"] for r in rep["codecs"]) else 1


# --backend → runner; a new backend is a runner function and one entry here.
BACKENDS = {"torch": _run_torch, "cuda": _run_torch, "onnxruntime": _run_onnxruntime}
