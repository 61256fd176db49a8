"""Which implementation of the kernel contracts serves a tensor (see DESIGN.md, Kernel backends)."""

from __future__ import annotations

import torch

from triton_syncbn.kernels import INTERPRETED

from . import launchers, torch_path
from .contract import KernelBackend


def kernel_backend(tensor: torch.Tensor) -> KernelBackend:
    """The ``contract.KernelBackend`` (a module) whose stages handle ``tensor``.

    - CUDA tensors: the compiled Triton kernels (``launchers``).
    - CPU tensors under ``TRITON_INTERPRET=1`` (set before triton was imported): the same
      Triton kernels, run by Triton's interpreter.
    - CPU tensors otherwise: ``torch_path``, the same contracts in plain torch ops.
    """
    if tensor.device.type == "cuda":
        return launchers
    if tensor.device.type == "cpu":
        return launchers if INTERPRETED else torch_path
    raise TypeError(f"triton_syncbn runs on CUDA and CPU tensors; got a tensor on {tensor.device}")


def new_merge_tickets(tensor: torch.Tensor, channels: int) -> torch.Tensor | None:
    """Zeroed split-merge tickets for the reductions over ``tensor``'s device (``contract.ForwardCall``),
    or None when its backend merges nothing (``torch_path``). Allocating them is a fill launch,
    so a layer makes them once per device and keeps them."""
    if kernel_backend(tensor) is launchers:
        return launchers.new_merge_tickets(channels, tensor.device)
    return None


def backend_name(tensor: torch.Tensor) -> str:
    """A short name of the backend that ``kernel_backend`` picks, for logs and benchmarks."""
    if tensor.device.type == "cuda":
        return "triton"
    return "triton-interpreter" if INTERPRETED else "torch-cpu"
