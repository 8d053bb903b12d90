"""Output files of the benchmark scripts: OUT.json with OUT.md rendered from it, and ``--render``.

No torch import here: ``--render`` and ``--help`` run where torch does not.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Callable


def write_atomic(path: Path, text: str) -> None:
    """Write by rename, so a run killed by a time limit leaves the previous complete file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_pair(json_path: Path, data: dict, render_md: Callable[[dict], str], *,
               derive: Callable[[dict], dict] | None = None, indent: int = 1, default=None) -> None:
    """JSON_PATH (``derive(data)`` when given) and the .md beside it (``render_md(data)``), each by rename."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(json_path, json.dumps(derive(data) if derive else data, indent=indent, default=default) + "\n")
    write_atomic(json_path.with_suffix(".md"), render_md(data))


def render_only(json_path: str, md_path: Path, render_md: Callable[[dict], str]) -> int:
    """``--render JSON``: MD_PATH from a JSON the script wrote; 0, or 2 with one line on stderr and no file."""
    try:
        md = render_md(json.loads(Path(json_path).read_text()))
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"error: cannot render {json_path}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    try:
        md_path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(md_path, md)
    except OSError as e:
        print(f"error: cannot write {md_path}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    return 0


def bad_specs(specs, parse: Callable[[str], object]) -> bool:
    """True, after one ``error:`` line on stderr, when ``parse`` (``codecs.from_spec``) refuses a spec."""
    try:
        for spec in specs:
            parse(spec)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return True
    return False


def add_render_out(ap, default_stem: Path) -> None:
    """The GPU benchmarks' last two options: ``--render JSON`` and ``--out STEM``."""
    ap.add_argument("--render", metavar="JSON", help="only re-render OUT.md from a JSON this script wrote (no GPU)")
    ap.add_argument("--out", default=str(default_stem), help="output stem (.json and .md)")
