"""Backward stages: per-channel gradient sums, then the input gradient.

With a fused activation, ``dy`` below stands for the gradient at the activation's input,
``dy * act'(z)`` with ``z = xhat * weight + bias (+ residual)`` recomputed from x and the saved
statistics; it is also the residual's gradient. With ``xhat = (x - mean) * invstd``:

    sum_dy      = sum(dy)            (the local grad_bias)
    sum_dy_xhat = sum(dy * xhat)     (the local grad_weight)
    dx = weight * invstd * (dy - sum_dy / n - xhat * sum_dy_xhat / n)   (batch statistics)
    dx = weight * invstd * dy                                           (running statistics)

where the sums in ``dx`` are the all-reduced global ones and ``n`` the global count. Sums over a
channel split across programs are combined by ``_combine_grad_sums_kernel`` in split order
(no atomics), so gradients are bitwise reproducible.
"""

import triton
import triton.language as tl

from .activation import activation_backward
from .indexing import load_affine, split_elements, tile_offsets


@triton.jit
def _grad_before_activation(
    dy, x, mean, invstd, weight, bias, residual_ptr, r_offsets, mask, negative_slope,
    ACTIVATION: tl.constexpr, ACC_DTYPE: tl.constexpr,
):  # fmt: skip
    """``dy * act'(z)`` for ``z = (x - mean) * invstd * weight + bias (+ residual)``, recomputed."""
    if ACTIVATION != 0:
        z = (x - mean[:, None]) * (invstd * weight)[:, None] + bias[:, None]
        if residual_ptr is not None:
            z += tl.load(residual_ptr + r_offsets, mask=mask, other=0.0).to(ACC_DTYPE)
        dy = activation_backward(z, dy, negative_slope, ACTIVATION)
    return dy


@triton.jit
def _store_grad_sums(sums_ptr, grad_weight_ptr, grad_bias_ptr, channels, channel_mask, C, sum_dy, sum_dy_xmu, invstd):
    """Write ``sums_ptr[2, C]`` = (sum_dy, sum_dy_xhat) and, where given, the parameter grads."""
    sum_dy_xhat = sum_dy_xmu * invstd
    tl.store(sums_ptr + channels, sum_dy, mask=channel_mask)
    tl.store(sums_ptr + C + channels, sum_dy_xhat, mask=channel_mask)
    if grad_weight_ptr is not None:
        tl.store(grad_weight_ptr + channels, sum_dy_xhat.to(grad_weight_ptr.dtype.element_ty), mask=channel_mask)
    if grad_bias_ptr is not None:
        tl.store(grad_bias_ptr + channels, sum_dy.to(grad_bias_ptr.dtype.element_ty), mask=channel_mask)


@triton.jit
def _backward_reduce_kernel(
    dy_ptr,  # output gradient viewed as [N, C, S]
    x_ptr,  # input viewed as [N, C, S]
    residual_ptr,  # [N, C, S] residual added before the activation, or None
    mean_ptr,  # [C] ACC_DTYPE, saved by the forward
    invstd_ptr,  # [C] ACC_DTYPE, saved by the forward
    weight_ptr,  # [C] or None; read only to recompute the activation's input
    bias_ptr,  # [C] or None; likewise
    sums_ptr,  # FINAL_OUTPUT: ACC_DTYPE [2, C] (sum_dy, sum_dy_xhat); else [2, num_splits, C] (sum_dy, sum_dy_xmu)
    grad_weight_ptr,  # [C] weight's dtype or None; written only when FINAL_OUTPUT
    grad_bias_ptr,  # [C] bias's dtype or None; written only when FINAL_OUTPUT
    C,
    S,
    M,  # channels, spatial size, elements per channel
    chunk,  # elements per channel handled by one split
    num_splits,  # programs per channel block along the element axis (grid axis 1)
    negative_slope,  # float: leaky_relu's slope
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
    FINAL_OUTPUT: tl.constexpr,  # num_splits == 1: write the final sums (and grads) directly
    BLOCK_C: tl.constexpr,
    BLOCK_M: tl.constexpr,
    INT64: tl.constexpr,  # widen offsets to 64 bits (tensors of 2**31 elements or more)
    SPATIAL_VEC: tl.constexpr,  # >1: aligned runs of this many spatial elements are contiguous
):
    pid_c = tl.program_id(0)
    pid_split = tl.program_id(1)
    channels = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_mask = channels < C
    mean = tl.load(mean_ptr + channels, mask=channel_mask, other=0.0)
    invstd = tl.load(invstd_ptr + channels, mask=channel_mask, other=0.0)
    weight, bias = load_affine(weight_ptr, bias_ptr, channels, channel_mask, ACC_DTYPE)

    start = pid_split * chunk
    end = tl.minimum(start + chunk, M)
    acc_dy = tl.zeros([BLOCK_C, BLOCK_M], dtype=ACC_DTYPE)
    acc_dy_xmu = tl.zeros([BLOCK_C, BLOCK_M], dtype=ACC_DTYPE)
    for block_start in range(start, end, BLOCK_M):
        elements = block_start + tl.arange(0, BLOCK_M)
        mask = channel_mask[:, None] & (elements < end)[None, :]
        sample, spatial = split_elements(elements, S, INT64)
        dy_offsets = tile_offsets(channels, sample, spatial, stride_dyn, stride_dyc, stride_dys, INT64, SPATIAL_VEC)
        x_offsets = tile_offsets(channels, sample, spatial, stride_xn, stride_xc, stride_xs, INT64, SPATIAL_VEC)
        dy = tl.load(dy_ptr + dy_offsets, mask=mask, other=0.0).to(ACC_DTYPE)
        x = tl.load(x_ptr + x_offsets, mask=mask, other=0.0).to(ACC_DTYPE)
        r_offsets = tile_offsets(channels, sample, spatial, stride_rn, stride_rc, stride_rs, INT64, SPATIAL_VEC)
        dy = _grad_before_activation(
            dy, x, mean, invstd, weight, bias, residual_ptr, r_offsets, mask, negative_slope, ACTIVATION, ACC_DTYPE
        )
        acc_dy += dy
        acc_dy_xmu += tl.where(mask, dy * (x - mean[:, None]), 0.0)
    sum_dy = tl.sum(acc_dy, axis=1)
    sum_dy_xmu = tl.sum(acc_dy_xmu, axis=1)

    if FINAL_OUTPUT:
        _store_grad_sums(
            sums_ptr, grad_weight_ptr, grad_bias_ptr, channels, channel_mask, C, sum_dy, sum_dy_xmu, invstd
        )
    else:
        partial = pid_split * C + channels
        tl.store(sums_ptr + partial, sum_dy, mask=channel_mask)
        tl.store(sums_ptr + num_splits * C + partial, sum_dy_xmu, mask=channel_mask)


@triton.jit
def _combine_grad_sums_kernel(
    partials_ptr,  # ACC_DTYPE [2, num_splits, C]: per split (sum_dy, sum_dy_xmu)
    invstd_ptr,  # [C] ACC_DTYPE
    sums_ptr,  # ACC_DTYPE [2, C] written: (sum_dy, sum_dy_xhat)
    grad_weight_ptr,  # [C] or None
    grad_bias_ptr,  # [C] or None
    C,
    num_splits,  # splits to add up
    ACC_DTYPE: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    channels = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_mask = channels < C
    sum_dy = tl.zeros([BLOCK_C], dtype=ACC_DTYPE)
    sum_dy_xmu = tl.zeros([BLOCK_C], dtype=ACC_DTYPE)
    for split in range(num_splits):  # fixed order: bitwise reproducible
        sum_dy += tl.load(partials_ptr + split * C + channels, mask=channel_mask, other=0.0)
        sum_dy_xmu += tl.load(partials_ptr + (num_splits + split) * C + channels, mask=channel_mask, other=0.0)
    invstd = tl.load(invstd_ptr + channels, mask=channel_mask, other=0.0)
    _store_grad_sums(sums_ptr, grad_weight_ptr, grad_bias_ptr, channels, channel_mask, C, sum_dy, sum_dy_xmu, invstd)


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
    C,
    S,
    M,
    chunk,
    negative_slope,  # float: leaky_relu's slope
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
    BLOCK_M: tl.constexpr,
    INT64: tl.constexpr,  # widen offsets to 64 bits (tensors of 2**31 elements or more)
    SPATIAL_VEC: tl.constexpr,  # >1: aligned runs of this many spatial elements are contiguous
):
    pid_c = tl.program_id(0)
    pid_split = tl.program_id(1)
    channels = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_mask = channels < C
    mean = tl.load(mean_ptr + channels, mask=channel_mask, other=0.0)
    invstd = tl.load(invstd_ptr + channels, mask=channel_mask, other=0.0)
    weight, bias = load_affine(weight_ptr, bias_ptr, channels, channel_mask, ACC_DTYPE)
    scale = invstd * weight
    if BATCH_STATS:
        count = tl.maximum(tl.load(count_ptr + channels, mask=channel_mask, other=1.0), 1.0)
        mean_dy = (tl.load(sums_ptr + channels, mask=channel_mask, other=0.0) / count).to(ACC_DTYPE)
        mean_dy_xhat = (tl.load(sums_ptr + C + channels, mask=channel_mask, other=0.0) / count).to(ACC_DTYPE)

    start = pid_split * chunk
    end = tl.minimum(start + chunk, M)
    for block_start in range(start, end, BLOCK_M):
        elements = block_start + tl.arange(0, BLOCK_M)
        mask = channel_mask[:, None] & (elements < end)[None, :]
        sample, spatial = split_elements(elements, S, INT64)
        dy_offsets = tile_offsets(channels, sample, spatial, stride_dyn, stride_dyc, stride_dys, INT64, SPATIAL_VEC)
        dy = tl.load(dy_ptr + dy_offsets, mask=mask, other=0.0).to(ACC_DTYPE)
        x_offsets = tile_offsets(channels, sample, spatial, stride_xn, stride_xc, stride_xs, INT64, SPATIAL_VEC)
        if BATCH_STATS or ACTIVATION != 0:
            x = tl.load(x_ptr + x_offsets, mask=mask, other=0.0).to(ACC_DTYPE)
        r_offsets = tile_offsets(channels, sample, spatial, stride_rn, stride_rc, stride_rs, INT64, SPATIAL_VEC)
        if ACTIVATION != 0:
            dy = _grad_before_activation(
                dy, x, mean, invstd, weight, bias, residual_ptr, r_offsets, mask, negative_slope, ACTIVATION, ACC_DTYPE
            )
        if grad_residual_ptr is not None:
            tl.store(grad_residual_ptr + r_offsets, dy.to(grad_residual_ptr.dtype.element_ty), mask=mask)
        if dx_ptr is not None:
            if BATCH_STATS:
                xhat = (x - mean[:, None]) * invstd[:, None]
                dy = dy - mean_dy[:, None] - xhat * mean_dy_xhat[:, None]
            dx = dy * scale[:, None]
            dx_offsets = tile_offsets(channels, sample, spatial, stride_dxn, stride_dxc, stride_dxs, INT64, SPATIAL_VEC)
            tl.store(dx_ptr + dx_offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)
