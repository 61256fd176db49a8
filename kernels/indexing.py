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
        offsets = tl.max_contiguous(tl.multiple_of(offsets, [1, VEC]), [1, VEC])
    if CVEC > 1:
        step = tl.multiple_of(step, CVEC)
        offsets = tl.max_contiguous(tl.multiple_of(offsets, [CVEC, 1]), [CVEC, 1])
    # A uniform (scalar) base per step, then 32-bit lane offsets: one address add per access.
    return (ptr + step) + offsets


@triton.jit
def step_mask(
    channel_mask, lane_n, lane_s_run, n0, s0, n_hi, s_hi, BLOCK_S: tl.constexpr, VEC: tl.constexpr, CVEC: tl.constexpr
):
    """``[BLOCK_C, BLOCK_M]`` mask of the valid elements of one step, constant over each aligned
    run of ``VEC`` positions and of ``CVEC`` channels (so it does not split 128-bit accesses)."""
    rows = lane_n < (n_hi - n0)  # scalar bounds: one compare per element
    if BLOCK_S > 1:
        rows = rows & (lane_s_run < (s_hi - s0))
    mask = channel_mask[:, None] & rows[None, :]
    if VEC > 1:
        mask = tl.max_constancy(mask, [1, VEC])
    if CVEC > 1:
        mask = tl.max_constancy(mask, [CVEC, 1])
    return mask


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
def widen(x, ACC_DTYPE: tl.constexpr):
    """``x`` in ``ACC_DTYPE``; bfloat16 by placing its bits in the high half of a float32 (exact,
    one integer op per element where the generic conversion compiles to about two)."""
    if x.dtype == tl.bfloat16 and ACC_DTYPE == tl.float32:
        return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    return x.to(ACC_DTYPE)
