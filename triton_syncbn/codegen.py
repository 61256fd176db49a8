"""Compile the kernel specializations the launchers would launch, for a GPU target, without a GPU.

``capture_launches`` records the kernel calls the launchers make (with any tensors, meta
tensors included) instead of running them; ``compile_launch`` compiles one recorded call for
``sm_80``/``sm_90`` through ``triton.compile``, specializing every argument exactly as Triton's
JIT would (ints equal to 1 become constants, 16-divisible ints and pointers get divisibility
hints). The result holds the PTX and the cubin built by ptxas, so codegen can be inspected and
proven to build on a CPU-only machine. A developer tool: nothing on the training path uses it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import triton
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.compiler import ASTSource

from . import launchers

KERNEL_NAMES = (
    "_partial_stats_kernel",
    "_combine_stats_kernel",
    "_normalize_kernel",
    "_backward_reduce_kernel",
    "_combine_grad_sums_kernel",
    "_backward_dx_kernel",
)
_LAUNCH_OPTIONS = ("num_warps", "num_stages")


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


class _Recorder:
    def __init__(self, kernel: Any, launches: list[KernelLaunch]) -> None:
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid: tuple[int, ...]) -> Any:
        def record(*args: Any, **kwargs: Any) -> None:
            self.launches.append(KernelLaunch(self.kernel, tuple(grid), args, kwargs))

        return record


@contextlib.contextmanager
def capture_launches() -> Iterator[list[KernelLaunch]]:
    """Within the block, launcher calls record their kernel launches instead of running them."""
    launches: list[KernelLaunch] = []
    originals = {name: getattr(launchers, name) for name in KERNEL_NAMES}
    try:
        for name, kernel in originals.items():
            setattr(launchers, name, _Recorder(kernel, launches))
        yield launches
    finally:
        for name, kernel in originals.items():
            setattr(launchers, name, kernel)


def compile_launch(launch: KernelLaunch, arch: int) -> Any:
    """Compile ``launch`` for ``sm_<arch>`` (e.g. 80, 90); returns Triton's compiled kernel.

    ``compiled.asm`` holds ``ttir``, ``ttgir``, ``llir``, ``ptx`` and ``cubin``.
    """
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
        type_name, specialization = _specialize(value)
        signature[name] = type_name
        if type_name == "constexpr":
            constexprs[name] = specialization
        elif isinstance(specialization, str) and specialization:
            attrs[(index,)] = BaseBackend.parse_attr(specialization)
    options = {name: launch.kwargs[name] for name in _LAUNCH_OPTIONS if name in launch.kwargs}
    source = ASTSource(kernel, signature, constexprs, attrs)
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
