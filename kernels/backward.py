"""Backward stages: per-channel gradient sums, then the input gradient.

With a fused activation, ``dy`` below stands for the gradient at the activation's input,
``dy * act'(z)`` with ``z = xhat * weight + bias (+ residual)`` recomputed from x and the saved
statistics; it is also the residual's gradient. With ``xhat = (x - mean) * invstd``:

    sum_dy      = sum(dy)            (the local grad_bias)
    sum_dy_xhat = sum(dy * xhat)     (the local grad_weight)
    dx = weight * invstd * (dy - sum_dy / n - xhat * sum_dy_xhat / n)   (batch statistics)
    dx = weight * invstd * dy                                           (running statistics)

where the sums in ``dx`` are the all-reduced global ones and ``n`` the global count.

The reduce kernel keeps per-lane sums in registers (fp32; fp64 for fp64 input) and folds them
into float64 per-channel totals once every ``FLUSH_STEPS`` steps (one cross-thread reduction per
32 steps: the issue cost of the reduction vanishes, and an fp32 lane never sums more than 32
values, which keeps the gradients at torch's accuracy whatever the tensor size). Sums over a
channel split across programs are float64 partials that the last program of the channel block
to finish adds in a fixed order (``kernels/merge.py``; no separate merge kernel), so gradients
are bitwise reproducible. The dx kernel reduces nothing;
launchers size its grid on their own.

S not a multiple of the 16-byte vector, contiguous layout: short rows (S = 49) take channel
runs (``_run_backward_reduce_kernel``; the dx kernel's ``RUN_CHANNELS``), long ones edges mode
(``EDGES``), as in ``kernels/stats.py``.
"""

import triton
import triton.language as tl

from .activation import activation_backward
from .indexing import (
    advance,
    edge_start,
    edge_tile,
    float_argument,
    fold_into,
    interior_offsets,
    lane_offsets,
    lanes,
    load_affine,
    per_channel_tile,
    run_channel_block,
    run_channel_sums,
    run_tile,
    split_bounds,
    step_count,
    step_mask,
    step_pointers,
    tile_lanes,
    to_element_type,
    widen,
)
from .merge import merge_splits

# Steps between folds of the per-lane fp32 sums into the float64 totals (see the module docstring).
FLUSH_STEPS = tl.constexpr(32)


@triton.jit
def _grad_before_activation(
    dy, x, mean, scale, bias, residual_ptr, r_pointers, mask, negative_slope,
    ACTIVATION: tl.constexpr, ACC_DTYPE: tl.constexpr, PAIRED: tl.constexpr,
):  # fmt: skip
    """``dy * act'(z)`` for ``z = (x - mean) * scale + bias (+ residual)`` (``scale = invstd *
    weight``; each broadcastable to the tile), recomputed (``PAIRED``: the residual comes from
    vector loads, see ``widen``)."""
    if ACTIVATION != 0:
        z = (x - mean) * scale + bias
        if residual_ptr is not None:
            z += widen(tl.load(r_pointers, mask=mask, other=0.0), ACC_DTYPE, PAIRED)
        dy = activation_backward(z, dy, negative_slope, ACTIVATION)
    return dy


@triton.jit
def _store_grad_sums(sums_ptr, grad_weight_ptr, grad_bias_ptr, channels, channel_mask, C, sum_dy, sum_dy_xmu, invstd):
    """Write ``sums_ptr[2, C]`` = (sum_dy, sum_dy_xhat) and, where given, the parameter grads, from
    float64 sums."""
    sum_dy_xhat = sum_dy_xmu * invstd.to(tl.float64)
    tl.store(sums_ptr + channels, to_element_type(sum_dy, sums_ptr), mask=channel_mask)
    tl.store(sums_ptr + C + channels, to_element_type(sum_dy_xhat, sums_ptr), mask=channel_mask)
    if grad_weight_ptr is not None:
        tl.store(grad_weight_ptr + channels, to_element_type(sum_dy_xhat, grad_weight_ptr), mask=channel_mask)
    if grad_bias_ptr is not None:
        tl.store(grad_bias_ptr + channels, to_element_type(sum_dy, grad_bias_ptr), mask=channel_mask)


@triton.jit
def _backward_reduce_kernel(
    dy_ptr,  # output gradient viewed as [N, C, S]
    x_ptr,  # input viewed as [N, C, S]
    residual_ptr,  # [N, C, S] residual added before the activation, or None
    mean_ptr,  # [C] ACC_DTYPE, saved by the forward
    invstd_ptr,  # [C] ACC_DTYPE, saved by the forward
    weight_ptr,  # [C] or None; read only to recompute the activation's input
    bias_ptr,  # [C] or None; likewise
    sums_ptr,  # ACC_DTYPE [2, C] written: (sum_dy, sum_dy_xhat)
    grad_weight_ptr,  # [C] weight's dtype or None
    grad_bias_ptr,  # [C] bias's dtype or None
    partials_ptr,  # num_splits > 1: float64 [2, num_splits + groups, C] (sum_dy, sum_dy_xmu) scratch; else None
    tickets_ptr,  # num_splits > 1: int32 merge tickets, zero (kernels/merge.py); else None
    C,  # channels
    N,  # samples of the view
    S,  # spatial size of the view
    chunk_n,  # samples per split (a multiple of BLOCK_N)
    chunk_s,  # spatial positions per split (a multiple of BLOCK_S)
    s_splits,  # splits along S per split along N
    num_splits,  # splits in all (grid axis 1)
    negative_slope,  # float: leaky_relu's slope (with negative_slope_low: indexing.float_argument)
    negative_slope_low,
    stride_dyn,
    stride_dyc,
    stride_dys,
    stride_xn,
    stride_xc,
    stride_xs,
    stride_rn,
    stride_rc,
    stride_rs,
    ACTIVATION: tl.constexpr,  # the forward's activation (kernels/activation.py)
    ACC_DTYPE: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_N: tl.constexpr,  # samples per step
    BLOCK_S: tl.constexpr,  # spatial positions per step
    INT64: tl.constexpr,  # 64-bit lane offsets (tensors of 2**31 elements or more)
    VEC: tl.constexpr,  # >1: aligned runs of VEC positions are contiguous (128-bit accesses)
    CVEC: tl.constexpr,  # >1: aligned runs of CVEC channels are contiguous (channels_last, 128-bit)
    SAME_STRIDES: tl.constexpr,  # dy (and residual) strided like x: one set of offsets (fewer registers)
    NUM_STAGES: tl.constexpr,  # software-pipelining depth of the inner loop's loads (1: none)
    GROUP_SPLITS: tl.constexpr,  # splits per merge group (kernels/merge.py)
    MERGE_ROWS: tl.constexpr,  # partial rows a merge step adds
    channel_size,  # positions per channel (with EDGES, S is the aligned interior's)
    EDGES: tl.constexpr,  # the loop walks each row's aligned interior, then the edges (launchers.interior_length)
    FOLD: tl.constexpr,  # lanes l and l + BLOCK_N * BLOCK_S / 2 share an accumulator (2) or not (1)
):
    if SAME_STRIDES:
        stride_dyn, stride_dyc, stride_dys = stride_xn, stride_xc, stride_xs
        stride_rn, stride_rc, stride_rs = stride_xn, stride_xc, stride_xs
    channels = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_mask = channels < C
    negative_slope = float_argument(negative_slope, negative_slope_low, ACC_DTYPE)
    mean = tl.load(mean_ptr + channels, mask=channel_mask, other=0.0)
    invstd = tl.load(invstd_ptr + channels, mask=channel_mask, other=0.0)
    weight, bias = load_affine(weight_ptr, bias_ptr, channels, channel_mask, ACC_DTYPE)

    n_lo, n_hi, s_lo, s_hi = split_bounds(N, S, chunk_n, chunk_s, s_splits)
    lane_n, lane_s, lane_s_run = lanes(BLOCK_N, BLOCK_S, VEC)
    dy_offsets = lane_offsets(channels, lane_n, lane_s, stride_dyn, stride_dyc, stride_dys, INT64)
    x_offsets = lane_offsets(channels, lane_n, lane_s, stride_xn, stride_xc, stride_xs, INT64)
    r_offsets = lane_offsets(channels, lane_n, lane_s, stride_rn, stride_rc, stride_rs, INT64)
    if EDGES:  # (one channel per program; dy and the residual strided like x)
        start = edge_start(channels, channel_size, VEC)
        x_offsets = interior_offsets(x_offsets, start, stride_xs, VEC)
        dy_offsets = x_offsets
        r_offsets = x_offsets
    steps = step_count(n_lo, n_hi, s_lo, s_hi, BLOCK_N, BLOCK_S)
    total_dy = tl.zeros([BLOCK_C], dtype=tl.float64)
    total_dy_xmu = tl.zeros([BLOCK_C], dtype=tl.float64)
    n0 = n_lo
    s0 = s_lo
    # a lane sums at most FLUSH_STEPS values between folds into the float64 totals, folded or not
    FLUSH: tl.constexpr = FLUSH_STEPS // FOLD
    for first in range(0, steps, FLUSH):
        acc_dy = tl.zeros([BLOCK_C, BLOCK_N * BLOCK_S // FOLD], dtype=ACC_DTYPE)
        acc_dy_xmu = tl.zeros([BLOCK_C, BLOCK_N * BLOCK_S // FOLD], dtype=ACC_DTYPE)
        # NUM_STAGES > 1: the loads software-pipelined (see kernels/stats.py)
        for _ in tl.range(first, tl.minimum(first + FLUSH, steps), num_stages=NUM_STAGES):
            mask = step_mask(channel_mask, lane_n, lane_s_run, n0, s0, n_hi, s_hi, BLOCK_S, VEC, CVEC)
            dy_pointers = step_pointers(dy_ptr, dy_offsets, n0, s0, stride_dyn, stride_dys, VEC, CVEC)
            x_pointers = step_pointers(x_ptr, x_offsets, n0, s0, stride_xn, stride_xs, VEC, CVEC)
            dy = widen(tl.load(dy_pointers, mask=mask, other=0.0), ACC_DTYPE, VEC * CVEC > 1)
            x = widen(tl.load(x_pointers, mask=mask, other=0.0), ACC_DTYPE, VEC * CVEC > 1)
            r_pointers = r_offsets  # unused without a residual
            if residual_ptr is not None:
                r_pointers = step_pointers(residual_ptr, r_offsets, n0, s0, stride_rn, stride_rs, VEC, CVEC)
            dy = _grad_before_activation(
                dy, x, mean[:, None], (invstd * weight)[:, None], bias[:, None], residual_ptr, r_pointers, mask,
                negative_slope, ACTIVATION, ACC_DTYPE, VEC * CVEC > 1,
            )  # fmt: skip
            # masked lanes: dy = 0, x = 0, mean finite -> 0
            acc_dy = fold_into(acc_dy, dy, FOLD)
            acc_dy_xmu = fold_into(acc_dy_xmu, dy * (x - mean[:, None]), FOLD)
            n0, s0 = advance(n0, s0, s_lo, s_hi, BLOCK_N, BLOCK_S)
        total_dy += tl.sum(acc_dy.to(tl.float64), axis=1)
        total_dy_xmu += tl.sum(acc_dy_xmu.to(tl.float64), axis=1)
    if EDGES:
        if s_lo == 0:  # the split holding the rows' first positions also takes their edge elements
            EDGE_ROWS: tl.constexpr = 128 // VEC  # tiles of [EDGE_ROWS, 2 x VEC] elements
            for edge_n in range(n_lo, n_hi, EDGE_ROWS):
                offsets, mask = edge_tile(
                    edge_n, n_hi, channels, start, S, channel_size, stride_xn, stride_xc, VEC, EDGE_ROWS
                )
                dy = widen(tl.load(dy_ptr + offsets, mask=mask, other=0.0), ACC_DTYPE)
                x = widen(tl.load(x_ptr + offsets, mask=mask, other=0.0), ACC_DTYPE)
                r_pointers = offsets  # unused without a residual
                if residual_ptr is not None:
                    r_pointers = residual_ptr + offsets
                dy = _grad_before_activation(
                    dy, x, mean[:, None], (invstd * weight)[:, None], bias[:, None], residual_ptr, r_pointers, mask,
                    negative_slope, ACTIVATION, ACC_DTYPE, False,
                )  # fmt: skip
                total_dy += tl.sum(tl.sum(dy.to(tl.float64), axis=1), axis=0)
                total_dy_xmu += tl.sum(tl.sum((dy * (x - mean[:, None])).to(tl.float64), axis=1), axis=0)

    _finish_grad_sums(
        sums_ptr, grad_weight_ptr, grad_bias_ptr, partials_ptr, tickets_ptr, channels, channel_mask, C, num_splits,
        total_dy, total_dy_xmu, invstd, BLOCK_C, GROUP_SPLITS, MERGE_ROWS,
    )  # fmt: skip


@triton.jit
def _finish_grad_sums(
    sums_ptr, grad_weight_ptr, grad_bias_ptr, partials_ptr, tickets_ptr, channels, channel_mask, C, num_splits,
    total_dy, total_dy_xmu, invstd, BLOCK_C: tl.constexpr, GROUP_SPLITS: tl.constexpr, MERGE_ROWS: tl.constexpr,
):  # fmt: skip
    """Write the gradient sums of this program's channels from its float64 totals, after
    merging them with the other splits' (``kernels/merge.py``) where the channels are split."""
    if partials_ptr is None:
        _store_grad_sums(
            sums_ptr, grad_weight_ptr, grad_bias_ptr, channels, channel_mask, C, total_dy, total_dy_xmu, invstd
        )
    else:
        done, total_dy, total_dy_xmu = merge_splits(
            partials_ptr, tickets_ptr, channels, channel_mask, C, num_splits, total_dy, total_dy_xmu,
            BLOCK_C, GROUP_SPLITS, MERGE_ROWS,
        )  # fmt: skip
        if done:
            _store_grad_sums(
                sums_ptr, grad_weight_ptr, grad_bias_ptr, channels, channel_mask, C, total_dy, total_dy_xmu, invstd
            )


@triton.jit
def _run_gradient_step(
    dy_rows, x_rows, r_rows, offsets, mask, acc_dy, acc_dy_xmu, mean, scale, bias, residual_ptr, negative_slope,
    ACTIVATION: tl.constexpr, ACC_DTYPE: tl.constexpr,
):  # fmt: skip
    """Add one tile of a channel run (``_run_backward_reduce_kernel``; ``mask``: its valid rows)
    to the per-lane sums; the coefficients are per position ``[1, BLOCK_S]``."""
    dy = widen(tl.load(dy_rows + offsets, mask=mask, other=0.0), ACC_DTYPE, True)
    x = widen(tl.load(x_rows + offsets, mask=mask, other=0.0), ACC_DTYPE, True)
    dy = _grad_before_activation(
        dy, x, mean, scale, bias, residual_ptr, r_rows + offsets, mask, negative_slope, ACTIVATION, ACC_DTYPE, True
    )
    return acc_dy + dy, acc_dy_xmu + dy * (x - mean)  # masked rows: dy = 0, x = 0, mean finite -> 0


@triton.jit
def _run_backward_reduce_kernel(
    dy_ptr,  # output gradient viewed as [N, C, S], contiguous like x
    x_ptr,  # contiguous input viewed as [N, C, S], S not a multiple of the 16-byte vector
    residual_ptr,  # [N, C, S] strided like x, or None
    mean_ptr,  # [C] ACC_DTYPE
    invstd_ptr,  # [C] ACC_DTYPE
    weight_ptr,  # [C] or None; read only to recompute the activation's input
    bias_ptr,  # [C] or None; likewise
    sums_ptr,  # ACC_DTYPE [2, C] written: (sum_dy, sum_dy_xhat)
    grad_weight_ptr,  # [C] weight's dtype or None
    grad_bias_ptr,  # [C] bias's dtype or None
    partials_ptr,  # num_splits > 1: float64 [2, num_splits + groups, C] scratch; else None
    tickets_ptr,  # num_splits > 1: int32 merge tickets, zero (kernels/merge.py); else None
    C,  # channels (a multiple of VEC)
    N,  # samples
    S,  # positions per channel
    chunk_n,  # samples per split
    num_splits,  # splits along N (grid axis 1)
    negative_slope,  # float: leaky_relu's slope (with negative_slope_low: indexing.float_argument)
    negative_slope_low,
    stride_n,  # sample stride of every view, in elements (a multiple of VEC); the channel stride is S
    ACTIVATION: tl.constexpr,  # the forward's activation (kernels/activation.py)
    ACC_DTYPE: tl.constexpr,
    BLOCK_C: tl.constexpr,  # RUN_CHANNELS rounded up to a power of two
    BLOCK_N: tl.constexpr,  # samples per step
    BLOCK_S: tl.constexpr,  # lanes along the run (a power of two >= RUN_CHANNELS x S)
    RUN_CHANNELS: tl.constexpr,  # channels per program (a multiple of VEC)
    FOLD: tl.constexpr,  # a step's rows in FOLD slices of BLOCK_N / FOLD rows, one accumulator per lane of a slice
    INT64: tl.constexpr,  # 64-bit lane offsets
    VEC: tl.constexpr,  # elements per 16-byte access
    NUM_STAGES: tl.constexpr,  # software-pipelining depth of the loop's loads (1: none)
    GROUP_SPLITS: tl.constexpr,  # splits per merge group (kernels/merge.py)
    MERGE_ROWS: tl.constexpr,  # partial rows a merge step adds
):
    """The gradient sums of a run of ``RUN_CHANNELS`` consecutive channels, walked as the
    statistics kernel's channel runs walk (``kernels/stats.py``, ``_run_stats_kernel``): 128-bit
    loads along the run, each position's channel coefficients gathered once, whole steps without
    masks, the split's last rows in one masked step. The launcher splits N so that a program takes
    at most ``FLUSH_STEPS`` whole steps (a lane sums at most ``FLUSH_STEPS x FOLD + 1`` values, as
    in ``_backward_reduce_kernel``); after the loop the lanes go to float64 per-channel totals by a
    segmented prefix sum."""
    channels, channel_mask = run_channel_block(C, RUN_CHANNELS, BLOCK_C)
    negative_slope = float_argument(negative_slope, negative_slope_low, ACC_DTYPE)
    mean = tl.load(mean_ptr + channels, mask=channel_mask, other=0.0)
    invstd = tl.load(invstd_ptr + channels, mask=channel_mask, other=0.0)
    weight, bias = load_affine(weight_ptr, bias_ptr, channels, channel_mask, ACC_DTYPE)
    n_lo = tl.program_id(1) * chunk_n
    n_hi = tl.minimum(n_lo + chunk_n, N)
    SLICE: tl.constexpr = BLOCK_N // FOLD
    start, offsets, position_channel = run_tile(C, S, stride_n, RUN_CHANNELS, BLOCK_C, BLOCK_S, SLICE, VEC, INT64)
    lane_n = tl.arange(0, SLICE)
    mean_p = tl.gather(mean, position_channel, 0)[None, :]
    scale_p = tl.gather(invstd * weight, position_channel, 0)[None, :]
    bias_p = tl.gather(bias, position_channel, 0)[None, :]
    base = tl.multiple_of(start + n_lo.to(tl.int64) * stride_n, VEC)
    row_step = BLOCK_N * stride_n.to(tl.int64)
    slice_step = SLICE * stride_n.to(tl.int64)
    r_rows = x_ptr  # unused without a residual
    if residual_ptr is not None:
        r_rows = residual_ptr + base

    acc_dy = tl.zeros([SLICE, BLOCK_S], dtype=ACC_DTYPE)
    acc_dy_xmu = tl.zeros([SLICE, BLOCK_S], dtype=ACC_DTYPE)
    whole_steps = tl.maximum(n_hi - n_lo, 0) // BLOCK_N  # at most FLUSH_STEPS (the launcher's splits)
    whole = tl.full([1, 1], 1, tl.int1)  # a whole step's mask: constant, folded away
    dy_rows = dy_ptr + base
    x_rows = x_ptr + base
    for _ in tl.range(0, whole_steps, num_stages=NUM_STAGES):
        for part in tl.static_range(FOLD):
            acc_dy, acc_dy_xmu = _run_gradient_step(
                dy_rows + part * slice_step, x_rows + part * slice_step, r_rows + part * slice_step, offsets, whole,
                acc_dy, acc_dy_xmu, mean_p, scale_p, bias_p, residual_ptr, negative_slope, ACTIVATION, ACC_DTYPE,
            )  # fmt: skip
        dy_rows += row_step
        x_rows += row_step
        r_rows += row_step
    rows_left = n_hi - n_lo - whole_steps * BLOCK_N
    for part in tl.static_range(FOLD):  # the split's last rows: a masked step, its slices that hold any
        if part * SLICE < rows_left:
            acc_dy, acc_dy_xmu = _run_gradient_step(
                dy_rows + part * slice_step, x_rows + part * slice_step, r_rows + part * slice_step, offsets,
                (lane_n + part * SLICE < rows_left)[:, None], acc_dy, acc_dy_xmu, mean_p, scale_p, bias_p,
                residual_ptr, negative_slope, ACTIVATION, ACC_DTYPE,
            )  # fmt: skip
    total_dy, total_dy_xmu = run_channel_sums(acc_dy, acc_dy_xmu, S, BLOCK_C)
    _finish_grad_sums(
        sums_ptr, grad_weight_ptr, grad_bias_ptr, partials_ptr, tickets_ptr, channels, channel_mask, C, num_splits,
        total_dy, total_dy_xmu, invstd, BLOCK_C, GROUP_SPLITS, MERGE_ROWS,
    )  # fmt: skip


@triton.jit
def _backward_dx_kernel(
    dy_ptr,  # output gradient viewed as [N, C, S]
    x_ptr,  # input viewed as [N, C, S]
    dx_ptr,  # input gradient viewed as [N, C, S], x's dtype, or None (only grad_residual wanted)
    residual_ptr,  # [N, C, S] residual added before the activation, or None
    grad_residual_ptr,  # [N, C, S] written: the residual's gradient (dy * act'(z)), or None
    mean_ptr,  # [C] ACC_DTYPE
    invstd_ptr,  # [C] ACC_DTYPE
    weight_ptr,  # [C] or None (affine=False)
    bias_ptr,  # [C] or None; read only to recompute the activation's input
    sums_ptr,  # BATCH_STATS: ACC_DTYPE [2, C] global (sum_dy, sum_dy_xhat)
    count_ptr,  # BATCH_STATS: float64 [C] global element count per channel
    C,  # channels
    N,  # samples of the view
    S,  # spatial size of the view
    chunk_n,  # samples per split (a multiple of BLOCK_N)
    chunk_s,  # spatial positions per split (a multiple of BLOCK_S)
    s_splits,  # splits along S per split along N
    negative_slope,  # float: leaky_relu's slope (with negative_slope_low: indexing.float_argument)
    negative_slope_low,
    stride_dyn,
    stride_dyc,
    stride_dys,
    stride_xn,
    stride_xc,
    stride_xs,
    stride_dxn,
    stride_dxc,
    stride_dxs,
    stride_rn,  # strides shared by residual and grad_residual
    stride_rc,
    stride_rs,
    BATCH_STATS: tl.constexpr,  # the forward normalized with batch statistics
    ACTIVATION: tl.constexpr,  # the forward's activation (kernels/activation.py)
    ACC_DTYPE: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_N: tl.constexpr,  # samples per step
    BLOCK_S: tl.constexpr,  # spatial positions per step
    INT64: tl.constexpr,  # 64-bit lane offsets (tensors of 2**31 elements or more)
    VEC: tl.constexpr,  # >1: aligned runs of VEC positions are contiguous (128-bit accesses)
    CVEC: tl.constexpr,  # >1: aligned runs of CVEC channels are contiguous (channels_last, 128-bit)
    SAME_STRIDES: tl.constexpr,  # dy, dx (and residual) strided like x: one set of offsets (fewer registers)
    NUM_STAGES: tl.constexpr,  # software-pipelining depth of the loop's loads (1: none)
    RUN_CHANNELS: tl.constexpr,  # >0: channel runs (launchers.channel_run_tiling): channels per program
    channel_size,  # positions per channel (with channel runs S is the run's length, with EDGES the interior's)
    EDGES: tl.constexpr,  # the loop walks each row's aligned interior, then the edges (launchers.interior_length)
):
    if SAME_STRIDES:
        stride_dyn, stride_dyc, stride_dys = stride_xn, stride_xc, stride_xs
        stride_dxn, stride_dxc, stride_dxs = stride_xn, stride_xc, stride_xs
        stride_rn, stride_rc, stride_rs = stride_xn, stride_xc, stride_xs
    channels, channel_mask = run_channel_block(C, RUN_CHANNELS, BLOCK_C)
    negative_slope = float_argument(negative_slope, negative_slope_low, ACC_DTYPE)
    mean = tl.load(mean_ptr + channels, mask=channel_mask, other=0.0)
    invstd = tl.load(invstd_ptr + channels, mask=channel_mask, other=0.0)
    weight, bias = load_affine(weight_ptr, bias_ptr, channels, channel_mask, ACC_DTYPE)
    scale = invstd * weight
    if BATCH_STATS:
        count = tl.maximum(tl.load(count_ptr + channels, mask=channel_mask, other=1.0), 1.0)
        mean_dy = (tl.load(sums_ptr + channels, mask=channel_mask, other=0.0) / count).to(ACC_DTYPE)
        mean_dy_xhat = (tl.load(sums_ptr + C + channels, mask=channel_mask, other=0.0) / count).to(ACC_DTYPE)
    else:
        mean_dy = tl.zeros_like(mean)
        mean_dy_xhat = tl.zeros_like(mean)

    n_lo, n_hi, s_lo, s_hi = split_bounds(N, S, chunk_n, chunk_s, s_splits)
    lane_n, lane_s, lane_s_run = lanes(BLOCK_N, BLOCK_S, VEC)
    tile_channels, tile_mask, lanes_in_run = tile_lanes(channels, channel_mask, C, channel_size, lane_s, RUN_CHANNELS)
    mean_t = per_channel_tile(mean, channel_size, BLOCK_N, BLOCK_S, RUN_CHANNELS)
    invstd_t = per_channel_tile(invstd, channel_size, BLOCK_N, BLOCK_S, RUN_CHANNELS)
    scale_t = per_channel_tile(scale, channel_size, BLOCK_N, BLOCK_S, RUN_CHANNELS)
    bias_t = per_channel_tile(bias, channel_size, BLOCK_N, BLOCK_S, RUN_CHANNELS)
    mean_dy_t = per_channel_tile(mean_dy, channel_size, BLOCK_N, BLOCK_S, RUN_CHANNELS)
    mean_dy_xhat_t = per_channel_tile(mean_dy_xhat, channel_size, BLOCK_N, BLOCK_S, RUN_CHANNELS)
    dy_offsets = lane_offsets(tile_channels, lane_n, lane_s, stride_dyn, stride_dyc, stride_dys, INT64)
    x_offsets = lane_offsets(tile_channels, lane_n, lane_s, stride_xn, stride_xc, stride_xs, INT64)
    dx_offsets = lane_offsets(tile_channels, lane_n, lane_s, stride_dxn, stride_dxc, stride_dxs, INT64)
    r_offsets = lane_offsets(tile_channels, lane_n, lane_s, stride_rn, stride_rc, stride_rs, INT64)
    if EDGES:  # (one channel per program; every view strided like x)
        start = edge_start(channels, channel_size, VEC)
        x_offsets = interior_offsets(x_offsets, start, stride_xs, VEC)
        dy_offsets = x_offsets
        dx_offsets = x_offsets
        r_offsets = x_offsets
    n0 = n_lo
    s0 = s_lo
    for _ in tl.range(0, step_count(n_lo, n_hi, s_lo, s_hi, BLOCK_N, BLOCK_S), num_stages=NUM_STAGES):
        mask = step_mask(tile_mask, lane_n, lane_s_run, n0, s0, n_hi, s_hi, BLOCK_S, VEC, CVEC, lanes_in_run)
        x_pointers = step_pointers(x_ptr, x_offsets, n0, s0, stride_xn, stride_xs, VEC, CVEC)
        r_pointers = r_offsets  # unused without a residual
        if residual_ptr is not None:
            r_pointers = step_pointers(residual_ptr, r_offsets, n0, s0, stride_rn, stride_rs, VEC, CVEC)
        dy, dx = _input_gradient(
            step_pointers(dy_ptr, dy_offsets, n0, s0, stride_dyn, stride_dys, VEC, CVEC), x_pointers, residual_ptr,
            r_pointers, mask, mean_t, invstd_t, scale_t, bias_t, mean_dy_t, mean_dy_xhat_t, negative_slope,
            BATCH_STATS, ACTIVATION, ACC_DTYPE, VEC * CVEC > 1,
        )  # fmt: skip
        if grad_residual_ptr is not None:
            gr_pointers = step_pointers(grad_residual_ptr, r_offsets, n0, s0, stride_rn, stride_rs, VEC, CVEC)
            tl.store(gr_pointers, dy.to(grad_residual_ptr.dtype.element_ty), mask=mask)
        if dx_ptr is not None:
            dx_pointers = step_pointers(dx_ptr, dx_offsets, n0, s0, stride_dxn, stride_dxs, VEC, CVEC)
            tl.store(dx_pointers, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        n0, s0 = advance(n0, s0, s_lo, s_hi, BLOCK_N, BLOCK_S)
    if EDGES:
        if s_lo == 0:  # the split holding the rows' first positions also takes their edge elements
            EDGE_ROWS: tl.constexpr = 128 // VEC  # tiles of [EDGE_ROWS, 2 x VEC] elements
            for edge_n in range(n_lo, n_hi, EDGE_ROWS):
                offsets, mask = edge_tile(
                    edge_n, n_hi, channels, start, S, channel_size, stride_xn, stride_xc, VEC, EDGE_ROWS
                )
                r_pointers = offsets  # unused without a residual
                if residual_ptr is not None:
                    r_pointers = residual_ptr + offsets
                dy, dx = _input_gradient(
                    dy_ptr + offsets, x_ptr + offsets, residual_ptr, r_pointers, mask, mean_t, invstd_t, scale_t,
                    bias_t, mean_dy_t, mean_dy_xhat_t, negative_slope, BATCH_STATS, ACTIVATION, ACC_DTYPE, False,
                )  # fmt: skip
                if grad_residual_ptr is not None:
                    tl.store(grad_residual_ptr + offsets, dy.to(grad_residual_ptr.dtype.element_ty), mask=mask)
                if dx_ptr is not None:
                    tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _input_gradient(
    dy_pointers, x_pointers, residual_ptr, r_pointers, mask, mean, invstd, scale, bias, mean_dy, mean_dy_xhat,
    negative_slope, BATCH_STATS: tl.constexpr, ACTIVATION: tl.constexpr, ACC_DTYPE: tl.constexpr,
    PAIRED: tl.constexpr,
):  # fmt: skip
    """``(dy before the activation, dx)`` of one tile in ``ACC_DTYPE`` (the coefficients broadcast
    to it; ``PAIRED``: from vector loads, see ``indexing.widen``). x is read only where needed."""
    dy = widen(tl.load(dy_pointers, mask=mask, other=0.0), ACC_DTYPE, PAIRED)
    x = dy  # unused unless read below
    if BATCH_STATS or ACTIVATION != 0:
        x = widen(tl.load(x_pointers, mask=mask, other=0.0), ACC_DTYPE, PAIRED)
    if ACTIVATION != 0:
        dy = _grad_before_activation(
            dy, x, mean, scale, bias, residual_ptr, r_pointers, mask, negative_slope, ACTIVATION, ACC_DTYPE, PAIRED
        )
    grad = dy
    if BATCH_STATS:
        xhat = (x - mean) * invstd
        grad = dy - mean_dy - xhat * mean_dy_xhat
    return dy, grad * scale
