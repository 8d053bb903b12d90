"""Build and data caches (kvexport._cache): stable keys, verified artefacts, atomic installs,
one builder per key, unique temporary names.  CPU only: a fake nvcc (a shell script that logs
each call and writes its ``-o`` file) stands in for the compiler, so no test here runs nvcc."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import torch

from kvexport import _cache, _toolchain
from kvexport.kernels import _build as kbuild
from kvexport.trt import _build as tbuild

FAKE_NVCC = """#!/bin/sh
echo "$*" >> "$FAKE_NVCC_LOG"
if [ "$1" = "--version" ]; then echo "Cuda compilation tools, release 99.9, V99.9.0"; exit 0; fi
out=""; prev=""; shared=0
for a in "$@"; do
  [ "$prev" = "-o" ] && out="$a"
  [ "$a" = "-shared" ] && shared=1
  prev="$a"
done
if [ $shared = 1 ]; then
  [ -n "$FAKE_NVCC_LINK_SLEEP" ] && sleep "$FAKE_NVCC_LINK_SLEEP"
  printf 'fake library\\n' > "$out"
else
  printf 'fake object\\n' > "$out"
fi
"""


class Fake:
    def __init__(self, root: Path):
        self.log = root / "nvcc.log"

    def calls(self, kind: str) -> int:
        """How many compile (``-c``) or link (``-shared``) commands ran."""
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        return sum(("-shared" if kind == "link" else "-c") in s.split() for s in lines)


@pytest.fixture
def fake(tmp_path, monkeypatch):
    nvcc = tmp_path / "bin" / "nvcc"
    nvcc.parent.mkdir()
    nvcc.write_text(FAKE_NVCC)
    nvcc.chmod(0o755)
    trt = tmp_path / "trt" / "include"
    trt.mkdir(parents=True)
    for h in ("NvInferRuntime.h", "NvInferPluginBase.h", "NvInferVersion.h"):
        (trt / h).write_text(f"// fake {h}\n")
    monkeypatch.setenv("KVEXPORT_NVCC", str(nvcc))
    monkeypatch.setenv("TENSORRT_ROOT", str(trt.parent))
    monkeypatch.setenv("KVEXPORT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FAKE_NVCC_LOG", str(tmp_path / "nvcc.log"))
    monkeypatch.delenv("KVEXPORT_TRT_PLUGIN_LIB", raising=False)
    monkeypatch.delenv("KVEXPORT_CUDA_ARCHS", raising=False)
    return Fake(tmp_path)


BUILDERS = {
    "kernels": lambda **kw: kbuild.build(archs=["90"]),
    "trt": lambda force=False: tbuild.build(["86"], force=force),
}



def _run_twice(fn, timeout: float) -> None:
    """Run ``fn`` in two threads at once; re-raise what either raised."""
    errors = []

    def guarded():
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=guarded) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not errors, errors

def test_object_cache_key_ignores_temporary_dirs(fake):
    """Two plugin-library builds (each in its own temporary directory) share compiled objects."""
    first = tbuild.build(["86"])
    compiled = fake.calls("compile")
    assert compiled >= len(kbuild.sources()) and fake.calls("link") == 1
    again = tbuild.build(["86"], force=True)
    assert again == first
    assert fake.calls("compile") == compiled, "objects were recompiled: their cache key changed"
    assert fake.calls("link") == 2


@pytest.mark.parametrize("which", BUILDERS)
def test_corrupt_cached_library_is_rebuilt(fake, which):
    lib = BUILDERS[which]()
    good = lib.read_bytes()
    lib.write_bytes(b"X" * len(good))           # same size, other bytes
    assert BUILDERS[which]() == lib
    assert lib.read_bytes() == good and fake.calls("link") == 2
    assert _cache.verified(lib)


def test_failed_install_keeps_old_library(fake, monkeypatch):
    lib = tbuild.build(["86"])
    good = lib.read_bytes()
    real = os.replace

    def failing(src, dst, *a, **k):
        if Path(dst) in (lib, lib.parent):
            raise OSError(28, "No space left on device")
        return real(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(tbuild.PluginBuildError, match="No space left"):
        tbuild.build(["86"], force=True)
    monkeypatch.setattr(os, "replace", real)
    assert lib.read_bytes() == good and _cache.verified(lib)
    assert not [p for p in lib.parent.iterdir() if ".tmp" in p.name], "temporary files left behind"


@pytest.mark.parametrize("which", BUILDERS)
def test_concurrent_builders_make_one_library(fake, monkeypatch, which):
    monkeypatch.setenv("FAKE_NVCC_LINK_SLEEP", "0.5")
    from kvexport.trt import codegen
    codegen.generate()                          # warm the op registry outside the threads
    start, out = threading.Barrier(2), []

    def one():
        start.wait()
        out.append(BUILDERS[which]())

    _run_twice(one, 60)
    assert len(out) == 2 and out[0] == out[1]
    assert fake.calls("link") == 1, "both builders linked: no lock around the build"
    assert out[0].read_bytes() == b"fake library\n" and _cache.verified(out[0])


def test_cached_header_dir_is_verified(fake, monkeypatch, tmp_path):
    """The kernel-lens headers, once fetched, are checked like any artefact: a damaged copy is
    fetched again (and never deleted before its replacement is in place)."""
    import io
    import subprocess
    import zipfile
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for h in ("NvInferRuntime.h", "NvInferPluginBase.h"):
            z.writestr(zipfile.ZipInfo(tbuild.HEADER_WHEEL_DIR + h, (2020, 1, 1, 0, 0, 0)), f"// {h}\n")
    wheel = buf.getvalue()
    real_run, fetched = subprocess.run, []

    def run(cmd, *a, **k):
        if cmd[1:4] == ["-m", "pip", "download"]:
            fetched.append(cmd)
            (Path(cmd[cmd.index("-d") + 1]) / "kernel_lens-2.0.1-py3-none-any.whl").write_bytes(wheel)
            return subprocess.CompletedProcess(cmd, 0, "", "")
        return real_run(cmd, *a, **k)

    import hashlib
    monkeypatch.setattr(tbuild, "HEADER_WHEEL_SHA256", hashlib.sha256(wheel).hexdigest())
    monkeypatch.setattr(tbuild, "_system_header_dirs", lambda: [])
    monkeypatch.setattr(subprocess, "run", run)
    inc = tmp_path / "cache" / "trt-headers" / tbuild.HEADER_WHEEL.replace("==", "-") / "include"
    assert tbuild.header_dir() == inc and len(fetched) == 1
    assert tbuild.header_dir() == inc and len(fetched) == 1       # cached
    (inc / "NvInferRuntime.h").write_text("// truncated")
    assert tbuild.header_dir() == inc and len(fetched) == 2       # damaged → fetched again
    assert (inc / "NvInferRuntime.h").read_text() == "// NvInferRuntime.h\n"


def test_user_named_plugin_library_must_be_a_file(tmp_path, monkeypatch):
    monkeypatch.setenv("KVEXPORT_TRT_PLUGIN_LIB", str(tmp_path))
    with pytest.raises(tbuild.PluginBuildError, match="is not a file"):
        tbuild.build(["86"])
    lib = tmp_path / "mine.so"
    lib.write_bytes(b"anything: the user named it, it is not checked against our digest")
    monkeypatch.setenv("KVEXPORT_TRT_PLUGIN_LIB", str(lib))
    assert tbuild.build(["86"]) == lib


def test_corrupt_cached_codebook_is_refit(tmp_path, monkeypatch):
    from kvexport.codecs.fibquant import codec as fq
    monkeypatch.setenv("KVEXPORT_CACHE", str(tmp_path))
    monkeypatch.setattr(fq, "_DISK_CACHE_AFTER_S", -1.0)      # cache every fit on disk
    args = (16, 2, 8, 1, 4, 256, 0)
    fq.fit_codebook.cache_clear()
    first = fq.fit_codebook(*args)
    (path,) = (tmp_path / "codebooks").glob("*.safetensors")
    raw = bytearray(path.read_bytes())
    raw[-8:] = bytes(8)                          # the last two fp32 entries → 0, header intact
    path.write_bytes(bytes(raw))
    fq.fit_codebook.cache_clear()
    again = fq.fit_codebook(*args)
    fq.fit_codebook.cache_clear()
    assert torch.equal(again, first), "a damaged cached codebook was used"
    assert _cache.verified(path)


def test_realkv_concurrent_writers_use_unique_temp_names(tmp_path, monkeypatch):
    """Two processes capturing the same K/V at once must not share a temporary file."""
    import safetensors.torch as st
    from kvexport import realkv
    monkeypatch.setenv("KVEXPORT_CACHE", str(tmp_path))
    data = {"k.0": torch.arange(8.0).reshape(1, 1, 2, 4)}
    monkeypatch.setattr(realkv, "capture", lambda layers, tokens: {k: v.clone() for k, v in data.items()})
    both_written, real_save, temps = threading.Barrier(2, timeout=20), st.save_file, []

    def save(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        temps.append(Path(filename))
        both_written.wait()                      # both writers hold a written temp file

    monkeypatch.setattr(st, "save_file", save)
    def one():
        assert torch.equal(realkv.load_real_kv((0,), 2)["k.0"], data["k.0"])

    _run_twice(one, 30)
    assert len(set(temps)) == 2 and all(p.parent == tmp_path for p in temps)
    (final,) = tmp_path.glob("realkv-*.safetensors")
    assert _cache.verified(final) and not list(tmp_path.glob("*.tmp*"))


# ----- toolchain: one nvcc search, one arch parser ------------------------------------------

def test_parse_archs():
    assert _toolchain.parse_archs("80;86, sm_90a 8.9 80") == ["80", "86", "90a", "89"]
    for bad in ("abc", "9", "sm_", "86;x86"):
        with pytest.raises(ValueError, match="is not a compute capability"):
            _toolchain.parse_archs(bad)


@pytest.mark.parametrize("archs", [lambda: tbuild.archs(), lambda: kbuild.device_archs()])
def test_bad_arch_env_is_refused_by_name(monkeypatch, archs):
    monkeypatch.setenv("KVEXPORT_CUDA_ARCHS", "86;sm86x")
    with pytest.raises(ValueError, match="KVEXPORT_CUDA_ARCHS: 'sm86x'"):
        archs()


def test_env_reports_the_nvcc_builds_use(fake):
    from kvexport import envinfo
    info = envinfo.collect()["nvcc"]
    assert info["path"] == os.environ["KVEXPORT_NVCC"] == kbuild.find_nvcc()
    assert info["version"] == "99.9"
