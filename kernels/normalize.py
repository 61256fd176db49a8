"""Forward stage 2: finalize per-channel statistics and apply the normalize-affine transform,
then (optionally) add a residual and apply an activation, all in one pass.

Every program finalizes mean and invstd for its channel block itself (O(BLOCK_C) work), so no
separate finalize launch is needed. The programs of split 0 also write mean/invstd for backward
and, when asked, update the running statistics on the device: momentum (or ``1 /
num_batches_tracked`` for the cumulative average) is read on the device, and a global batch of
zero elements leaves the running statistics untouched, with no host synchronization.
"""

import triton
import triton.language as tl

from .activation import apply_activation
from .indexing import load_affine, split_elements, tile_offsets


@triton.jit
def _to_element_type(value, pointer):
    """Cast float64 ``value`` to ``pointer``'s element type, through float32 below float64:
    a direct float64 -> bfloat16 conversion is not supported everywhere (Triton's interpreter
    writes zeros)."""
    if pointer.dtype.element_ty == tl.float64:
        return value
    return value.to(tl.float32).to(pointer.dtype.element_ty)


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
    running_mean_ptr,  # [C]: read when not BATCH_STATS, updated when UPDATE_RUNNING
    running_var_ptr,  # [C]: likewise; holds the unbiased variance
    num_batches_ptr,  # int64 scalar, read when CUMULATIVE (momentum = 1 / num_batches_tracked)
    momentum,  # float: exponential average factor when not CUMULATIVE
    eps,  # float
    negative_slope,  # float: leaky_relu's slope (ACTIVATION == 2)
    C,
    S,
    M,  # channels, spatial size, elements per channel
    chunk,  # elements per channel handled by one split
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
    UPDATE_RUNNING: tl.constexpr,  # update running_mean / running_var in place
    CUMULATIVE: tl.constexpr,  # momentum=None: cumulative moving average
    ACTIVATION: tl.constexpr,  # 0 identity, 1 relu, 2 leaky_relu, 3 silu (kernels/activation.py)
    ACC_DTYPE: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_M: tl.constexpr,
    INT64: tl.constexpr,  # widen offsets to 64 bits (tensors of 2**31 elements or more)
    SPATIAL_VEC: tl.constexpr,  # >1: aligned runs of this many spatial elements are contiguous
):
    pid_c = tl.program_id(0)
    pid_split = tl.program_id(1)
    channels = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_mask = channels < C

    if BATCH_STATS:
        count = tl.load(stats_ptr + channels, mask=channel_mask, other=0.0)
        total = tl.load(stats_ptr + C + channels, mask=channel_mask, other=0.0)
        total_sq = tl.load(stats_ptr + 2 * C + channels, mask=channel_mask, other=0.0)
        safe_count = tl.maximum(count, 1.0)
        mean64 = total / safe_count
        # Clamp rounding below zero, but keep NaN (Inf or NaN in the channel): tl.maximum drops it.
        m2 = total_sq - total * mean64
        m2 = tl.where(m2 < 0.0, 0.0, m2)
        var64 = m2 / safe_count
        mean = mean64.to(ACC_DTYPE)
        invstd = (1.0 / tl.sqrt(var64 + eps)).to(ACC_DTYPE)
        if UPDATE_RUNNING:
            if pid_split == 0:
                factor = tl.zeros([BLOCK_C], dtype=tl.float64)
                if CUMULATIVE:
                    factor += 1.0 / tl.load(num_batches_ptr).to(tl.float64)
                else:
                    factor += momentum
                update = channel_mask & (count > 0.0)
                old_mean = tl.load(running_mean_ptr + channels, mask=update, other=0.0).to(tl.float64)
                old_var = tl.load(running_var_ptr + channels, mask=update, other=0.0).to(tl.float64)
                unbiased_var = m2 / tl.maximum(count - 1.0, 1.0)
                new_mean = old_mean + factor * (mean64 - old_mean)
                new_var = old_var + factor * (unbiased_var - old_var)
                new_mean = _to_element_type(new_mean, running_mean_ptr)
                new_var = _to_element_type(new_var, running_var_ptr)
                tl.store(running_mean_ptr + channels, new_mean, mask=update)
                tl.store(running_var_ptr + channels, new_var, mask=update)
    else:
        mean = tl.load(running_mean_ptr + channels, mask=channel_mask, other=0.0).to(ACC_DTYPE)
        var = tl.load(running_var_ptr + channels, mask=channel_mask, other=1.0).to(ACC_DTYPE)
        invstd = 1.0 / tl.sqrt(var + eps)
    if pid_split == 0:
        tl.store(mean_ptr + channels, mean, mask=channel_mask)
        tl.store(invstd_ptr + channels, invstd, mask=channel_mask)

    weight, shift = load_affine(weight_ptr, bias_ptr, channels, channel_mask, ACC_DTYPE)
    scale = invstd * weight

    start = pid_split * chunk
    end = tl.minimum(start + chunk, M)
    for block_start in range(start, end, BLOCK_M):
        elements = block_start + tl.arange(0, BLOCK_M)
        mask = channel_mask[:, None] & (elements < end)[None, :]
        sample, spatial = split_elements(elements, S, INT64)
        x_offsets = tile_offsets(channels, sample, spatial, stride_xn, stride_xc, stride_xs, INT64, SPATIAL_VEC)
        y_offsets = tile_offsets(channels, sample, spatial, stride_yn, stride_yc, stride_ys, INT64, SPATIAL_VEC)
        x = tl.load(x_ptr + x_offsets, mask=mask, other=0.0).to(ACC_DTYPE)
        # (x - mean) first: exact for x near mean, unlike x * scale - mean * scale.
        y = (x - mean[:, None]) * scale[:, None] + shift[:, None]
        if residual_ptr is not None:
            r_offsets = tile_offsets(channels, sample, spatial, stride_rn, stride_rc, stride_rs, INT64, SPATIAL_VEC)
            y += tl.load(residual_ptr + r_offsets, mask=mask, other=0.0).to(ACC_DTYPE)
        y = apply_activation(y, negative_slope, ACTIVATION)
        tl.store(y_ptr + y_offsets, y.to(y_ptr.dtype.element_ty), mask=mask)
