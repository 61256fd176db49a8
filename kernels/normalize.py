"""Forward stage 2: finalize per-channel statistics and apply the normalize-affine transform,
then (optionally) add a residual and apply an activation, all in one pass.

Every program finalizes mean and invstd for its channel block itself (O(BLOCK_C) work), so no
separate finalize launch is needed. The programs of split 0 write mean/invstd for backward and
update the running statistics of their channels; program (0, 0) bumps ``num_batches_tracked`` on
the device, so the forward needs no separate launch for it. The cumulative average
(``1 / num_batches_tracked`` after the increment) reads the counter, so in that mode program
(0, 0) alone updates every channel, then bumps it: no program reads it half-updated. Momentum
is applied in float64; a global batch of zero elements leaves the running statistics untouched, with no host
synchronization. The element loop walks the program's rectangle of the (sample, spatial) plane
like every streaming kernel (see ``indexing.py``); this kernel reduces nothing, so launchers
size its grid on their own.
"""

import triton
import triton.language as tl

from .activation import apply_activation
from .indexing import (
    advance,
    edge_start,
    edge_tile,
    float_argument,
    interior_offsets,
    lane_offsets,
    lanes,
    load_affine,
    per_channel_tile,
    run_channel_block,
    split_bounds,
    step_count,
    step_mask,
    step_pointers,
    tile_lanes,
    to_element_type,
    widen,
)


@triton.jit
def _batch_moments(stats_ptr, channels, channel_mask, C, SHARED_COUNT: tl.constexpr):
    """float64 ``(count, mean, M2, var)`` ``[BLOCK_C]`` from the packed global statistics
    (``var = M2 / count``, the biased variance that normalizes).

    ``SHARED_COUNT`` (blocks of several channels): every channel has the same count, so one
    reciprocal of channel 0's count serves them all. A float64 division is a ~40-instruction
    subroutine; two per channel held by a thread (8 channels for channels_last bf16) raised the
    normalize kernel to 111 registers, where this takes 94 (sm_90). One channel per program keeps
    the divisions (the reciprocal cost it 5 more registers there)."""
    total = tl.load(stats_ptr + C + channels, mask=channel_mask, other=0.0)
    total_sq = tl.load(stats_ptr + 2 * C + channels, mask=channel_mask, other=0.0)
    if SHARED_COUNT:
        count = tl.load(stats_ptr) + tl.zeros_like(total)
        inverse_count = 1.0 / tl.maximum(tl.load(stats_ptr), 1.0)
        mean = total * inverse_count
    else:
        count = tl.load(stats_ptr + channels, mask=channel_mask, other=0.0)
        mean = total / tl.maximum(count, 1.0)
    # Clamp rounding below zero, but keep NaN (Inf or NaN in the channel): tl.maximum drops it.
    m2 = total_sq - total * mean
    m2 = tl.where(m2 < 0.0, 0.0, m2)
    if SHARED_COUNT:
        var = m2 * inverse_count
    else:
        var = m2 / tl.maximum(count, 1.0)
    return count, mean, m2, var


@triton.jit
def _update_channels(stats_ptr, running_mean_ptr, running_var_ptr, channels, channel_mask, factor, C):
    """The momentum update of ``channels``' running statistics with the float64 ``factor``."""
    count, mean, m2, _ = _batch_moments(stats_ptr, channels, channel_mask, C, False)
    update = channel_mask & (count > 0.0)
    old_mean = tl.load(running_mean_ptr + channels, mask=update, other=0.0).to(tl.float64)
    old_var = tl.load(running_var_ptr + channels, mask=update, other=0.0).to(tl.float64)
    unbiased_var = m2 / tl.maximum(count - 1.0, 1.0)
    new_mean = to_element_type(old_mean + factor * (mean - old_mean), running_mean_ptr)
    new_var = to_element_type(old_var + factor * (unbiased_var - old_var), running_var_ptr)
    tl.store(running_mean_ptr + channels, new_mean, mask=update)
    tl.store(running_var_ptr + channels, new_var, mask=update)


@triton.jit
def _update_running_stats(
    stats_ptr, running_mean_ptr, running_var_ptr, num_batches_ptr, momentum, C, channels, channel_mask,
    CUMULATIVE: tl.constexpr,
):  # fmt: skip
    """Running statistics and ``num_batches_tracked``, without a race on the counter.

    With a fixed momentum, the split-0 program of each channel block updates its own channels
    and program (0, 0) bumps the counter. The cumulative average reads the counter, so there
    program (0, 0) alone updates every channel (``UPDATE_BLOCK`` at a time) before bumping it."""
    UPDATE_BLOCK: tl.constexpr = 1024
    first = (tl.program_id(0) == 0) & (tl.program_id(1) == 0)
    if CUMULATIVE:
        if first:
            batches = tl.load(num_batches_ptr) + 1
            factor = 1.0 / batches.to(tl.float64)
            if running_mean_ptr is not None:
                for block in range(0, tl.cdiv(C, UPDATE_BLOCK)):
                    block_channels = block * UPDATE_BLOCK + tl.arange(0, UPDATE_BLOCK)
                    _update_channels(
                        stats_ptr, running_mean_ptr, running_var_ptr, block_channels, block_channels < C, factor, C
                    )
            tl.store(num_batches_ptr, batches)
    else:
        if running_mean_ptr is not None:
            if tl.program_id(1) == 0:
                factor = tl.zeros([], dtype=tl.float64) + momentum
                _update_channels(stats_ptr, running_mean_ptr, running_var_ptr, channels, channel_mask, factor, C)
        if num_batches_ptr is not None:
            if first:
                tl.store(num_batches_ptr, tl.load(num_batches_ptr) + 1)


@triton.jit
def _normalize_kernel(
    x_ptr,  # input viewed as [N, C, S]
    y_ptr,  # output viewed as [N, C, S], x's dtype
    residual_ptr,  # [N, C, S] added before the activation, or None
    weight_ptr,  # [C] or None (affine=False)
    bias_ptr,  # [C] or None
    stats_ptr,  # BATCH_STATS: float64 [3, C] global (count, sum, sum of squares)
    mean_ptr,  # [C] ACC_DTYPE, written: the mean used (saved for backward)
    invstd_ptr,  # [C] ACC_DTYPE, written: 1 / sqrt(var + eps) used (saved for backward)
    running_mean_ptr,  # [C]: read when not BATCH_STATS; with BATCH_STATS updated in place, or None
    running_var_ptr,  # [C]: likewise; holds the unbiased variance
    num_batches_ptr,  # int64 scalar incremented (BATCH_STATS), or None
    momentum,  # float: exponential average factor when not CUMULATIVE (with momentum_low: float_argument)
    momentum_low,
    eps,  # float (with eps_low)
    eps_low,
    negative_slope,  # float: leaky_relu's slope (ACTIVATION == 2) (with negative_slope_low)
    negative_slope_low,
    C,  # channels
    N,  # samples of the view
    S,  # spatial size of the view
    chunk_n,  # samples per split (a multiple of BLOCK_N)
    chunk_s,  # spatial positions per split (a multiple of BLOCK_S)
    s_splits,  # splits along S per split along N
    stride_xn,
    stride_xc,
    stride_xs,
    stride_yn,
    stride_yc,
    stride_ys,
    stride_rn,
    stride_rc,
    stride_rs,
    BATCH_STATS: tl.constexpr,  # normalize with the batch statistics (else the running ones)
    CUMULATIVE: tl.constexpr,  # momentum=None: cumulative moving average, 1 / num_batches_tracked
    ACTIVATION: tl.constexpr,  # 0 identity, 1 relu, 2 leaky_relu, 3 silu (kernels/activation.py)
    ACC_DTYPE: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_N: tl.constexpr,  # samples per step
    BLOCK_S: tl.constexpr,  # spatial positions per step
    INT64: tl.constexpr,  # 64-bit lane offsets (tensors of 2**31 elements or more)
    VEC: tl.constexpr,  # >1: aligned runs of VEC positions are contiguous (128-bit accesses)
    CVEC: tl.constexpr,  # >1: aligned runs of CVEC channels are contiguous (channels_last, 128-bit)
    SAME_STRIDES: tl.constexpr,  # y (and residual) strided like x: one set of offsets (fewer registers)
    NUM_STAGES: tl.constexpr,  # software-pipelining depth of the loop's loads (1: none)
    RUN_CHANNELS: tl.constexpr,  # >0: channel runs (launchers.channel_run_tiling): channels per program
    channel_size,  # positions per channel (with channel runs S is the run's length, with EDGES the interior's)
    EDGES: tl.constexpr,  # the loop walks each row's aligned interior, then the edges (launchers.interior_length)
):
    if SAME_STRIDES:
        stride_yn, stride_yc, stride_ys = stride_xn, stride_xc, stride_xs
        stride_rn, stride_rc, stride_rs = stride_xn, stride_xc, stride_xs
    pid_split = tl.program_id(1)
    channels, channel_mask = run_channel_block(C, RUN_CHANNELS, BLOCK_C)
    momentum = float_argument(momentum, momentum_low, tl.float64)
    eps = float_argument(eps, eps_low, tl.float64)
    negative_slope = float_argument(negative_slope, negative_slope_low, ACC_DTYPE)

    if BATCH_STATS:
        _, mean64, _, var = _batch_moments(stats_ptr, channels, channel_mask, C, BLOCK_C > 1)
        mean = mean64.to(ACC_DTYPE)
        invstd = (1.0 / tl.sqrt(var + eps)).to(ACC_DTYPE)
        _update_running_stats(
            stats_ptr, running_mean_ptr, running_var_ptr, num_batches_ptr, momentum, C, channels, channel_mask,
            CUMULATIVE,
        )  # fmt: skip
    else:
        mean = widen(tl.load(running_mean_ptr + channels, mask=channel_mask, other=0.0), ACC_DTYPE)
        var = widen(tl.load(running_var_ptr + channels, mask=channel_mask, other=1.0), ACC_DTYPE)
        invstd = 1.0 / tl.sqrt(var + eps.to(ACC_DTYPE))
    if pid_split == 0:
        tl.store(mean_ptr + channels, mean, mask=channel_mask)
        tl.store(invstd_ptr + channels, invstd, mask=channel_mask)

    weight, shift = load_affine(weight_ptr, bias_ptr, channels, channel_mask, ACC_DTYPE)
    scale = invstd * weight

    n_lo, n_hi, s_lo, s_hi = split_bounds(N, S, chunk_n, chunk_s, s_splits)
    lane_n, lane_s, lane_s_run = lanes(BLOCK_N, BLOCK_S, VEC)
    tile_channels, tile_mask, lanes_in_run = tile_lanes(channels, channel_mask, C, channel_size, lane_s, RUN_CHANNELS)
    mean_t = per_channel_tile(mean, channel_size, BLOCK_N, BLOCK_S, RUN_CHANNELS)
    scale_t = per_channel_tile(scale, channel_size, BLOCK_N, BLOCK_S, RUN_CHANNELS)
    shift_t = per_channel_tile(shift, channel_size, BLOCK_N, BLOCK_S, RUN_CHANNELS)
    x_offsets = lane_offsets(tile_channels, lane_n, lane_s, stride_xn, stride_xc, stride_xs, INT64)
    y_offsets = lane_offsets(tile_channels, lane_n, lane_s, stride_yn, stride_yc, stride_ys, INT64)
    r_offsets = lane_offsets(tile_channels, lane_n, lane_s, stride_rn, stride_rc, stride_rs, INT64)
    if EDGES:  # (one channel per program; y and the residual strided like x)
        start = edge_start(channels, channel_size, VEC)
        x_offsets = interior_offsets(x_offsets, start, stride_xs, VEC)
        y_offsets = x_offsets
        r_offsets = x_offsets
    n0 = n_lo
    s0 = s_lo
    for _ in tl.range(0, step_count(n_lo, n_hi, s_lo, s_hi, BLOCK_N, BLOCK_S), num_stages=NUM_STAGES):
        mask = step_mask(tile_mask, lane_n, lane_s_run, n0, s0, n_hi, s_hi, BLOCK_S, VEC, CVEC, lanes_in_run)
        x = tl.load(step_pointers(x_ptr, x_offsets, n0, s0, stride_xn, stride_xs, VEC, CVEC), mask=mask, other=0.0)
        r_pointers = r_offsets  # unused without a residual
        if residual_ptr is not None:
            r_pointers = step_pointers(residual_ptr, r_offsets, n0, s0, stride_rn, stride_rs, VEC, CVEC)
        y = _transform(
            x, residual_ptr, r_pointers, mask, mean_t, scale_t, shift_t, negative_slope, ACTIVATION, ACC_DTYPE,
            VEC * CVEC > 1,
        )  # fmt: skip
        y_pointers = step_pointers(y_ptr, y_offsets, n0, s0, stride_yn, stride_ys, VEC, CVEC)
        tl.store(y_pointers, y.to(y_ptr.dtype.element_ty), mask=mask)
        n0, s0 = advance(n0, s0, s_lo, s_hi, BLOCK_N, BLOCK_S)
    if EDGES:
        if s_lo == 0:  # the split holding the rows' first positions also takes their edge elements
            EDGE_ROWS: tl.constexpr = 128 // VEC  # tiles of [EDGE_ROWS, 2 x VEC] elements
            for edge_n in range(n_lo, n_hi, EDGE_ROWS):
                offsets, mask = edge_tile(
                    edge_n, n_hi, channels, start, S, channel_size, stride_xn, stride_xc, VEC, EDGE_ROWS
                )
                x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
                r_pointers = offsets  # unused without a residual
                if residual_ptr is not None:
                    r_pointers = residual_ptr + offsets
                y = _transform(
                    x, residual_ptr, r_pointers, mask, mean_t, scale_t, shift_t, negative_slope, ACTIVATION,
                    ACC_DTYPE, False,
                )  # fmt: skip
                tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _transform(
    x, residual_ptr, r_pointers, mask, mean, scale, shift, negative_slope, ACTIVATION: tl.constexpr,
    ACC_DTYPE: tl.constexpr, PAIRED: tl.constexpr,
):  # fmt: skip
    """``act((x - mean) * scale + shift [+ residual])`` in ``ACC_DTYPE`` for one tile (``PAIRED``:
    from vector loads, see ``indexing.widen``)."""
    # (x - mean) first: exact for x near mean, unlike x * scale - mean * scale.
    y = (widen(x, ACC_DTYPE, PAIRED) - mean) * scale + shift
    if residual_ptr is not None:
        y += widen(tl.load(r_pointers, mask=mask, other=0.0), ACC_DTYPE, PAIRED)
    return apply_activation(y, negative_slope, ACTIVATION)
