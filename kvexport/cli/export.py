"""``kvexport export``: a decoder with a packed KV cache as ONNX (+ optional onnxruntime check)."""

from __future__ import annotations

import json

from .common import add_json, add_output_dir, open_output


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="export a decoder with a compressed KV cache to ONNX")
    p.add_argument("--model", default="default",
                   help="'default', a .gguf file, a Hugging Face model directory or tiny:<family>")
    p.add_argument("--codec", default="fp16", help="codec spec, e.g. kivi:bits=2 (default fp16)")
    p.add_argument("--verify", type=int, default=0, metavar="N",
                   help="run N greedy steps in torch and onnxruntime and write report.json")
    add_output_dir(p)
    add_json(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from .. import codecs
    from ..onnx.package import export_to_dir
    codec = codecs.from_spec(args.codec)          # ValueError names the bad parameter
    with open_output(args) as tmp:
        res = export_to_dir(args.model, codec, tmp, verify_steps=args.verify)
    rep = res.get("report")
    if args.json:
        print(json.dumps(res, indent=2, default=str))
    else:
        cfg = res["config"]
        size = sum(f["bytes"] for f in cfg["files"].values())
        print(f"exported {cfg['model']} with {codec.name} to {args.out_dir} "
              f"({size / 1e6:.1f} MB, {cfg['export_seconds']:.1f} s)")
        if rep:
            e = rep["logit_error"]
            print(f"onnxruntime vs torch over {rep['steps']} greedy steps: token agreement "
                  f"{rep['token_agreement']:.3f}, logit error max {e['max']:.2e} mean {e['mean']:.2e} "
                  f"median {e['median']:.2e} ({'within' if rep['within_tolerance'] else 'OUTSIDE'} tolerance)")
    return 0 if not rep or rep["within_tolerance"] else 1
