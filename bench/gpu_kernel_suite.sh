#!/usr/bin/env bash
# One device call: build our wkv7 kernel ahead of time, run its GPU tests, benchmark it (and the official kernel
# if ref/ was carried). Usage on the GPU machine, from the repo root: bash bench/gpu_kernel_suite.sh
# Logs go to $OUT (when set) so they come back from the device tool; the last lines printed are the timing table.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/wkv_suite}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
if ! python3 -c "import pytest" 2>/dev/null; then  # the image may lack pytest: wheels travel in .whl/
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/pytest-*.whl .whl/iniconfig-*.whl .whl/pluggy-*.whl \
    && export PYTHONPATH=/tmp/site
fi
t0=$(date +%s)
python3 kernels/build.py --verbose > "$OUT/build.log" 2>&1; rc=$?
grep -E "registers|spill|error" "$OUT/build.log" | head -30
echo "build rc=$rc in $(( $(date +%s) - t0 )) s"; [ $rc -eq 0 ] || { tail -40 "$OUT/build.log"; exit 1; }
timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -rA -s -p no:cacheprovider tests/test_wkv_cuda.py 2>&1 | tee "$OUT/pytest.log" \
  | grep -E "^B[0-9]|passed|failed|FAILED|Error|error" | head -60
timeout ${BENCH_TIMEOUT:-240} python3 bench/wkv_kernel.py --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log" | tail -30
[ -n "${CLASSIC:-}" ] && timeout 120 python3 bench/wkv_kernel.py --classic --lanes 2 2>&1 | tail -8
