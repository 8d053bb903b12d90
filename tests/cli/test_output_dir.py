"""``--force`` replaces only a directory kvexport wrote, never the user's files (issue 10 item 0).

The refusal tests stub out every deleting and renaming call, so even a regression cannot
delete anything: a refused ``--force`` must touch nothing at all."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import kvexport
from kvexport.cli import CliError
from kvexport.cli.common import MARKER, output_dir


def _tree(root: Path) -> dict[str, str]:
    """Every path under ``root`` (relative) → file content ('' for directories)."""
    return {str(p.relative_to(root)): (p.read_text() if p.is_file() else "")
            for p in sorted(root.rglob("*"))}


def _user_dir(d: Path) -> Path:
    (d / "sub").mkdir(parents=True)
    (d / "precious.txt").write_text("keep")
    (d / "sub" / "y").write_text("y")
    return d


@pytest.fixture
def no_delete(monkeypatch):
    """Deleting or moving anything fails the test (and does nothing)."""
    def forbidden(*a, **k):
        raise AssertionError(f"a refused --force must not delete or move anything: {a}")
    for mod, name in ((shutil, "rmtree"), (os, "rename"), (os, "replace"), (os, "rmdir"), (os, "unlink"),
                      (Path, "rename"), (Path, "replace"), (Path, "rmdir"), (Path, "unlink")):
        monkeypatch.setattr(mod, name, forbidden)


def _refused(path, match, watch: Path | None = None) -> str:
    """``output_dir(path, force=True)`` raises a one-line CliError matching ``match`` and leaves
    ``watch`` (a directory tree) exactly as it was."""
    before = _tree(watch) if watch else None
    with pytest.raises(CliError, match=match) as ei:
        with output_dir(path, force=True):
            raise AssertionError("the body must not run for a refused OUT_DIR")
    assert len(str(ei.value).splitlines()) == 1
    if watch:
        assert _tree(watch) == before  # untouched, no hidden temp dirs
    return str(ei.value)


def test_force_refuses_cwd_dot_end_to_end(tmp_path):
    """The reported bug: ``kvexport export --model tiny:llama . --force`` in a directory with the
    user's files deleted them. Now refused in one line, before any work, everything untouched."""
    work = _user_dir(tmp_path / "work")
    before = _tree(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(Path(kvexport.__file__).resolve().parents[1]))
    r = subprocess.run([sys.executable, "-m", "kvexport", "export", "--model", "tiny:llama", ".", "--force"],
                       cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.count("\n") == 1 and "working directory" in r.stderr, r.stderr
    assert _tree(tmp_path) == before


def test_force_refuses_cwd_and_its_ancestors(tmp_path, monkeypatch, no_delete):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    (work / MARKER).write_text(json.dumps({"tool": "kvexport"}))  # even a kvexport-written cwd is kept
    monkeypatch.chdir(work)
    _refused(".", "working directory", watch=tmp_path)
    _refused(str(work), "working directory", watch=tmp_path)
    _refused("..", "working directory", watch=tmp_path)
    _refused(str(tmp_path / "a"), "working directory", watch=tmp_path)
    _refused("../b/../..", "working directory", watch=tmp_path)


def test_force_refuses_home(tmp_path, monkeypatch, no_delete):
    home = _user_dir(tmp_path / "home")
    (home / MARKER).write_text(json.dumps({"tool": "kvexport"}))
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    assert "home directory" in _refused(str(home), "home directory", watch=tmp_path)
    assert "home directory" in _refused("~", "home directory", watch=tmp_path)


def test_force_refuses_root(tmp_path, monkeypatch, no_delete):
    monkeypatch.chdir(tmp_path)
    _refused("/", r"refusing to replace /")


def test_force_refuses_a_directory_kvexport_did_not_write(tmp_path, monkeypatch, no_delete):
    monkeypatch.chdir(tmp_path)
    _user_dir(tmp_path / "mine")
    msg = _refused("mine", "not written by kvexport", watch=tmp_path)
    assert "mine" in msg
    # a marker that is not kvexport's (not JSON, another tool, a directory) does not count
    for bad in ("not json", json.dumps({"tool": "other"}), json.dumps(["kvexport"])):
        (tmp_path / "mine" / MARKER).write_text(bad)
        _refused("mine", "not written by kvexport", watch=tmp_path)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / MARKER).mkdir()
    _refused("other", "not written by kvexport", watch=tmp_path)


def test_force_refuses_a_file(tmp_path, monkeypatch, no_delete):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "f").write_text("data")
    _refused("f", "not a directory", watch=tmp_path)


def test_without_force_a_user_directory_is_refused_without_suggesting_force(tmp_path, no_delete):
    _user_dir(tmp_path / "mine")
    with pytest.raises(CliError, match="not written by kvexport") as ei:
        with output_dir(tmp_path / "mine", force=False):
            pass
    assert "--force" not in str(ei.value)


@pytest.mark.parametrize("target", ["cwd", "home", "user", "kvexport"])
def test_force_refuses_symlinks(tmp_path, monkeypatch, no_delete, target):
    """A link is resolved before the checks (a link to a protected directory is protected) and a
    link itself is never replaced (the user's link would silently become a directory)."""
    work = tmp_path / "work"
    work.mkdir()
    dest = {"cwd": work, "home": tmp_path / "home", "user": tmp_path / "user", "kvexport": tmp_path / "kv"}[target]
    dest.mkdir(exist_ok=True)
    (dest / "precious.txt").write_text("keep")
    if target == "kvexport":
        (dest / MARKER).write_text(json.dumps({"tool": "kvexport"}))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(work)
    os.symlink(dest, tmp_path / "link")
    match = {"cwd": "working directory", "home": "home directory", "user": "symbolic link",
             "kvexport": "symbolic link"}[target]
    _refused(str(tmp_path / "link"), match, watch=tmp_path)
    assert (dest / "precious.txt").read_text() == "keep"


def test_new_output_carries_the_marker_and_force_replaces_it(tmp_path):
    out = tmp_path / "out"
    with output_dir(out, force=False, command="kvexport export out") as tmp:
        (tmp / "old.txt").write_text("old")
    marker = json.loads((out / MARKER).read_text())
    from kvexport import __version__
    assert marker["tool"] == "kvexport" and marker["version"] == __version__
    assert marker["command"] == "kvexport export out" and marker["time"].endswith("Z")
    with pytest.raises(CliError, match="pass --force"):
        with output_dir(out, force=False):
            pass
    with output_dir(out, force=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # old removed, no hidden leftovers


def _kvexport_dir(out: Path) -> dict[str, str]:
    with output_dir(out, force=False) as tmp:
        (tmp / "old.txt").write_text("old")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "z").write_text("z")
    return _tree(out)


def test_force_failure_in_the_body_leaves_the_old_output(tmp_path):
    out = tmp_path / "out"
    old = _kvexport_dir(out)
    with pytest.raises(RuntimeError, match="boom"):
        with output_dir(out, force=True) as tmp:
            (tmp / "half.txt").write_text("half")
            raise RuntimeError("boom")
    assert _tree(out) == old and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("fail_at", [1, 2])
def test_force_failure_during_the_swap_leaves_the_old_output(tmp_path, monkeypatch, fail_at):
    """Rename 1 moves the old output aside, rename 2 moves the new one in; either failing leaves
    the old output in place and no hidden directories in the parent."""
    out = tmp_path / "out"
    old = _kvexport_dir(out)
    real, calls = os.rename, []

    def rename(src, dst, *a, **k):
        calls.append((src, dst))
        if len(calls) == fail_at:
            raise OSError(28, "No space left on device")
        return real(src, dst, *a, **k)
    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(CliError, match="No space left on device") as ei:
        with output_dir(out, force=True) as tmp:
            (tmp / "new.txt").write_text("new")
    monkeypatch.undo()
    assert len(str(ei.value).splitlines()) == 1 and "left as it was" in str(ei.value)
    assert _tree(out) == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_force_interrupt_during_the_swap_restores_the_old_output(tmp_path, monkeypatch):
    out = tmp_path / "out"
    old = _kvexport_dir(out)
    real, calls = os.rename, []

    def rename(src, dst, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(src, dst, *a, **k)
    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        with output_dir(out, force=True) as tmp:
            (tmp / "new.txt").write_text("new")
    monkeypatch.undo()
    assert _tree(out) == old and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_force_replaces_an_empty_directory(tmp_path):
    """An empty directory (``mkdir out`` first) holds nothing to lose: --force may use it."""
    (tmp_path / "out").mkdir()
    with pytest.raises(CliError, match="pass --force"):
        with output_dir(tmp_path / "out", force=False):
            pass
    with output_dir(tmp_path / "out", force=True) as tmp:
        (tmp / "f").write_text("x")
    assert (tmp_path / "out" / "f").read_text() == "x" and (tmp_path / "out" / MARKER).is_file()


def test_cli_writes_the_marker_and_a_failed_force_run_keeps_the_old_output(tmp_path, monkeypatch, capsys):
    """Through the CLI: the marker records the command line; a second run is refused without
    --force; a --force run that fails midway leaves the old output and no temporaries."""
    import kvexport.models.compare as compare
    from kvexport.cli import main
    monkeypatch.setattr(compare, "write_reports", lambda rep, out: (out / "report.json").write_text("{}"))  # no plots
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.txt").write_text("the quick brown fox jumps over the lazy dog " * 4)
    args = ["compare", "--model", "tiny:llama", "--codec", "fp16", "--text", "t.txt", "--windows", "1",
            "--window-len", "16", "--no-progress", "out"]
    assert main(args) == 0
    marker = json.loads((tmp_path / "out" / MARKER).read_text())
    assert marker["command"] == "kvexport " + " ".join(args)
    assert main(args) == 2 and "pass --force" in capsys.readouterr().err
    (tmp_path / "out" / "stale.txt").write_text("from before")
    bad = [*args[:2], "no-such-model", *args[3:], "--force"]  # fails inside the run, after the checks
    assert main(bad) == 2 and "model 'no-such-model' not found" in capsys.readouterr().err
    assert (tmp_path / "out" / "stale.txt").exists()  # a failed --force run keeps the old output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "t.txt"]
