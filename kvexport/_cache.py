"""The on-disk cache (``$KVEXPORT_CACHE``, default ``~/.cache/kvexport``) and the rules every
cached artefact there follows: built libraries, compiled objects, TensorRT headers, fitted
codebooks, captured K/V.

* **Atomic writes.** An artefact is written to a unique temporary name in its own directory,
  fsync'd, then ``os.replace``d over the target. An installed file is never deleted first: a
  reader (or a process that has the library dlopened) sees the old file or the new one.
* **Recorded digest.** Beside ``X`` lies ``X.sha256``; :func:`verified` checks it before a
  cached file is used, and a mismatch means "make it again", never "load it anyway".
* **One builder per key.** :func:`locked` serialises builds of one artefact
  (``fcntl.flock`` on ``X.lock``, never removed), so concurrent builders make it once.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator

DIGEST_SUFFIX = ".sha256"


def cache_dir() -> Path:
    """``$KVEXPORT_CACHE``, else ``~/.cache/kvexport`` (the one place cached artefacts live)."""
    return Path(os.environ.get("KVEXPORT_CACHE") or Path.home() / ".cache" / "kvexport")


def file_digest(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def files_digest(paths: Iterable[Path], root: Path) -> str:
    """One sha256 over (path relative to ``root``, contents) of ``paths``, in sorted order."""
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(str(p.relative_to(root)).encode() + b"\0")
        h.update(p.read_bytes())
    return h.hexdigest()


def digest(path: Path) -> str:
    """sha256 of a file, or of every file under a directory (names included)."""
    if path.is_dir():
        return files_digest((p for p in path.rglob("*") if p.is_file()), path)
    return file_digest(path)


def sidecar(path: Path) -> Path:
    return path.with_name(path.name + DIGEST_SUFFIX)


def verified(path: str | os.PathLike) -> bool:
    """True when ``path`` exists and matches the digest recorded beside it."""
    path = Path(path)
    try:
        want = sidecar(path).read_text().strip()
        return bool(want) and digest(path) == want
    except OSError:
        return False


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_name(path: Path) -> Path:
    """A fresh, unique, empty file next to ``path`` (same directory, so ``os.replace`` is atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    return Path(tmp)


def _replace(src: Path, dst: Path) -> None:
    _fsync(src)
    os.replace(src, dst)


def record(path: Path) -> str:
    """Write the digest sidecar of an existing ``path`` (atomically); returns the digest."""
    d = digest(path)
    tmp = temp_name(sidecar(path))
    try:
        tmp.write_text(d + "\n")
        _replace(tmp, sidecar(path))
    finally:
        tmp.unlink(missing_ok=True)
    return d


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> str:
    """Create ``path`` through ``write(tmp)`` (``tmp`` a unique name beside it), then record its
    digest.  If ``write`` or the install fails, the previous ``path`` is untouched and no
    temporary file is left.  Returns the sha256 of the new file."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        write(tmp)
        if not tmp.is_file() or tmp.stat().st_size == 0:
            raise OSError(f"writing {path.name} produced no file")
        # New file first, then its digest: a reader between the two sees a mismatch and
        # rebuilds under the lock, never a wrong file with a matching digest.
        _replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return record(path)


@contextlib.contextmanager
def locked(path: str | os.PathLike) -> Iterator[None]:
    """Exclusive lock for making ``path`` (a lock file ``path.lock`` beside it, never removed,
    so every process locks the same inode).  Works between threads too: each call opens its
    own file description."""
    lock = Path(str(path) + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        try:
            import fcntl
        except ImportError:  # no flock (Windows): atomic replaces still keep each file whole
            yield
            return
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def cached(path: str | os.PathLike, make: Callable[[Path], object], force: bool = False) -> bool:
    """Ensure a verified ``path``: unless one exists (and not ``force``), make it with
    ``make(tmp)`` under the lock, once however many callers race.  True if this call made it."""
    path = Path(path)
    if not force and verified(path):
        return False
    with locked(path):
        if not force and verified(path):  # another builder finished while we waited
            return False
        atomic_write(path, make)
    return True
