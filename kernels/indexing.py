"""Index and parameter helpers shared by every kernel.

Every kernel sees its tensors as ``[N, C, S]`` views with explicit strides, so contiguous
(``stride_s == 1``) and channels_last (``stride_c == 1``) inputs are read without copies.

A program owns a block of ``BLOCK_C`` channels and a rectangle ``[n_lo, n_hi) x [s_lo, s_hi)``
of the (sample, spatial) plane, its *split* (grid axis 1, ``s_splits`` splits along S per split
along N). It walks the rectangle in steps of ``BLOCK_N`` samples x ``BLOCK_S`` spatial positions:
lane ``l`` of a ``[BLOCK_C, BLOCK_N * BLOCK_S]`` tile is sample ``l // BLOCK_S`` and position
``l % BLOCK_S`` of the step (constexpr powers of two: shifts and masks, computed once). The lane
offsets are loop-invariant; a step adds one scalar offset, so the inner loops carry no integer
division at all. Launchers collapse ``(N, S)`` into one axis (``[N * S, C, 1]``) whenever
``stride_n == S * stride_s`` (channels_last, 2-D), so those layouts walk rows only.
"""

import triton
import triton.language as tl


@triton.jit
def split_bounds(N, S, chunk_n, chunk_s, s_splits):
    """This program's rectangle ``(n_lo, n_hi, s_lo, s_hi)`` and its step count along N and S."""
    pid_split = tl.program_id(1)
    split_n = pid_split // s_splits  # once per program, not per step
    split_s = pid_split - split_n * s_splits
    n_lo = split_n * chunk_n
    n_hi = tl.minimum(n_lo + chunk_n, N)
    s_lo = split_s * chunk_s
    s_hi = tl.minimum(s_lo + chunk_s, S)
    return n_lo, n_hi, s_lo, s_hi


@triton.jit
def step_count(n_lo, n_hi, s_lo, s_hi, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr):
    """Steps of ``BLOCK_N x BLOCK_S`` that cover the rectangle (0 when it is empty)."""
    n_steps = tl.maximum(tl.cdiv(n_hi - n_lo, BLOCK_N), 0)
    s_steps = tl.maximum(tl.cdiv(s_hi - s_lo, BLOCK_S), 0)
    return n_steps * s_steps


@triton.jit
def advance(n0, s0, s_lo, s_hi, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr):
    """The next step's (first sample, first position): along S first, then the next row block."""
    s0 += BLOCK_S
    wrap = s0 >= s_hi
    return tl.where(wrap, n0 + BLOCK_N, n0), tl.where(wrap, s_lo, s0)


@triton.jit
def lanes(BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, VEC: tl.constexpr):
    """Per-lane (sample, position) within a step ``[BLOCK_N * BLOCK_S]``, and the position rounded
    down to a multiple of ``VEC`` (equal across each aligned run, so masks stay vector-wide)."""
    lane = tl.arange(0, BLOCK_N * BLOCK_S)
    lane_n = lane // BLOCK_S
    lane_s = lane % BLOCK_S
    lane_s_run = (lane_s // VEC) * VEC
    return lane_n, lane_s, lane_s_run


@triton.jit
def lane_offsets(channels, lane_n, lane_s, stride_n, stride_c, stride_s, INT64: tl.constexpr):
    """Loop-invariant element offsets ``[BLOCK_C, BLOCK_M]`` of a step's tile, relative to the
    step's first (sample, position)."""
    if INT64:
        channels = channels.to(tl.int64)
        lane_n = lane_n.to(tl.int64)
        lane_s = lane_s.to(tl.int64)
    return channels[:, None] * stride_c + (lane_n * stride_n + lane_s * stride_s)[None, :]


@triton.jit
def step_pointers(ptr, offsets, n0, s0, stride_n, stride_s, VEC: tl.constexpr, CVEC: tl.constexpr):
    """Pointers of one step's tile: a scalar step offset (64-bit: it spans the tensor) plus the
    loop-invariant lane offsets. With ``VEC > 1`` (the launcher checked that runs of VEC
    positions are contiguous and 16-byte aligned) the hint makes loads and stores 128-bit; with
    ``CVEC > 1`` the same for runs of CVEC channels (channels_last: unit channel stride, C, the
    row stride and the channel block all multiples of CVEC). Triton 3.6 vectorizes neither axis
    without the hint (Triton 3.9 infers the channel one)."""
    step = n0.to(tl.int64) * stride_n + s0.to(tl.int64) * stride_s
    if VEC > 1:  # hints in elements (the pointer argument itself is 16-byte aligned)
        step = tl.multiple_of(step, VEC)
    if CVEC > 1:
        step = tl.multiple_of(step, CVEC)
    return tile_pointers(ptr + step, offsets, VEC, CVEC)


@triton.jit
def tile_pointers(base, offsets, VEC: tl.constexpr, CVEC: tl.constexpr):
    """A step's pointers from its (uniform, scalar) base and the lane offsets, hinted as in
    ``step_pointers``: then 32-bit lane offsets, one address add per access."""
    if VEC > 1:
        offsets = tl.max_contiguous(tl.multiple_of(offsets, [1, VEC]), [1, VEC])
    if CVEC > 1:
        offsets = tl.max_contiguous(tl.multiple_of(offsets, [CVEC, 1]), [CVEC, 1])
    return base + offsets


@triton.jit
def step_lanes_valid(
    lane_n, lane_s_run, n0, s0, n_hi, s_hi, BLOCK_S: tl.constexpr, VEC: tl.constexpr,
    WHOLE_N: tl.constexpr = False, WHOLE_S: tl.constexpr = False,
):  # fmt: skip
    """``[BLOCK_M]``: which lanes of the step at ``(n0, s0)`` fall inside the rectangle, constant
    over each aligned run of ``VEC`` positions. ``WHOLE_N`` / ``WHOLE_S``: the launcher proved
    that every step lies inside the rectangle along N / S (N, S multiples of the block), so that
    compare is left out."""
    if WHOLE_N:
        rows = lane_n >= 0
    else:
        rows = lane_n < (n_hi - n0)  # scalar bounds: one compare per element
    if BLOCK_S > 1 and not WHOLE_S:
        rows = rows & (lane_s_run < (s_hi - s0))
    if VEC > 1:
        rows = tl.max_constancy(rows, VEC)
    return rows


@triton.jit
def step_mask(
    channel_mask, lane_n, lane_s_run, n0, s0, n_hi, s_hi, BLOCK_S: tl.constexpr, VEC: tl.constexpr, CVEC: tl.constexpr,
    lanes_in_run=None,
):  # fmt: skip
    """``[BLOCK_C, BLOCK_M]`` mask of the valid elements of one step, constant over each aligned
    run of ``VEC`` positions and of ``CVEC`` channels (so it does not split 128-bit accesses).
    ``lanes_in_run`` (``tile_lanes``): channel runs' lanes, ``[1, BLOCK_M]``, or all true."""
    if lanes_in_run is None:
        lanes_in_run = tl.full([1, 1], 1, tl.int1)
    rows = step_lanes_valid(lane_n, lane_s_run, n0, s0, n_hi, s_hi, BLOCK_S, VEC)
    mask = channel_mask[:, None] & rows[None, :] & lanes_in_run
    if VEC > 1:
        mask = tl.max_constancy(mask, [1, VEC])
    if CVEC > 1:
        mask = tl.max_constancy(mask, [CVEC, 1])
    return mask


@triton.jit
def parking_offsets(channels, C, stride_c, stride_s, INT64: tl.constexpr, VEC: tl.constexpr):
    """Offsets ``[BLOCK_C, VEC]`` of the *parking* run of each channel: sample 0, positions
    ``0 .. VEC - 1`` of channel ``c mod C`` (inside the tensor whenever it is not empty; S is a
    multiple of VEC). A reduction points the lanes that fall outside its rectangle at the run
    (``per_lane``) instead of masking them, and shifts every lane by the element it parks on:
    those reads add exactly zero, with no select on the values. Runs of ``CVEC`` channels (C a
    multiple of CVEC) park on runs of channels, so the accesses stay 128-bit."""
    parked_channels = channels % C  # once per program; only channels past C move
    if INT64:
        parked_channels = parked_channels.to(tl.int64)
    return parked_channels[:, None] * stride_c + tl.arange(0, VEC)[None, :] * stride_s


@triton.jit
def per_lane(run, BLOCK_M: tl.constexpr):
    """A ``[BLOCK_C, VEC]`` run repeated along a step's lanes: ``[BLOCK_C, BLOCK_M]`` whose lane
    ``l`` holds ``run[:, l % VEC]``. A broadcast in registers (a thread holds whole runs), so
    equal values stay one register."""
    BLOCK_C: tl.constexpr = run.shape[0]
    VEC: tl.constexpr = run.shape[1]
    if VEC == 1:
        lanes = tl.broadcast_to(run, [BLOCK_C, BLOCK_M])
    else:
        lanes = tl.reshape(tl.broadcast_to(run[:, None, :], [BLOCK_C, BLOCK_M // VEC, VEC]), [BLOCK_C, BLOCK_M])
    return lanes


@triton.jit
def run_lanes(values, channel_size, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr):
    """Channel runs: per-channel ``values`` ``[BLOCK_C]`` of a program's run of channels, spread
    over a step's lanes ``[1, BLOCK_N * BLOCK_S]`` by the channel each lane's position falls in
    (position ``p`` of the run is channel ``p // channel_size``; lanes past the run take the last
    channel's and are masked). One gather per position, a broadcast over the step's rows."""
    BLOCK_C: tl.constexpr = values.shape[0]
    positions = tl.arange(0, BLOCK_S)
    channel = tl.minimum(positions // channel_size, BLOCK_C - 1)  # once per program
    per_position = tl.gather(values, channel, 0)
    lanes = tl.broadcast_to(per_position[None, :], [BLOCK_N, BLOCK_S])
    return tl.reshape(lanes, [BLOCK_N * BLOCK_S])[None, :]


@triton.jit
def tile_lanes(channels, channel_mask, C, channel_size, lane_s, RUN_CHANNELS: tl.constexpr):
    """``(tile_channels, tile_mask, lanes_in_run)`` of a program's step tile: its channels and
    their mask ``[BLOCK_C]`` (the tile is ``[BLOCK_C, BLOCK_M]``) and an all-true ``[1, 1]``; with
    channel runs the run's first channel and a true ``[1]`` (the tile is ``[1, BLOCK_M]``) and
    which lanes fall inside the run ``[1, BLOCK_M]`` (the last run of C may be short)."""
    if RUN_CHANNELS > 0:
        first = tl.program_id(0) * RUN_CHANNELS
        tile_channels = tl.full([1], first, tl.int32)
        tile_mask = tl.full([1], 1, tl.int1)
        lanes_in_run = (lane_s < tl.minimum(C - first, RUN_CHANNELS) * channel_size)[None, :]
    else:
        tile_channels, tile_mask = channels, channel_mask
        lanes_in_run = tl.full([1, 1], 1, tl.int1)
    return tile_channels, tile_mask, lanes_in_run


@triton.jit
def per_channel_tile(values, channel_size, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, RUN_CHANNELS: tl.constexpr):
    """Per-channel ``values`` ``[BLOCK_C]`` broadcastable to the step tile: ``[BLOCK_C, 1]``, or
    per lane ``[1, BLOCK_M]`` with channel runs (``run_lanes``)."""
    if RUN_CHANNELS > 0:
        tile = run_lanes(values, channel_size, BLOCK_N, BLOCK_S)
    else:
        tile = values[:, None]
    return tile


@triton.jit
def edge_start(channels, channel_size, VEC: tl.constexpr):
    """Edges mode (``launchers.interior_length``; contiguous layout, S not a multiple of VEC): the
    first 16-byte aligned position of each channel's rows ``[BLOCK_C]``, 0 .. VEC - 1 (the sample
    stride is a multiple of VEC, so it is the same in every sample). Once per program."""
    return (VEC - (channels % VEC) * (channel_size % VEC) % VEC) % VEC


@triton.jit
def interior_offsets(offsets, start, stride_s, VEC: tl.constexpr):
    """Edges mode: a step's lane offsets ``[BLOCK_C, BLOCK_M]`` moved to each channel's aligned
    interior (``start``, ``edge_start``), hinted as 128-bit runs (the channel stride, S, is odd:
    the compiler cannot see the alignment)."""
    moved = offsets + start[:, None] * stride_s
    return tl.max_contiguous(tl.multiple_of(moved, [1, VEC]), [1, VEC])


@triton.jit
def edge_tile(
    n0, n_hi, channel, start, interior, channel_size, stride_n, stride_c, VEC: tl.constexpr,
    EDGE_ROWS: tl.constexpr,
):  # fmt: skip
    """Edges mode: int64 element offsets ``[EDGE_ROWS, 2 x VEC]`` and mask of the elements of
    samples ``n0 ..`` (up to ``n_hi``) of ``channel`` (``[1]``, unit position stride) outside
    their rows' aligned interior ``[start, start + interior)``: the ``start`` before it, then the
    rest after it (``channel_size - interior`` in all, fewer than ``2 x VEC``)."""
    slot = tl.arange(0, 2 * VEC)[None, :]
    positions = tl.where(slot < start[:, None], slot, slot + interior)
    rows = n0 + tl.arange(0, EDGE_ROWS)[:, None]
    offsets = rows.to(tl.int64) * stride_n + channel.to(tl.int64) * stride_c + positions
    return offsets, (rows < n_hi) & (slot < channel_size - interior)


@triton.jit
def run_tile(C, S, stride_n, RUN_CHANNELS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
             ROWS: tl.constexpr, VEC: tl.constexpr, INT64: tl.constexpr):  # fmt: skip
    """Channel runs, the reductions' walk (``launchers.channel_run_tiling``): a program reads the
    rows of its run of ``RUN_CHANNELS`` channels (``RUN_CHANNELS x S`` contiguous elements per
    sample, 16-byte aligned) as ``[ROWS, BLOCK_S]`` tiles, a sample per row. Returns ``(start,
    offsets, channel)``: the run's first element (int64), the lane offsets ``[ROWS, BLOCK_S]``
    relative to a tile's first sample, and each position's channel within the run ``[BLOCK_S]``.
    Lanes past the run (the last run of C may be short) read the run's first vector, whole
    vectors together, so accesses stay 128-bit; their sums must be left out."""
    first = tl.program_id(0) * RUN_CHANNELS
    run_length = tl.minimum(C - first, RUN_CHANNELS) * S  # a multiple of VEC
    lane_s = tl.arange(0, BLOCK_S)
    lane_n = tl.arange(0, ROWS)
    position = tl.where(lane_s < run_length, lane_s, lane_s % VEC)
    if INT64:
        lane_n = lane_n.to(tl.int64)
        position = position.to(tl.int64)
    offsets = lane_n[:, None] * stride_n + position[None, :]
    offsets = tl.max_contiguous(tl.multiple_of(offsets, [1, VEC]), [1, VEC])  # (the select hides the runs)
    channel = tl.minimum(lane_s // S, BLOCK_C - 1)  # once per program
    return first.to(tl.int64) * S, offsets, channel


@triton.jit
def _segmented_add(start_a, first_a, second_a, start_b, first_b, second_b):
    """The combine of a segmented prefix sum of two arrays: ``b`` follows ``a``; a segment
    starting at ``b`` drops what came before (a select, so a non-finite value never crosses into
    the next segment)."""
    return (
        start_a | start_b,
        tl.where(start_b, first_b, first_a + first_b),
        tl.where(start_b, second_b, second_a + second_b),
    )


@triton.jit
def run_channel_sums(first, second, channel_size, BLOCK_C: tl.constexpr):
    """Channel runs: per-channel float64 sums ``[BLOCK_C]`` of two arrays of lane values
    ``[ROWS, BLOCK_S]`` of a run (position ``p`` is channel ``p // channel_size``). Positions past
    ``BLOCK_C x channel_size`` are left out; channels past the run hold partial sums, which the
    caller masks. The rows are added in float64, then a segmented prefix sum over the positions
    is read at each channel's last position (the scan costs about as much as a tile-wide
    ``tl.sum``; the reductions call this after their loops)."""
    BLOCK_S: tl.constexpr = first.shape[1]
    positions = tl.arange(0, BLOCK_S)
    starts = positions % channel_size == 0
    _, first_prefix, second_prefix = tl.associative_scan(
        (starts, tl.sum(first.to(tl.float64), axis=0), tl.sum(second.to(tl.float64), axis=0)), 0, _segmented_add
    )
    ends = tl.minimum((tl.arange(0, BLOCK_C) + 1) * channel_size - 1, BLOCK_S - 1)
    return tl.gather(first_prefix, ends, 0), tl.gather(second_prefix, ends, 0)


@triton.jit
def run_channel_block(C, RUN_CHANNELS: tl.constexpr, BLOCK_C: tl.constexpr):
    """``(channels, channel_mask)`` ``[BLOCK_C]`` of this program: its run of ``RUN_CHANNELS``
    consecutive channels (channel runs), else its block of ``BLOCK_C``."""
    pid_c = tl.program_id(0)
    if RUN_CHANNELS > 0:
        channels = pid_c * RUN_CHANNELS + tl.arange(0, BLOCK_C)
        channel_mask = (tl.arange(0, BLOCK_C) < RUN_CHANNELS) & (channels < C)
    else:
        channels = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        channel_mask = channels < C
    return channels, channel_mask


@triton.jit
def position_visits(s_lo, s_hi, BLOCK_S: tl.constexpr):
    """``[BLOCK_S]``: the steps along S of the walk over ``[s_lo, s_hi)`` in which each position
    of a step is inside it (a row of the walk adds that many of its elements there)."""
    return tl.maximum(tl.cdiv(s_hi - s_lo - tl.arange(0, BLOCK_S), BLOCK_S), 0)


@triton.jit
def load_affine(weight_ptr, bias_ptr, channels, channel_mask, ACC_DTYPE: tl.constexpr):
    """Per-channel ``(weight, bias)`` ``[BLOCK_C]``; 1 and 0 where the pointer is None."""
    if weight_ptr is not None:
        weight = tl.load(weight_ptr + channels, mask=channel_mask, other=1.0).to(ACC_DTYPE)
    else:
        weight = tl.full(channels.shape, 1.0, ACC_DTYPE)
    if bias_ptr is not None:
        bias = tl.load(bias_ptr + channels, mask=channel_mask, other=0.0).to(ACC_DTYPE)
    else:
        bias = tl.zeros(channels.shape, ACC_DTYPE)
    return weight, bias


@triton.jit
def float_argument(high, low, DTYPE: tl.constexpr):
    """A float argument the launcher split in two (``launchers.float_halves``), in ``DTYPE``.

    Triton passes Python floats as float32; ``high + low`` in float64 restores the value to ~48
    bits, so float64 inputs see eps, momentum and slopes as given (0.01 as float32 is off by
    2e-8 relative, far above float64's tolerances). Scalar work, once per program."""
    return ((tl.zeros([], dtype=tl.float64) + high) + low).to(DTYPE)  # (a Python float in the interpreter)


@triton.jit
def to_element_type(value, pointer):
    """Cast float64 ``value`` to ``pointer``'s element type, through float32 below float64:
    a direct float64 -> bfloat16 conversion is not supported everywhere (Triton's interpreter
    writes zeros)."""
    if pointer.dtype.element_ty == tl.float64:
        return value
    return value.to(tl.float32).to(pointer.dtype.element_ty)


@triton.jit
def widen(x, ACC_DTYPE: tl.constexpr, PAIRED: tl.constexpr = False):
    """``x`` in ``ACC_DTYPE``; bfloat16 by placing its bits in the high half of a float32: exact,
    one integer op per element. ``PAIRED``: ``x`` came from vector loads, so neighbouring elements
    share a 32-bit register; compiled, inline PTX then widens each packed pair with a shift (low
    half) and a mask (high half), where the generic code compiles to 2-3 ops per high half."""
    if x.dtype == tl.bfloat16 and ACC_DTYPE == tl.float32:
        if _PTX and PAIRED:
            return tl.inline_asm_elementwise(
                "{ shl.b32 $0, $2, 16; and.b32 $1, $2, 0xffff0000; }", "=r,=r,r", [x],
                dtype=tl.float32, is_pure=True, pack=2,
            )  # fmt: skip
        return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    return x.to(ACC_DTYPE)


@triton.jit
def fold_into(acc, values, FOLD: tl.constexpr):
    """``acc`` ``[BLOCK_C, BLOCK_M / FOLD]`` plus a step's ``values`` ``[BLOCK_C, BLOCK_M]``: the
    per-lane accumulators of the statistics and the gradient sums. With ``FOLD = 2`` lanes ``l``
    and ``l + BLOCK_M / 2`` (one thread's where ``launchers._folds_within_threads`` holds: the
    same position of another row) add into one accumulator, one after the other: half the
    accumulator registers, the same additions."""
    if FOLD == 1:
        acc += values
    else:
        BLOCK_C: tl.constexpr = values.shape[0]
        HALF: tl.constexpr = values.shape[1] // 2
        first, second = tl.split(tl.permute(tl.reshape(values, [BLOCK_C, 2, HALF]), (0, 2, 1)))
        acc = (acc + first) + second
    return acc


# Inline PTX (``widen``) only where the kernels compile: Triton's interpreter, chosen when a kernel
# is decorated (TRITON_INTERPRET=1), runs them as Python on the CPU and has no assembler.
_PTX = tl.constexpr(type(widen).__name__ != "InterpretedFunction")
