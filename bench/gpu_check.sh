#!/usr/bin/env bash
# One prepared GPU check for a ~10-minute window on a GPU machine:
#   1. the GPU tests (compiled kernels against the float64 oracle, no host sync, CUDA graphs,
#      torch.compile on CUDA; NCCL when there are 2+ GPUs),
#   2. the codegen check for sm_80/sm_90,
#   3. the benchmark on PERF.md shapes (fp32 and bf16, both layouts, all modes).
# Results go to the folder given as $1, else $OUT, else bench/results/gpu: benchmark.json/.csv,
# summary.md, bandwidth.png, speedup.png, comm_model.png and two logs (8 files at most).
# Uses the machine's own torch/triton/pytest; installs this project without dependencies.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-bench/results/gpu}}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$out/tests.log" 2>&1 || {
    echo "install failed"; cat "$out/tests.log"; exit 1;
}
{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, \
'cuda', torch.version.cuda, torch.cuda.get_device_name())"
} >> "$out/tests.log" 2>&1
status=0
timeout 240 python3 -m pytest tests/test_gpu.py -q -x -p no:cacheprovider >> "$out/tests.log" 2>&1 || status=1
timeout 120 python3 bench/codegen_check.py >> "$out/tests.log" 2>&1 || status=1
tail -n 5 "$out/tests.log"
timeout 300 python3 bench/benchmark.py --world-size 1 --shapes S1 S2 S3 S4 S5 S6 S9 S11 S12 \
    --dtype fp32 bf16 --budget-ms 60 --out "$out" > "$out/benchmark.log" 2>&1 || status=1
tail -n 3 "$out/benchmark.log"
exit $status
