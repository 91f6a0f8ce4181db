#!/usr/bin/env bash
# One command that checks and times gpunn on a GPU machine (H100/H200): versions and card, the new GPU
# tests (the fused kernels over several row chunks, repeated), the other GPU tests, the agreement check,
# compute-sanitizer, and the benchmark against PyTorch eager. Runs from the source tree and installs
# nothing. Writes everything under $OUT (default ./gpu-check-out) and prints a summary last.
#   PYTHONPATH=$PWD bash scripts/gpu-check.sh
# (GPUNN_COMMIT names the commit where the copy there has no .git.) Back here, turn $OUT into a record:
#   python scripts/gpu_report.py OUT_DIR --commit $(git rev-parse --short HEAD)
# GPU_CHECK_DRY=1 runs nothing: it lists each capped command with its limit (tests/test_gpu_check_script.py
# adds them up against the 9-minute budget).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 CUPY_CACHE_DIR=${CUPY_CACHE_DIR:-/tmp/gpunn-cupy-cache}
unset CUPY_TF32 GPUNN_FUSED              # TF32 off and fused kernels on, as documented defaults
DRY=${GPU_CHECK_DRY:-}
status=0
step() { echo; echo "== $1 =="; }

# Seconds each capped command may run. A command past its limit gets SIGINT (pytest then prints what
# failed so far) and SIGKILL GRACE seconds later, so each costs at most its limit + GRACE.
GRACE=5
T_SMI=10 T_VERSIONS=25 T_INFO=15 T_NEW=60 T_GPU=80 T_CHECK=60 T_SANITIZER=30 T_BENCH=180 BENCH_BUDGET=130
WORST=$(( T_SMI + T_VERSIONS + T_INFO + T_NEW + T_GPU + T_CHECK + 2 * T_SANITIZER + T_BENCH + 9 * GRACE ))
limit() {
  local s=$1; shift
  if [ -n "$DRY" ]; then printf 'limit %s grace %s: %s\n' "$s" "$GRACE" "$(echo "$*" | head -n 1 | cut -c1-100)"; return 0; fi
  timeout -s INT -k "$GRACE" "$s" "$@"
}
echo "worst case: ${WORST} s with every step at its limit (budget 540 s)"

step "1. versions and card" | tee "$OUT/env.txt"
{ echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: ${GPUNN_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
  limit $T_SMI nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.sm,clocks.max.mem,driver_version --format=csv
  limit $T_VERSIONS python3 -c "
import sys, numpy, cupy
print('python', sys.version.split()[0], 'numpy', numpy.__version__, 'cupy', cupy.__version__)
try:
    import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)
except ImportError:
    print('torch not installed')"
  limit $T_INFO python3 -m gpunn.cli info; } 2>&1 | tee -a "$OUT/env.txt"

# every failure in one run (card time is short), but a hung test cannot eat the whole step
per_test=$(python3 -c "import pytest_timeout" 2>/dev/null && echo "--timeout=60")
step "2. new GPU tests: fused kernels over several row chunks, ~1000 launches each" | tee "$OUT/pytest-gpu.txt"
limit $T_NEW python3 -m pytest -q -m gpu -p no:cacheprovider --maxfail=25 $per_test tests/test_gpu_kernels.py \
  2>&1 | tee -a "$OUT/pytest-gpu.txt"
[ "${PIPESTATUS[0]}" = 0 ] || status=1

step "3. the other GPU tests (pytest -m gpu), the kernels first" | tee -a "$OUT/pytest-gpu.txt"
limit $T_GPU python3 -m pytest -q -m gpu -p no:cacheprovider --maxfail=25 $per_test \
  --ignore=tests/test_gpu_kernels.py tests/test_kernels.py tests 2>&1 | tee -a "$OUT/pytest-gpu.txt"
[ "${PIPESTATUS[0]}" = 0 ] || status=1

step "4. agreement check (gpunn check: batch 131, multi-chunk column sums, counters back at zero)" | tee "$OUT/check.txt"
limit $T_CHECK python3 -m gpunn.cli check --device cpu,cuda:0 --dtype float32,float64 --steps 20 2>&1 | tee -a "$OUT/check.txt"
[ "${PIPESTATUS[0]}" = 0 ] || status=1

step "5. compute-sanitizer memcheck and racecheck of one small fused step" | tee "$OUT/sanitizer.txt"
if [ -n "$DRY" ] || command -v compute-sanitizer >/dev/null; then
  for tool in memcheck racecheck; do
    limit $T_SANITIZER compute-sanitizer --tool $tool --error-exitcode 3 python3 -c "
import gpunn, numpy
net = gpunn.mlp([37, 64, 48, 5], activation='tanh', output='softmax', device='cuda:0', seed=0)
x = numpy.random.default_rng(0).normal(size=(131, 37)); y = numpy.arange(131) % 5
net.fit(x, y, loss='cross_entropy', optimizer=gpunn.SGD(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4),
        epochs=1, batch_size=131)
net.predict(x); print('$tool: one fused fit and predict ran')" 2>&1 | tail -n 5 | tee -a "$OUT/sanitizer.txt"
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
  done
else
  echo "compute-sanitizer not found: skipped" | tee -a "$OUT/sanitizer.txt"
fi

step "6. benchmark: gpunn-cupy fused/unfused vs PyTorch eager, cuBLAS ceiling" | tee "$OUT/bench.txt"
limit $T_BENCH python3 bench/gpu_check.py --budget $BENCH_BUDGET --json "$OUT/gpu-bench.json" 2>&1 | tee -a "$OUT/bench.txt"
[ "${PIPESTATUS[0]}" = 0 ] || status=1

step "summary (status $status)"
grep -E "[0-9]+ (passed|failed|skipped|deselected|error)" "$OUT/pytest-gpu.txt" | tail -n 2
grep -E "ran|ERROR|skipped" "$OUT/sanitizer.txt"
tail -n 2 "$OUT/check.txt"
grep -E "^# (fp32|no-sync|colsum)" "$OUT/bench.txt"
grep -E "^\|" "$OUT/bench.txt"
exit $status
