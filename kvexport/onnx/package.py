"""Write an exported decoder directory: ``model.onnx`` (+ external data), ``config.json``,
and optionally verify it against torch with a greedy decode loop (``report.json``, written by
:func:`~.agreement.agreement`, which also states the pass rule).  ``kvexport export --verify``
and ``kvexport compare --backend onnxruntime`` share :func:`export_decoder_files` and
:func:`verify_dir`."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import onnx
import torch

from .. import __version__
from . import IR_VERSION

DEFAULT_PROMPT = "The history of the city begins in the twelfth century, when"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def export_decoder_files(lm, codec, out: Path, model_spec: str) -> tuple[Any, dict[str, Any]]:
    """Export the loaded model ``lm`` with ``codec`` into the (existing, empty) directory ``out``:
    ``model.onnx`` + ``model.onnx.data`` (full-checked) and ``config.json``.  Returns
    (the :class:`~.decoder.PackedCacheDecoder`, the config dict)."""
    from .decoder import PackedCacheDecoder, export_decoder
    from ..ops.registry import get_op
    try:
        dec = PackedCacheDecoder(lm.model, codec, lm.recipe)
    except ValueError as e:
        raise ValueError(f"cannot export {lm.name}: {e}") from None
    t0 = time.perf_counter()
    try:
        model = export_decoder(dec)
    except Exception as e:   # torch.export / translation errors: name the module and the first line
        msg = str(e).strip().splitlines()
        raise ValueError(f"cannot export {lm.name} ({type(lm.model).__name__}): "
                         f"{type(e).__name__}: {msg[0] if msg else ''}") from e
    export_s = time.perf_counter() - t0
    path = out / "model.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=1024)
    onnx.checker.check_model(str(path), full_check=True)
    files = {p.name: dict(bytes=p.stat().st_size, sha256=_sha256(p)) for p in sorted(out.iterdir())}
    ops = sorted({(n.op_type, n.domain) for n in model.graph.node if n.domain == "kvexport"})
    config = dict(
        kvexport_version=__version__, model=lm.name, model_spec=model_spec,
        model_type=getattr(lm.model.config, "model_type", None),
        geometry=dict(layers=dec.layers, kv_heads=dec.kv_heads, head_dim=dec.head_dim,
                      vocab=lm.model.config.vocab_size),
        codec=codec.spec(), cache_fields={r: dec.fields[r] for r in ("key", "value")},
        inputs=[i.name for i in model.graph.input], outputs=[o.name for o in model.graph.output],
        ops={name: get_op(name).version for name, _ in ops}, ir_version=IR_VERSION,
        opsets={o.domain or "ai.onnx": o.version for o in model.opset_import},
        files=files, export_seconds=round(export_s, 3),
        versions=dict(torch=torch.__version__, onnx=onnx.__version__),
    )
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return dec, config


def verify_dir(out: Path, dec, prompt: torch.Tensor, steps: int) -> dict[str, Any]:
    """onnxruntime on ``out/model.onnx`` vs the torch decoder ``dec`` over a greedy decode of
    ``steps`` tokens after ``prompt`` (B, P) (:func:`~.agreement.agreement`)."""
    from .agreement import agreement
    from .opmodels import session
    return agreement(session(onnx.load(str(out / "model.onnx"))), dec, prompt, steps)


def export_to_dir(model_spec: str, codec, out: Path, *, verify_steps: int = 0,
                  prompt: str = DEFAULT_PROMPT) -> dict[str, Any]:
    """Export ``model_spec`` with ``codec`` into the (existing, empty) directory ``out``; with
    ``verify_steps``, also the agreement report ``report.json`` (see the module doc)."""
    from ..models.loading import load_model
    lm = load_model(model_spec)
    dec, config = export_decoder_files(lm, codec, out, model_spec)
    result = dict(config=config)
    if verify_steps:
        ids = lm.encode(prompt) if lm.tokenizer is not None else torch.arange(12).unsqueeze(0)
        report = verify_dir(out, dec, ids, verify_steps)
        (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        result["report"] = report
    return result
