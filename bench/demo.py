"""CPU demo: train a converted conv net on 2 gloo processes and check it against one process.

    python bench/demo.py [--world-size 2] [--steps 5] [--batch 24]

Each rank gets an uneven share of every global batch (the last rank gets fewer samples). With
synchronized BatchNorm, DistributedDataParallel training over the ranks must reach the same
parameters and running statistics as one process training on the whole batch with plain
``torch.nn.BatchNorm``; the demo prints both and exits non-zero if they differ.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import triton_syncbn
from triton_syncbn.distributed import free_local_port


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    ).double()


def make_batch(batch: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    images = torch.randn(batch, 3, 16, 16, generator=generator, dtype=torch.float64) * 2 + 0.5
    labels = torch.randint(0, 10, (batch,), generator=generator)
    return images, labels


def shard(batch: int, world_size: int, rank: int) -> slice:
    """Uneven shares: every rank but the last gets ceil(batch / world_size) samples."""
    share = -(-batch // world_size)
    start = min(rank * share, batch)
    return slice(start, min(start + share, batch))


def train(model: nn.Module, steps: int, batch: int, rows: slice, scale: float, label: str | None) -> nn.Module:
    """SGD on ``rows`` of each global batch; prints ``label``'s loss per step when given."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    for step in range(steps):
        images, labels = make_batch(batch, step)
        loss = loss_fn(model(images[rows]), labels[rows]) * scale
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if label:
            print(f"  step {step + 1}/{steps}: {label} = {loss.item():.6f}", flush=True)
    return model


def worker(rank: int, world_size: int, port: int, steps: int, batch: int, results: mp.Queue) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    model = DistributedDataParallel(triton_syncbn.convert_sync_batchnorm(build_model()))
    # DDP averages gradients over ranks: scaling by world_size / batch gives the mean loss's gradient.
    train(
        model,
        steps,
        batch,
        shard(batch, world_size, rank),
        world_size / batch,
        "rank 0's share of the loss" if rank == 0 else None,
    )
    if rank == 0:  # as bytes: shared-memory tensors would not outlive this process
        buffer = io.BytesIO()
        torch.save(model.module.state_dict(), buffer)
        results.put(buffer.getvalue())
    dist.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=24, help="global batch size")
    args = parser.parse_args()
    if args.world_size < 1 or args.batch < 2:
        parser.error("need --world-size >= 1 and --batch >= 2")

    print(f"training on {args.world_size} gloo processes (triton_syncbn.SyncBatchNorm, DDP)...", flush=True)
    start = time.perf_counter()
    context = mp.get_context("spawn")
    results = context.Queue()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    processes = mp.start_processes(
        worker, args=(args.world_size, free_local_port(), args.steps, args.batch, results), nprocs=args.world_size,
        start_method="spawn", join=False,
    )  # fmt: skip
    distributed = torch.load(io.BytesIO(results.get(timeout=300)))
    processes.join()
    print(f"  done in {time.perf_counter() - start:.1f} s", flush=True)

    print("training one process on the whole batch (torch.nn.BatchNorm2d)...", flush=True)
    single = train(build_model(), args.steps, args.batch, slice(0, args.batch), 1 / args.batch, "loss").state_dict()

    worst = max((distributed[name].double() - value.double()).abs().max().item() for name, value in single.items())
    print(f"largest difference in parameters and buffers: {worst:.3e}")
    if worst > 1e-8:
        print("FAIL: synchronized training differs from single-process training")
        return 1
    print("OK: synchronized training matches single-process training on the global batch")
    return 0


if __name__ == "__main__":
    sys.exit(main())
