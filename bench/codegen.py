"""Compile the kernel specializations the launchers would launch, for a GPU target, without a GPU.

``recording(programs)`` gives a ``launchers.Dispatch`` that records the kernel calls the
launchers make (with any tensors, meta tensors included) instead of running them, aiming at
``programs`` programs as on a GPU with that many SMs x 4; ``compile_launch`` compiles one
recorded call for ``sm_80``/``sm_90`` through ``triton.compile``, specializing every argument
exactly as Triton's JIT would (ints equal to 1 become constants, 16-divisible ints and pointers
get divisibility hints). The result holds the PTX and the cubin built by ptxas, so codegen can
be inspected and proven to build on a CPU-only machine. A developer tool (bench/, not shipped):
the launchers take the recording ``Dispatch`` as an argument; nothing is patched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import triton
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.compiler import ASTSource

from triton_syncbn import launchers

_LAUNCH_OPTIONS = ("num_warps", "num_stages", "maxnreg")

# The streaming kernels and their roles: a forward launches a statistics and a normalize kernel,
# a backward a gradient-sums and an input-gradient kernel (the channel-run reductions where S is
# odd in the contiguous layout, kernels/stats.py and kernels/backward.py).
STREAMING_ROLES = {
    "_partial_stats_kernel": "statistics",
    "_run_stats_kernel": "statistics",
    "_normalize_kernel": "normalize",
    "_backward_reduce_kernel": "gradient sums",
    "_run_backward_reduce_kernel": "gradient sums",
    "_backward_dx_kernel": "input gradient",
}
# What most shapes launch, in order.
PER_CHANNEL_KERNELS = ("_partial_stats_kernel", "_normalize_kernel", "_backward_reduce_kernel", "_backward_dx_kernel")


@dataclass
class KernelLaunch:
    """One kernel call as a launcher made it: the JIT function, its arguments and grid."""

    kernel: Any
    grid: tuple[int, ...]
    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.kernel.__name__

    @property
    def programs(self) -> int:
        count = 1
        for size in self.grid:
            count *= size
        return count


def recording(programs: int) -> tuple[launchers.Dispatch, list[KernelLaunch]]:
    """A ``Dispatch`` for the launchers' ``dispatch=`` argument that records their launches (in
    the returned list) instead of running them, sizing grids for ``programs`` programs."""
    launches: list[KernelLaunch] = []

    def record(kernel: Any, grid: tuple[int, ...], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        launches.append(KernelLaunch(kernel, tuple(grid), tuple(args), dict(kwargs)))

    return launchers.Dispatch(programs=programs, launch=record), launches


def specialization(launch: KernelLaunch) -> tuple[dict[str, str], dict[str, Any], dict, dict[str, Any]]:
    """``(signature, constexprs, attrs, options)`` of ``launch`` as Triton's JIT would specialize
    it: equal specializations compile to the same binary (a cache key, with the kernel)."""
    kernel = launch.kernel
    arg_names = kernel.arg_names
    values = dict(zip(arg_names, launch.args, strict=False))
    values.update({name: value for name, value in launch.kwargs.items() if name not in _LAUNCH_OPTIONS})
    missing = [name for name in arg_names if name not in values]
    if missing:
        raise TypeError(f"{kernel.__name__}: launch is missing arguments {missing}")
    signature: dict[str, str] = {}
    constexprs: dict[str, Any] = {}
    attrs: dict[tuple[int, ...], list] = {}
    for index, name in enumerate(arg_names):
        value = values[name]
        is_constexpr = index in kernel.constexprs
        if is_constexpr:
            signature[name] = "constexpr"
            constexprs[name] = value
            continue
        type_name, specialized = _specialize(value)
        signature[name] = type_name
        if type_name == "constexpr":
            constexprs[name] = specialized
        elif isinstance(specialized, str) and specialized:
            attrs[(index,)] = BaseBackend.parse_attr(specialized)
    options = {name: launch.kwargs[name] for name in _LAUNCH_OPTIONS if name in launch.kwargs}
    return signature, constexprs, attrs, options


def compile_launch(launch: KernelLaunch, arch: int) -> Any:
    """Compile ``launch`` for ``sm_<arch>`` (e.g. 80, 90); returns Triton's compiled kernel.

    ``compiled.asm`` holds ``ttir``, ``ttgir``, ``llir``, ``ptx`` and ``cubin``.
    """
    signature, constexprs, attrs, options = specialization(launch)
    source = ASTSource(launch.kernel, signature, constexprs, attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


_POINTER_TYPES = {
    torch.float32: "*fp32", torch.float64: "*fp64", torch.float16: "*fp16", torch.bfloat16: "*bf16",
    torch.int64: "*i64", torch.int32: "*i32", torch.uint8: "*u8", torch.bool: "*i1",
}  # fmt: skip


def _specialize(value: Any) -> tuple[str, Any]:
    """(signature type, specialization) of one argument, as Triton's JIT derives them."""
    try:  # the JIT's own rules, where this Triton exposes them
        from triton._C.libtriton import native_specialize_impl
    except ImportError:
        native_specialize_impl = None
    if native_specialize_impl is not None:
        return native_specialize_impl(BaseBackend, value, False, True, True)
    return specialize_like_jit(value)


def specialize_like_jit(value: Any) -> tuple[str, Any]:
    """The JIT's specialization rules restated, for Triton releases that do not expose them."""
    if value is None:
        return "constexpr", None
    if isinstance(value, bool):
        return "u1", None
    if isinstance(value, int):
        if value == 1:
            return "constexpr", 1
        kind = "i32" if -(2**31) <= value < 2**31 else "i64"
        return kind, "D" if value % 16 == 0 else ""
    if isinstance(value, float):
        return "fp32", None
    if isinstance(value, torch.Tensor):
        return _POINTER_TYPES[value.dtype], "D" if value.data_ptr() % 16 == 0 else ""
    raise TypeError(f"cannot specialize an argument of type {type(value).__name__}")


def training_step_launches(
    x: torch.Tensor,
    programs: int,
    activation: int = 0,
    residual: bool = False,
    tiling: launchers.Tiling | None = None,
) -> dict[str, list[KernelLaunch]]:
    """The launches of one synchronized training forward and backward of ``x`` ``(N, C, *)``
    (meta tensors are enough), as the module makes them: statistics, normalize with the running
    statistics and ``num_batches_tracked`` updated, gradient sums, input gradient. Keyed by
    direction ("forward", "backward"); ``tiling`` forces block sizes (tests)."""
    from triton_syncbn.contract import Epilogue, RunningStats, SavedStatistics
    from triton_syncbn.layout import channel_view, empty_output_like

    dispatch, launches = recording(programs)
    view = channel_view(x)
    channels = x.shape[1]
    per_channel = torch.empty(channels, device=x.device)
    counter = torch.empty((), dtype=torch.int64, device=x.device)
    residual_view = channel_view(torch.empty_like(x)) if residual else None
    epilogue = Epilogue(residual_view, activation, 0.01)
    options = {"tiling": tiling, "dispatch": dispatch}
    tickets = launchers.new_merge_tickets(channels, x.device)  # the module's, made once per device
    stats = launchers.partial_stats(view, tickets, **options)
    _, out = empty_output_like(x)
    running = RunningStats(per_channel, per_channel, counter, 0.1)
    mean, invstd = launchers.normalize(view, out, per_channel, per_channel, stats, running, 1e-5, epilogue, **options)
    forward = list(launches)
    launches.clear()
    saved = SavedStatistics(mean, invstd, stats[0])
    sums, _, _ = launchers.backward_reduce(
        view, view, per_channel, per_channel, saved, epilogue, torch.float32, torch.float32, tickets, **options
    )
    _, grad_in = empty_output_like(x)
    grad_residual = channel_view(torch.empty_like(x)) if residual else None
    launchers.backward_dx(
        view, view, grad_in, per_channel, per_channel, saved, sums, epilogue, grad_residual, **options
    )
    return {"forward": forward, "backward": list(launches)}
