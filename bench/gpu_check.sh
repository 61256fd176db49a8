#!/usr/bin/env bash
# One prepared GPU check for a short lease (~6 minutes typical, under 10 at most: each step has a hard limit):
#   1. the GPU tests (compiled kernels against the float64 oracle, 4 gloo ranks sharing the GPU,
#      no host sync, CUDA graphs, torch.compile on CUDA; NCCL when there are 2+ GPUs),
#   2. the host's cost per call, ours and torch's (bench/host_overhead.py),
#   3. per-kernel device times next to the static model's predictions (bench/kernel_times.py), and
#      for a few shapes again without the reductions' software pipelining (the A/B of that choice),
#   4. the benchmark on PERF.md shapes (fp32 and bf16, both layouts) against torch's SyncBN and BN,
#   5. Nsight Compute sections for a few kernels, where ncu is installed,
#   6. a quick autotune of the elementwise kernels on S4 bf16 channels_last (bench/autotune.py).
# Every step writes as it goes, so a step stopped at its limit keeps what it measured.
# Results go to the folder given as $1, else $OUT, else bench/results/gpu: four logs, ncu.csv,
# summary.md, kernel_times.md and results.tgz holding the rest (8 files: a lease returns at most 8).
# Rebuild the benchmark report from a stopped run with `python bench/benchmark.py --from-rows DIR`.
# Uses the machine's own torch/triton/pytest; installs this project without dependencies.
# For the model's columns in kernel_times.md, carry bench/results/model/model.csv to the machine
# (`python bench/perf_model.py` writes it here; it is git-ignored): the device tool's `carry`.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-bench/results/gpu}}"
work="$out/work"
mkdir -p "$work"
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
step() {  # step NAME LIMIT_S COMMAND...: run with a hard limit, report its exit status
    local name=$1 limit=$2; shift 2
    local start=$SECONDS
    timeout "$limit" "$@"
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - start)) s (limit $limit s)"
    [ "$rc" -eq 0 ] || status=1
}
per_test=()
python3 -c "import pytest_timeout" 2> /dev/null && per_test=(--timeout 90)
step tests 150 python3 -m pytest tests/test_gpu.py -v -rA -p no:cacheprovider "${per_test[@]}" \
    >> "$out/tests.log" 2>&1
tail -n 4 "$out/tests.log"

step host-overhead 60 python3 bench/host_overhead.py --profile > "$out/host_overhead.log" 2>&1
head -n 8 "$out/host_overhead.log"

step kernel-times 110 python3 bench/kernel_times.py --out "$work" --steps 5 > "$out/kernel_times.log" 2>&1
cp "$work/kernel_times.md" "$out/" 2> /dev/null
tail -n 2 "$out/kernel_times.log"
# The same kernels without software-pipelined loads (REDUCTION_STAGES = ELEMENTWISE_STAGES = 1), to compare.
step kernel-times-unpipelined 50 python3 bench/kernel_times.py --out "$work/unpipelined" --steps 5 \
    --reduction-stages 1 --elementwise-stages 1 --shapes S3 S4 S6 S9 S11 > "$work/kernel_times_unpipelined.log" 2>&1

step benchmark 90 python3 bench/benchmark.py --world-size 1 --shapes S1 S2 S3 S4 S5 S6 S8 S9 S11 S12 \
    --dtype fp32 bf16 --modes forward backward forward+backward --budget-ms 30 --out "$work" \
    > "$out/benchmark.log" 2>&1
# A benchmark stopped at its limit leaves rows.jsonl: report what it measured.
[ -f "$work/summary.md" ] || timeout 60 python3 bench/benchmark.py --from-rows "$work" --out "$work" \
    >> "$out/benchmark.log" 2>&1
cp "$work/summary.md" "$out/" 2> /dev/null
tail -n 8 "$out/benchmark.log"

if command -v ncu > /dev/null; then
    step ncu 50 ncu --clock-control none --csv --page details --launch-count 40 \
        --kernel-name "regex:_(partial_stats|normalize|backward_reduce|backward_dx)_kernel" \
        --section SpeedOfLight --section Occupancy --section LaunchStats --section SchedulerStats \
        --section WarpStateStats \
        python3 bench/kernel_times.py --no-profile --shapes S4 S9 S2 S1 --out "$work/ncu-run" \
        > "$out/ncu.csv" 2> "$work/ncu.stderr"
else
    echo "ncu not installed" > "$out/ncu.csv"
fi
step autotune 40 python3 bench/autotune.py --shapes S4 --dtype bf16 --layouts channels_last --quick \
    --out "$work/tuning.json" > "$work/autotune.log" 2>&1
tail -n 3 "$work/autotune.log"
tar -czf "$out/results.tgz" -C "$work" . && rm -rf "$work"
ls -l "$out"
exit $status
