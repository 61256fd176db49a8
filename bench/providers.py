"""The implementations the benchmark compares, each turned into a callable for one case.

- ``triton_syncbn``: ours (compiled Triton kernels on CUDA; the plain-torch path on CPU, or
  the Triton interpreter with ``--interpret``).
- ``torch_sync``: torch's synchronized path, ``torch.nn.modules._functions.SyncBatchNorm``,
  called directly so that it synchronizes even in a one-rank group (the module itself falls
  back to ``F.batch_norm`` at world size 1). CUDA only: torch refuses CPU tensors there.
- ``torch_bn``: torch's module, ``torch.nn.BatchNorm1d/2d/3d`` (cuDNN or native kernels), no
  sync: the layer ours replaces, with its per-call cost (the counter, the input check), as ours
  has its own.
- ``floor``: ``torch.nn.functional.batch_norm`` on the local batch (no module around it) plus one
  all-reduce per direction of the payload
  ours sends (float64 ``[3, C]`` forward, ``[2, C]`` in the statistics dtype backward): what a
  synchronized BatchNorm cannot beat with torch's kernels. Needs a process group.
- ``fairscale``: ``fairscale.experimental.nn.SyncBatchNorm`` (pure torch, runs on gloo; two
  all-reduces forward, one backward) when fairscale is installed. Needs a process group.
- ``apex``: ``apex.parallel.SyncBatchNorm`` when apex is installed (CUDA only).

Modes: ``forward`` (training forward, no autograd graph), ``backward`` (backward alone, one
forward kept), ``forward+backward``, ``fused-relu`` (forward + backward of ``relu(bn(x))``:
ours fused in one layer, the others followed by a separate ReLU) and ``fused-add-relu``
(forward + backward of ``relu(bn(x) + residual)``, the residual block's tail; gradients for
x, weight, bias and the residual).
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

MODES = ("forward", "backward", "forward+backward", "fused-relu", "fused-add-relu")
PROVIDERS = ("triton_syncbn", "torch_sync", "torch_bn", "floor", "fairscale", "apex")
SYNCHRONIZED = ("triton_syncbn", "torch_sync", "floor", "fairscale", "apex")  # issue collectives

# Bytes moved per element size S of the input: (algorithmic, actual) for each mode; see PERF.md.
# With a residual: + S read forward, + S written (its gradient) backward.
TRAFFIC = {
    "forward": (2, 3),
    "backward": (3, 5),
    "forward+backward": (5, 8),
    "fused-relu": (5, 8),
    "fused-add-relu": (7, 10),
}


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
    if provider in ("torch_sync", "floor", "fairscale") and case.group is None:
        return "needs a process group"
    if provider == "fairscale":
        try:
            import fairscale.experimental.nn  # noqa: F401
        except ImportError:
            return "fairscale is not installed (pip install fairscale, or the bench extra)"
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
    fused = case.mode in ("fused-relu", "fused-add-relu")
    layer = _layer(provider, case, weight, bias, running_mean, running_var, fused)
    needs_grad = case.mode != "forward"
    x = make_input(case, requires_grad=needs_grad)
    if case.mode == "forward":
        return lambda: layer(x)
    grad = torch.randn_like(x)
    inputs: tuple[torch.Tensor, ...] = (x, weight, bias)
    if case.mode == "backward":
        output = layer(x)
        return lambda: torch.autograd.grad(output, inputs, grad, retain_graph=True)
    if case.mode == "fused-add-relu":
        residual = make_input(case, requires_grad=True)
        inputs += (residual,)
        return lambda: torch.autograd.grad(layer(x, residual), inputs, grad)
    return lambda: torch.autograd.grad(layer(x), inputs, grad)


def _layer(
    provider: str,
    case: Case,
    weight: torch.Tensor,
    bias: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    fused: bool,
) -> Callable[..., torch.Tensor]:
    """``layer(x)`` or, for ``fused-add-relu``, ``layer(x, residual)``: one provider's BatchNorm
    (+ ReLU, + residual add: fused in ours, separate torch ops in the others)."""
    if provider == "triton_syncbn":
        import triton_syncbn

        module = triton_syncbn.SyncBatchNorm(
            case.dims[1], process_group=case.group, activation="relu" if fused else None, device=case.device
        )
        module.weight, module.bias = weight, bias  # the very tensors the benchmark differentiates
        return module
    if provider == "torch_bn":
        module_class = torch.nn.BatchNorm3d if len(case.dims) == 5 else (
            torch.nn.BatchNorm2d if len(case.dims) == 4 else torch.nn.BatchNorm1d
        )  # fmt: skip
        module = module_class(case.dims[1], momentum=0.1, eps=1e-5, device=case.device)
        module.weight, module.bias = weight, bias  # the very tensors the benchmark differentiates
        module.running_mean, module.running_var = running_mean, running_var
        return _unfused_epilogue(module, fused)
    if provider == "floor":
        acc_dtype = torch.float64 if case.dtype == torch.float64 else torch.float32
        payloads = (torch.zeros(3, case.dims[1], dtype=torch.float64), torch.zeros(2, case.dims[1], dtype=acc_dtype))

        def floor(x: torch.Tensor) -> torch.Tensor:
            y = F.batch_norm(x, running_mean, running_var, weight, bias, True, 0.1, 1e-5)
            return _AllReducePerDirection.apply(y, payloads, case.group)

        return _unfused_epilogue(floor, fused)
    if provider == "fairscale":
        from fairscale.experimental.nn import SyncBatchNorm as FairscaleSyncBatchNorm

        module = FairscaleSyncBatchNorm(case.dims[1], process_group=case.group).to(case.device)
        module.weight, module.bias = weight, bias
        return _unfused_epilogue(module, fused)
    if provider == "torch_sync":
        from torch.nn.modules._functions import SyncBatchNorm as TorchSyncFunction

        world = dist.get_world_size(case.group)

        def torch_sync(x: torch.Tensor) -> torch.Tensor:
            return TorchSyncFunction.apply(x, weight, bias, running_mean, running_var, 1e-5, 0.1, case.group, world)

        return _unfused_epilogue(torch_sync, fused)
    if provider == "apex":
        import apex.parallel

        if case.mode == "fused-add-relu":
            module = apex.parallel.SyncBatchNorm(case.dims[1], process_group=case.group).to(case.device)
            module.weight, module.bias = weight, bias
            return _unfused_epilogue(module, True)
        module = apex.parallel.SyncBatchNorm(case.dims[1], process_group=case.group, fuse_relu=fused).to(case.device)
        module.weight, module.bias = weight, bias
        return module
    raise ValueError(f"unknown provider {provider!r}; known: {PROVIDERS}")


def _unfused_epilogue(batch_norm: Callable[[torch.Tensor], torch.Tensor], fused: bool) -> Callable[..., torch.Tensor]:
    """``batch_norm`` followed by separate torch ops: ``relu(bn(x) [+ residual])`` when ``fused``."""
    if not fused:
        return batch_norm

    def layer(x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        y = batch_norm(x)
        return torch.relu(y if residual is None else y + residual)

    return layer


class _AllReducePerDirection(torch.autograd.Function):
    """Identity on ``y`` that all-reduces ``payloads[0]`` forward and ``payloads[1]`` backward:
    the communication a synchronized BatchNorm cannot avoid, for the ``floor`` provider."""

    @staticmethod
    def forward(
        ctx: object, y: torch.Tensor, payloads: tuple[torch.Tensor, torch.Tensor], group: object
    ) -> torch.Tensor:
        dist.all_reduce(payloads[0], group=group)
        ctx.payload, ctx.group = payloads[1], group
        return y.view_as(y)

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        dist.all_reduce(ctx.payload, group=ctx.group)
        return grad, None, None


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
