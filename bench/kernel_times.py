"""Per-kernel GPU times of one training step, next to the static model's prediction for each kernel.

    python bench/kernel_times.py [--shapes S1 S4] [--dtype fp32 bf16] [--layouts contiguous channels_last]
                                 [--steps 10] [--out bench/results/gpu] [--no-profile]

The benchmark (``bench/benchmark.py``) times whole directions, host included; this says which
kernel the device time goes to, and sets our device time per step next to torch's BatchNorm's
(same input, same profile). For every PERF.md shape, dtype and layout it runs ``--steps`` training
steps (forward and backward of ``triton_syncbn.SyncBatchNorm``, world size 1, then of torch's
``F.batch_norm``) under ``torch.profiler`` with the L2
flushed before each step (a 256 MB write, left out of the results), and reports per kernel name
the launches per step and the mean device time per launch. Where ``bench/results/model/model.csv``
(``python bench/perf_model.py``) has the kernel, it adds the model's traffic for it, the measured
fraction of copy bandwidth (copy measured in the same run) and the model's predicted fraction.

Rows go to ``kernel_times.jsonl`` under ``--out`` case by case (a run stopped part way keeps what
it measured) and a markdown table to ``kernel_times.md`` at the end. ``--no-profile`` only runs
one step per case (for an outside profiler such as Nsight Compute). CUDA only.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from shapes import GPU_SHAPES, select  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FLUSH_MARK = "bitwise_not"  # the L2 flush's kernel name contains this; nothing of ours does


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--shapes", nargs="+", help="PERF.md shape ids (default: all)")
    parser.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--layouts", nargs="+", choices=["contiguous", "channels_last"], default=None)
    parser.add_argument("--steps", type=int, default=10, help="profiled training steps per case (after 2 warm-ups)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "gpu")
    parser.add_argument("--model", type=Path, default=HERE / "results" / "model" / "model.csv")
    parser.add_argument("--no-profile", action="store_true", help="run the steps only (for ncu)")
    parser.add_argument(
        "--reduction-stages", type=int, default=None,
        help="software-pipelining depth of the reductions' loads (launchers.REDUCTION_STAGES; 1: none), to compare",
    )  # fmt: skip
    parser.add_argument(
        "--elementwise-stages", type=int, default=None,
        help="software-pipelining depth of normalize's and dx's loads (launchers.ELEMENTWISE_STAGES; 1: none)",
    )  # fmt: skip
    return parser.parse_args(argv)


def model_rows(path: Path) -> dict[tuple[str, str, str, str], dict]:
    """The static model's per-kernel rows keyed by (shape, layout, dtype, kernel)."""
    if not path.exists():
        return {}
    with path.open() as handle:
        return {(r["shape"], r["layout"], r["dtype"], r["kernel"]): r for r in csv.DictReader(handle)}


class TorchBatchNorm(torch.nn.Module):
    """torch's own training-mode BatchNorm (cuDNN or native kernels), any input rank: the device
    time to compare with."""

    def __init__(self, channels: int, device: torch.device) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(channels, device=device))
        self.bias = torch.nn.Parameter(torch.zeros(channels, device=device))
        self.register_buffer("running_mean", torch.zeros(channels, device=device))
        self.register_buffer("running_var", torch.ones(channels, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, True)


def step_us(kernels: dict) -> float:
    """Device time of one training step: every kernel's launches per step x mean time."""
    return sum(per_step * mean_us for per_step, mean_us in kernels.values())


def training_step(module: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor, flush: torch.Tensor) -> None:
    flush.bitwise_not_()
    x.grad = None  # no gradient accumulation kernel: the step's own kernels only
    module(x).backward(grad)


def profile_case(module: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor, flush: torch.Tensor, steps: int) -> dict:
    """{kernel name: (launches per step, mean us per launch)} over ``steps`` profiled steps."""
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as profile:
        for _ in range(steps):
            training_step(module, x, grad, flush)
        torch.cuda.synchronize()
    launches: dict[str, list[float]] = defaultdict(list)
    for event in profile.events():
        if event.device_type != torch.autograd.DeviceType.CUDA or FLUSH_MARK in event.name.lower():
            continue
        launches[event.name].append(event.time_range.elapsed_us())
    return {name: (len(times) / steps, sum(times) / len(times)) for name, times in launches.items()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("kernel_times.py needs a CUDA device (the CPU path runs no kernels of ours)")
    from timing import copy_bandwidth_gbps

    import triton_syncbn
    from triton_syncbn import launchers

    if args.reduction_stages is not None:
        launchers.REDUCTION_STAGES = args.reduction_stages
    if args.elementwise_stages is not None:
        launchers.ELEMENTWISE_STAGES = args.elementwise_stages
    device = torch.device("cuda")
    copy_gbps = copy_bandwidth_gbps(device)
    model = model_rows(args.model)
    args.out.mkdir(parents=True, exist_ok=True)
    rows_path = args.out / "kernel_times.jsonl"
    flush = torch.empty(64 << 20, dtype=torch.int32, device=device)
    cases = [
        (shape, dtype, layout)
        for shape in select(GPU_SHAPES, args.shapes)
        for dtype in args.dtype
        for layout in args.layouts or ["contiguous", "channels_last"]
        if layout == "contiguous" or shape.has_channels_last
    ]
    print(f"{torch.cuda.get_device_name(device)}, copy {copy_gbps:.0f} GB/s, {len(cases)} cases", flush=True)
    rows: list[dict] = []
    step_rows: list[dict] = []
    with rows_path.open("w") as progress:
        progress.write(json.dumps({"meta": {"device": torch.cuda.get_device_name(device), "copy_gbps": copy_gbps,
                                            "torch": torch.__version__, "triton": __import__("triton").__version__,
                                            "reduction_stages": launchers.REDUCTION_STAGES,
                                            "elementwise_stages": launchers.ELEMENTWISE_STAGES}}) + "\n")  # fmt: skip
        for index, (shape, dtype_name, layout) in enumerate(cases, 1):
            try:
                module = triton_syncbn.SyncBatchNorm(shape.dims[1], device=device)
                x = torch.randn(shape.dims, device=device, dtype=DTYPES[dtype_name])
                if layout == "channels_last":
                    fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
                    x = x.contiguous(memory_format=fmt)
                x.requires_grad_(True)
                grad = torch.randn_like(x)
                for _ in range(1 if args.no_profile else 2):  # compile, allocator
                    training_step(module, x, grad, flush)
                torch.cuda.synchronize()
                if args.no_profile:
                    print(f"[{index}/{len(cases)}] {shape.id} {dtype_name} {layout}: ran", flush=True)
                    continue
                kernels = profile_case(module, x, grad, flush, args.steps)
                reference = TorchBatchNorm(shape.dims[1], device)
                for _ in range(2):
                    training_step(reference, x, grad, flush)
                reference_kernels = profile_case(reference, x, grad, flush, args.steps)
            except Exception as error:  # noqa: BLE001 - one failing case must not lose the others
                print(f"[{index}/{len(cases)}] {shape.id} {dtype_name} {layout}: FAILED {error!r}", flush=True)
                continue
            finally:
                x = grad = module = None  # noqa: F841 - free before the next case
            parts = []
            for name, (per_step, mean_us) in sorted(kernels.items(), key=lambda item: -item[1][0] * item[1][1]):
                predicted = model.get((shape.id, layout, dtype_name, name))
                row = {
                    "shape": shape.id, "dtype": dtype_name, "layout": layout, "kernel": name[:80],
                    "per_step": per_step, "mean_us": round(mean_us, 2),
                }  # fmt: skip
                if predicted:
                    traffic_mb = float(predicted["traffic_mb"])
                    row["traffic_mb"] = traffic_mb
                    row["measured_fraction"] = round(traffic_mb * 1e6 / (mean_us * 1e-6) / 1e9 / copy_gbps, 3)
                    row["predicted_fraction"] = round(float(predicted["fraction"]), 3)
                rows.append(row)
                progress.write(json.dumps({"row": row}) + "\n")
                fraction = f" ({row['measured_fraction']:.2f} of copy, model {row['predicted_fraction']:.2f})" if (
                    predicted
                ) else ""  # fmt: skip
                parts.append(f"{name[:40]} x{per_step:g} {mean_us:.1f} us{fraction}")
            steps = {"shape": shape.id, "dtype": dtype_name, "layout": layout,
                     "ours_step_us": round(step_us(kernels), 2),
                     "torch_bn_step_us": round(step_us(reference_kernels), 2)}  # fmt: skip
            step_rows.append(steps)
            progress.write(json.dumps({"step": steps}) + "\n")
            progress.flush()
            print(f"[{index}/{len(cases)}] {shape.id} {dtype_name} {layout}: step {steps['ours_step_us']:.1f} us, "
                  f"torch_bn {steps['torch_bn_step_us']:.1f} us; " + "; ".join(parts), flush=True)  # fmt: skip
    write_markdown(rows, step_rows, args.out / "kernel_times.md", copy_gbps)
    return 0


def write_markdown(rows: list[dict], step_rows: list[dict], path: Path, copy_gbps: float) -> None:
    lines = [
        f"# Device time of one training step, and per kernel (copy {copy_gbps:.0f} GB/s)",
        "",
        "| shape | dtype | layout | ours us | torch_bn us | ours / torch_bn |",
        "|---|---|---|---|---|---|",
    ]
    for row in step_rows:
        ratio = row["ours_step_us"] / row["torch_bn_step_us"] if row["torch_bn_step_us"] else float("nan")
        lines.append(f"| {row['shape']} | {row['dtype']} | {row['layout']} | {row['ours_step_us']} | "
                     f"{row['torch_bn_step_us']} | {ratio:.2f} |")  # fmt: skip
    lines += [
        "",
        "| shape | dtype | layout | kernel | per step | mean us | model MB | measured/copy | model/copy |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['shape']} | {row['dtype']} | {row['layout']} | {row['kernel']} | {row['per_step']:g} | "
            f"{row['mean_us']} | {row.get('traffic_mb', '')} | {row.get('measured_fraction', '')} | "
            f"{row.get('predicted_fraction', '')} |"
        )
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
