"""tests/conftest.py ``require``: a missing dependency skips locally and fails under CI=true,
and no test skips a dependency any other way."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

TINY = '''
import pytest

pytestmark = pytest.mark.requires("kvexport_no_such_module")

def test_marked():
    pass
'''

TINY_FIXTURE = '''
def test_condition(require):
    require(False, "no widget here")

def test_present(require):
    assert require("/usr/bin/g++", "unused") == "/usr/bin/g++"   # a found path is returned as is
    assert require(7, "unused") == 7
'''


@pytest.fixture
def run(pytester, monkeypatch):
    pytester.makeconftest((TESTS / "conftest.py").read_text())
    pytester.makepyfile(test_marker=TINY, test_fixture=TINY_FIXTURE)

    def go(ci: str | None):
        if ci is None:
            monkeypatch.delenv("CI", raising=False)
        else:
            monkeypatch.setenv("CI", ci)
        # (hypothesis's plugin would be imported afresh by each in-process run: seconds)
        return pytester.runpytest_inprocess("-p", "no:cacheprovider", "-p", "no:hypothesispytest", "-rA")
    return go


def test_missing_dependency_skips_locally(run):
    r = run(None)
    r.assert_outcomes(passed=1, skipped=2)
    r.stdout.fnmatch_lines(["*SKIPPED*kvexport_no_such_module is not installed*"])
    r.stdout.fnmatch_lines(["*SKIPPED*no widget here*"])


@pytest.mark.parametrize("ci", ["true", "1"])
def test_missing_dependency_fails_under_ci(run, ci):
    r = run(ci)
    r.assert_outcomes(passed=1, failed=1, errors=1)
    r.stdout.fnmatch_lines(["*CI=true and kvexport_no_such_module is not installed*"])
    r.stdout.fnmatch_lines(["*CI=true and no widget here*"])
    assert r.ret != 0


# What may still skip: the hardware a GPU test needs, which CI does not have.
ALLOWED = {
    ("conftest.py", 'pytest.mark.skip(reason="needs a CUDA GPU")'),
    ("conftest.py", "pytest.skip(why)"),
    ("models/test_kernel_binding.py", 'skipif(torch.cuda.is_available(), reason="checks the no-GPU error")'),
    ("cli/test_errors.py", 'skipif(torch.cuda.is_available(), reason="this machine has CUDA")'),
    ("gpu/test_model_kernels_gpu.py", 'pytest.skip("no bf16 on this GPU")'),
}
_SKIP = re.compile(r"importorskip\(|pytest\.skip\(|mark\.skip\(|mark\.skipif\(|\bskipif\(")


def test_no_dependency_skips_outside_require():
    found = []
    for p in sorted(TESTS.rglob("*.py")):
        rel = str(p.relative_to(TESTS))
        if rel == "test_require.py":
            continue
        for line in p.read_text().splitlines():
            if _SKIP.search(line) and not any(rel == f and s in line for f, s in ALLOWED):
                found.append(f"{rel}: {line.strip()}")
    assert not found, "skip a missing dependency through require() (tests/conftest.py):\n" + "\n".join(found)
