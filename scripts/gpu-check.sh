#!/usr/bin/env bash
# One command that checks and times gpunn on a GPU machine (H100/H200): versions and card, the GPU
# tests, the agreement check, and the benchmark against PyTorch eager. Runs from the source tree and
# installs nothing. Writes everything under $OUT (default ./gpu-check-out) and prints a summary last.
#   PYTHONPATH=$PWD bash scripts/gpu-check.sh
# (GPUNN_COMMIT names the commit where the copy there has no .git.) Back here, turn $OUT into a record:
#   python scripts/gpu_report.py OUT_DIR --commit $(git rev-parse --short HEAD)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 CUPY_CACHE_DIR=${CUPY_CACHE_DIR:-/tmp/gpunn-cupy-cache}
unset CUPY_TF32 GPUNN_FUSED              # TF32 off and fused kernels on, as documented defaults
status=0
step() { echo; echo "== $1 =="; }

# A step past its limit gets SIGINT first (pytest then prints what failed so far), SIGKILL 10 s later.
limit() { local s=$1; shift; timeout -s INT -k 10 "$s" "$@"; }

step "1. versions and card" | tee "$OUT/env.txt"
{ echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: ${GPUNN_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.sm,clocks.max.mem,driver_version --format=csv
  limit 30 python3 -c "import sys, numpy, cupy; print('python', sys.version.split()[0], 'numpy', numpy.__version__, 'cupy', cupy.__version__)"
  limit 30 python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" || true
  limit 30 python3 -m gpunn.cli info; } 2>&1 | tee -a "$OUT/env.txt"

step "2. GPU tests (pytest -m gpu), the kernels first" | tee "$OUT/pytest-gpu.txt"
# every failure in one run (card time is short), but a hung test cannot eat the whole step
per_test=$(python3 -c "import pytest_timeout" 2>/dev/null && echo "--timeout=60")
limit 120 python3 -m pytest -q -m gpu -p no:cacheprovider --maxfail=25 $per_test tests/test_kernels.py tests \
  2>&1 | tee -a "$OUT/pytest-gpu.txt"
[ "${PIPESTATUS[0]}" = 0 ] || status=1

step "2b. compute-sanitizer memcheck and racecheck of one small fused step" | tee "$OUT/sanitizer.txt"
if command -v compute-sanitizer >/dev/null; then
  for tool in memcheck racecheck; do
    limit 30 compute-sanitizer --tool $tool --error-exitcode 3 python3 -c "
import gpunn, numpy
net = gpunn.mlp([37, 64, 48, 5], activation='tanh', output='softmax', device='cuda:0', seed=0)
x = numpy.random.default_rng(0).normal(size=(33, 37)); y = numpy.arange(33) % 5
net.fit(x, y, loss='cross_entropy', optimizer=gpunn.SGD(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4),
        epochs=1, batch_size=16)
net.predict(x); print('$tool: one fused fit and predict ran')" 2>&1 | tail -n 5 | tee -a "$OUT/sanitizer.txt"
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
  done
else
  echo "compute-sanitizer not found: skipped" | tee -a "$OUT/sanitizer.txt"
fi

step "3. agreement check (gpunn check)" | tee "$OUT/check.txt"
limit 90 python3 -m gpunn.cli check --device cpu,cuda:0 --dtype float32,float64 --steps 20 2>&1 | tee -a "$OUT/check.txt"
[ "${PIPESTATUS[0]}" = 0 ] || status=1

step "4. benchmark: gpunn-cupy fused/unfused vs PyTorch eager, cuBLAS ceiling" | tee "$OUT/bench.txt"
limit 180 python3 bench/gpu_check.py --budget 130 --json "$OUT/gpu-bench.json" 2>&1 | tee -a "$OUT/bench.txt"
[ "${PIPESTATUS[0]}" = 0 ] || status=1

step "summary (status $status)"
grep -E "[0-9]+ (passed|failed|skipped|deselected|error)" "$OUT/pytest-gpu.txt" | tail -n 1
grep -E "ran|ERROR|skipped" "$OUT/sanitizer.txt"
tail -n 2 "$OUT/check.txt"
grep -E "^# (fp32|no-sync)" "$OUT/bench.txt"
grep -E "^\|" "$OUT/bench.txt"
exit $status
