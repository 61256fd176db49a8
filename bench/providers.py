"""The implementations the benchmark compares, each turned into a callable for one case.

- ``triton_syncbn``: ours (compiled Triton kernels on CUDA; the plain-torch path on CPU, or
  the Triton interpreter with ``--interpret``).
- ``torch_sync``: torch's synchronized path, ``torch.nn.modules._functions.SyncBatchNorm``,
  called directly so that it synchronizes even in a one-rank group (the module itself falls
  back to ``F.batch_norm`` at world size 1). CUDA only: torch refuses CPU tensors there.
- ``torch_bn``: plain ``torch.nn.functional.batch_norm`` (cuDNN or native kernels), no sync.
- ``apex``: ``apex.parallel.SyncBatchNorm`` when apex is installed (CUDA only).

Modes: ``forward`` (training forward, no autograd graph), ``backward`` (backward alone, one
forward kept), ``forward+backward``, and ``fused-relu`` (forward + backward of
``relu(bn(x))``: ours fused in one layer, the others followed by a separate ReLU).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

MODES = ("forward", "backward", "forward+backward", "fused-relu")
PROVIDERS = ("triton_syncbn", "torch_sync", "torch_bn", "apex")

# Bytes moved per element size S of the input: (algorithmic, actual) for each mode; see PERF.md.
TRAFFIC = {"forward": (2, 3), "backward": (3, 5), "forward+backward": (5, 8), "fused-relu": (5, 8)}


@dataclass
class Case:
    dims: tuple[int, ...]
    dtype: torch.dtype
    channels_last: bool
    mode: str
    device: torch.device
    group: dist.ProcessGroup | None  # the group to synchronize over (None: no process group)


def make_input(case: Case, requires_grad: bool) -> torch.Tensor:
    x = torch.randn(case.dims, device=case.device, dtype=case.dtype)
    if case.channels_last:
        x = x.contiguous(memory_format=torch.channels_last if len(case.dims) == 4 else torch.channels_last_3d)
    return x.requires_grad_(requires_grad)


def unavailable_reason(provider: str, case: Case) -> str | None:
    """Why ``provider`` cannot run ``case`` here, or None."""
    if provider in ("torch_sync", "apex") and case.device.type != "cuda":
        return "needs CUDA"
    if provider == "torch_sync" and case.group is None:
        return "needs a process group"
    if provider == "apex":
        try:
            import apex.parallel  # noqa: F401
        except ImportError:
            return "apex is not installed"
    return None


def build(provider: str, case: Case) -> Callable[[], object]:
    """A callable that runs ``case.mode`` once with ``provider``."""
    channels = case.dims[1]
    weight = torch.nn.Parameter(torch.ones(channels, device=case.device))
    bias = torch.nn.Parameter(torch.zeros(channels, device=case.device))
    running_mean = torch.zeros(channels, device=case.device)
    running_var = torch.ones(channels, device=case.device)
    fused = case.mode == "fused-relu"
    layer = _layer(provider, case, weight, bias, running_mean, running_var, fused)
    needs_grad = case.mode != "forward"
    x = make_input(case, requires_grad=needs_grad)
    if case.mode == "forward":
        return lambda: layer(x)
    grad = torch.randn_like(x)
    inputs = (x, weight, bias)
    if case.mode == "backward":
        output = layer(x)
        return lambda: torch.autograd.grad(output, inputs, grad, retain_graph=True)
    return lambda: torch.autograd.grad(layer(x), inputs, grad)


def _layer(
    provider: str,
    case: Case,
    weight: torch.Tensor,
    bias: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    fused: bool,
) -> Callable[[torch.Tensor], torch.Tensor]:
    if provider == "triton_syncbn":
        import triton_syncbn

        module = triton_syncbn.SyncBatchNorm(
            case.dims[1], process_group=case.group, activation="relu" if fused else None, device=case.device
        )
        module.weight, module.bias = weight, bias  # the very tensors the benchmark differentiates
        return module
    if provider == "torch_bn":

        def torch_bn(x: torch.Tensor) -> torch.Tensor:
            y = F.batch_norm(x, running_mean, running_var, weight, bias, True, 0.1, 1e-5)
            return torch.relu(y) if fused else y

        return torch_bn
    if provider == "torch_sync":
        from torch.nn.modules._functions import SyncBatchNorm as TorchSyncFunction

        world = dist.get_world_size(case.group)

        def torch_sync(x: torch.Tensor) -> torch.Tensor:
            y = TorchSyncFunction.apply(x, weight, bias, running_mean, running_var, 1e-5, 0.1, case.group, world)
            return torch.relu(y) if fused else y

        return torch_sync
    if provider == "apex":
        import apex.parallel

        module = apex.parallel.SyncBatchNorm(case.dims[1], process_group=case.group, fuse_relu=fused).to(case.device)
        module.weight, module.bias = weight, bias
        return module
    raise ValueError(f"unknown provider {provider!r}; known: {PROVIDERS}")


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Hide what native code writes to fd 2 (the profiler prints a line at every start/stop)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def count_events(function: Callable[[], object], device: torch.device) -> tuple[int | None, int]:
    """(GPU kernels launched, collectives issued) by one call, from the profiler."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with _native_stderr_silenced(), torch.profiler.profile(activities=activities) as profile:
        function()
        if device.type == "cuda":
            torch.cuda.synchronize()
    events = profile.events()
    collectives = sum(1 for event in events if event.name.startswith(("gloo:", "nccl:")))
    if device.type != "cuda":
        return None, collectives
    kernels = sum(
        1
        for event in events
        if event.device_type == torch.autograd.DeviceType.CUDA and not event.name.startswith(("Memcpy", "Memset"))
    )
    return kernels, collectives
