"""``kvexport`` command line: a thin layer over the library.

Each subcommand is a module in this package exposing ``add_parser(subparsers)``
that registers itself with ``set_defaults(func=run)``; ``run(args)`` returns an
exit code.  Exit codes: 0 ok, 1 a failed tolerance, 2 a user or environment error
(bad input, missing file or tool: one line on stderr), 70 an internal error (a
kvexport bug: one line saying so and where), 130 interrupted.  ``KVEXPORT_DEBUG=1``
adds the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shlex
import sys
import traceback
from pathlib import Path

from .. import __version__

SUBCOMMANDS = ("env", "codecs", "compare", "generate", "export", "build")


EXIT_TOLERANCE, EXIT_USAGE, EXIT_INTERNAL, EXIT_INTERRUPTED = 1, 2, 70, 130  # 70: EX_SOFTWARE

# Library errors that mean "this input / machine cannot do that", not a bug; looked up only
# in modules already imported (an error of a module never imported cannot have been raised).
_LIBRARY_USER_ERRORS = (("kvexport.kernels._build", "KernelsUnavailable"),
                        ("kvexport.trt.runtime", "TrtUnavailable"),
                        ("kvexport.trt._build", "PluginBuildError"),
                        ("kvexport.trt.engine", "PluginCoverageError"),
                        ("google.protobuf.message", "DecodeError"))


class CliError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


def _user_error_types() -> tuple[type[BaseException], ...]:
    found = [CliError, ValueError, OSError]  # OSError: missing / unreadable files, full disks
    for mod, name in _LIBRARY_USER_ERRORS:
        cls = getattr(sys.modules.get(mod), name, None)
        if isinstance(cls, type):
            found.append(cls)
    return tuple(found)


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror and not isinstance(e, CliError):
        msg = e.strerror + (f": {e.filename}" if e.filename else "")
    else:
        msg = str(e).strip() or type(e).__name__
    lines = msg.splitlines()
    more = "" if len(lines) < 2 or _debug() else " (KVEXPORT_DEBUG=1 shows the rest)"
    return lines[0] + more


def _where(e: BaseException) -> str:
    """``kvexport/x.py:N`` of the innermost frame inside the package ('' if none)."""
    root = Path(__file__).resolve().parents[1]
    where = ""
    for fr in traceback.extract_tb(e.__traceback__):
        try:
            rel = Path(fr.filename).resolve().relative_to(root.parent)
        except ValueError:
            continue
        if rel.parts[0] == root.name:
            where = f"{rel.as_posix()}:{fr.lineno}"
    return where


def _check_specs(args) -> None:
    """Refuse a misspelt codec before the subcommand imports torch (seconds); the parameters
    are checked when the codec is built."""
    from ..codecs import check_spec
    codec = getattr(args, "codec", None)
    for spec in [codec] if isinstance(codec, str) else codec or []:
        check_spec(spec)
    for item in getattr(args, "layer_codec", None) or []:  # LAYERS=SPEC
        _, eq, spec = item.partition("=")
        if eq:
            check_spec(spec)


def _debug() -> bool:
    return os.environ.get("KVEXPORT_DEBUG", "") not in ("", "0")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvexport", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"kvexport {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            mod = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:  # subcommand not built yet
            if e.name != f"{__name__}.{name}":
                raise
            continue
        mod.add_parser(sub)
    return parser


def _terminate(signum, frame):  # SIGTERM unwinds like Ctrl-C, so output_dir() cleans up
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    import signal
    if threading_main():
        signal.signal(signal.SIGTERM, _terminate)
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    args.invocation = shlex.join(["kvexport", *argv])  # recorded in each output directory's marker
    who = f"kvexport {args.command}"
    try:
        _check_specs(args)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"{who}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 — every error ends as one line; bugs are named as bugs
        if _debug():
            traceback.print_exc()
        if isinstance(e, _user_error_types()):
            print(f"{who}: error: {_one_line(e)}", file=sys.stderr)
            return EXIT_USAGE
        where = _where(e)
        print(f"{who}: internal error: {type(e).__name__}: {_one_line(e)}{f' (at {where})' if where else ''}; "
              f"this is a bug in kvexport: please report it with the traceback from KVEXPORT_DEBUG=1",
              file=sys.stderr)
        return EXIT_INTERNAL


def threading_main() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
