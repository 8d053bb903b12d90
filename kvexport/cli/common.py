"""Argument groups shared by subcommands, and the output-directory contract."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def add_output_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("out_dir", metavar="OUT_DIR", help="output directory (must not exist unless --force)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing OUT_DIR that kvexport wrote (it holds a .kvexport-output marker)")


def check_device(device: str, flag: str = "--device") -> None:
    """Refuse, in one line and before a model loads, a torch device this machine lacks."""
    import torch
    from . import CliError
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise CliError(f"{flag} {device}: not a torch device ({str(e).splitlines()[0]})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch was built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise CliError(f"{flag} {device}: no CUDA device available ({why}; torch {torch.__version__}); "
                           f"use --device cpu")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise CliError(f"{flag} {device}: this machine has {n} CUDA device(s), cuda:0 to cuda:{n - 1}")
    elif dev.type != "cpu":
        try:  # other backends: a round trip shows whether torch can compute there
            (torch.ones(1, device=dev) + 1).cpu()
        except Exception as e:  # noqa: BLE001 — whatever the backend raises, the device is unusable
            raise CliError(f"{flag} {device}: torch cannot compute on it ({str(e).splitlines()[0]})") from None


def add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")


# Written into every output directory kvexport creates; --force replaces only such a directory.
MARKER = ".kvexport-output"


def open_output(args) -> "contextlib.AbstractContextManager[Path]":
    """:func:`output_dir` for a subcommand's ``out_dir`` / ``--force``, recording its command line."""
    return output_dir(args.out_dir, args.force, command=getattr(args, "invocation", None))


def _protected(real: Path) -> str | None:
    """Why the resolved path ``real`` may never be replaced, or None."""
    if real == Path(real.anchor):
        return "it is the file-system root"
    if real == Path(os.path.expanduser("~")).resolve():
        return "it is the home directory"
    try:
        cwd = Path.cwd().resolve()
    except OSError:  # the working directory was deleted: nothing to protect
        return None
    if real == cwd:
        return "it is the working directory"
    if real in cwd.parents:
        return "it contains the working directory"
    return None


def _written_by_kvexport(d: Path) -> bool:
    m = d / MARKER
    if m.is_symlink() or not m.is_file():
        return False
    try:
        info = json.loads(m.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and info.get("tool") == "kvexport"


def _check_replaceable(out: Path, shown: str, force: bool) -> bool:
    """Raise CliError unless an existing ``out`` may be replaced; True when it exists."""
    from . import CliError
    if not (out.exists() or out.is_symlink()):
        return False
    real = out.resolve()
    why = _protected(real)
    if why:
        where = "" if str(real) == shown else f" ({real})"
        raise CliError(f"refusing to replace {shown}{where}: {why}; name a new output directory")
    if out.is_symlink():
        raise CliError(f"{shown} is a symbolic link (to {real}); kvexport replaces only a directory it wrote, "
                       f"not a link: name the directory itself or a new one")
    if not out.is_dir():
        raise CliError(f"{shown} exists and is not a directory")
    empty = not any(out.iterdir())
    if not empty and not _written_by_kvexport(out):
        raise CliError(f"{shown} exists and was not written by kvexport (it has no {MARKER}); "
                       f"name a new output directory")
    if not force:
        raise CliError(f"output directory {shown} exists; pass --force to replace it")
    return True


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT / SIGTERM while directories are swapped (delivered right after)."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextmanager
def output_dir(path: str | Path, force: bool, command: str | None = None) -> Iterator[Path]:
    """Write into a temporary sibling and move it into place only on success.

    An existing OUT_DIR is refused unless ``force`` and it is a directory kvexport wrote (it
    holds :data:`MARKER`) or is empty; never replaced, whatever the marker says: the working
    directory or one of its parents, the home directory, ``/``, a symbolic link.  Missing
    parents are created.  The swap only renames (old moved aside, new moved in, old removed
    last): on failure at any point the old directory is as it was and no temporary is left.
    """
    from . import CliError
    from .. import __version__
    shown = str(path)
    out = Path(path).expanduser()
    replace = _check_replaceable(out, shown, force)
    out = out.resolve()  # "." or "a/.." name a real directory; temporaries go beside it
    parent = out.parent
    try:  # like `mkdir -p`: creating missing parents overwrites nothing
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CliError(f"cannot create parent directory {parent}: {e.strerror or e}") from None
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.kvexport-new-", dir=parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; an output dir is an ordinary one
        yield tmp
        write_json(tmp / MARKER, dict(tool="kvexport", version=__version__, command=command or "kvexport",
                                      time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    with _signals_deferred():
        _swap_in(tmp, out, shown, replace)


def _swap_in(tmp: Path, out: Path, shown: str, replace: bool) -> None:
    from . import CliError
    aside = out.parent / f".{out.name}.kvexport-old-{secrets.token_hex(6)}"
    try:
        if replace:
            os.rename(out, aside)
        try:
            os.rename(tmp, out)
        except BaseException:
            if replace:
                os.rename(aside, out)  # the old output back where it was
            raise
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if replace and aside.exists() and not out.exists():
            raise CliError(f"cannot replace {shown}: {e}; the previous output is at {aside}") from None
        if isinstance(e, OSError):
            state = "the existing directory is left as it was" if replace else "nothing was written"
            raise CliError(f"cannot move the new output into {shown}: {e.strerror or e}; {state}") from None
        raise
    if replace:
        try:
            shutil.rmtree(aside)
        except OSError as e:
            print(f"kvexport: warning: wrote {shown}, but could not remove the previous output moved to "
                  f"{aside}: {e.strerror or e}", file=sys.stderr)


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
