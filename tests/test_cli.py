"""The CLI: env, codecs listing, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys


def _run(*args):
    return subprocess.run([sys.executable, "-m", "kvexport", *args], capture_output=True, text=True, timeout=600)


def test_env_text_and_json():
    r = _run("env")
    assert r.returncode == 0, r.stderr
    for key in ("python", "torch", "onnxruntime", "tensorrt", "nvcc", "default model"):
        assert key in r.stdout
    info = json.loads(_run("env", "--json").stdout)
    assert info["python"].count(".") == 2 and info["torch"]["version"].startswith("2.")
    assert "cuda_available" in info["torch"]


def test_codecs_lists_every_codec():
    from kvexport import codecs
    rows = json.loads(_run("codecs", "--json").stdout)
    assert [r["codec"] for r in rows] == codecs.names()
    assert rows[0]["codec"] == "fp16" and rows[0]["compression"] == 1.0


def test_no_command_prints_help_and_fails():
    r = _run()
    assert r.returncode == 2 and "usage" in r.stdout.lower()


def test_output_dir_creates_missing_parents_and_refuses_existing(tmp_path):
    from kvexport.cli import CliError
    from kvexport.cli.common import output_dir
    target = tmp_path / "a" / "b" / "out"
    with output_dir(target, force=False) as tmp:
        (tmp / "f").write_text("x")
    assert (target / "f").read_text() == "x"
    import pytest
    with pytest.raises(CliError, match="exists"):
        with output_dir(target, force=False):
            pass
    assert (target / "f").read_text() == "x"  # untouched
    try:
        with output_dir(tmp_path / "c" / "out", force=False) as tmp:
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert not (tmp_path / "c" / "out").exists()  # nothing half-written


def test_sigterm_leaves_no_half_written_output(tmp_path):
    import signal
    import time
    out = tmp_path / "o"
    p = subprocess.Popen([sys.executable, "-m", "kvexport", "compare", "--model", "tiny:llama",
                          "--windows", "5000", "--window-len", "64", "--codec", "kivi", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(10)  # well inside the run (5000 windows take minutes)
    assert p.poll() is None
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-2000:]
    assert "interrupted" in err
    assert list(tmp_path.iterdir()) == []


def test_compare_backend_onnxruntime_writes_agreement_report(tmp_path):
    """compare --backend onnxruntime on tiny:llama: report.json / report.md with, per codec, the
    per-output errors, code mismatch fractions, token agreement and first divergence."""
    out = tmp_path / "o"
    r = _run("compare", "--backend", "onnxruntime", "--model", "tiny:llama", "--codec", "kivi:group=8",
             "--windows", "2", "--window-len", "19", "--steps", "5", "--no-progress", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((out / "report.json").read_text())
    assert rep["backend"] == "onnxruntime" and rep["windows"] == 2 and rep["steps"] == 5
    (row,) = rep["codecs"]
    assert row["spec"] == "kivi:group=8" and row["export_seconds"] > 0 and row["files"]["model.onnx.data"] > 0
    assert set(row["outputs"]) == {"logits", "key.codes", "key.scale", "key.zero", "key.residual",
                                   "value.codes", "value.scale", "value.zero"}
    for k in ("logits", "key.scale", "value.zero"):
        assert set(row["outputs"][k]) == {"max", "mean", "median", "elements"}
    assert row["outputs"]["logits"]["elements"] > 0
    assert row["outputs"]["key.codes"]["bytes_compared"] > 0 and row["outputs"]["value.codes"]["code_mismatch"] == 0
    from kvexport.tolerances import tolerance
    assert row["logit_error"] == row["outputs"]["logits"], row["logit_error"]   # one logit figure
    assert row["logit_error"]["max"] <= tolerance("kivi", "end-to-end", "float32").atol, row["logit_error"]
    assert row["fixed_bytes"]["within_tolerance"] and row["fixed_bytes"]["present_bytes_differing"] == 0
    assert row["code_identical_steps"] >= 1 and row["steps_outside_tolerance"] == []
    (line,) = [x for x in r.stdout.splitlines() if x.startswith("kivi:group=8")]
    assert line.count("|Δ| max") == 1 and f"{row['logit_error']['max']:.2e}" in line and "within tolerance" in line
    assert row["token_agreement"] == 1.0 and row["first_divergence"] is None
    assert row["teacher_forced"]["token_agreement"] == 1.0 and len(row["first_difference"]) == 5
    assert row["within_tolerance"]
    assert "| kivi:group=8 |" in (out / "report.md").read_text()


def test_compare_backend_onnxruntime_refuses_torch_only_options(tmp_path):
    r = _run("compare", "--backend", "onnxruntime", "--model", "tiny:llama", "--compress", "k", str(tmp_path / "o"))
    assert r.returncode == 2 and "--compress not supported with --backend onnxruntime" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()
