"""Accuracy report: relative L2 errors against a float64 oracle on the global batch (CPU).

    python bench/numerics.py [--markdown]

Compares, on the cases of the numerics issue (fp32 input):
- triton_syncbn.SyncBatchNorm on 2 gloo processes (the plain-torch CPU path; the Triton kernels
  are held to the same bounds through the interpreter by tests/test_numerics.py),
- torch.nn.BatchNorm on one process with the whole batch (CPU),
- the naive per-rank sum / sum-of-squares method, E[x^2] - E[x]^2 in fp32, with the negative
  variances it produces clamped to 0 as Keras and Flax do.
"""

from __future__ import annotations

import argparse
import io
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import triton_syncbn
from triton_syncbn.distributed import free_local_port

EPS = 1e-5


@dataclass(frozen=True)
class Scenario:
    name: str
    mean: float
    std: float
    shape: tuple[int, ...] = (10, 3, 8, 8)  # global batch; rank 0 gets 6 rows, rank 1 gets 4
    split: int = 6


SCENARIOS = [
    Scenario("mean = 2e4, std = 2", 2e4, 2.0),
    Scenario("std = 1e-4 (eps = 1e-5)", 1.0, 1e-4),
    Scenario("normal data", 0.0, 1.0),
]
# (scenario index, quantity, bound) as in the table
ROWS = [
    (0, "running_var", 1e-3),
    (0, "output", 2e-3),
    (0, "input_grad", 2e-2),
    (1, "running_var", 1e-4),
    (2, "output", 2e-5),
]


def data(scenario: Scenario) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = scenario.mean + scenario.std * torch.randn(scenario.shape, generator=generator, dtype=torch.float64)
    dy = torch.randn(scenario.shape, generator=generator, dtype=torch.float64)
    return x.float(), dy.float()


def run(x: torch.Tensor, dy: torch.Tensor, forward) -> dict[str, torch.Tensor]:
    """Output, input grad and running_var (momentum 1: the unbiased batch variance) of ``forward``."""
    x = x.clone().requires_grad_(True)
    running_mean, running_var = torch.zeros(x.shape[1], dtype=x.dtype), torch.ones(x.shape[1], dtype=x.dtype)
    output = forward(x, running_mean, running_var)
    (grad,) = torch.autograd.grad(output, x, dy)
    return {"output": output.detach(), "input_grad": grad, "running_var": running_var}


def batch_norm(x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor) -> torch.Tensor:
    return F.batch_norm(x, running_mean, running_var, None, None, True, 1.0, EPS)


def naive(x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor, split: int) -> torch.Tensor:
    """Per-rank fp32 sums of x and x^2, summed across ranks, then E[x^2] - E[x]^2 (clamped at 0)."""
    dims = [0] + list(range(2, x.dim()))
    parts = (x[:split], x[split:])
    total = sum(part.sum(dims) for part in parts)
    total_sq = sum(part.square().sum(dims) for part in parts)
    count = x.numel() // x.shape[1]
    mean = total / count
    var = (total_sq / count - mean.square()).clamp(min=0)
    with torch.no_grad():
        running_mean.copy_(mean)
        running_var.copy_(var * count / (count - 1))
    view = (1, -1) + (1,) * (x.dim() - 2)
    return (x - mean.view(view)) * torch.rsqrt(var.view(view) + EPS)


def worker(rank: int, port: int, scenario: Scenario, results: mp.Queue) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    x, dy = data(scenario)
    rows = slice(0, scenario.split) if rank == 0 else slice(scenario.split, None)
    module = triton_syncbn.SyncBatchNorm(scenario.shape[1], eps=EPS, momentum=1.0, affine=False)
    result = run(x[rows], dy[rows], lambda x, _mean, _var: module(x))
    result["running_var"] = module.running_var.detach()
    buffer = io.BytesIO()
    torch.save((rank, result), buffer)
    results.put(buffer.getvalue())
    dist.destroy_process_group()


def ours(scenario: Scenario) -> dict[str, torch.Tensor]:
    port = free_local_port()
    context = mp.get_context("spawn")
    queue = context.Queue()
    processes = mp.start_processes(worker, args=(port, scenario, queue), nprocs=2, start_method="spawn", join=False)
    by_rank = dict(torch.load(io.BytesIO(queue.get(timeout=300))) for _ in range(2))
    processes.join()
    return {
        "output": torch.cat([by_rank[0]["output"], by_rank[1]["output"]]),
        "input_grad": torch.cat([by_rank[0]["input_grad"], by_rank[1]["input_grad"]]),
        "running_var": by_rank[0]["running_var"],
    }


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected).norm() / expected.norm())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--markdown", action="store_true", help="print a markdown table (as in README.md)")
    parser.parse_args()
    measured = []
    for scenario in SCENARIOS:
        print(f"measuring: {scenario.name} ...", file=sys.stderr, flush=True)
        x, dy = data(scenario)
        expected = run(x.double(), dy.double(), batch_norm)
        providers = {
            "ours": ours(scenario),
            "torch": run(x, dy, batch_norm),
            "naive": run(x, dy, lambda x, m, v, split=scenario.split: naive(x, m, v, split)),
        }
        measured.append(
            {name: {q: relative_error(result[q], expected[q]) for q in expected} for name, result in providers.items()}
        )
    columns = ["triton_syncbn, 2 gloo ranks", "torch.nn.BatchNorm2d, 1 process", "naive sum/sum-of-squares"]
    print("| case | quantity | bound | " + " | ".join(columns) + " |")
    print("|---|---|---|---|---|---|")
    failed = False
    for index, quantity, bound in ROWS:
        errors = measured[index]
        failed |= errors["ours"][quantity] > bound
        cells = " | ".join(f"{errors[name][quantity]:.1e}" for name in ("ours", "torch", "naive"))
        print(f"| {SCENARIOS[index].name} | {quantity} | {bound:.0e} | {cells} |")
    if failed:
        print("FAIL: triton_syncbn misses a bound", file=sys.stderr)
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
