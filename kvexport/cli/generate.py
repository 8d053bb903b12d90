"""``kvexport generate``: greedy continuation of a prompt with the model running on a compressed cache."""

from __future__ import annotations

import json

from .common import add_json, check_device
from .compare import add_model_args


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="greedy generation on a compressed KV cache")
    add_model_args(p)
    p.add_argument("--codec", default="fp16", metavar="SPEC", help="codec spec name[:key=value,...] (default fp16)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default 32)")
    p.add_argument("prompt", help="the prompt text")
    add_json(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..codecs import get
    from ..codecs._core.params import parse_spec
    from ..models.cache import LayerPlan, parse_overrides
    from ..models.loading import load_model
    from ..models.rewrite import CompressedSession, generate
    from . import CliError
    if args.max_new_tokens < 1:
        raise CliError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not args.prompt:
        raise CliError("the prompt is empty")
    check_device(args.device)
    if args.codec_device:
        check_device(args.codec_device, "--codec-device")
    name, given = parse_spec(args.codec)
    if args.fp16_window is not None:
        given["window"] = args.fp16_window
    codec = get(name, **given)
    lm = load_model(args.model)
    lm.model.to(args.device)
    geo = lm.recipe.geometry(lm.model.config)
    plan = LayerPlan(codec, parse_overrides(args.layer_codec, geo.layers))
    ids = lm.encode(args.prompt).to(args.device)
    with CompressedSession(lm.model, plan, recipe=lm.recipe, compute_device=args.codec_device) as s:
        new = generate(s, ids, args.max_new_tokens, eos_token_id=lm.eos_token_id)
        kv = s.cache.nbytes()
        tokens = s.cache.tokens
    text = lm.decode(new[0].tolist())
    if args.json:
        print(json.dumps(dict(model=lm.name, codec=args.codec, prompt=args.prompt, continuation=text,
                              tokens=new[0].tolist(), kv_bytes=kv, cache_tokens=tokens,
                              seconds=round(s.seconds, 3)), indent=2))
    else:
        print(text)
    return 0
