"""``build --onnx PATH``: read the given graph, refuse what is not a kvexport ONNX model in one
line, and take the codec from the graph's kvexport nodes (their attributes are the codec's
parameters), so the report names the codec the engine really runs."""

from __future__ import annotations

from pathlib import Path


def model_file(path: str | Path) -> Path:
    """The model.onnx of a ``kvexport export`` directory, or ``path`` itself."""
    from . import CliError
    p = Path(path)
    f = p / "model.onnx" if p.is_dir() else p
    if not f.is_file():
        raise CliError(f"--onnx {path}: no ONNX model at {f}")
    return f


def read_graph(path: str | Path):
    """The graph of ``path`` (external weights not loaded)."""
    import onnx
    from . import CliError
    f = model_file(path)
    try:
        model = onnx.load(str(f), load_external_data=False)
    except Exception as e:  # noqa: BLE001 — protobuf's DecodeError, onnx's ValueError, OSError
        raise CliError(f"--onnx {path}: {f} is not a readable ONNX model ({type(e).__name__}: "
                       f"{(str(e).splitlines() or [''])[0]})") from None
    if not model.graph.node:
        raise CliError(f"--onnx {path}: {f} holds no graph ({f.stat().st_size} bytes; not an ONNX model?)")
    return model


def graph_codec(model, shown: str):
    """The codec object of the graph's kvexport nodes (None when it has none); refuses nodes
    whose attributes are not a valid codec and a graph mixing codecs."""
    from ..ops.registry import DOMAIN, spec_for_node
    from ..onnx.finalize import _attr_dict
    from . import CliError
    found: dict[str, object] = {}
    for node in model.graph.node:
        if node.domain != DOMAIN:
            continue
        try:
            _, codec = spec_for_node(node.op_type, _attr_dict(node))
        except (ValueError, TypeError) as e:
            raise CliError(f"--onnx {shown}: node {node.name or node.op_type}: {e}") from None
        found.setdefault(codec.spec_hash, codec)
    if len(found) > 1:
        from ..trt.package import codec_label
        raise CliError(f"--onnx {shown}: the graph's kvexport nodes are of several codecs "
                       f"({', '.join(map(codec_label, found.values()))}); kvexport build takes one")
    return next(iter(found.values()), None)


def codec_for_onnx(path: str | Path, spec: str | None):
    """The codec to build ``path`` with: the graph's; ``spec`` (--codec), when given, must agree."""
    from .. import codecs
    from ..trt.package import codec_label
    from . import CliError
    model = read_graph(path)
    from ..onnx.finalize import check_versions
    try:  # a graph for another packed-format version or layout is refused by name
        check_versions(model)
    except ValueError as e:
        raise CliError(f"--onnx {path}: {e}") from None
    got = graph_codec(model, str(path))
    want = codecs.from_spec(spec) if spec is not None else None
    if got is None:
        if want is None:
            raise CliError(f"--onnx {path}: the graph has no kvexport nodes, so its codec cannot be read "
                           f"from it; pass --codec")
        return want
    if want is not None and want.spec_hash != got.spec_hash:
        raise CliError(f"--onnx {path}: the graph was exported with {codec_label(got)}, not --codec "
                       f"{codec_label(want)}; drop --codec or pass the graph's")
    return got
