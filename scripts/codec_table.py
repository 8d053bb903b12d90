#!/usr/bin/env python
"""Codec table on real K/V of the default model.

For every codec at its rate sweep (and its paper default): bits per coordinate
(keys+values, side values included), compression vs fp16, relative MSE of keys
and values (‖x − x̂‖² / ‖x‖²) and mean attention-output cosine against exact
fp32 causal attention, using the real post-RoPE q/k/v captured from
SmolLM2-135M (layers 0, 7, 15, 23, 29; one 512-token window of the default
Wikipedia text; kvexport.realkv).

    python scripts/codec_table.py [--out docs/codec_table]   # writes .json and .md
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from _bench_io import render_only, write_pair  # noqa: E402
from kvexport import __version__, codecs  # noqa: E402
from kvexport.realkv import DEFAULT_LAYERS, load_real_kv  # noqa: E402


def exact_attention(q, k, v):
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    t = q.shape[2]
    mask = torch.ones(t, t, dtype=torch.bool).tril()
    return torch.softmax(s.masked_fill(~mask, float("-inf")), -1) @ v


def measure(c, data, layers):
    rel_k, rel_v, cos = [], [], []
    for layer in layers:
        q, k, v = (data[f"{n}.{layer}"].float() for n in "qkv")
        pk, pv = c.encode(k, "key"), c.encode(v, "value")
        rel_k.append(((c.decode(pk).float() - k) ** 2).sum().item() / (k ** 2).sum().item())
        rel_v.append(((c.decode(pv).float() - v) ** 2).sum().item() / (v ** 2).sum().item())
        out = c.attend(q, pk, pv).float()
        ref = exact_attention(q, k, v)
        cos.append(torch.nn.functional.cosine_similarity(out, ref, dim=-1).mean().item())
    n = len(layers)
    return sum(rel_k) / n, sum(rel_v) / n, sum(cos) / n, cos


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/codec_table", help="output path stem (.json and .md are written)")
    ap.add_argument("--render", metavar="JSON", help="only re-render OUT.md from a JSON this script wrote")
    args = ap.parse_args(argv)
    if args.render:
        return render_only(args.render, Path(args.out).with_suffix(".md"), render_md)
    data = load_real_kv()
    layers = list(DEFAULT_LAYERS)
    tokens, d = data[f"k.{layers[0]}"].shape[2], data[f"k.{layers[0]}"].shape[3]
    rows = []
    for name in codecs.names():
        cls = codecs.codec_class(name)
        sweeps = [dict(p) for p in cls.RATE_SWEEP] or [{}]
        default_hash = codecs.get(name).spec_hash
        if all(codecs.get(name, **s).spec_hash != default_hash for s in sweeps):
            sweeps.append({})
        for prm in sweeps:
            c = codecs.get(name, **prm)
            t0 = time.perf_counter()
            rk, rv, cos, per_layer = measure(c, data, layers)
            bpc = c.bits_per_coordinate(d, tokens)
            fmt = lambda v: "/".join(map(str, v)) if isinstance(v, (tuple, list)) else str(v)
            spec = name + (":" + ",".join(f"{k}={fmt(v)}" for k, v in prm.items()) if prm else "")
            rows.append(dict(spec=spec, default=c.spec_hash == default_hash, bits_per_coordinate=bpc,
                             key_bits=c.bits_per_coordinate(d, tokens, "key"),
                             value_bits=c.bits_per_coordinate(d, tokens, "value"),
                             compression=16.0 / bpc, rel_mse_k=rk, rel_mse_v=rv, attn_cosine=cos,
                             attn_cosine_per_layer=dict(zip(map(str, layers), per_layer)),
                             seconds=time.perf_counter() - t0))
            print(f"{spec:<34} {bpc:6.3f} b/c {16 / bpc:5.2f}x  mseK {rk:.4f} mseV {rv:.4f}  cos {cos:.5f}",
                  flush=True)
    meta = dict(date=datetime.date.today().isoformat(), kvexport=__version__, torch=torch.__version__,
                machine=platform.platform(), model="SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized fp32)",
                layers=layers, tokens=tokens, head_dim=d,
                note="one 512-token window of the default Wikipedia text; causal attention, real queries")
    write_pair(Path(args.out).with_suffix(".json"), dict(meta=meta, rows=rows), render_md, indent=2)
    return 0


def render_md(data: dict) -> str:
    """Markdown of a codec_table JSON."""
    meta, rows = data["meta"], data["rows"]
    lines = [f"# Codec table on real K/V ({meta['date']})", "",
             f"Model {meta['model']}, layers {meta['layers']}, {meta['tokens']} tokens, head_dim {meta['head_dim']}; "
             f"{meta['note']}. Reproduce: `python scripts/codec_table.py`.", "",
             "| spec | bits/coord (K+V) | K bits | V bits | compression | rel. MSE K | rel. MSE V | attn cosine |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| `{r['spec']}`{' (default)' if r['default'] else ''} | {r['bits_per_coordinate']:.3f} | "
                     f"{r['key_bits']:.3f} | {r['value_bits']:.3f} | {r['compression']:.2f}× | "
                     f"{r['rel_mse_k']:.4f} | {r['rel_mse_v']:.4f} | {r['attn_cosine']:.5f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
