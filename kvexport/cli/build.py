"""``kvexport build``: a decoder with a compressed KV cache as a TensorRT engine + plugin library."""

from __future__ import annotations

import json
import sys

from .common import add_json, add_output_dir, open_output


def add_parser(sub) -> None:
    p = sub.add_parser("build", help="build a TensorRT(-RTX) engine whose plugins run the compressed-cache ops")
    p.add_argument("--model", default=None,
                   help="'default' (the default), a .gguf file, a Hugging Face model directory or tiny:<family>")
    p.add_argument("--codec", default=None,
                   help="codec spec with parameters, e.g. turbo:bits=4 (default fp16; with --onnx: the graph's)")
    p.add_argument("--onnx", metavar="PATH", help="build from an existing `kvexport export` directory or .onnx file "
                   "(instead of --model; the codec is read from its kvexport nodes)")
    p.add_argument("--max-batch", type=int, default=1, metavar="B", help="largest batch of the profile (default 1)")
    p.add_argument("--max-prompt", type=int, default=128, metavar="P",
                   help="largest number of new tokens per step (default 128)")
    p.add_argument("--max-context", type=int, default=2048, metavar="T",
                   help="largest cached context in tokens (default 2048)")
    p.add_argument("--backend", choices=("tensorrt", "tensorrt_rtx"),
                   help="TensorRT Python module (default: tensorrt if importable, else tensorrt_rtx)")
    add_output_dir(p)
    add_json(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from .. import codecs
    from ..trt import Limits, PluginBuildError, PluginCoverageError, TrtUnavailable, plugin_support
    from ..trt.package import build_to_dir
    from . import CliError
    for name in ("max_batch", "max_prompt", "max_context"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.onnx and args.model:
        raise CliError("--model and --onnx exclude each other: the graph given by --onnx is the model")
    if args.onnx:
        from .onnx_input import codec_for_onnx
        codec = codec_for_onnx(args.onnx, args.codec)   # the graph's codec; --codec must agree
    else:
        codec = codecs.from_spec(args.codec or "fp16")
    model = args.model or (str(args.onnx) if args.onnx else "default")
    why = plugin_support(codec)  # before anything is exported or written
    if why:
        raise CliError(why)
    limits = Limits(args.max_batch, args.max_prompt, args.max_context)
    say = (lambda s: print(f"[kvexport build] {s}", file=sys.stderr, flush=True))
    try:
        with open_output(args) as tmp:
            res = build_to_dir(model, codec, tmp, limits=limits, onnx_path=args.onnx, progress=say,
                               backend_name=args.backend)
    except (TrtUnavailable, PluginBuildError, PluginCoverageError) as e:
        raise CliError(str(e)) from None
    rep = res["report"]
    if args.json:
        print(json.dumps(res, indent=2, default=str))
    else:
        kv = rep.get("kv_cache") or {}
        print(f"built {res['config']['model']} with {res['config']['codec']} → {args.out_dir}/engine.plan "
              f"({rep['engine_bytes'] / 1e6:.2f} MB, {rep['backend']}, {rep['plugin_layers']} plugin layers, "
              f"build {rep['build_seconds']:.1f} s"
              + (f", KV {kv['bytes_per_token']:.0f} B/token = {kv['compression_vs_fp16']:.2f}× smaller than fp16"
                 if kv else "") + ")")
    return 0
