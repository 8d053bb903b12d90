#!/usr/bin/env bash
# One GPU-machine pass for decode v2 (docs/KERNELS.md, "Decode v2"): build the kernels for sm_90,
# the v2 GPU tests plus a v1 subset, the v1 / v2 / fp16 SDPA benchmark, ncu counters of one
# launch per kernel, compute-sanitizer on a small v2 case.  Logs and JSON go to $OUT.
# Run from the repo root with .devcarry/v2cache carried (real K/V + codebooks, made on the CPU).
#   bash scripts/gpu_v2.sh [quick]
set -u -o pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 KVEXPORT_CUDA_ARCHS=90 KVEXPORT_CACHE=$PWD/.devcarry/v2cache
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=python3
t0=$(date +%s)
TOTAL=${TOTAL:-330}   # seconds for the whole pass: every stage gets at most what is left
stamp() { echo "== $* ($(( $(date +%s) - t0 )) s)"; }
left() { local l=$(( TOTAL - ($(date +%s) - t0) )); local m=$1; (( l < m )) && m=$l; (( m < 1 )) && m=1; echo $m; }

stamp build
$PY -c "from kvexport.kernels import _build; print(_build.build(verbose=True))" 2>&1 | tail -20 | tee "$OUT/build.log" || exit 1
stamp sass
LIB=$(ls "$KVEXPORT_CACHE"/kernels/*/libkvexport_kernels.so | head -1)
cuobjdump --dump-sass -fun '_ZN3kvx2v216kvxDecodeSplitV2INS0_13RotCodebookV2ILi128ELi1ELi4EEES3_Li128EEEv13KvxDecodeArgs' "$LIB" \
  2>/dev/null | grep -oE 'LDGSTS[.A-Z0-9]*|HMMA[.A-Z0-9]*|LDS[.A-Z0-9]*|STS[.A-Z0-9]*|LDSM[.A-Z0-9]*|PRMT|STL|LDL' \
  | sort | uniq -c | tee "$OUT/sass_turbo4.txt"

stamp tests
timeout $(left 100) $PY -m pytest -x -q -m gpu tests/gpu/test_decode_v2_gpu.py 2>&1 | tail -30 | tee "$OUT/tests_v2.log"
timeout $(left 30) $PY -m pytest -x -q -m gpu tests/gpu/test_kernels_gpu.py -k "decode_matches_reference and (fp16 or turbo or fibquant) and 128-2-4" \
  2>&1 | tail -8 | tee "$OUT/tests_v1.log"

stamp bench
timeout $(left 110) $PY scripts/bench_decode_v2.py --out "$OUT/bench_v2.json" --batch 8 --contexts 32768 4096 ${BENCH_LONG:-} --shapes ${BENCH_SHAPES:-llama3-8b} \
  2>&1 | grep -v Warning | tee "$OUT/bench.log"
timeout $(left 40) $PY scripts/bench_decode_v2.py --out "$OUT/bench_v2_b1.json" --batch 1 --contexts 32768 \
  2>&1 | grep -v Warning | tee -a "$OUT/bench.log"

stamp ncu
cat > /tmp/one.py <<'EOF'
import sys, torch
from kvexport import codecs
import kvexport.kernels as K
sys.path.insert(0, "scripts")
from bench_kernels import fill_random
spec, kernel, B = sys.argv[1], sys.argv[2], int(sys.argv[3])
codec = codecs.from_spec(spec)
ck = K.KernelCache.allocate(codec, "key", B, 8, 128, 32768); cv = K.KernelCache.allocate(codec, "value", B, 8, 128, 32768)
fill_random(ck); fill_random(cv)
q = torch.randn(B, 32, 1, 128, dtype=torch.float16, device="cuda")
lens = torch.full((B,), 32768, dtype=torch.int32, device="cuda")
for _ in range(2): K.decode_attention(q, ck, cv, lens, kernel=kernel)
torch.cuda.synchronize()
EOF
ST=smsp__average_warps_issue_stalled
MET=$(for r in long_scoreboard short_scoreboard mio_throttle math_pipe_throttle wait not_selected lg_throttle \
  no_instruction dispatch_stall barrier branch_resolving selected; do printf "%s_%s_per_issue_active.ratio," $ST $r; done)
for sk in ${NCU_CASES:-turbo:bits=4/v2}; do  # spec/kernel ...
  set -- "${sk%/*}" "${sk#*/}"
  timeout $(left 40) ncu --clock-control none -k regex:kvxDecodeSplit -c 1 --section SpeedOfLight --section Occupancy \
    --section SchedulerStats --section LaunchStats --metrics "${MET%,}" $PY /tmp/one.py $1 $2 8 2>&1 \
    | grep -E "DRAM Through|L1/TEX Cache Through|Memory Through|Compute \(SM\)|Achieved Occupancy|Registers Per|Duration|stalled|Issued Warp|No Eligible|Eligible Warps|Block Limit (Reg|Sh)|Grid Size" \
    | sed "s/^/$1 $2 B8: /" | tee -a "$OUT/ncu.txt"
done
for sk in ${NCU_B1:-}; do  # every launch of one B = 1 decode: q prologue, split kernel, combine
  set -- "${sk%/*}" "${sk#*/}"
  timeout $(left 30) ncu --clock-control none -k regex:kvx -c 3 --section SpeedOfLight $PY /tmp/one.py $1 $2 1 2>&1 \
    | grep -E "kvx|Duration|DRAM Through" | sed "s/^/$1 $2 B1: /" | cut -c1-160 | tee -a "$OUT/ncu.txt"
done

stamp sanitizer
cat > /tmp/san.py <<'EOF'
import torch
from kvexport import codecs
import kvexport.kernels as K
for spec in ["fp16", "turbo:bits=4", "turbo:bits=3", "fibquant", "fibquant:k=8,N=16"]:
    codec = codecs.from_spec(spec)
    for d, hkv, g, cap in ((64, 3, 3, 70), (128, 2, 4, 71)):
        ck = K.KernelCache.allocate(codec, "key", 3, hkv, d, cap); cv = K.KernelCache.allocate(codec, "value", 3, hkv, d, cap)
        for name, buf in list(ck.fields.items()) + list(cv.fields.items()):
            buf.random_(0, 256) if buf.dtype == torch.uint8 else buf.uniform_(0.01, 0.1)
        lens = torch.tensor([0, 33, 70], dtype=torch.int32, device="cuda")
        q = torch.randn(3, hkv * g, 1, d, device="cuda", dtype=torch.float16)
        for splits in (1, 5):
            K.decode_attention(q, ck, cv, lens, num_splits=splits, max_len=70, kernel="v2")
torch.cuda.synchronize()
print("san driver done")
EOF
for tool in ${SAN_TOOLS:-memcheck}; do
  timeout $(left 45) compute-sanitizer --tool $tool --error-exitcode 1 $PY /tmp/san.py 2>&1 | tail -6 | sed "s/^/$tool: /" | tee -a "$OUT/sanitizer.txt"
done
stamp done
