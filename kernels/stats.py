"""Forward stage 1: per-channel partial statistics of the local batch.

Output contract (what the distributed all-reduce sums): a float64 ``[3, C]`` tensor with, per
channel, the element count, the sum and the sum of squares of the local input,

    count_c = n,   sum_c = n * mean,   sumsq_c = M2 + n * mean**2,

where ``mean`` and ``M2`` (sum of squared deviations) come from a Welford/Chan merge in the
accumulation dtype (fp32, fp64 for fp64 input). Raw sums of x and x**2 are never accumulated in
fp32: each block's values are shifted by the channel's first element (the *pilot*) so block sums
stay small when |mean| >> std, each block is centred on its own mean before squaring, and blocks
are merged with Chan's formula. Only the final, exactly merged moments are expanded into sums,
in float64, where ``sumsq - sum**2 / count`` keeps a relative error near
``2**-53 * (1 + mean**2 / var)`` (< 1e-8 for |mean| / std <= 1e4).

When a channel is split over several programs (``num_splits > 1``), each program writes its
(pilot-shifted mean, M2) to a partial buffer and ``_combine_stats_kernel`` merges the splits in
index order, so results are bitwise reproducible (no atomics).
"""

import triton
import triton.language as tl

from .indexing import split_elements, tile_offsets


@triton.jit
def _store_packed_stats(out_ptr, channels, channel_mask, C, count, shifted_mean, m2, pilot):
    """Write (count, sum, sum of squares) as float64 rows of ``out_ptr[3, C]``."""
    count = count.to(tl.float64)
    mean = pilot.to(tl.float64) + shifted_mean.to(tl.float64)
    tl.store(out_ptr + channels, tl.zeros_like(mean) + count, mask=channel_mask)
    tl.store(out_ptr + C + channels, count * mean, mask=channel_mask)
    tl.store(out_ptr + 2 * C + channels, m2.to(tl.float64) + count * mean * mean, mask=channel_mask)


@triton.jit
def _load_pilot(x_ptr, channels, channel_mask, M, stride_xc, ACC_DTYPE: tl.constexpr, INT64: tl.constexpr):
    """The first local element of each channel ``[BLOCK_C]`` (0 when the local batch is empty)."""
    if INT64:
        channels = channels.to(tl.int64)
    nonempty = (M + 0 * channels) > 0  # a tensor, so that masks combine the same way everywhere
    pilot = tl.load(x_ptr + channels * stride_xc, mask=channel_mask & nonempty, other=0.0).to(ACC_DTYPE)
    # A non-finite pilot would turn every shifted value into NaN (inf - inf); shift by 0 instead,
    # so the channel's statistics are Inf or NaN exactly as torch's are.
    return tl.where(tl.abs(pilot) < float("inf"), pilot, 0.0)


@triton.jit
def _partial_stats_kernel(
    x_ptr,  # input viewed as [N, C, S], any floating dtype
    out_ptr,  # PACKED_OUTPUT: float64 [3, C] packed stats; else ACC_DTYPE [2, num_splits, C] (mean, M2)
    C,  # channels
    S,  # spatial size (product of the dims after C; 1 for 2-D input)
    M,  # elements per channel, N * S
    chunk,  # elements per channel handled by one split (a multiple of BLOCK_M)
    num_splits,  # programs per channel block along the element axis (grid axis 1)
    stride_xn,
    stride_xc,
    stride_xs,  # strides of the [N, C, S] view of x, in elements
    ACC_DTYPE: tl.constexpr,  # tl.float32, or tl.float64 for fp64 input
    PACKED_OUTPUT: tl.constexpr,  # num_splits == 1: write the final packed stats directly
    BLOCK_C: tl.constexpr,  # channels per program
    BLOCK_M: tl.constexpr,  # elements per channel per loop step
    INT64: tl.constexpr,  # widen offsets to 64 bits (tensors of 2**31 elements or more)
    SPATIAL_VEC: tl.constexpr,  # >1: aligned runs of this many spatial elements are contiguous
):
    pid_c = tl.program_id(0)
    pid_split = tl.program_id(1)
    channels = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_mask = channels < C
    pilot = _load_pilot(x_ptr, channels, channel_mask, M, stride_xc, ACC_DTYPE, INT64)

    start = pid_split * chunk
    end = tl.minimum(start + chunk, M)
    count = tl.zeros([], dtype=tl.int64)
    mean = tl.zeros([BLOCK_C], dtype=ACC_DTYPE)
    m2 = tl.zeros([BLOCK_C], dtype=ACC_DTYPE)
    for block_start in range(start, end, BLOCK_M):
        elements = block_start + tl.arange(0, BLOCK_M)
        element_mask = elements < end
        sample, spatial = split_elements(elements, S, INT64)
        offsets = tile_offsets(channels, sample, spatial, stride_xn, stride_xc, stride_xs, INT64, SPATIAL_VEC)
        mask = channel_mask[:, None] & element_mask[None, :]
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(ACC_DTYPE)
        x = tl.where(mask, x - pilot[:, None], 0.0)

        block_count = tl.minimum(end - block_start, BLOCK_M).to(tl.int64)
        block_mean = tl.sum(x, axis=1) / block_count.to(ACC_DTYPE)
        centered = tl.where(mask, x - block_mean[:, None], 0.0)
        block_m2 = tl.sum(centered * centered, axis=1)

        # Chan et al. merge of (count, mean, m2) with the block's moments.
        merged_count = count + block_count
        block_fraction = block_count.to(ACC_DTYPE) / merged_count.to(ACC_DTYPE)
        delta = block_mean - mean
        mean += delta * block_fraction
        m2 += block_m2 + delta * delta * (count.to(ACC_DTYPE) * block_fraction)
        count = merged_count

    if PACKED_OUTPUT:
        _store_packed_stats(out_ptr, channels, channel_mask, C, count, mean, m2, pilot)
    else:
        partial = pid_split * C + channels
        tl.store(out_ptr + partial, mean, mask=channel_mask)
        tl.store(out_ptr + num_splits * C + partial, m2, mask=channel_mask)


@triton.jit
def _combine_stats_kernel(
    partials_ptr,  # ACC_DTYPE [2, num_splits, C]: per split pilot-shifted mean and M2
    x_ptr,  # the input, only read for each channel's pilot element
    out_ptr,  # float64 [3, C] packed stats
    C,  # channels
    M,  # elements per channel
    chunk,  # elements per split
    num_splits,  # splits to merge
    stride_xc,  # channel stride of x
    ACC_DTYPE: tl.constexpr,
    BLOCK_C: tl.constexpr,
    INT64: tl.constexpr,
):
    channels = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_mask = channels < C
    pilot = _load_pilot(x_ptr, channels, channel_mask, M, stride_xc, ACC_DTYPE, INT64)
    count = tl.zeros([], dtype=tl.int64)
    mean = tl.zeros([BLOCK_C], dtype=ACC_DTYPE)
    m2 = tl.zeros([BLOCK_C], dtype=ACC_DTYPE)
    # A fixed merge order over the splits keeps the result bitwise reproducible.
    for split in range(num_splits):
        split_count = tl.maximum(tl.minimum(M - split * chunk, chunk), 0).to(tl.int64)
        split_mean = tl.load(partials_ptr + split * C + channels, mask=channel_mask, other=0.0)
        split_m2 = tl.load(partials_ptr + (num_splits + split) * C + channels, mask=channel_mask, other=0.0)
        merged_count = count + split_count
        split_fraction = split_count.to(ACC_DTYPE) / tl.maximum(merged_count, 1).to(ACC_DTYPE)
        delta = split_mean - mean
        mean += delta * split_fraction
        m2 += split_m2 + delta * delta * (count.to(ACC_DTYPE) * split_fraction)
        count = merged_count
    _store_packed_stats(out_ptr, channels, channel_mask, C, count, mean, m2, pilot)
