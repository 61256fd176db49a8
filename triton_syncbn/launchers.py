"""Launchers for the Triton kernels: tensors in, grids and block sizes chosen, tensors out.

Every launcher takes ``[N, C, S]`` views (see ``layout.channel_view``) and honours their
strides, so contiguous and channels_last inputs are never copied. The same functions, with
the same contracts, exist in plain torch in ``torch_path`` for CPU tensors when Triton's
interpreter is off.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from triton_syncbn.kernels import (
    INTERPRETED,
    _backward_dx_kernel,
    _backward_reduce_kernel,
    _combine_grad_sums_kernel,
    _combine_stats_kernel,
    _normalize_kernel,
    _partial_stats_kernel,
    autotune,
)

from .layout import accumulation_dtype

# Elements per [BLOCK_C, BLOCK_M] tile: 16 fp32 values per thread at 4 warps.
_TILE_ELEMENTS = 2048
_MAX_BLOCK_C = 64
# Programs to aim for per streaming-multiprocessor, so that small-C shapes fill the GPU.
_PROGRAMS_PER_SM = 4
# Under the interpreter programs run one after another; a few splits still exercise the paths.
_INTERPRETER_PROGRAMS = 4
_INT32_LIMIT = 2**31 - 1


@dataclass(frozen=True)
class Tiling:
    """How a ``[N, C, S]`` tensor is cut into programs: grid = (cdiv(C, block_c), splits)."""

    block_c: int  # channels per program (power of two)
    block_m: int  # elements per channel per loop step (power of two)
    splits: int  # programs per channel block along the N * S axis
    chunk: int  # elements per channel per split, a multiple of block_m

    def grid(self, channels: int) -> tuple[int, int]:
        return (triton.cdiv(channels, self.block_c), self.splits)

    @classmethod
    def split(cls, view: torch.Tensor, block_c: int, block_m: int, splits: int) -> Tiling:
        """Cut each channel's N * S elements of ``view`` ``[N, C, S]`` into at most ``splits``
        chunks, each a multiple of ``block_m`` (none empty)."""
        elements = max(view.shape[0] * view.shape[2], 1)
        chunk = triton.cdiv(triton.cdiv(elements, max(splits, 1)), block_m) * block_m
        return cls(block_c=block_c, block_m=block_m, splits=triton.cdiv(elements, chunk), chunk=chunk)


def choose_tiling(view: torch.Tensor) -> Tiling:
    """Pick block sizes and the channel split for ``view`` ``[N, C, S]``.

    Channels-contiguous inputs (channels_last, 2-D) get wide channel blocks so each row of the
    tile is one coalesced read; otherwise a tile walks the contiguous spatial axis of one or a
    few channels. When there are fewer channel blocks than the device can run at once, each
    channel is split over several programs (a power of two, so few kernel variants compile).
    """
    batch, channels, spatial = view.shape
    elements = batch * spatial
    if view.stride(1) == 1 and channels > 1:
        block_c = min(_MAX_BLOCK_C, triton.next_power_of_2(channels))
        block_m = min(max(_TILE_ELEMENTS // block_c, 1), triton.next_power_of_2(max(elements, 1)))
    else:
        block_m = min(_TILE_ELEMENTS, triton.next_power_of_2(max(elements, 1)))
        block_c = min(max(_TILE_ELEMENTS // block_m, 1), 16, triton.next_power_of_2(channels))
    channel_blocks = triton.cdiv(channels, block_c)
    wanted = triton.cdiv(_target_programs(view.device), channel_blocks)
    splits = min(triton.next_power_of_2(wanted), triton.cdiv(max(elements, 1), block_m))
    return Tiling.split(view, block_c, block_m, splits)


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return _PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    return _INTERPRETER_PROGRAMS


@dataclass(frozen=True)
class Plan:
    """How one launcher call runs: autotuned (compiled kernels on CUDA, unless a tiling is
    forced) or with ``tiling``'s block sizes. The split count and chunk come from ``tiling``
    either way; tuned chunks are multiples of every config's BLOCK_M."""

    tiling: Tiling
    tuned: bool
    layout: str  # "contiguous" or "channels_last": which tuner

    @property
    def smallest_block_m(self) -> int:
        if not self.tuned:
            return self.tiling.block_m
        return autotune.MIN_BLOCK_M[self.layout]


def plan(view: torch.Tensor, tiling: Tiling | None) -> Plan:
    """The launch plan for ``view`` ``[N, C, S]``; ``tiling`` forces block sizes and splits."""
    layout = "channels_last" if view.stride(1) == 1 and view.shape[1] > 1 else "contiguous"
    if tiling is not None:
        return Plan(tiling, False, layout)
    heuristic = choose_tiling(view)
    if view.device.type != "cuda" or INTERPRETED:  # the interpreter cannot benchmark: one config
        return Plan(heuristic, False, layout)
    return Plan(Tiling.split(view, heuristic.block_c, autotune.MAX_BLOCK_M, heuristic.splits), True, layout)


def _launch(
    kernel: object,
    name: str,
    launch_plan: Plan,
    channels: int,
    *args: object,
    restore_running: bool = False,
    **constexprs: object,
) -> None:
    """Launch ``kernel`` (named ``name``) over ``launch_plan``'s grid: its autotuned variant for
    the layout, or the plain kernel with the plan's block sizes."""
    tiling = launch_plan.tiling
    if launch_plan.tuned:
        variant = autotune.TUNED[name + ("_update" if restore_running else "")][launch_plan.layout]
        variant[lambda meta: (triton.cdiv(channels, meta["BLOCK_C"]), tiling.splits)](*args, **constexprs)
        return
    kernel[tiling.grid(channels)](*args, BLOCK_C=tiling.block_c, BLOCK_M=tiling.block_m, **constexprs)


def _needs_int64(*views: torch.Tensor) -> bool:
    """True when an element offset of any view can exceed int32."""
    for view in views:
        span = sum((size - 1) * abs(stride) for size, stride in zip(view.shape, view.stride(), strict=True) if size > 0)
        if span > _INT32_LIMIT or view.numel() > _INT32_LIMIT:
            return True
    return False


def _strides(view: torch.Tensor | None) -> tuple[int, int, int]:
    """Strides of an optional ``[N, C, S]`` view (zeros when absent: the kernel ignores them)."""
    return (0, 0, 0) if view is None else view.stride()


def _present(*views: torch.Tensor | None) -> list[torch.Tensor]:
    return [view for view in views if view is not None]


def _spatial_vector(block_m: int, *views: torch.Tensor | None) -> int:
    """Elements per 16-byte access along the spatial axis, when every view allows it, else 1.

    Allowed when the spatial axis is the contiguous one (``stride_s == 1``) and S and the other
    strides are multiples of the run, so that no aligned run straddles two samples or channels
    (see ``kernels/indexing.tile_offsets``). 2-D inputs (S = 1) and channels_last never qualify;
    channels_last vectorizes along C instead.
    """
    present = [view for view in views if view is not None]
    vector = 16 // max(view.element_size() for view in present)
    if block_m % vector:
        return 1
    for view in present:
        _, _, spatial = view.shape
        if spatial % vector or view.stride(2) != 1 or view.stride(0) % vector or view.stride(1) % vector:
            return 1
    return vector


def _tl_dtype(dtype: torch.dtype) -> tl.dtype:
    return tl.float64 if dtype == torch.float64 else tl.float32


def partial_stats(x: torch.Tensor, tiling: Tiling | None = None) -> torch.Tensor:
    """Local per-channel statistics of ``x`` ``[N, C, S]``.

    Returns float64 ``[3, C]``: element count, sum and sum of squares per channel (exactly
    merged moments expanded in float64; see ``kernels/stats.py``). N may be 0.
    """
    batch, channels, spatial = x.shape
    elements = batch * spatial
    run = plan(x, tiling)
    splits = run.tiling.splits
    acc_dtype = accumulation_dtype(x.dtype)
    packed = torch.empty(3, channels, dtype=torch.float64, device=x.device)
    partials = packed
    if splits > 1:
        partials = torch.empty(2, splits, channels, dtype=acc_dtype, device=x.device)
    int64 = _needs_int64(x)
    _launch(
        _partial_stats_kernel, "_partial_stats_kernel", run, channels,
        x, partials, channels, spatial, elements, run.tiling.chunk, splits, *x.stride(),
        ACC_DTYPE=_tl_dtype(acc_dtype), PACKED_OUTPUT=splits == 1, INT64=int64,
        SPATIAL_VEC=_spatial_vector(run.smallest_block_m, x),
    )  # fmt: skip
    if splits > 1:
        combine_block = min(_MAX_BLOCK_C, triton.next_power_of_2(channels))
        _combine_stats_kernel[(triton.cdiv(channels, combine_block),)](
            partials, x, packed, channels, elements, run.tiling.chunk, splits, x.stride(1),
            ACC_DTYPE=_tl_dtype(acc_dtype), BLOCK_C=combine_block, INT64=int64,
        )  # fmt: skip
    return packed


def normalize(
    x: torch.Tensor,
    out: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    stats: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    num_batches_tracked: torch.Tensor | None,
    momentum: float,
    eps: float,
    residual: torch.Tensor | None = None,
    activation: int = 0,
    negative_slope: float = 0.0,
    tiling: Tiling | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Write ``out`` = ``act(weight * (x - mean) * invstd + bias [+ residual])``, all ``[N, C, S]``.

    ``activation`` is a code of ``kernels.activation.ACTIVATION_CODES`` (0: none).

    With ``stats`` (float64 ``[3, C]`` global count, sum, sum of squares) the batch statistics
    are used, and ``running_mean``/``running_var`` ``[C]``, when given, are updated in place
    with ``momentum`` (or ``1 / num_batches_tracked`` when that int64 scalar tensor is given);
    a zero global count leaves them unchanged. Without ``stats`` the running statistics are used.
    Returns ``(mean, invstd)`` ``[C]`` in the accumulation dtype, as used, for backward.
    """
    batch, channels, spatial = x.shape
    run = plan(x, tiling)
    acc_dtype = accumulation_dtype(x.dtype)
    mean = torch.empty(channels, dtype=acc_dtype, device=x.device)
    invstd = torch.empty(channels, dtype=acc_dtype, device=x.device)
    batch_stats = stats is not None
    update_running = batch_stats and running_mean is not None
    cumulative = update_running and num_batches_tracked is not None
    _launch(
        _normalize_kernel, "_normalize_kernel", run, channels,
        x, out, residual, weight, bias, stats, mean, invstd,
        running_mean, running_var, num_batches_tracked if cumulative else None,
        float(momentum), float(eps), float(negative_slope),
        channels, spatial, batch * spatial, run.tiling.chunk, *x.stride(), *out.stride(), *_strides(residual),
        restore_running=update_running,
        BATCH_STATS=batch_stats, UPDATE_RUNNING=update_running, CUMULATIVE=cumulative, ACTIVATION=activation,
        ACC_DTYPE=_tl_dtype(acc_dtype), INT64=_needs_int64(x, out, *_present(residual)),
        SPATIAL_VEC=_spatial_vector(run.smallest_block_m, x, out, residual),
    )  # fmt: skip
    return mean, invstd


def backward_reduce(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    weight_grad_dtype: torch.dtype | None,
    bias_grad_dtype: torch.dtype | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    activation: int = 0,
    negative_slope: float = 0.0,
    tiling: Tiling | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Per-channel ``sum(dy)`` and ``sum(dy * xhat)`` of ``grad_out``, ``x`` ``[N, C, S]``.

    With a fused ``activation``, ``dy`` is the gradient at the activation's input, recomputed
    from ``x``, ``mean``, ``invstd``, ``weight``, ``bias`` and ``residual`` (as in the forward).

    Returns ``(sums, grad_weight, grad_bias)``: ``sums`` is ``[2, C]`` in the accumulation
    dtype (what backward all-reduces); the local parameter grads ``[C]`` are returned in the
    given dtypes, or None where the dtype is None.
    """
    batch, channels, spatial = x.shape
    elements = batch * spatial
    run = plan(x, tiling)
    splits = run.tiling.splits
    acc_dtype = accumulation_dtype(x.dtype)
    sums = torch.empty(2, channels, dtype=acc_dtype, device=x.device)
    grad_weight = None if weight_grad_dtype is None else torch.empty(channels, dtype=weight_grad_dtype, device=x.device)
    grad_bias = None if bias_grad_dtype is None else torch.empty(channels, dtype=bias_grad_dtype, device=x.device)
    partials = sums
    if splits > 1:
        partials = torch.empty(2, splits, channels, dtype=acc_dtype, device=x.device)
    _launch(
        _backward_reduce_kernel, "_backward_reduce_kernel", run, channels,
        grad_out, x, residual if activation else None, mean, invstd,
        weight if activation else None, bias if activation else None, partials, grad_weight, grad_bias,
        channels, spatial, elements, run.tiling.chunk, splits, float(negative_slope),
        *grad_out.stride(), *x.stride(), *_strides(residual),
        ACTIVATION=activation, ACC_DTYPE=_tl_dtype(acc_dtype), FINAL_OUTPUT=splits == 1,
        INT64=_needs_int64(grad_out, x, *_present(residual)),
        SPATIAL_VEC=_spatial_vector(run.smallest_block_m, grad_out, x, residual if activation else None),
    )  # fmt: skip
    if splits > 1:
        combine_block = min(_MAX_BLOCK_C, triton.next_power_of_2(channels))
        _combine_grad_sums_kernel[(triton.cdiv(channels, combine_block),)](
            partials, invstd, sums, grad_weight, grad_bias, channels, splits,
            ACC_DTYPE=_tl_dtype(acc_dtype), BLOCK_C=combine_block,
        )  # fmt: skip
    return sums, grad_weight, grad_bias


def backward_dx(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    out: torch.Tensor | None,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    weight: torch.Tensor | None,
    sums: torch.Tensor | None,
    count: torch.Tensor | None,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    grad_residual: torch.Tensor | None = None,
    activation: int = 0,
    negative_slope: float = 0.0,
    tiling: Tiling | None = None,
) -> None:
    """Write the input gradient into ``out`` ``[N, C, S]`` (and the residual's into ``grad_residual``).

    ``out=None`` computes only ``grad_residual``.

    With ``sums`` (global ``[2, C]`` sum_dy, sum_dy_xhat) and ``count`` (float64 ``[C]`` global
    element count) the forward used batch statistics and their gradient is included;
    without them the forward used running statistics and ``dx = weight * invstd * dy``. With a
    fused ``activation``, ``dy`` is first taken back through it (recomputed from ``x``, the
    statistics, ``weight``, ``bias`` and ``residual``); that gradient is the residual's.
    ``grad_residual`` must then have the same strides as ``residual``.
    """
    batch, channels, spatial = x.shape
    run = plan(x, tiling)
    if grad_residual is not None and residual is not None and grad_residual.stride() != residual.stride():
        raise ValueError("grad_residual must have the residual's strides")
    residual_layout = residual if residual is not None else grad_residual
    _launch(
        _backward_dx_kernel, "_backward_dx_kernel", run, channels,
        grad_out, x, out, residual if activation else None, grad_residual, mean, invstd, weight,
        bias if activation else None, sums, count,
        channels, spatial, batch * spatial, run.tiling.chunk, float(negative_slope),
        *grad_out.stride(), *x.stride(), *_strides(out), *_strides(residual_layout),
        BATCH_STATS=sums is not None, ACTIVATION=activation, ACC_DTYPE=_tl_dtype(accumulation_dtype(x.dtype)),
        INT64=_needs_int64(grad_out, x, *_present(out, residual_layout)),
        SPATIAL_VEC=_spatial_vector(run.smallest_block_m, grad_out, x, out, residual_layout),
    )  # fmt: skip
