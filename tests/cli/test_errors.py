"""Bad input to the CLI: one line on stderr, a non-zero exit, no output directory left
(issue 10 item 11). Run in process through ``kvexport.cli.main`` (fast); the torch-free
refusal of a misspelt codec runs in a fresh interpreter."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kvexport
from kvexport.cli import EXIT_INTERNAL, EXIT_USAGE, main

_LLAMA = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=64, intermediate_size=128,
              num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, head_dim=16, vocab_size=320,
              max_position_embeddings=512, rms_norm_eps=1e-6)


def _fails(capsys, tmp_path: Path, *args: str, match: str, rc: int = EXIT_USAGE) -> str:
    """Run ``kvexport *args``: exit ``rc``, exactly one stderr line containing ``match``, and
    nothing left in ``tmp_path`` beyond what was there (no half-written output)."""
    before = sorted(p.name for p in tmp_path.iterdir())
    got = main(list(args))
    out, err = capsys.readouterr()
    assert got == rc, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert match in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    return err


# -- --device -------------------------------------------------------------------------------

_NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


@pytest.mark.parametrize("flag,device,match", [
    pytest.param("--device", "cuda", "--device cuda: no CUDA device available", marks=_NO_CUDA),
    ("--device", "cuda:99", "--device cuda:99: "),
    ("--device", "gpu0", "--device gpu0: not a torch device"),
    ("--device", "meta", "--device meta: torch cannot compute on it"),
    ("--codec-device", "cuda:99", "--codec-device cuda:99: ")])
@pytest.mark.parametrize("command", ["generate", "compare"])
def test_unavailable_device_is_one_line(capsys, tmp_path, command, flag, device, match):
    args = ["generate", "--model", "tiny:llama", flag, device, "hello"] if command == "generate" else \
        ["compare", "--model", "tiny:llama", "--codec", "kivi", flag, device, str(tmp_path / "o")]
    _fails(capsys, tmp_path, *args, match=match)


# -- model files ----------------------------------------------------------------------------

def _model_dir(tmp_path: Path, config, weights: bytes | None = None) -> Path:
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    if weights is not None:
        (d / "model.safetensors").write_bytes(weights)
    return d


@pytest.mark.parametrize("config,match", [
    ("{not json", "config.json is not valid JSON: Expecting property name enclosed in double quotes at line 1"),
    ("[1, 2]", "config.json must hold a JSON object, not a list"),
    ({**_LLAMA, "num_hidden_layers": "two"}, "num_hidden_layers"),
    ({**_LLAMA, "rms_norm_eps": "small"}, "rms_norm_eps")])
def test_bad_config_json_is_one_line(capsys, tmp_path, config, match):
    d = _model_dir(tmp_path, config)
    err = _fails(capsys, tmp_path, "generate", "--model", str(d), "hi", match=match)
    assert str(d / "config.json") in err


def test_config_types_checked_where_transformers_does_not(monkeypatch, tmp_path):
    """transformers < 5 builds a config with a string where an int belongs, then fails deep in
    the model with a TypeError: our own check names the key."""
    import transformers
    from kvexport.models.loading import load_model
    d = _model_dir(tmp_path, {**_LLAMA, "num_hidden_layers": "two"})
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained",
                        lambda *a, **k: transformers.LlamaConfig())  # accepts anything, like old versions
    with pytest.raises(ValueError, match=r"config.json: num_hidden_layers must be an integer, got 'two'"):
        load_model(str(d))


def test_model_dir_without_weights(capsys, tmp_path):
    d = _model_dir(tmp_path, _LLAMA)
    _fails(capsys, tmp_path, "generate", "--model", str(d), "hi",
           match=f"{d} has a config.json but no weights (model.safetensors or pytorch_model.bin)")


def test_model_dir_with_corrupt_weights(capsys, tmp_path):
    d = _model_dir(tmp_path, _LLAMA, weights=b"not a safetensors file" * 4)
    _fails(capsys, tmp_path, "generate", "--model", str(d), "hi", match=f"cannot load the weights in {d}: ")


def test_truncated_gguf_says_so(capsys, tmp_path, default_model_path):
    f = tmp_path / "cut.gguf"
    with open(default_model_path, "rb") as src:
        f.write_bytes(src.read(3_000_000))  # the default model is ~98 MB
    _fails(capsys, tmp_path, "generate", "--model", str(f), "hi",
           match=f"{f} is truncated: 3,000,000 bytes, but its header describes data up to byte ")


def test_corrupt_gguf_says_so(capsys, tmp_path):
    import struct
    f = tmp_path / "bad.gguf"
    key = b"general.name"
    f.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key
                  + struct.pack("<I", 99) + b"\0" * 8)
    _fails(capsys, tmp_path, "generate", "--model", str(f), "hi",
           match=f"{f} is a corrupt GGUF file ({f.stat().st_size} bytes): ValueError: unknown metadata value type 99")
    f.write_bytes(b"GGUF" + struct.pack("<IQQ", 1, 0, 0))
    _fails(capsys, tmp_path, "generate", "--model", str(f), "hi", match=f"{f}: GGUF version 1 is not supported")


@pytest.mark.parametrize("content", [b"", b"hello\n"])
def test_not_a_gguf_says_so(capsys, tmp_path, content):
    f = tmp_path / "x.gguf"
    f.write_bytes(content)
    _fails(capsys, tmp_path, "generate", "--model", str(f), "hi",
           match=f"{f} is not a GGUF file ({len(content)} bytes, no GGUF magic at its start)")


# -- build --onnx ---------------------------------------------------------------------------

def _graph(tmp_path: Path, *specs: str) -> Path:
    """A model.onnx (in a directory without config.json) holding one key-encode node per codec spec."""
    import onnx
    from onnx import helper
    from kvexport import codecs
    from kvexport.onnx.finalize import make_node
    from kvexport.ops.registry import ops_for
    from kvexport.ops.registry import DOMAIN
    nodes, version = [], 1
    for i, s in enumerate(specs):
        c = codecs.from_spec(s)
        params = {k: v for k, v in dataclasses.asdict(c.params).items() if v is not None}
        op = ops_for(c)["key"]
        nodes.append(make_node(op, [f"x{i}"], [f"y{i}"], params))
        version = max(version, op.version)
    d = tmp_path / "exported"
    d.mkdir()
    model = helper.make_model(helper.make_graph(nodes, "g", [], []),
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, version)])
    onnx.save(model, str(d / "model.onnx"))
    return d


def test_build_onnx_refuses_a_graph_of_another_format_version(capsys, tmp_path):
    """A graph written for another packed-format version is refused by name before any build."""
    import onnx
    d = _graph(tmp_path, "ternary")
    m = onnx.load(str(d / "model.onnx"))
    for a in m.graph.node[0].attribute:
        if a.name == "plugin_version":
            a.s = b"1"  # ternary's format is v2: a v1 node would be misread
    onnx.save(m, str(d / "model.onnx"))
    _fails(capsys, tmp_path, "build", "--onnx", str(d), str(tmp_path / "o"),
           match="has version 1, but the installed ternary packed format (version 2)")


@pytest.mark.parametrize("content,match", [(b"\x08\xff garbage \x00" * 50, "is not a readable ONNX model (DecodeError"),
                                           (b"", "holds no graph (0 bytes")])
def test_build_refuses_a_corrupt_onnx_file(capsys, tmp_path, content, match):
    (tmp_path / "model.onnx").write_bytes(content)
    _fails(capsys, tmp_path, "build", "--onnx", str(tmp_path / "model.onnx"), str(tmp_path / "o"), match=match)


def test_build_onnx_takes_the_codec_from_the_graph(capsys, tmp_path, monkeypatch):
    """Without config.json the graph's nodes say the codec; a --codec that disagrees is refused."""
    import kvexport.trt.package as package
    from kvexport import codecs
    d = _graph(tmp_path, "kivi:bits=4")
    seen = {}

    def fake_build(model, codec, out, **kw):  # stands in for the TensorRT build
        seen.update(model=model, codec=codec)
        return dict(config=dict(model=model, codec=package.codec_label(codec)),
                    report=dict(engine_bytes=1, backend="fake", plugin_layers=1, build_seconds=0.0, kv_cache=None))
    monkeypatch.setattr(package, "build_to_dir", fake_build)
    assert main(["build", "--onnx", str(d), str(tmp_path / "o")]) == 0
    assert seen["codec"].spec_hash == codecs.from_spec("kivi:bits=4").spec_hash
    assert seen["model"] == str(d)
    assert "with kivi:bits=4" in capsys.readouterr().out
    _fails(capsys, tmp_path, "build", "--onnx", str(d), "--codec", "turbo", str(tmp_path / "o2"),
           match="the graph was exported with kivi:bits=4, not --codec turbo")
    _fails(capsys, tmp_path, "build", "--onnx", str(d), "--model", "tiny:llama", str(tmp_path / "o2"),
           match="--model and --onnx exclude each other")


def test_build_onnx_refuses_a_graph_of_two_codecs(capsys, tmp_path):
    d = _graph(tmp_path, "kivi:bits=4", "turbo:bits=2")
    _fails(capsys, tmp_path, "build", "--onnx", str(d), str(tmp_path / "o"),
           match="nodes are of several codecs (kivi:bits=4, turbo:bits=2)")


def test_build_onnx_without_kvexport_nodes_needs_codec(capsys, tmp_path):
    import onnx
    from onnx import helper
    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [], [])
    onnx.save(helper.make_model(g), str(tmp_path / "plain.onnx"))
    _fails(capsys, tmp_path, "build", "--onnx", str(tmp_path / "plain.onnx"), str(tmp_path / "o"),
           match="the graph has no kvexport nodes, so its codec cannot be read from it; pass --codec")


@pytest.mark.parametrize("env,work,say", [(False, False, "using the cached plugin library"),
                                          (False, True, "ready in"),
                                          (True, False, "using the plugin library KVEXPORT_TRT_PLUGIN_LIB=")])
def test_build_says_whether_it_built_the_plugin_library(tmp_path, monkeypatch, env, work, say):
    import kvexport.trt.package as package
    lib = tmp_path / "lib.so"
    lib.write_bytes(b"\x7fELF")

    def fake_lib(progress=None, **kw):
        if work:
            progress("compiling 1 of 1 sources")
        return lib
    monkeypatch.setattr(package._build, "build", fake_lib)
    monkeypatch.setattr(package.runtime, "backend", lambda name: None)
    if env:
        monkeypatch.setenv("KVEXPORT_TRT_PLUGIN_LIB", str(lib))
    else:
        monkeypatch.delenv("KVEXPORT_TRT_PLUGIN_LIB", raising=False)
    said = []
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(FileNotFoundError):  # stop right after the library step
        package.build_to_dir("x", None, out, onnx_path=tmp_path / "none.onnx", progress=said.append)
    assert any(say in s for s in said), said
    assert not any("building" in s for s in said), said


# -- text windows, codec specs --------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_windows_beyond_the_text_are_refused(capsys, tmp_path, backend):
    text = tmp_path / "t.txt"
    text.write_text("x" * 200)  # tiny:llama reads bytes: 200 tokens = 3 windows of 64
    _fails(capsys, tmp_path, "compare", "--model", "tiny:llama", "--backend", backend, "--codec", "kivi",
           "--text", str(text), "--windows", "10", "--window-len", "64", "--no-progress", str(tmp_path / "o"),
           match="the text gives 3 window(s) of 64 tokens (200 tokens), not --windows 10")


def test_duplicated_codec_parameter_is_refused(capsys, tmp_path):
    from kvexport.codecs import from_spec
    with pytest.raises(ValueError, match="parameter 'bits' given twice"):
        from_spec("kivi:bits=4,bits=2")
    _fails(capsys, tmp_path, "export", "--model", "tiny:llama", "--codec", "kivi:bits=4,bits=2",
           str(tmp_path / "o"), match="bad codec spec 'kivi:bits=4,bits=2': parameter 'bits' given twice")


@pytest.mark.parametrize("args", [["build", "--codec", "kiwi:bits=2", "x"],
                                  ["compare", "--codec", "kivi", "--codec", "nosuch", "x"],
                                  ["compare", "--layer-codec", "0=nosuch", "x"],
                                  ["generate", "--codec", "nosuch", "hi"]])
def test_misspelt_codec_is_refused_before_torch_loads(tmp_path, args):
    """Checked against the static codec list before any subcommand imports torch (which takes
    seconds): the refusal must not load it."""
    code = ("import sys; from kvexport.cli import main; rc = main(sys.argv[1:]); "
            "print('torch imported' if 'torch' in sys.modules else 'torch not imported'); sys.exit(rc)")
    env = dict(os.environ, PYTHONPATH=str(Path(kvexport.__file__).resolve().parents[1]))
    r = subprocess.run([sys.executable, "-c", code, *args], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == EXIT_USAGE and r.stdout.strip() == "torch not imported", (r.stdout, r.stderr)
    assert len(r.stderr.splitlines()) == 1 and "unknown codec" in r.stderr, r.stderr
    assert list(tmp_path.iterdir()) == []


def test_misspelt_codec_suggests_the_close_name(capsys, tmp_path):
    _fails(capsys, tmp_path, "build", "--codec", "kiwi", str(tmp_path / "o"),
           match="unknown codec 'kiwi' (did you mean 'kivi'?)")


# -- the top-level error handler ------------------------------------------------------------

def _env_raises(monkeypatch, exc: BaseException) -> None:
    import kvexport.envinfo as envinfo

    def collect():
        raise exc
    monkeypatch.setattr(envinfo, "collect", collect)


def test_library_user_errors_are_one_line(capsys, tmp_path, monkeypatch):
    from kvexport.kernels import KernelsUnavailable
    _env_raises(monkeypatch, KernelsUnavailable("nvcc failed on kernels/x.cu:\nerror: line 1\nerror: line 2"))
    err = _fails(capsys, tmp_path, "env", match="kvexport env: error: nvcc failed on kernels/x.cu:")
    assert "KVEXPORT_DEBUG=1 shows the rest" in err
    _env_raises(monkeypatch, OSError(28, "No space left on device", "/x/y"))
    _fails(capsys, tmp_path, "env", match="kvexport env: error: No space left on device: /x/y")


def test_unexpected_error_is_an_internal_error_with_its_own_exit_code(capsys, tmp_path, monkeypatch):
    _env_raises(monkeypatch, KeyError("outlier_bits"))
    monkeypatch.delenv("KVEXPORT_DEBUG", raising=False)
    err = _fails(capsys, tmp_path, "env", rc=EXIT_INTERNAL,
                 match="kvexport env: internal error: KeyError: 'outlier_bits' (at kvexport/cli/env.py:")
    assert "this is a bug in kvexport" in err and "KVEXPORT_DEBUG=1" in err
    monkeypatch.setenv("KVEXPORT_DEBUG", "1")
    assert main(["env"]) == EXIT_INTERNAL
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.strip().endswith(
        "please report it with the traceback from KVEXPORT_DEBUG=1")
