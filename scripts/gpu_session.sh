#!/usr/bin/env bash
# The one command a session lent a GPU runs on it (the device tool's `run`), prepared here beforehand:
#
#   make gpu-wheels                                   # here: .whl/ with what the GPU image lacks (cp312 wheels)
#   run(command="bash scripts/gpu_session.sh", carry=[".whl"], timeout_s=600)
#
# The image has Python 3.12 and torch with CUDA but no pydantic, zstandard, megatron-core, torchao, deepspeed,
# submitit: the carried wheels go to /tmp/site, triarch runs from src/ (PYTHONPATH). Then, in the order the
# project asks for them, each step under its share of one deadline (GPU_SESSION_BUDGET_S, default 540 s, so
# the call ends inside its 600 s limit with the logs):
#   1. the environment (GPU, driver, torch, versions of the carried packages) and `import triarch`;
#   2. tests/test_gpu.py (every GPU test: bf16 step, generation + PPO, flex attention, NCCL checkpoints,
#      megatron engine, fp8 vs bf16);
#   3. benchmarks/gpu_throughput.py on the 886M shape (native bf16 / fp8 / megatron vs a plain compile loop);
#   4. benchmarks/plan_accuracy.py (the planner against the 886M shape on this GPU);
#   5. benchmarks/memory_offload.py --nproc 1 (device memory: FSDP2, its CPU offload, ZeRO-3 with offload).
# Every step's output lands in $OUT/<n>_<step>.log (and on stdout); $OUT/summary.txt lists each step's exit
# code and seconds. A step cut by the deadline leaves its partial log. Locally (no GPU, no wheels):
# `GPU_SESSION_NO_INSTALL=1 PY=.venv/bin/python bash scripts/gpu_session.sh` checks the script itself.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/triarch-gpu-session}
mkdir -p "$OUT"
PY=${PY:-python3}
BUDGET=${GPU_SESSION_BUDGET_S:-540}
start=$(date +%s)
export PYTHONUNBUFFERED=1

if [ "${GPU_SESSION_NO_INSTALL:-0}" != 1 ]; then
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "gpu_session: no wheels in .whl/ (run 'make gpu-wheels' here and carry .whl)" | tee "$OUT/summary.txt"
    exit 2
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >"$OUT/0_install.log" 2>&1 || { cat "$OUT/0_install.log"; exit 2; }
  export PYTHONPATH=/tmp/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
fi

# step NAME LIMIT_S CMD...: run CMD for at most LIMIT_S seconds and whatever is left of the budget
n=0
step() {
  local name=$1 limit=$2
  shift 2
  n=$((n + 1))
  local left=$((BUDGET - ($(date +%s) - start)))
  if [ "$left" -lt 20 ]; then
    echo "$n $name: skipped (budget spent)" | tee -a "$OUT/summary.txt"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local log="$OUT/${n}_${name}.log" t0 rc
  t0=$(date +%s)
  echo "== $n $name (limit ${limit} s)"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  echo "$n $name: exit $rc in $(($(date +%s) - t0)) s$([ "$rc" = 124 ] && echo ' (cut at its limit)')" \
    | tee -a "$OUT/summary.txt"
}

step environment 60 bash -c "nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv;
  $PY - <<'EOF'
import importlib.metadata as md
import torch
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())
if torch.cuda.is_available():
    print('device', torch.cuda.get_device_name(), 'capability', torch.cuda.get_device_capability())
for name in ('pydantic', 'megatron-core', 'torchao', 'deepspeed', 'transformers', 'triton', 'pyarrow', 'tokenizers'):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, 'missing')
import triarch.cli, triarch.engine.build, triarch.training.trainer  # noqa: E401,F401
print('import triarch: ok')
EOF"
step test_gpu 240 "$PY" -m pytest -q -rA -p no:cacheprovider --timeout 200 tests/test_gpu.py
step gpu_throughput 240 "$PY" benchmarks/gpu_throughput.py --steps 20 --warmup 6
step plan_accuracy 120 "$PY" benchmarks/plan_accuracy.py
step memory_offload 120 "$PY" benchmarks/memory_offload.py --nproc 1
echo "gpu_session: done in $(($(date +%s) - start)) s; logs in $OUT"
cat "$OUT/summary.txt"
