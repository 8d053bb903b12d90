#!/usr/bin/env bash
# The GPU test pass, for the GPU machine (repo root, no network): builds the kernel library and the
# plugin library for the machine's GPU, then runs every GPU-marked test. Logs go to $OUT.
#
#   OUT=DIR bash scripts/gpu_check.sh [kernels|model|plugins|sanitize ...]     # default: kernels
#
#   kernels   tests/gpu/test_kernels_gpu.py, test_abi_bounds_gpu.py, test_decode_v2_gpu.py
#   model     tests/gpu/test_model_kernels_gpu.py (needs the default model installed)
#   plugins   tests/gpu/test_plugins_gpu.py (needs TensorRT headers in $KVEXPORT_CACHE/trt-headers)
#   sanitize  compute-sanitizer memcheck over tests/gpu/sanitize_driver.py
#
# Each stage runs under `timeout` with what is left of BUDGET_S (default 500 s). A kernel build
# failure is a failure (tests/conftest.py), never a skip.
set -uo pipefail
cd "$(dirname "$0")/.."
[ -n "${OUT:-}" ] || { echo "error: set OUT to the folder the logs go to" >&2; exit 2; }
mkdir -p "$OUT"
PY="${PYTHON:-$(command -v python3)}"
BUDGET_S="${BUDGET_S:-500}"
START=$(date +%s)
STAGES=("$@"); [ ${#STAGES[@]} -eq 0 ] && STAGES=(kernels)
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }
rc=0
for s in "${STAGES[@]}"; do
    t=$(left); (( t > 5 )) || { echo "== $s: no time left" | tee -a "$OUT/gpu_check.log"; rc=1; continue; }
    echo "== $s ($t s left)" | tee -a "$OUT/gpu_check.log"
    case "$s" in
        kernels)  files="tests/gpu/test_kernels_gpu.py tests/gpu/test_abi_bounds_gpu.py tests/gpu/test_decode_v2_gpu.py" ;;
        model)    files="tests/gpu/test_model_kernels_gpu.py" ;;
        plugins)  files="tests/gpu/test_plugins_gpu.py" ;;
        sanitize) timeout "$t" compute-sanitizer --tool memcheck --error-exitcode 1 "$PY" tests/gpu/sanitize_driver.py \
                      >"$OUT/sanitize.log" 2>&1 || rc=1
                  tail -3 "$OUT/sanitize.log" | tee -a "$OUT/gpu_check.log"; continue ;;
        *) echo "error: unknown stage '$s'" >&2; exit 2 ;;
    esac
    timeout "$t" "$PY" -m pytest -q -m gpu -p no:cacheprovider $files >"$OUT/tests_$s.log" 2>&1 || rc=1
    tail -15 "$OUT/tests_$s.log" | tee -a "$OUT/gpu_check.log"
done
exit $rc
