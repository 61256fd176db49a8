"""Forward stage 1: per-channel partial statistics of the local batch.

Output contract (what the distributed all-reduce sums): a float64 ``[3, C]`` tensor with, per
channel, the element count, the sum and the sum of squares of the local input,

    count_c = n,   sum_c = n * mean,   sumsq_c = M2 + n * mean**2.

Accumulation: every value is shifted by its channel's first element, the *pilot* ``p`` (so sums
stay small when |mean| >> std), and each lane of the ``[BLOCK_C, BLOCK_M]`` tile keeps its own
running ``sum(x - p)`` and ``sum((x - p)**2)`` in registers (fp32; fp64 for fp64 input): one
subtract, one add and one fused multiply-add per element, no reduction across threads inside
the loop. After the loop the lanes are reduced once, in float64, and the moments

    mean = p + S1 / n,   M2 = S2 - S1**2 / n      (S1, S2: the shifted sums)

are formed in float64. With a pilot drawn from the data, |mean - p| is a few standard
deviations, so S2 - S1**2 / n loses only a few bits; the mean keeps torch's accuracy on
ordinary data and the variance stays exact to ~1e-6 relative even for |mean| / std = 1e4.

The loop has no masks and no per-element selects. Where a step reaches past its rectangle (or
past C), those lanes read their *parking* element instead (``indexing.parking_offsets``:
sample 0 of the channel, at the lane's position within its 128-bit run), and every lane is
shifted by the element it parks on, so a parked read adds exactly zero. channels_last (and the
contiguous layout with scalar accesses) parks every lane on the pilot itself; 128-bit runs
along S give each of a run's VEC positions its own shift, moved to the channel's pilot after the
loop, in float64 (d = lane shift - pilot, exact; n = the elements the lane added):

    sum(x - p) = S1' + n d,   sum((x - p)**2) = S2' + d (2 S1' + n d).

Where N and S are whole steps (``WHOLE_N``/``WHOLE_S``) nothing is parked and every lane takes
the pilot. Where only S is not (``TAIL_LOOP``, chosen for 16-bit inputs, whose loop is
issue-bound), a split's whole columns are walked in a loop with no select and its partial last
column in a loop of its own, the only one that parks. 16-bit inputs take steps of 128 bytes per
thread with two lanes per accumulator (``FOLD``): as many registers, the loop's fixed work spread
over twice the bytes.

Splits of a channel (``num_splits > 1``) share the pilot, so their shifted sums simply add:
each stores float64 ``(S1, S2)`` partials and the last program of the channel block to
finish adds them in a fixed order and writes the packed statistics (``kernels/merge.py``): no
separate merge kernel, bitwise reproducible.

S not a multiple of the 16-byte vector, contiguous layout: short rows (S = 49) are read as runs
of whole channels by ``_run_stats_kernel``; long ones (S = 9409) by this kernel in edges mode
(``EDGES``: each row's aligned interior in the loop, the few elements around it after).
"""

import triton
import triton.language as tl

from .indexing import (
    advance,
    edge_start,
    edge_tile,
    fold_into,
    interior_offsets,
    lane_offsets,
    lanes,
    parking_offsets,
    per_lane,
    position_visits,
    run_channel_block,
    run_channel_sums,
    run_tile,
    split_bounds,
    step_count,
    step_lanes_valid,
    step_pointers,
    tile_pointers,
    widen,
)
from .merge import merge_splits


@triton.jit
def _load_pilot(x_ptr, channels, channel_mask, N, S, stride_xc, ACC_DTYPE: tl.constexpr, INT64: tl.constexpr):
    """The first local element of each channel ``[BLOCK_C]`` (0 when the local batch is empty)."""
    if INT64:
        channels = channels.to(tl.int64)
    nonempty = (N * S + 0 * channels) > 0  # a tensor, so that masks combine the same way everywhere
    pilot = tl.load(x_ptr + channels * stride_xc, mask=channel_mask & nonempty, other=0.0).to(ACC_DTYPE)
    # A non-finite pilot would turn every shifted value into NaN (inf - inf); shift by 0 instead,
    # so the channel's statistics are Inf or NaN exactly as torch's are.
    return tl.where(tl.abs(pilot) < float("inf"), pilot, 0.0)


@triton.jit
def _store_packed_stats(out_ptr, channels, channel_mask, C, count, shifted_sum, shifted_sumsq, pilot):
    """Write (count, sum, sum of squares) as float64 rows of ``out_ptr[3, C]`` from float64
    shifted sums of ``count`` values."""
    safe_count = tl.maximum(count, 1.0)
    shifted_mean = shifted_sum / safe_count
    m2 = shifted_sumsq - shifted_sum * shifted_mean
    m2 = tl.where(m2 < 0.0, 0.0, m2)  # rounding only; NaN (non-finite input) stays NaN
    mean = pilot.to(tl.float64) + shifted_mean
    tl.store(out_ptr + channels, count, mask=channel_mask)
    tl.store(out_ptr + C + channels, count * mean, mask=channel_mask)
    tl.store(out_ptr + 2 * C + channels, m2 + count * mean * mean, mask=channel_mask)


@triton.jit
def _park(pointers, parked, valid, VEC: tl.constexpr, CVEC: tl.constexpr):
    """A step's ``pointers`` ``[BLOCK_C, BLOCK_M]``, those of lanes outside the rectangle
    (``valid`` ``[BLOCK_M]`` false) moved to their parking elements ``parked``."""
    pointers = tl.where(valid[None, :], pointers, parked)
    if VEC > 1:  # (hints as for the parked pointers: Triton does not see runs through the select)
        pointers = tl.max_contiguous(tl.multiple_of(pointers, [1, 16]), [1, VEC])
    if CVEC > 1:
        pointers = tl.max_contiguous(tl.multiple_of(pointers, [16, 1]), [CVEC, 1])
    return pointers


@triton.jit
def _add_shifted(x, lane_pilot, acc_sum, acc_sumsq, ACC_DTYPE: tl.constexpr, FOLD: tl.constexpr, PAIRED: tl.constexpr):
    """A step's elements ``x`` ``[BLOCK_C, BLOCK_M]`` (``PAIRED``: from vector loads), shifted by
    their lanes' pilots, added to the per-lane sums and sums of squares ``[BLOCK_C, BLOCK_M / FOLD]``."""
    shifted = widen(x, ACC_DTYPE, PAIRED) - lane_pilot
    return fold_into(acc_sum, shifted, FOLD), fold_into(acc_sumsq, shifted * shifted, FOLD)


@triton.jit
def _partial_stats_kernel(
    x_ptr,  # input viewed as [N, C, S], any floating dtype
    out_ptr,  # float64 [3, C] packed stats (count, sum, sum of squares)
    partials_ptr,  # num_splits > 1: float64 [2, num_splits + groups, C] (S1, S2) scratch; else None
    tickets_ptr,  # num_splits > 1: int32 merge tickets, zero (kernels/merge.py); else None
    C,  # channels
    N,  # samples (rows) of the view
    S,  # spatial size (1 for 2-D input and for collapsed channels_last views)
    chunk_n,  # samples per split (a multiple of BLOCK_N)
    chunk_s,  # spatial positions per split (a multiple of BLOCK_S)
    s_splits,  # splits along S per split along N
    num_splits,  # splits in all (grid axis 1)
    stride_xn,
    stride_xc,
    stride_xs,  # strides of the [N, C, S] view of x, in elements
    ACC_DTYPE: tl.constexpr,  # tl.float32, or tl.float64 for fp64 input
    BLOCK_C: tl.constexpr,  # channels per program
    BLOCK_N: tl.constexpr,  # samples per step
    BLOCK_S: tl.constexpr,  # spatial positions per step
    INT64: tl.constexpr,  # 64-bit lane offsets (tensors of 2**31 elements or more)
    VEC: tl.constexpr,  # >1: aligned runs of VEC positions are contiguous (128-bit accesses)
    CVEC: tl.constexpr,  # >1: aligned runs of CVEC channels are contiguous (channels_last, 128-bit)
    NUM_STAGES: tl.constexpr,  # software-pipelining depth of the loop's loads (1: none)
    WHOLE_N: tl.constexpr,  # every step lies inside its split along N (N a multiple of BLOCK_N)
    WHOLE_S: tl.constexpr,  # ... and along S (S a multiple of BLOCK_S)
    FOLD: tl.constexpr,  # lanes l and l + BLOCK_M / 2 share an accumulator (2) or not (1)
    ROWS_ONLY: tl.constexpr,  # S = 1 (collapsed channels_last, 2-D): steps advance along N only
    GROUP_SPLITS: tl.constexpr,  # splits per merge group (kernels/merge.py)
    MERGE_ROWS: tl.constexpr,  # partial rows a merge step adds
    channel_size,  # positions per channel (with EDGES, S is the aligned interior's)
    EDGES: tl.constexpr,  # the loop walks each row's aligned interior, then the edges (launchers.interior_length)
    TAIL_LOOP: tl.constexpr = False,  # a split's partial last column in a loop of its own (N whole, S not)
):
    channels = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_mask = channels < C
    pilot = _load_pilot(x_ptr, channels, channel_mask, N, S, stride_xc, ACC_DTYPE, INT64)
    n_lo, n_hi, s_lo, s_hi = split_bounds(N, S, chunk_n, chunk_s, s_splits)
    lane_n, lane_s, lane_s_run = lanes(BLOCK_N, BLOCK_S, VEC)
    # Channels past C (a partial last block) read channel c mod C, unmasked: their sums are dropped.
    offsets = lane_offsets(channels % C, lane_n, lane_s, stride_xn, stride_xc, stride_xs, INT64)
    # Parked lanes (see the module docstring): lanes outside the rectangle (and channels past C)
    # read an element they are shifted by.
    parking = parking_offsets(channels, C, stride_xc, stride_xs, INT64, VEC)
    if EDGES:  # (one channel per program) every row read from its aligned interior, parked there too
        start = edge_start(channels, channel_size, VEC)
        offsets = interior_offsets(offsets, start, stride_xs, VEC)
        parking += start[:, None] * stride_xs
    parked = x_ptr + per_lane(parking, BLOCK_N * BLOCK_S)
    if VEC > 1:  # (a pointer's divisibility is in bytes: every 128-bit run is 16-byte aligned)
        parked = tl.max_contiguous(tl.multiple_of(parked, [1, 16]), [1, VEC])
    if CVEC > 1:
        parked = tl.max_contiguous(tl.multiple_of(parked, [16, 1]), [CVEC, 1])
    PARKED: tl.constexpr = not (WHOLE_N and (WHOLE_S or BLOCK_S == 1))  # else every step is whole
    OWN_SHIFTS: tl.constexpr = PARKED and VEC > 1
    if not OWN_SHIFTS:  # every lane parks on sample 0, position 0 (the channel's pilot), or none does
        lane_pilot = pilot[:, None]
    else:
        nonempty = (N * S + 0 * parking) > 0
        run_pilot = tl.load(x_ptr + parking, mask=nonempty, other=0.0).to(ACC_DTYPE)
        run_pilot = tl.where(tl.abs(run_pilot) < float("inf"), run_pilot, 0.0)  # as _load_pilot
        lane_pilot = per_lane(run_pilot, BLOCK_N * BLOCK_S)

    # Per-lane shifted sums: no cross-thread reduction inside the loop.
    acc_sum = tl.zeros([BLOCK_C, BLOCK_N * BLOCK_S // FOLD], dtype=ACC_DTYPE)
    acc_sumsq = tl.zeros([BLOCK_C, BLOCK_N * BLOCK_S // FOLD], dtype=ACC_DTYPE)
    n0 = n_lo
    s0 = s_lo
    rows = x_ptr + n_lo.to(tl.int64) * stride_xn  # rows-only walks (S = 1) carry their step base
    # TAIL_LOOP, where N is whole and S is not (the only partial steps are the split's last
    # column): the whole columns first, in a loop with no select, then that column in its own.
    TAIL: tl.constexpr = TAIL_LOOP and PARKED and WHOLE_N and BLOCK_S > 1
    PAIRED: tl.constexpr = VEC * CVEC > 1
    s_whole = s_hi
    if TAIL:
        s_whole = s_lo + (s_hi - s_lo) // BLOCK_S * BLOCK_S
    # NUM_STAGES > 1: Triton software-pipelines the loads (cp.async into shared memory, NUM_STAGES - 1
    # steps ahead), so a warp keeps several steps' bytes in flight instead of one.
    for _ in tl.range(0, step_count(n_lo, n_hi, s_lo, s_whole, BLOCK_N, BLOCK_S), num_stages=NUM_STAGES):
        if ROWS_ONLY:
            pointers = tile_pointers(rows, offsets, VEC, CVEC)
            rows += BLOCK_N * stride_xn.to(tl.int64)
        else:
            pointers = step_pointers(x_ptr, offsets, n0, s0, stride_xn, stride_xs, VEC, CVEC)
        if PARKED and not TAIL:
            valid = step_lanes_valid(lane_n, lane_s_run, n0, s0, n_hi, s_hi, BLOCK_S, VEC, WHOLE_N, WHOLE_S)
            pointers = _park(pointers, parked, valid, VEC, CVEC)
        x = tl.load(pointers)
        acc_sum, acc_sumsq = _add_shifted(x, lane_pilot, acc_sum, acc_sumsq, ACC_DTYPE, FOLD, PAIRED)
        n0, s0 = advance(n0, s0, s_lo, s_whole, BLOCK_N, BLOCK_S)
    if TAIL:  # the last column (none where the split's S is whole): lanes past s_hi park
        n0 = n_lo
        for _ in tl.range(0, step_count(n_lo, n_hi, s_whole, s_hi, BLOCK_N, BLOCK_S), num_stages=NUM_STAGES):
            pointers = step_pointers(x_ptr, offsets, n0, s_whole, stride_xn, stride_xs, VEC, CVEC)
            valid = step_lanes_valid(lane_n, lane_s_run, n0, s_whole, n_hi, s_hi, BLOCK_S, VEC, WHOLE_N, WHOLE_S)
            pointers = _park(pointers, parked, valid, VEC, CVEC)
            x = tl.load(pointers)
            acc_sum, acc_sumsq = _add_shifted(x, lane_pilot, acc_sum, acc_sumsq, ACC_DTYPE, FOLD, PAIRED)
            n0 += BLOCK_N

    # Every channel's local count is N x S, split or not (written so that N or S specialized to the
    # constant 1 by Triton's JIT still works: batch 1 per rank splits along S).
    count = (tl.zeros([BLOCK_C], dtype=tl.float64) + N) * channel_size
    # The one reduction, in float64 (lanes with their own shift: moved to the pilot first).
    if not OWN_SHIFTS:
        shifted_sum = tl.sum(acc_sum.to(tl.float64), axis=1)
        shifted_sumsq = tl.sum(acc_sumsq.to(tl.float64), axis=1)
    else:
        # The lanes of one position share a shift: their rows are summed first ([BLOCK_C, BLOCK_S];
        # a position's lanes visit n_hi - n_lo rows between them), then moved to the pilot.
        # (Summing by VEC position through a [BLOCK_C, RUNS, VEC] reshape took Triton 3.6 30-100 s
        # and 20-29 thousand PTX lines to compile.)
        ROWS: tl.constexpr = BLOCK_N // FOLD
        position_sum = tl.sum(tl.reshape(acc_sum.to(tl.float64), [BLOCK_C, ROWS, BLOCK_S]), axis=1)
        position_sumsq = tl.sum(tl.reshape(acc_sumsq.to(tl.float64), [BLOCK_C, ROWS, BLOCK_S]), axis=1)
        visits = (position_visits(s_lo, s_hi, BLOCK_S) * (n_hi - n_lo)).to(tl.float64)[None, :]
        shift = per_lane(run_pilot, BLOCK_S).to(tl.float64) - pilot.to(tl.float64)[:, None]
        shifted_sum = tl.sum(position_sum + visits * shift, axis=1)
        shifted_sumsq = tl.sum(position_sumsq + shift * (2.0 * position_sum + visits * shift), axis=1)
    if EDGES:
        if s_lo == 0:  # the split holding the rows' first positions also takes their edge elements
            EDGE_ROWS: tl.constexpr = 128 // VEC  # tiles of [EDGE_ROWS, 2 x VEC] elements
            for edge_n in range(n_lo, n_hi, EDGE_ROWS):
                edge_offsets, mask = edge_tile(
                    edge_n, n_hi, channels, start, S, channel_size, stride_xn, stride_xc, VEC, EDGE_ROWS
                )
                x = tl.load(x_ptr + edge_offsets, mask=mask, other=0.0)
                shifted = tl.where(mask, widen(x, ACC_DTYPE) - pilot[:, None], 0.0).to(tl.float64)
                shifted_sum += tl.sum(tl.sum(shifted, axis=1), axis=0)
                shifted_sumsq += tl.sum(tl.sum(shifted * shifted, axis=1), axis=0)
    _finish(
        out_ptr, partials_ptr, tickets_ptr, channels, channel_mask, C, num_splits, count, shifted_sum, shifted_sumsq,
        pilot, BLOCK_C, GROUP_SPLITS, MERGE_ROWS,
    )  # fmt: skip


@triton.jit
def _finish(
    out_ptr, partials_ptr, tickets_ptr, channels, channel_mask, C, num_splits, count, shifted_sum, shifted_sumsq,
    pilot, BLOCK_C: tl.constexpr, GROUP_SPLITS: tl.constexpr, MERGE_ROWS: tl.constexpr,
):  # fmt: skip
    """Write the packed statistics of this program's channels from its float64 shifted sums,
    after merging them with the other splits' (``kernels/merge.py``) where the channels are split."""
    if partials_ptr is None:
        _store_packed_stats(out_ptr, channels, channel_mask, C, count, shifted_sum, shifted_sumsq, pilot)
    else:  # the count needs no merging: only the shifted sums
        done, shifted_sum, shifted_sumsq = merge_splits(
            partials_ptr, tickets_ptr, channels, channel_mask, C, num_splits, shifted_sum, shifted_sumsq,
            BLOCK_C, GROUP_SPLITS, MERGE_ROWS,
        )  # fmt: skip
        if done:
            _store_packed_stats(out_ptr, channels, channel_mask, C, count, shifted_sum, shifted_sumsq, pilot)


@triton.jit
def _run_statistics_step(rows, offsets, mask, acc_sum, acc_sumsq, pilot, ACC_DTYPE: tl.constexpr):
    """Add one tile of a channel run (``_run_stats_kernel``; ``mask``: its valid rows), shifted by
    each position's pilot ``[1, BLOCK_S]``, to the per-lane sums; masked lanes add zero."""
    x = tl.load(rows + offsets, mask=mask, other=0.0)
    shifted = tl.where(mask, widen(x, ACC_DTYPE, True) - pilot, 0.0)
    return acc_sum + shifted, acc_sumsq + shifted * shifted


@triton.jit
def _run_stats_kernel(
    x_ptr,  # contiguous input viewed as [N, C, S], S not a multiple of the 16-byte vector
    out_ptr,  # float64 [3, C] packed stats (count, sum, sum of squares)
    partials_ptr,  # num_splits > 1: float64 [2, num_splits + groups, C] (S1, S2) scratch; else None
    tickets_ptr,  # num_splits > 1: int32 merge tickets, zero (kernels/merge.py); else None
    C,  # channels (a multiple of VEC)
    N,  # samples
    S,  # positions per channel
    chunk_n,  # samples per split (any: the split's last rows take one masked step)
    num_splits,  # splits along N (grid axis 1)
    stride_xn,  # sample stride, in elements (a multiple of VEC); the channel stride is S
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
    """The statistics of a run of ``RUN_CHANNELS`` consecutive channels (channel runs, see
    ``launchers.channel_run_tiling``): for S odd no (sample, channel) row splits into aligned
    16-byte pieces, but a run's rows of one sample are one contiguous, aligned stretch of
    ``RUN_CHANNELS x S`` elements. Each step reads ``BLOCK_N`` samples of it with 128-bit loads;
    lane ``p`` of a row stays in channel ``p // S`` for the whole walk and is shifted by that
    channel's pilot (gathered once). Lanes past the run read the run's first vector and are left
    out at the end. Whole steps carry no mask; the one partial step (rows past the split) masks
    its rows. After the loop, the lanes' sums go to float64 per position, then to channels by a
    segmented prefix sum (``indexing.run_channel_sums``)."""
    channels, channel_mask = run_channel_block(C, RUN_CHANNELS, BLOCK_C)
    pilot = _load_pilot(x_ptr, channels, channel_mask, N, S, S, ACC_DTYPE, INT64)
    n_lo = tl.program_id(1) * chunk_n
    n_hi = tl.minimum(n_lo + chunk_n, N)
    SLICE: tl.constexpr = BLOCK_N // FOLD
    start, offsets, position_channel = run_tile(C, S, stride_xn, RUN_CHANNELS, BLOCK_C, BLOCK_S, SLICE, VEC, INT64)
    lane_n = tl.arange(0, SLICE)
    position_pilot = tl.gather(pilot, position_channel, 0)[None, :]
    rows = x_ptr + tl.multiple_of(start + n_lo.to(tl.int64) * stride_xn, VEC)
    row_step = BLOCK_N * stride_xn.to(tl.int64)
    slice_step = SLICE * stride_xn.to(tl.int64)

    acc_sum = tl.zeros([SLICE, BLOCK_S], dtype=ACC_DTYPE)
    acc_sumsq = tl.zeros([SLICE, BLOCK_S], dtype=ACC_DTYPE)
    whole_steps = tl.maximum(n_hi - n_lo, 0) // BLOCK_N
    whole = tl.full([1, 1], 1, tl.int1)  # a whole step's mask: constant, folded away
    for _ in tl.range(0, whole_steps, num_stages=NUM_STAGES):
        for part in tl.static_range(FOLD):
            acc_sum, acc_sumsq = _run_statistics_step(
                rows + part * slice_step, offsets, whole, acc_sum, acc_sumsq, position_pilot, ACC_DTYPE
            )
        rows += row_step
    rows_left = n_hi - n_lo - whole_steps * BLOCK_N
    for part in tl.static_range(FOLD):  # the split's last rows: a masked step, its slices that hold any
        if part * SLICE < rows_left:
            acc_sum, acc_sumsq = _run_statistics_step(
                rows + part * slice_step, offsets, (lane_n + part * SLICE < rows_left)[:, None], acc_sum,
                acc_sumsq, position_pilot, ACC_DTYPE,
            )  # fmt: skip

    shifted_sum, shifted_sumsq = run_channel_sums(acc_sum, acc_sumsq, S, BLOCK_C)
    count = (tl.zeros([BLOCK_C], dtype=tl.float64) + N) * S
    _finish(
        out_ptr, partials_ptr, tickets_ptr, channels, channel_mask, C, num_splits, count, shifted_sum, shifted_sumsq,
        pilot, BLOCK_C, GROUP_SPLITS, MERGE_ROWS,
    )  # fmt: skip
