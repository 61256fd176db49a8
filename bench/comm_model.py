"""Exposed communication time per SyncBN layer vs world size, from NCCL's latency-bandwidth model.

BatchNorm statistics sit on the critical path (the next layer needs them), so a layer's exposed
time is its kernels plus its collectives plus any host synchronization. Per layer and step:

- torch.nn.SyncBatchNorm: forward all-gathers ``W * (2C + 1)`` fp32 values and syncs with the
  host to drop empty ranks; backward all-reduces ``2C`` fp32 values.
- triton_syncbn: forward all-reduces ``3C`` fp64 values, backward ``2C`` fp32 values.

A collective over W ranks of n bytes costs, with per-step latency alpha and bus bandwidth beta:
all-reduce ``min(ring, tree)`` with ring ``2 (W - 1) alpha + 2 (W - 1) / W * n / beta`` and tree
``2 log2(W) alpha + 2 n / beta``; all-gather (ring) ``(W - 1) alpha + (W - 1) * n_rank / beta``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Network:
    alpha_us: float = 5.0  # per-step latency between nodes (InfiniBand + NCCL overheads)
    beta_gbps: float = 25.0  # per-GPU bus bandwidth (a 200 Gb/s NIC per GPU)
    host_sync_us: float = 10.0  # a device-to-host copy that blocks the CPU


def all_reduce_us(nbytes: float, world: int, network: Network) -> float:
    if world <= 1:
        return 0.0
    transfer = nbytes / (network.beta_gbps * 1e3)  # bytes / (GB/s) in microseconds
    ring = 2 * (world - 1) * network.alpha_us + 2 * (world - 1) / world * transfer
    tree = 2 * math.log2(world) * network.alpha_us + 2 * transfer
    return min(ring, tree)


def all_gather_us(nbytes_per_rank: float, world: int, network: Network) -> float:
    if world <= 1:
        return 0.0
    return (world - 1) * network.alpha_us + (world - 1) * nbytes_per_rank / (network.beta_gbps * 1e3)


def exposed_us(design: str, channels: int, world: int, kernel_us: float, network: Network = Network()) -> float:
    """Exposed time of one layer's forward + backward for ``design`` ("torch" or "ours")."""
    if design == "torch":
        forward = all_gather_us((2 * channels + 1) * 4, world, network) + network.host_sync_us
        backward = all_reduce_us(2 * channels * 4, world, network)
    elif design == "ours":
        forward = all_reduce_us(3 * channels * 8, world, network)
        backward = all_reduce_us(2 * channels * 4, world, network)
    else:
        raise ValueError(f"unknown design {design!r}")
    return kernel_us + forward + backward


def plot(path: str, channels: int, kernel_us: dict[str, float], note: str, network: Network = Network()) -> float:
    """Plot exposed time vs world size (8 to 4096) to ``path``; return torch / ours at 512 GPUs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    worlds = [2**k for k in range(3, 13)]
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for design, label in (("torch", "torch.nn.SyncBatchNorm (all-gather + host sync)"), ("ours", "triton_syncbn")):
        times = [exposed_us(design, channels, world, kernel_us[design], network) for world in worlds]
        axis.plot(worlds, times, marker="o", label=label)
    axis.set_xscale("log", base=2)
    axis.set_yscale("log")
    axis.set_xlabel("world size (GPUs)")
    axis.set_ylabel("exposed time per layer, fwd + bwd (us)")
    axis.set_title(f"C = {channels}: NCCL model, alpha = {network.alpha_us} us, beta = {network.beta_gbps} GB/s")
    axis.text(0.01, 0.01, note, transform=axis.transAxes, fontsize=7, va="bottom")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    ratio = exposed_us("torch", channels, 512, kernel_us["torch"], network)
    return ratio / exposed_us("ours", channels, 512, kernel_us["ours"], network)
