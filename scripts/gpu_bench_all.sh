#!/usr/bin/env bash
# Every GPU benchmark of docs/ in one command, for the GPU machine (repo root, no network).
#
#   OUT=/path/to/results bash scripts/gpu_bench_all.sh [STAGE ...]      # default: kernels
#
# Stages (each writes one JSON into $OUT; the Markdown is rendered from it afterwards, so at
# most 6 files come back: the JSONs and gpu_bench_all.log):
#   kernels  build the kernel library, then scripts/bench_kernels.py on Llama-3-8B
#            (B 1, 8 × 4k, 32k, 128k) and SmolLM2 (B 8 × 4k, 32k)        → benchmarks.json
#   prefill  scripts/bench_prefill.py                                  → bench_prefill.json
#   qjl      scripts/bench_qjl_official.py; needs QJL_OFFICIAL=DIR (the official qjl_kernel
#            sources, kept outside the repository)                     → bench_qjl_official.json
#   ppl      scripts/kernel_ppl.py on the default model ($PPL_ARGS, default --dtypes float16)
#                                                                      → kernel_ppl.json
#   plugins  tests/gpu/test_plugins_gpu.py with KVEXPORT_PLUGIN_REPORT, then
#            scripts/bench_plugins.py --collect (set KVEXPORT_TRT_PLUGIN_LIB / KVEXPORT_TRT_HARNESS
#            to prebuilt binaries where no TensorRT headers are reachable) → bench_plugins.json
#
# The stages share one time budget, BUDGET_S seconds (default 450); each runs under `timeout` with
# what is left, and the benchmarks write their JSON after every row, so a stage cut short still
# returns what it measured. Exit status: 0 if every requested stage succeeded.
#
# Back on the development machine, copy the JSONs into docs/ and render:
#   python scripts/bench_kernels.py --render docs/benchmarks.json --out docs/benchmarks
#   python scripts/bench_prefill.py --render docs/bench_prefill.json --out docs/bench_prefill
#   python scripts/bench_qjl_official.py --render docs/bench_qjl_official.json --out docs/bench_qjl_official
#   python scripts/kernel_ppl.py --render docs/kernel_ppl.json --out docs
#   python scripts/bench_plugins.py --render docs/bench_plugins.json --out docs/bench_plugins
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -z "${OUT:-}" ]; then
    echo "error: set OUT to the folder the results go to" >&2
    exit 2
fi
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(kernels)
for s in "${STAGES[@]}"; do
    case "$s" in
        kernels|prefill|qjl|ppl|plugins) ;;
        *) echo "error: unknown stage '$s' (kernels, prefill, qjl, ppl, plugins)" >&2; exit 2 ;;
    esac
done
if [[ " ${STAGES[*]} " == *" qjl "* ]] && [ ! -d "${QJL_OFFICIAL:-}" ]; then
    echo "error: stage qjl needs QJL_OFFICIAL=DIR (the official qjl_kernel sources)" >&2
    exit 2
fi
PY="${PYTHON:-$(command -v python3 || command -v python)}"
BUDGET_S="${BUDGET_S:-450}"
START=$(date +%s)
mkdir -p "$OUT"
WORK="$(mktemp -d)"
LOG="$OUT/gpu_bench_all.log"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
: > "$LOG"
say() { echo "[gpu_bench_all $(( $(date +%s) - START )) s] $*" | tee -a "$LOG"; }

# Run a command under what is left of the budget; its output goes to the log and to stdout.
timed() {
    local left=$(( BUDGET_S - ($(date +%s) - START) ))
    if [ "$left" -lt 20 ]; then
        say "no time left for: $*"
        return 124
    fi
    timeout -k 10 "$left" "$@" 2>&1 | tee -a "$LOG"
    return "${PIPESTATUS[0]}"
}

# Copy a stage's JSON into $OUT (only complete files exist: the scripts write by rename).
keep() {
    if [ -f "$1" ]; then cp "$1" "$OUT/"; say "kept $(basename "$1")"; else say "no $(basename "$1") written"; fi
}

say "stages: ${STAGES[*]}; budget ${BUDGET_S} s; python $PY"
timed "$PY" -c "import kvexport.envinfo as e; print(e.format_text(e.collect()))"
say "building the kernel library"
timed "$PY" -c "import kvexport.kernels as K; print('kernel library:', K.build())" || { say "kernel build FAILED"; exit 1; }
failed=()
for s in "${STAGES[@]}"; do
    say "stage $s"
    case "$s" in
        kernels)
            timed "$PY" scripts/bench_kernels.py --contexts 4096 32768 131072 --batch 1 8 --shapes llama3-8b \
                --grid smollm2-135m:8:4096,32768 --out "$WORK/benchmarks"
            rc=$?; keep "$WORK/benchmarks.json" ;;
        prefill)
            timed "$PY" scripts/bench_prefill.py --out "$WORK/bench_prefill"
            rc=$?; keep "$WORK/bench_prefill.json" ;;
        qjl)
            timed "$PY" scripts/bench_qjl_official.py --official "$QJL_OFFICIAL" --contexts 4096 32768 --batch 8 \
                --out "$WORK/bench_qjl_official"
            rc=$?; keep "$WORK/bench_qjl_official.json" ;;
        ppl)
            # shellcheck disable=SC2086  # PPL_ARGS is a list of arguments
            timed "$PY" scripts/kernel_ppl.py --out "$WORK/ppl" ${PPL_ARGS:---dtypes float16}
            rc=$?; keep "$WORK/ppl/kernel_ppl.json" ;;
        plugins)
            XDIST=(); "$PY" -c "import xdist" 2>/dev/null && XDIST=(-n 8)
            export KVEXPORT_PLUGIN_REPORT="$WORK/plug"
            timed "$PY" -m pytest -m gpu -q "${XDIST[@]}" tests/gpu/test_plugins_gpu.py
            rc=$?
            timed "$PY" scripts/bench_plugins.py --collect "$WORK/plug" --out "$WORK/bench_plugins" \
                --command "KVEXPORT_PLUGIN_REPORT=DIR pytest -m gpu -q ${XDIST[*]} tests/gpu/test_plugins_gpu.py" || rc=1
            keep "$WORK/bench_plugins.json" ;;
    esac
    if [ "$rc" -ne 0 ]; then failed+=("$s (exit $rc)"); fi
done
rm -rf "$WORK"
if [ ${#failed[@]} -gt 0 ]; then
    say "FAILED: ${failed[*]}"
    exit 1
fi
say "done"
