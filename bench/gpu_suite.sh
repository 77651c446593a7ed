#!/usr/bin/env bash
# The GPU suite in one command (README: "make gpu-test"): install the wheels brought along (if any), build the wkv7
# kernel ahead of time, run the kernel's GPU tests and benchmark, time training, check CUDA-vs-reference parity,
# record the 0.1b-short expected log on the stand-in corpus, and time generation. Prints a table per stage.
#   STAGES="kernel train golden parity generate" DATA=PREFIX bash bench/gpu_suite.sh
# More stages: aot (ahead-of-time build timed, then the time to the first training step with an empty JIT cache),
# resume (bench/gpu_resume.py: SIGKILL mid-run, resume, compare with the golden run), compile (train.compile=1),
# fused (bench/fused_step.py: the step's variants, timed and checked against the eager path),
# gputests (tests/test_train_gpu.py), multigpu (bench/multi_gpu.py, DEVICES=2 GPUs against one), official
# (bench/vs_official.py: the official RWKV-LM trainer side by side with ours; OFFICIAL=path of a git-ignored copy of
# RWKV-LM's RWKV-v7/train_temp, OFFICIAL_ARGS for more options, e.g. "--shapes 0.1b --ours-set train.compile=1").
# DATA: a World-tokenized binidx prefix (the stand-in corpus, or minipile). Outputs go to $OUT (default /tmp/gpu-suite).
set -uo pipefail
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
OUT=${OUT:-/tmp/gpu-suite}; mkdir -p "$OUT"
STAGES=${STAGES:-"kernel gputests train golden parity generate"}  # run in this order
DATA=${DATA:-.standin/standin}
if [ -d .whl ] && ! python3 -c "import pytorch_lightning, deepspeed" 2>/dev/null; then
  # keep the machine's own pytest (and its plugins): an older carried pytest breaks e.g. pytest-timeout
  wheels=$(ls .whl/*.whl | if python3 -c "import pytest" 2>/dev/null; then grep -v -E "/(pytest|pluggy|iniconfig)-"; else cat; fi)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $wheels \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 - <<'PY'
import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())
PY
has() { case " $STAGES " in *" $1 "*) return 0;; esac; return 1; }
stage() { echo; echo "=== $1 ($(date +%H:%M:%S))"; }
if has aot; then stage aot
  t0=$(date +%s.%N); python3 kernels/build.py > "$OUT/build.log" 2>&1 || { tail -20 "$OUT/build.log"; exit 1; }
  echo "aot build ($TORCH_CUDA_ARCH_LIST): $(python3 -c "print(round($(date +%s.%N)-$t0,1))") s"
  export RWKV7_KERNEL_CACHE=/tmp/jit-cache-must-stay-empty; rm -rf "$RWKV7_KERNEL_CACHE"
  t0=$(date +%s.%N)
  python3 entrypoint.py train --recipe 0.1b-short --out /tmp/first-step --fresh --no-progress --no-check \
    --set data.path="$DATA" train.epoch_steps=10 train.epoch_count=1 > "$OUT/first-step.log" 2>&1 || tail -20 "$OUT/first-step.log"
  python3 - "$t0" <<'PY'
import json, os, sys
rows = [json.loads(l) for l in open("/tmp/first-step/metrics.jsonl")]
cache = os.environ["RWKV7_KERNEL_CACHE"]
jit = os.path.isdir(cache) and any(os.scandir(cache))
print(f"time to first step (process start -> step 1 read back): {rows[0]['time'] - float(sys.argv[1]):.1f} s; "
      f"JIT cache used: {jit}")
PY
  unset RWKV7_KERNEL_CACHE
  if [ -n "${FULL_ARCH:-}" ]; then  # the image's arch list, in the background (CPU only)
    ( t0=$(date +%s); TORCH_CUDA_ARCH_LIST="$FULL_ARCH" python3 kernels/build.py --dir /tmp/aot-full > "$OUT/build-full.log" 2>&1
      echo "full-arch build ($FULL_ARCH) rc=$? in $(( $(date +%s) - t0 )) s" >> "$OUT/build-full.log" ) &
  fi
fi
if has kernel; then stage kernel; OUT=$OUT/kernel bash bench/gpu_kernel_suite.sh 2>&1 | tail -40
elif [ "$STAGES" != official ]; then  # alone, the official stage builds ours in parallel with the official kernels
  python3 kernels/build.py > "$OUT/build.log" 2>&1 || { tail -20 "$OUT/build.log"; exit 1; }; fi
if has gputests; then stage gputests  # the CUDA-graph training path against the eager one, end to end and resumed
  timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -p no:cacheprovider tests/test_train_gpu.py 2>&1 | tail -15; fi
if has multigpu; then stage multigpu; python3 bench/multi_gpu.py --data "$DATA" --devices ${DEVICES:-2} ${MULTIGPU_ARGS:-} 2>&1 | tail -40; fi
if has train; then stage train; python3 bench/train_bench.py --data "$DATA" --quick --json "$OUT/train_bench.json" ${TRAIN_ARGS:-} 2>&1 | tail -14; fi
if has golden; then stage golden
  python3 entrypoint.py train --recipe 0.1b-short --out /tmp/golden --fresh --no-progress --set data.path="$DATA" 2>&1 | tail -8
  cp /tmp/golden/train_log.txt "$OUT/0.1b-short-standin.log"; cp /tmp/golden/metrics.jsonl "$OUT/golden-metrics.jsonl"
fi
if has resume; then stage resume; python3 bench/gpu_resume.py --data "$DATA" --reference /tmp/golden 2>&1 | tail -30
  cp /tmp/rwkv7-resume/resume.json "$OUT/" 2>/dev/null; tail -5 /tmp/rwkv7-resume/run.log > "$OUT/resume-tail.txt" 2>&1; fi
if has fused; then stage fused; python3 bench/fused_step.py --check --json "$OUT/fused_step.json" 2>&1 | tail -16; fi
if has compile; then stage compile
  python3 entrypoint.py train --recipe 0.1b-short --out /tmp/compiled --fresh --no-progress --no-check --set data.path="$DATA" \
    train.strategy=single train.compile=1 train.epoch_steps=30 train.epoch_count=1 > "$OUT/compile.log" 2>&1; echo "compile rc=$?"
  grep -E "Error|error" "$OUT/compile.log" | head -5; tail -3 /tmp/compiled/metrics.jsonl 2>/dev/null; fi
if has parity; then stage parity; python3 bench/backend_parity.py --data "$DATA" --steps ${PARITY_STEPS:-100} --long ${LONG_STEPS:-300} 2>&1 | tail -14; cp /tmp/rwkv7-parity/parity.json "$OUT/" 2>/dev/null; fi
if has official; then stage official
  if [ -z "${OFFICIAL:-}" ]; then echo "official: set OFFICIAL=path/to/RWKV-LM/RWKV-v7/train_temp (git-ignored copy)"
  else python3 bench/vs_official.py --official "$OFFICIAL" --data "$DATA" --out "$OUT/official" ${OFFICIAL_ARGS:-}; fi; fi
if has generate; then stage generate; python3 bench/generate.py --quick 2>&1 | tail -12; fi
wait; [ -f "$OUT/build-full.log" ] && tail -3 "$OUT/build-full.log"
echo "=== done ($(date +%H:%M:%S))"
