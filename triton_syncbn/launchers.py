"""Launchers for the Triton kernels: tensors in, grids and block sizes chosen, tensors out.

Every launcher takes ``[N, C, S]`` views (see ``layout.channel_view``) and honours their
strides, so contiguous and channels_last inputs are never copied. The same functions, with
the same contracts, exist in plain torch in ``torch_path`` for CPU tensors when Triton's
interpreter is off.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import torch
import triton.language as tl

from triton_syncbn.kernels import (
    _backward_dx_kernel,
    _backward_reduce_kernel,
    _normalize_kernel,
    _partial_stats_kernel,
    _run_backward_reduce_kernel,
    _run_stats_kernel,
)
from triton_syncbn.kernels.backward import FLUSH_STEPS

from . import tuning
from .contract import Epilogue, RunningStats, SavedStatistics
from .layout import accumulation_dtype

# Elements each thread holds per step (16 fp32 = 64 bytes, 16 bf16 = 32 bytes in flight per load).
_THREAD_ELEMENTS = 16
_NUM_WARPS = 4
_MAX_BLOCK_C = 64
# Programs to aim for per streaming-multiprocessor, so that small-C shapes fill the GPU: 4 is the
# target (bench/perf_model.py), 5 leaves room for the rounding of splits to whole steps.
PROGRAMS_PER_SM = 5
# Splits of one channel block a reduction may use. Split reductions merge in the kernel itself
# (kernels/merge.py): the last program of each group of splits adds the group's float64 partials,
# MERGE_TILE values per array per step (MERGE_TILE // block_c rows), and with several groups the
# last of those adds the groups; merge_plan picks the group size with the fewest serial steps
# (block_c = 64, 1024 splits: 32 groups of 32, 6 round trips).
# Larger steps cost registers in every program of the kernel (sm_90: 2048 values took the
# channels_last fp32 statistics kernel from 72 to 103-128 registers), smaller ones more steps.
MAX_SPLITS = 1024
MERGE_TILE = 1024
# Programs per SM the channel-run reductions aim at, at least (the least the model accepts), so
# that the grid stays one wave of PROGRAMS_PER_SM where the splits allow: aiming at 5 and
# rounding up left a last wave of a few programs (the model: S8 fp32 statistics 66% of copy).
RUN_REDUCTION_PROGRAMS_PER_SM = 4
# Registers per thread the channel-run statistics kernel may use (Triton's ``maxnreg``): on sm_90
# its float64 segmented scan after the loop peaks at 118 registers for 16-bit inputs (4 programs
# per SM); capped, 6-22 setup and epilogue accesses spill to local memory, none in the loop (every
# dtype and FOLD checked at the pipelining depths the launchers use, 1 and REDUCTION_STAGES = 3; a
# depth of 2 spills in the loop of 16-bit inputs, which bench/perf_model.py fails), and 5 fit. The
# gradient sums are not capped: with a fused activation's coefficients a cap of 96 spilled inside
# their loop; they take 94 (fp32) and 140-144 (bf16) registers.
RUN_STATISTICS_REGISTERS = 96
# Whole steps a channel-run reduction's program takes at most (the launcher splits N to keep it):
# its lanes then sum at most RUN_REDUCTION_STEPS x FOLD + 1 values in fp32 before the float64
# totals, as the per-channel gradient sums flush every FLUSH_STEPS steps.
RUN_REDUCTION_STEPS = FLUSH_STEPS.value
# Software-pipelining depth of the reductions' loads (statistics, gradient sums): Triton's
# tl.range(num_stages=...) issues the loads of the next steps (cp.async into shared memory) while a
# step is added up. On an H200 those loops were latency-bound (ncu: no eligible warp 60-90% of
# cycles; 35-64% of copy with 32-56 KB in flight per SM). The summation order is unchanged.
REDUCTION_STAGES = 3
# Software-pipelining depth of the elementwise kernels' loads (normalize; the input gradient only
# with 16-byte accesses: its scalar loads, S odd, would become 4-byte copies that cost more issue
# than the extra bytes in flight gain). bench/perf_model.py: channels_last bf16 normalize 40 ->
# 80 KB in flight per SM (48-85% -> 68-100% of copy), dx 64 -> 128 KB. Not yet measured.
ELEMENTWISE_STAGES = 3
# Contiguous layout: the least bytes a step reads along each (sample, channel) row, unless the row
# is shorter (two 128-byte lines: whole DRAM bursts, few rows per step).
MIN_RUN_BYTES = 256
# The statistics kernel's steps for 16-bit inputs: twice the elements of _THREAD_ELEMENTS x 2 per
# thread, two lanes per accumulator (kernels/stats.py, FOLD). sm_90: the loop's issue need
# 1.5-1.6 -> 1.3-1.4 warp-instr/cycle/SM (bf16, 128-bit accesses), registers +25-50.
STATISTICS_FOLD = 2
# The gradient sums' accumulators for 16-bit inputs, folded the same way over an unchanged step
# (_gradient_fold). sm_90, S1 channels_last bf16: 180 -> 127 registers, 2 -> 4 resident programs,
# the same 220-instruction loop; channels_last bf16 in general 176-209 -> 128 registers.
GRADIENT_FOLD = 2
# Bytes a thread of a one-step 16-bit elementwise program loads, below which the program runs on
# half the warps (a reduction: half of this from each tensor; _one_small_step).
SMALL_STEP_BYTES = 128
# Steps per program the elementwise kernels (normalize, dx) aim at on tensors too small for the
# one-wave grid below.
_ELEMENTWISE_STEPS = 16
# Programs per SM of the elementwise kernels' grid where the tensor has two steps or more for each
# (at most this many, one wave: every such kernel holds at least 4 per SM, and a last partial
# wave would run a few programs per SM with too few loads in flight; bench/perf_model.py:
# channels_last bf16 normalize, 5 resident of 5.3-5.9 per SM, streamed at 67-76% of copy).
ELEMENTWISE_PROGRAMS_PER_SM = 4
# Under the interpreter programs run one after another; a few splits still exercise the paths.
_INTERPRETER_PROGRAMS = 4
_INT32_LIMIT = 2**31 - 1
_LAYOUTS = ("contiguous", "channels_last")


# Plain-int helpers: triton.cdiv and triton.next_power_of_2 are constexpr functions in Triton 3.6+,
# ~2 us per host call; the launchers call them dozens of times per launch.
def _cdiv(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


def _next_power_of_2(value: int) -> int:
    return 1 if value <= 1 else 1 << (value - 1).bit_length()


@dataclass(frozen=True)
class Tiling:
    """How a ``[N, C, S]`` view is cut into programs: grid = (cdiv(C, block_c), n_splits * s_splits).

    Each step of a program covers ``block_c`` channels x ``block_n`` samples x ``block_s``
    positions; a split covers ``chunk_n`` samples x ``chunk_s`` positions (see kernels/indexing.py).
    """

    block_c: int  # channels per program (power of two)
    block_n: int  # samples per step (power of two)
    block_s: int  # spatial positions per step (power of two)
    chunk_n: int  # samples per split, a multiple of block_n (channel runs: any; their last step is masked)
    chunk_s: int  # positions per split, a multiple of block_s
    n_splits: int
    s_splits: int
    num_warps: int = _NUM_WARPS
    # Channel runs (contiguous layout, S odd; kernels/indexing.py): each program walks a run of
    # run_channels consecutive channels, block_s >= run_channels x S positions; 0: off.
    run_channels: int = 0
    # Edges mode (contiguous layout, S odd and long; interior_length): the blocks and splits cover
    # each row's aligned interior of this many positions, the rest after the loop; 0: off.
    interior: int = 0
    # A register cap per thread (Triton's maxnreg), set by the tiling that needs it; 0: none.
    max_registers: int = 0

    @property
    def block_m(self) -> int:
        return self.block_n * self.block_s

    @property
    def splits(self) -> int:
        return self.n_splits * self.s_splits

    @property
    def thread_elements(self) -> int:
        """Elements of one step each thread holds."""
        return self.block_c * self.block_m // (32 * self.num_warps)

    def grid(self, channels: int) -> tuple[int, int]:
        return (_cdiv(channels, self.run_channels or self.block_c), self.splits)

    def steps(self) -> int:
        """Steps of the longest split."""
        return _cdiv(self.chunk_n, self.block_n) * _cdiv(self.chunk_s, self.block_s)

    @classmethod
    def split(cls, view: torch.Tensor, block_c: int, block_m: int, splits: int) -> Tiling:
        """Forced block sizes (for tests): ``block_c`` channels and ``block_m`` elements per step,
        the launchers' own division of ``block_m`` into samples x positions for ``view``, and at
        most ``splits`` splits. Launchers refit it to the view they actually launch on."""
        return _fit(collapse(view), block_c, block_m, splits)

    def refit(self, view: torch.Tensor) -> Tiling:
        """The same block_c, block_m and split budget on ``view`` (as collapsed by a launcher);
        a channel-run tiling (``channel_run_tiling``) as it is."""
        if self.run_channels or self.interior:
            return self
        return _fit(view, self.block_c, self.block_m, self.splits)


def _fit(view: torch.Tensor, block_c: int, block_m: int, splits: int) -> Tiling:
    shape = tuple(view.shape)
    block_s = 1 if layout_of(view) == "channels_last" else _spatial_block(shape, block_m, view.element_size())
    return _with_splits(shape, block_c, max(block_m // block_s, 1), block_s, splits, cap=splits)


def layout_of(view: torch.Tensor) -> str:
    """ "channels_last" when channels are the contiguous axis (channels_last, 2-D) else "contiguous"."""
    return "channels_last" if view.stride(1) == 1 and view.shape[1] > 1 else "contiguous"


def collapse(view: torch.Tensor, *others: torch.Tensor | None) -> torch.Tensor:
    """``view`` ``[N, C, S]`` as ``[N * S, C, 1]`` when every given view has ``stride_n == S *
    stride_s`` (channels_last, channels_last_3d): the kernels then walk rows only. Else ``view``."""
    batch, channels, spatial = view.shape
    if spatial == 1:
        return view
    for other in (view, *others):
        if other is not None and other.stride(0) != spatial * other.stride(2):
            return view
    return view.as_strided((batch * spatial, channels, 1), (view.stride(2), view.stride(1), 1))


def _tile_elements(itemsize: int, num_warps: int = _NUM_WARPS) -> int:
    """Elements per step for elements of ``itemsize`` bytes: 64 bytes per thread (16 fp32,
    32 fp16/bf16; 8 fp64 to bound registers)."""
    per_thread = {8: _THREAD_ELEMENTS // 2, 2: 2 * _THREAD_ELEMENTS}.get(itemsize, _THREAD_ELEMENTS)
    return per_thread * 32 * num_warps


def _spatial_block(shape: tuple[int, int, int], tile: int, itemsize: int) -> int:
    """Positions per step for a contiguous-layout ``[N, C, S]`` view: the power of two that covers
    the ``[N, S]`` plane in the fewest tile-sized steps (padding of S and of N both count), among
    those that read at least ``MIN_RUN_BYTES`` contiguous bytes per row (or the whole row).

    Shorter runs cost far more than their padding: on an H200, S = 49 with N = 1024 (the RoI
    head) took 2-position steps across 1024 rows and streamed at 5-15% of copy bandwidth."""
    batch, _, spatial = shape
    if spatial == 1:
        return 1
    best, best_cost = 1, None
    block = min(_next_power_of_2(spatial), max(MIN_RUN_BYTES // itemsize, 1), tile)
    while block <= min(tile, _next_power_of_2(spatial)):
        block_n = min(tile // block, _next_power_of_2(max(batch, 1)))
        cost = _cdiv(max(batch, 1), block_n) * _cdiv(spatial, block) * max(block_n * block, tile)
        if best_cost is None or cost <= best_cost:
            best, best_cost = block, cost
        block *= 2
    return best


def _chunk(blocks: int, splits: int, cap: int, at_most: bool = False) -> int:
    """Blocks per split: rounded down, so that at least ``splits`` splits result, unless that
    would exceed ``cap``; ``at_most``: rounded up, so that at most ``splits`` result."""
    chunk = max(blocks // splits, 1)
    return chunk if _cdiv(blocks, chunk) <= cap and not at_most else _cdiv(blocks, splits)


def _with_splits(
    shape: tuple[int, int, int], block_c: int, block_n: int, block_s: int, wanted: int, cap: int, at_most: bool = False
) -> Tiling:
    """Split the ``[N, S]`` plane of an ``[N, C, S]`` view along N first, then S, into about
    ``min(wanted, cap)`` rectangles made of whole steps (``at_most``: no more than that)."""
    batch, _, spatial = shape
    wanted = max(1, min(wanted, cap))
    n_blocks = max(_cdiv(batch, block_n), 1)
    s_blocks = max(_cdiv(spatial, block_s), 1)
    n_splits = min(wanted, n_blocks)
    chunk_n = _chunk(n_blocks, n_splits, cap, at_most) * block_n
    n_splits = max(_cdiv(batch, chunk_n), 1)
    per_row = wanted // n_splits if at_most else _cdiv(wanted, n_splits)
    s_splits = max(min(per_row, s_blocks, max(cap // n_splits, 1)), 1)
    chunk_s = _chunk(s_blocks, s_splits, max(cap // n_splits, 1), at_most) * block_s
    s_splits = max(_cdiv(spatial, chunk_s), 1)
    return Tiling(block_c, block_n, block_s, chunk_n, chunk_s, n_splits, s_splits)


def _one_wave_tiling(
    shape: tuple[int, int, int], block_c: int, block_n: int, block_s: int, programs: int
) -> Tiling | None:
    """An elementwise kernel's splits for one wave of programs, each of two steps or more: the
    fewest splits that give ``ELEMENTWISE_PROGRAMS_PER_SM`` programs per SM or more, and at most
    ``PROGRAMS_PER_SM`` (``programs`` is the latter's grid); None where the tensor is too small or
    no split count lands there (whole steps per split)."""
    batch, channels, spatial = shape
    channel_blocks = _cdiv(channels, block_c)
    least = programs * ELEMENTWISE_PROGRAMS_PER_SM // PROGRAMS_PER_SM
    steps = _cdiv(max(batch, 1), block_n) * _cdiv(max(spatial, 1), block_s)
    if channel_blocks * steps < 2 * least:
        return None
    for wanted in range(_cdiv(least, channel_blocks), programs // channel_blocks + 1):
        for at_most in (False, True):
            tiling = _with_splits(shape, block_c, block_n, block_s, wanted, 2**30, at_most)
            if least <= channel_blocks * tiling.splits <= programs:
                return tiling
    return None


def choose_tiling(
    view: torch.Tensor,
    programs: int,
    reduction: bool = True,
    fold: int = 1,
    reads: int = 1,
    single_wave: bool = False,
) -> Tiling:
    """Block sizes and splits for ``view`` ``[N, C, S]`` (already collapsed), aiming at ``programs``
    programs.

    channels_last (channels contiguous): wide channel blocks, each row of a tile one coalesced
    read. Contiguous: one channel per program, steps of ``block_n`` samples x ``block_s``
    positions along the contiguous spatial axis. Block sizes depend only on the shape, dtype
    and layout, never on timing, so a reduction's order is fixed by the shape. Reductions
    (``reduction=True``) split a channel over at most ``MAX_SPLITS`` programs; the elementwise
    kernels split freely: with ``single_wave`` (a kernel that holds PROGRAMS_PER_SM programs per
    SM or more) one wave of 4-5 programs per SM (``_one_wave_tiling``) where the tensor has two
    steps or more for each, else ``_ELEMENTWISE_STEPS`` steps per program on large tensors.
    ``reads``: the tensors each program of an elementwise kernel loads (its warps,
    ``_one_small_step``). The result is cached per (shape, layout, element size, programs,
    reduction, fold, reads, single_wave): the launchers ask on every call, with the same few shapes.
    """
    return _cached_tiling(
        tuple(view.shape), layout_of(view), view.element_size(), programs, reduction, None, fold, reads, single_wave
    )


@functools.lru_cache(maxsize=4096)
def _cached_tiling(
    shape: tuple[int, int, int],
    layout: str,
    itemsize: int,
    programs: int,
    reduction: bool,
    config: tuning.ElementwiseConfig | None = None,
    fold: int = 1,
    reads: int = 1,
    single_wave: bool = False,
) -> Tiling:
    """``choose_tiling``'s work; ``config`` (elementwise kernels only) replaces the elements per
    thread, warps and steps per program of the heuristic."""
    batch, channels, spatial = shape
    num_warps = _NUM_WARPS if config is None else config.num_warps
    tile = fold * (_tile_elements(itemsize) if config is None else config.thread_elements * 32 * num_warps)
    elementwise_steps = _ELEMENTWISE_STEPS if config is None else config.steps
    if layout == "channels_last":
        block_c = min(_MAX_BLOCK_C, _next_power_of_2(channels))
        block_s = 1
        block_n = min(max(tile // block_c, 1), _next_power_of_2(max(batch, 1)))
    else:
        block_c = 1
        block_s = _spatial_block(shape, tile, itemsize)
        block_n = min(max(tile // block_s, 1), _next_power_of_2(max(batch, 1)))
    channel_blocks = _cdiv(channels, block_c)
    # Too few steps to give every program one: smaller steps (down to 4 elements per thread).
    while (
        block_c * block_n * block_s > num_warps * 32 * 4
        and channel_blocks * _cdiv(max(batch, 1), block_n) * _cdiv(max(spatial, 1), block_s) < programs
    ):
        if block_n > 1:
            block_n //= 2
        else:
            block_s //= 2
    wanted = _cdiv(programs, channel_blocks)
    tiling = None
    if not reduction:
        steps = _cdiv(max(batch, 1), block_n) * _cdiv(max(spatial, 1), block_s)
        if config is None and single_wave:
            tiling = _one_wave_tiling(shape, block_c, block_n, block_s, programs)
        wanted = max(wanted, _cdiv(steps, elementwise_steps))
    if tiling is None:
        tiling = _with_splits(shape, block_c, block_n, block_s, wanted, MAX_SPLITS if reduction else 2**30)
    if config is None and _one_small_step(tiling, itemsize, reduction, reads):
        num_warps = _NUM_WARPS // 2
    return tiling if num_warps == _NUM_WARPS else replace(tiling, num_warps=num_warps)


def _one_small_step(tiling: Tiling, itemsize: int, reduction: bool, reads: int = 1) -> bool:
    """Whether ``tiling``'s programs take one small step each of 16-bit elements (small tensors cut
    back to give every program a step: S2, 256 x 4096; S1 channels_last). Such a step runs on half
    the warps, the same elements per program: a program's float64 prologue and epilogue, not its
    step, set its registers, so the bytes each thread has in flight double (sm_90, S2 bf16:
    normalize 82 -> 54 registers for 32 bytes a thread instead of 16, every program resident; the
    gradient sums 96 -> 126 for 64 bytes, still every program resident; the model: forward 13.4
    -> 11.2 us, backward 14.0 -> 10.5). Not fp32: S2 fp32's forward went 9.9 -> 11.2 us.

    Small: a reduction's per-lane accumulators grow with the elements a thread holds, so it
    halves its warps below ``SMALL_STEP_BYTES / 2`` a thread of each tensor (S2's 32; S1
    channels_last's 64-byte statistics on 2 warps took 138-168 registers, one program per SM of
    its grid left for a last wave). An elementwise kernel halves them below ``SMALL_STEP_BYTES``
    a thread over the ``reads`` tensors it reads: S1 channels_last's normalize (x: 64 bytes), 5 ->
    10 resident programs, 40 -> 48 KB in flight; not its dx (dy and x: 128 bytes), whose 4-6
    resident programs on 2 warps no longer held the 6.06 per SM of the grid."""
    per_tensor = tiling.thread_elements * itemsize
    small = per_tensor < SMALL_STEP_BYTES // 2 if reduction else per_tensor * reads < SMALL_STEP_BYTES
    return itemsize == 2 and tiling.steps() == 1 and small


# Channel runs: the least fraction of a run's lanes that must hold elements.
MIN_RUN_UTILIZATION = 0.75


def channel_run_tiling(
    view: torch.Tensor,
    programs: int,
    *others: torch.Tensor | None,
    reduction: bool = False,
    fold: int = 1,
    one_wave: bool = False,
) -> Tiling | None:
    """Channel runs for a kernel over ``view`` ``[N, C, S]`` (and ``others``, strided alike), or
    None where they do not apply. Reductions (``reduction=True``) split a run over at most
    ``MAX_SPLITS`` programs along N, aiming at ``programs``; elementwise kernels split freely.
    ``fold``: steps of ``fold`` times the samples (the statistics of 16-bit inputs, FOLD).
    ``one_wave``: a kernel that fits PROGRAMS_PER_SM programs per SM (normalize) splits a small
    tensor in samples, as the reductions do, for one wave of programs that each load their steps
    at once (S1 bf16: 572 programs of 3 samples, where whole steps gave 832 of 2: 1.3 waves).

    In the contiguous layout with S not a multiple of the 16-byte vector (S = 49: 7x7 maps), a
    (sample, channel) row cannot be read in aligned 16-byte pieces, but the rows of consecutive
    channels are one contiguous run: ``k`` channels (a multiple of the vector, so every run starts
    16-byte aligned) take ``k x S`` consecutive elements. A program walks its run as one step
    wide (``block_s``, a power of two >= k x S) and ``block_n`` samples deep, with 128-bit
    accesses; each lane keeps its channel for the whole walk (``indexing.run_lanes``). Chosen
    where at least ``MIN_RUN_UTILIZATION`` of the lanes hold elements (S = 49: 20 fp32 channels
    in 1024 lanes or 40 bf16 in 2048, 96%)."""
    batch, channels, spatial = view.shape
    geometries = _geometries(view, *others)
    itemsize = max(size for _, _, size in geometries)
    vector = 16 // itemsize
    if spatial <= 1 or spatial % vector == 0 or channels % vector or not _same_strides(geometries):
        return None
    stride_n, stride_c, stride_s = view.stride()
    if stride_s != 1 or stride_c != spatial or stride_n % vector:
        return None
    tile = _tile_elements(itemsize)
    best: tuple[float, int, int] | None = None
    block = _next_power_of_2(vector * spatial)
    while block <= tile:
        run = min(block // spatial // vector * vector, channels)
        utilization = run * spatial / block
        if best is None or utilization > best[0]:
            best = (utilization, run, block)
        block *= 2
    if best is None or best[0] < MIN_RUN_UTILIZATION:
        return None
    _, run, block = best
    block_n = min(fold * tile // block, _next_power_of_2(max(batch, 1)))
    runs = _cdiv(channels, run)
    steps = _cdiv(max(batch, 1), block_n)
    small = one_wave and _cdiv(steps, _ELEMENTWISE_STEPS) <= _cdiv(programs, runs)  # one wave, in samples
    if reduction or small:
        longest = RUN_REDUCTION_STEPS * block_n if reduction else max(batch, 1)
        chunk_n = _sample_chunk(max(batch, 1), runs, programs, longest)
        splits = _cdiv(max(batch, 1), chunk_n)
        if splits > MAX_SPLITS:  # (reductions only: a small tensor's splits are at most its programs)
            return None  # a batch this deep keeps the per-channel walk, whose sums flush as they go
        return Tiling(_next_power_of_2(run), block_n, block, chunk_n, block, splits, 1, run_channels=run)
    wanted = max(_cdiv(programs, runs), _cdiv(steps, _ELEMENTWISE_STEPS))
    tiling = _with_splits((batch, runs, block), _next_power_of_2(run), block_n, block, wanted, 2**30)
    return replace(tiling, run_channels=run)


def _sample_chunk(batch: int, runs: int, programs: int, longest: int) -> int:
    """Samples per split of a channel-run walk split in samples (the reductions; normalize on a
    small tensor): at most ``longest``, and otherwise the fewest splits that give at least
    ``programs`` x 4/5 programs in all (one wave of PROGRAMS_PER_SM per SM). Splits need not be
    whole steps (the kernels mask a split's last rows), so the count is not rounded to the step:
    S1 fp32, 103 runs of 32 samples, gets 6 splits of 6 samples (618 programs, one wave on an
    H200), where whole 2-sample steps gave 5 or 7 splits (515 programs: under 4 per SM; 721: a
    last wave of 61)."""
    target = programs * RUN_REDUCTION_PROGRAMS_PER_SM // PROGRAMS_PER_SM
    wanted = max(min(_cdiv(target, runs), batch), _cdiv(batch, longest))
    candidates = [chunk for chunk in {max(batch // wanted, 1), _cdiv(batch, wanted)} if chunk <= longest]
    enough = [chunk for chunk in candidates if runs * _cdiv(batch, chunk) >= target]
    return max(enough) if enough else min(candidates)


# Edges mode applies from this many 16-byte vectors per channel: the fewer than two vectors of
# elements around each row's aligned interior then stay under 5% of it.
MIN_EDGE_VECTORS = 40


def interior_length(view: torch.Tensor, *others: torch.Tensor | None) -> int | None:
    """Edges mode for ``view`` ``[N, C, S]`` (and ``others``, strided alike): the length of each
    row's aligned interior, or None where the mode does not apply.

    In the contiguous layout with S not a multiple of the 16-byte vector and too long for channel
    runs (S9: 97 x 97 = 9409), a (sample, channel) row starts anywhere within a vector, but from
    its first 16-byte aligned position on (``kernels.indexing.edge_start``, 0 to VEC - 1 in) it can
    be read with 128-bit accesses. The kernels walk that interior, the same length for every
    channel (S - VEC + 1 rounded down to the vector), as if it were the row, then add the few
    elements before and after it (fewer than 2 x VEC per row) with scalar accesses after their
    loop. Needs the sample stride a multiple of the vector."""
    batch, channels, spatial = view.shape
    geometries = _geometries(view, *others)
    vector = 16 // max(itemsize for _, _, itemsize in geometries)
    if spatial % vector == 0 or spatial < MIN_EDGE_VECTORS * vector or not _same_strides(geometries):
        return None
    stride_n, stride_c, stride_s = view.stride()
    if stride_s != 1 or stride_c != spatial or stride_n % vector:
        return None
    return (spatial - vector + 1) // vector * vector


def _interior_view(view: torch.Tensor, interior: int) -> torch.Tensor:
    """``view`` as its rows' aligned interiors ``[N, C, interior]`` (for block sizes and splits)."""
    return view.as_strided((view.shape[0], view.shape[1], interior), view.stride())


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return _cuda_programs(device.index if device.index is not None else torch.cuda.current_device())
    return _INTERPRETER_PROGRAMS


@functools.lru_cache(maxsize=64)
def _cuda_programs(index: int) -> int:
    return PROGRAMS_PER_SM * torch.cuda.get_device_properties(index).multi_processor_count


LaunchFn = Callable[[Any, tuple[int, ...], tuple[Any, ...], dict[str, Any]], None]


def _run(kernel: Any, grid: tuple[int, ...], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    kernel[grid](*args, **kwargs)


@dataclass(frozen=True)
class Dispatch:
    """Where the launchers' kernel launches go: ``launch(kernel, grid, args, kwargs)`` runs them
    (the default) or records them (bench/codegen.py compiles recorded launches for a GPU that
    is not here); ``programs`` is the number of programs to aim for (default: PROGRAMS_PER_SM per SM of the
    tensor's device, 4 under the interpreter); ``tuning`` configures the elementwise kernels
    (default: the table of ``tuning.use``, if any; see ``triton_syncbn/tuning.py``)."""

    programs: int | None = None
    launch: LaunchFn = _run
    tuning: tuning.TuningTable | None = None


_DEFAULT_DISPATCH = Dispatch()


def _programs(dispatch: Dispatch, device: torch.device) -> int:
    return dispatch.programs if dispatch.programs is not None else _target_programs(device)


def elementwise_tiling(
    kernel: str,
    view: torch.Tensor,
    flags: Callable[[], dict[str, bool | int]],
    dispatch: Dispatch = _DEFAULT_DISPATCH,
    runs: tuple[torch.Tensor | None, ...] | None = None,
    one_wave: bool = False,
    reads: int = 1,
    single_wave: bool = False,
) -> Tiling:
    """The tiling of an elementwise kernel (``tuning.KERNELS``) on ``view`` ``[N, C, S]``: the
    tuned configuration of the dispatch's (or the process's) table for this key, else the
    heuristic. ``flags()`` gives the launch's constexpr flags fixed before tiling (called only
    when a table is in use). ``runs``: the kernel walks channel runs where they apply
    (``channel_run_tiling`` of ``view`` and these other views, with ``one_wave``) and no tuned
    entry says otherwise."""
    table = dispatch.tuning if dispatch.tuning is not None else tuning.active()
    programs = _programs(dispatch, view.device)
    if table is not None:
        layout = layout_of(view)
        key = tuning.TuningKey.of(kernel, layout, tuple(view.shape), view.element_size(), flags())
        config = table.lookup(key)
        if config is not None:
            return _cached_tiling(tuple(view.shape), layout, view.element_size(), programs, False, config)
    if runs:
        tiling = channel_run_tiling(view, programs, *runs, one_wave=one_wave)
        if tiling is not None:
            return tiling
        interior = interior_length(view, *runs)
        if interior is not None:
            interior_view = _interior_view(view, interior)
            tiling = choose_tiling(interior_view, programs, reduction=False, reads=reads, single_wave=single_wave)
            return replace(tiling, interior=interior)
    return choose_tiling(view, programs, reduction=False, reads=reads, single_wave=single_wave)


# A view's geometry for the cached launch decisions: (shape, strides, element size).
Geometry = tuple[tuple[int, ...], tuple[int, ...], int]


def _geometries(*views: torch.Tensor | None) -> tuple[Geometry, ...]:
    return tuple((tuple(view.shape), view.stride(), view.element_size()) for view in views if view is not None)


def _needs_int64(tiling: Tiling, geometries: tuple[Geometry, ...]) -> bool:
    """True when a tile's lane offsets (channel, sample and position within a step) can exceed
    int32; the step offsets themselves are always 64-bit scalars."""
    for (_, channels, _), strides, _ in geometries:
        sn, sc, ss = (abs(stride) for stride in strides)
        reach = (channels - 1) * sc + (tiling.block_n - 1) * sn + (tiling.block_s - 1) * ss
        if reach > _INT32_LIMIT:
            return True
    return False


def _same_strides(geometries: tuple[Geometry, ...]) -> bool:
    """Whether every view has the first one's strides (the kernels then share offsets)."""
    return all(strides == geometries[0][1] for _, strides, _ in geometries)


@functools.lru_cache(maxsize=4096)
def _access(tiling: Tiling, geometries: tuple[Geometry, ...]) -> tuple[bool, int, int, bool]:
    """(INT64, VEC, CVEC, SAME_STRIDES) of a launch over views of these geometries, computed once
    per geometry (the launchers ask on every call)."""
    return (
        _needs_int64(tiling, geometries),
        _spatial_vector(tiling, geometries),
        _channel_vector(tiling, geometries),
        _same_strides(geometries),
    )


def _channel_vector(tiling: Tiling, geometries: tuple[Geometry, ...]) -> int:
    """Channels per 16-byte access in the channels_last layouts (unit channel stride), when every
    view allows it, else 1: C, the sample stride, the position stride (where S > 1) and
    ``block_c`` must be multiples of the run, so that every aligned run of channels lies in one
    row and one program."""
    vector = 16 // max(itemsize for _, _, itemsize in geometries)
    if tiling.block_c % vector:
        return 1
    for (_, channels, spatial), (stride_n, stride_c, stride_s), _ in geometries:
        if stride_c != 1 or channels % vector or stride_n % vector or (spatial > 1 and stride_s % vector):
            return 1
    return vector


def _strides(view: torch.Tensor | None) -> tuple[int, int, int]:
    """Strides of an optional ``[N, C, S]`` view (zeros when absent: the kernel ignores them)."""
    return (0, 0, 0) if view is None else view.stride()


def _present(*views: torch.Tensor | None) -> list[torch.Tensor]:
    return [view for view in views if view is not None]


def spatial_vector(tiling: Tiling, *views: torch.Tensor | None) -> int:
    """Elements per 16-byte access along the spatial axis, when every view allows it, else 1.

    Allowed when the spatial axis is the contiguous one (``stride_s == 1``) and S, the other
    strides, ``block_s`` and ``chunk_s`` are multiples of the run, so that every aligned run lies
    in one (sample, channel) row and in one step (see ``kernels/indexing.step_pointers``).
    channels_last vectorizes along C instead (unit channel stride, no hint needed).
    """
    return _spatial_vector(tiling, _geometries(*views))


def _spatial_vector(tiling: Tiling, geometries: tuple[Geometry, ...]) -> int:
    vector = 16 // max(itemsize for _, _, itemsize in geometries)
    if tiling.run_channels or tiling.interior:  # along the runs or interiors, which their tilings checked
        return vector
    if tiling.block_s % vector or tiling.chunk_s % vector:
        return 1
    for (_, _, spatial), (stride_n, stride_c, stride_s), _ in geometries:
        if spatial % vector or stride_s != 1 or stride_n % vector or stride_c % vector:
            return 1
    return vector


def float_halves(value: float) -> tuple[float, float]:
    """``value`` as (float32-representable high part, remainder): Triton passes Python floats to
    kernels as float32, and ``kernels.indexing.float_argument`` adds the halves back in float64."""
    high = struct.unpack("f", struct.pack("f", value))[0]
    return high, float(value) - high


def _whole_steps(view: torch.Tensor, tiling: Tiling) -> dict[str, bool]:
    """WHOLE_N / WHOLE_S: every step of every split lies inside the ``[N, C, S]`` view along N / S
    (splits are whole steps, so it is enough that N / S are multiples of the block); ROWS_ONLY:
    S = 1, so steps advance along N only."""
    batch, _, spatial = view.shape
    spatial = tiling.interior or spatial
    return {"WHOLE_N": batch % tiling.block_n == 0, "WHOLE_S": spatial % tiling.block_s == 0, "ROWS_ONLY": spatial == 1}


def _tl_dtype(dtype: torch.dtype) -> tl.dtype:
    return tl.float64 if dtype == torch.float64 else tl.float32


def _geometry(view: torch.Tensor, tiling: Tiling) -> tuple[int, ...]:
    """The (N, S, chunk_n, chunk_s, s_splits) arguments every streaming kernel takes (channel
    runs: S is the run's length; edges mode: the aligned interior's)."""
    spatial = tiling.interior or view.shape[2] * (tiling.run_channels or 1)
    return (view.shape[0], spatial, tiling.chunk_n, tiling.chunk_s, tiling.s_splits)


def _edges(view: torch.Tensor, tiling: Tiling) -> dict[str, int | bool]:
    """The per-channel kernels' ``channel_size`` (positions per channel; ``_geometry`` may pass
    another S) and ``EDGES`` (edges mode, ``interior_length``) arguments."""
    return {"channel_size": view.shape[2], "EDGES": tiling.interior > 0}


def _runs(view: torch.Tensor, tiling: Tiling) -> dict[str, int | bool]:
    """The elementwise kernels' layout arguments: channels per run (0: none), and ``_edges``."""
    return {"RUN_CHANNELS": tiling.run_channels, **_edges(view, tiling)}


def _blocks(tiling: Tiling) -> dict[str, int]:
    cap = {"maxnreg": tiling.max_registers} if tiling.max_registers else {}
    return {"BLOCK_C": tiling.block_c, "BLOCK_N": tiling.block_n, "BLOCK_S": tiling.block_s,
            "num_warps": tiling.num_warps, **cap}  # fmt: skip


class MergePlan(NamedTuple):
    """How a reduction split ``splits`` ways merges in-kernel (``kernels/merge.py``); fixed by the
    shape, so the summation order is."""

    group_splits: int  # splits per group (the first merge level)
    rows: int  # partial rows added per merge step (MERGE_TILE values per array)
    groups: int  # groups; more than one adds a second level over the groups

    def serial_steps(self, splits: int) -> int:
        """Dependent round trips on the critical path: per level a ticket and its load steps."""
        steps = 1 + _cdiv(min(splits, self.group_splits), self.rows)
        return steps + (1 + _cdiv(self.groups, self.rows) if self.groups > 1 else 0)


@functools.lru_cache(maxsize=1024)
def merge_plan(block_c: int, splits: int) -> MergePlan:
    """The ``MergePlan`` with the fewest serial steps for ``splits`` splits of ``block_c``-channel
    blocks: groups of ``rows x 2**k`` splits (e.g. 25 splits of 64 channels: one level of two
    steps, 3 round trips, rather than two levels of one, 4; 175 splits: 11 groups of 16, 4)."""
    rows = min(_next_power_of_2(splits), max(MERGE_TILE // block_c, 1))
    best = None
    group_splits = rows
    while True:
        plan = MergePlan(group_splits, rows, _cdiv(splits, group_splits))
        if best is None or plan.serial_steps(splits) <= best.serial_steps(splits):
            best = plan
        if group_splits >= splits:
            return best
        group_splits *= 2


@functools.lru_cache(maxsize=4096)
def _tickets_needed(channels: int, block_c: int, splits: int, run_channels: int = 0) -> int:
    """Merge tickets a reduction over ``channels`` in blocks of ``block_c`` (channel runs: of
    ``run_channels``, padded to ``block_c``) split ``splits`` ways uses: one per group of each
    channel block, plus one per channel block with several groups."""
    if splits <= 1:
        return 0
    blocks = _cdiv(channels, run_channels or block_c)
    groups = merge_plan(block_c, splits).groups
    return blocks * groups + (blocks if groups > 1 else 0)


def merge_tickets_size(channels: int) -> int:
    """Merge tickets any launch over ``channels`` channels can use (the launchers' block sizes,
    at most ``MAX_SPLITS`` splits): the size of a ``merge_tickets`` buffer that serves every
    input shape."""
    sizes = [_tickets_needed(channels, 1 << bits, MAX_SPLITS) for bits in range(_MAX_BLOCK_C.bit_length())]
    # channel runs: blocks of up to a step's elements, each run more than half its padded block
    for bits in range(1, _tile_elements(2).bit_length()):
        sizes.append(_tickets_needed(channels, 1 << bits, MAX_SPLITS, (1 << (bits - 1)) + 1))
    return max(sizes)


def new_merge_tickets(channels: int, device: torch.device) -> torch.Tensor:
    """Zeroed int32 merge tickets for ``channels`` channels on ``device`` (``merge_tickets_size``):
    the reductions leave them zero, so one buffer serves every call that does not overlap another
    call using it (one layer on one stream)."""
    return torch.zeros(merge_tickets_size(channels), dtype=torch.int32, device=device)


def _merge_arguments(
    channels: int, tiling: Tiling, merge_tickets: torch.Tensor | None, device: torch.device
) -> tuple[torch.Tensor | None, torch.Tensor | None, dict[str, int]]:
    """``(partials, tickets, constexprs)`` of a reduction launch: float64 scratch
    ``[2, splits + groups, C]`` and the tickets (``merge_tickets``, checked, or zeros
    allocated for this call), or Nones for an unsplit one."""
    splits = tiling.splits
    plan = merge_plan(tiling.block_c, splits)
    constexprs = {"GROUP_SPLITS": plan.group_splits, "MERGE_ROWS": plan.rows}
    if splits <= 1:
        return None, None, constexprs
    needed = _tickets_needed(channels, tiling.block_c, splits, tiling.run_channels)
    if merge_tickets is None:
        merge_tickets = torch.zeros(needed, dtype=torch.int32, device=device)
    elif merge_tickets.dtype != torch.int32 or merge_tickets.device != device or merge_tickets.numel() < needed:
        raise ValueError(
            f"merge_tickets must be int32 zeros on {device} with at least {needed} elements "
            f"(launchers.new_merge_tickets); got {merge_tickets.dtype} {tuple(merge_tickets.shape)} "
            f"on {merge_tickets.device}"
        )
    partials = torch.empty(2, splits + plan.groups, channels, dtype=torch.float64, device=device)
    return partials, merge_tickets, constexprs


def _collapsed(*views: torch.Tensor | None) -> list[torch.Tensor | None]:
    """Every view collapsed to rows (``collapse``) when all of them can be, else unchanged."""
    first = next(view for view in views if view is not None)
    if collapse(first, *views) is first:
        return list(views)
    return [None if view is None else collapse(view) for view in views]


def _statistics_tiling(x: torch.Tensor, forced: Tiling | None, programs: int) -> tuple[Tiling, int]:
    """The statistics kernel's tiling of ``x`` (collapsed) and its FOLD: 16-bit inputs take
    ``STATISTICS_FOLD`` times the usual elements per step, lanes ``l`` and ``l + block_m / 2``
    sharing an accumulator (as many registers, the loop's fixed work spread over twice the bytes),
    wherever the tensor has steps enough for every program at that size; else the usual tiling.
    Folding needs ``block_n`` a multiple of the fold (the folded lanes then share a position)."""
    if forced is not None:
        tiling = forced.refit(x)
        fits = x.element_size() == 2 and tiling.block_n % STATISTICS_FOLD == 0
        return tiling, STATISTICS_FOLD if fits else 1
    tiling = choose_tiling(x, programs)
    if x.element_size() != 2:
        return tiling, 1
    return _folded_statistics_tiling(tiling, choose_tiling(x, programs, fold=STATISTICS_FOLD), tuple(x.shape))


@functools.lru_cache(maxsize=4096)
def _folded_statistics_tiling(tiling: Tiling, folded: Tiling, shape: tuple[int, int, int]) -> tuple[Tiling, int]:
    """``_statistics_tiling`` for 16-bit inputs, from the usual tiling and the one with twice the
    elements per step (cached: the launcher asks on every call)."""
    cut_back = folded.block_c * folded.block_m < STATISTICS_FOLD * tiling.block_c * tiling.block_m
    if cut_back or folded.block_n % STATISTICS_FOLD:
        # The larger steps were cut back (too few steps for the grid) or cannot fold: the usual
        # step, its accumulators folded where that stays within each thread (S1 channels_last:
        # 106 -> 72 registers, 4 -> 6 resident programs, loop 159 -> 165 instructions).
        return tiling, STATISTICS_FOLD if _folds_within_threads(tiling, STATISTICS_FOLD) else 1
    narrow = replace(tiling, num_warps=tiling.num_warps // STATISTICS_FOLD, max_registers=NARROW_STATISTICS_REGISTERS)
    gain = lane_utilization(shape, tiling) - lane_utilization(shape, folded)
    halves = tiling.num_warps == _NUM_WARPS and _folds_within_threads(narrow, STATISTICS_FOLD)
    if halves and gain > MIN_UTILIZATION_GAIN:
        # The larger steps pad the rows more (S9 bf16, rows of 9400: 2 x 4096 positions a step,
        # 77% of the lanes hold elements; 2 x 2048, 92%): the usual steps on half the warps, each
        # thread with the folded step's elements (sm_90: the same 128 bytes and loop a thread).
        return narrow, STATISTICS_FOLD
    return folded, STATISTICS_FOLD


# Registers per thread of the statistics' programs that take the usual 16-bit steps on half the
# warps (_folded_statistics_tiling): 6 programs of 2 warps per SM (65536 / (64 x 168)). sm_90, S9
# bf16: 176 -> 168 registers (two spill accesses, outside the loop; a cap of 160 made 16 and a loop
# 9 instructions longer), 5 -> 6 resident programs, so that its 2048 programs run in 2.6 waves, not
# 3.1 (the model: the last wave's 0.1 of a wave took 0.6 of one; forward 60.4 -> 57.8 us).
NARROW_STATISTICS_REGISTERS = 168


# The least gain in lane utilization for which the statistics of 16-bit inputs take the usual
# steps on half the warps rather than steps of twice the elements (_folded_statistics_tiling).
MIN_UTILIZATION_GAIN = 0.05


def _padded(length: int, chunk: int, block: int) -> int:
    """Positions (or samples) that splits of ``chunk`` walk over ``length``, in whole blocks."""
    whole, rest = divmod(length, chunk)
    return whole * _cdiv(chunk, block) * block + _cdiv(rest, block) * block


def lane_utilization(shape: tuple[int, int, int], tiling: Tiling) -> float:
    """The fraction of the lanes ``tiling``'s steps walk over a ``[N, C, S]`` view that hold
    elements (each split pads its rectangle to whole steps; channel blocks are not counted)."""
    batch, _, spatial = shape
    lanes = _padded(batch, tiling.chunk_n, tiling.block_n) * _padded(spatial, tiling.chunk_s, tiling.block_s)
    return batch * spatial / lanes if lanes else 1.0


def _statistics_tail_loop(x: torch.Tensor) -> bool:
    """Whether the statistics walk a split's partial last column in a loop of their own
    (``kernels/stats.py``, ``TAIL_LOOP``; it applies where N is whole and S is not), so that the
    whole steps read with no select: for 16-bit inputs, whose loop is issue-bound (4 instructions
    per element). sm_90, S5 bf16 (rows of 784 in steps of 128 positions): loop 344 -> 320 SASS
    (322 over both loops' steps), the model's issue need 1.58 -> 1.48.
    Not fp32 (its loop needs at most 1.0 of 2.5): there the split loops' fewer registers (S5:
    76 -> 72, 7 resident programs of 7.76 per SM) left a last wave of 100 programs, and the
    model's S5 fp32 forward went 156.7 -> 162.9 us."""
    return x.element_size() == 2


def _folds_within_threads(tiling: Tiling, fold: int) -> bool:
    """Whether lanes ``l`` and ``l + block_m / fold`` of ``tiling``'s steps can share an accumulator
    without leaving their thread: ``block_n`` a multiple of ``fold`` (the lanes share a position)
    and a full 16-bit step of ``2 x _THREAD_ELEMENTS`` elements per thread (S2's 8-element
    steps folded across threads: the gradient sums' loop 65 -> 114 instructions)."""
    return tiling.block_n % fold == 0 and tiling.thread_elements >= 2 * _THREAD_ELEMENTS


def _reduction_stages(tiling: Tiling) -> int:
    """A reduction's software-pipelining depth: REDUCTION_STAGES, or none where its programs take
    one step each. Such a program has nothing to fetch ahead, and the pipeline's bookkeeping
    (stage indices, barriers, copies through shared memory) only costs issue: S2 bf16 statistics,
    55 -> 37 SASS instructions per 16 bytes on sm_90."""
    return REDUCTION_STAGES if tiling.steps() > 1 else 1


def _elementwise_stages(tiling: Tiling) -> int:
    """An elementwise kernel's software-pipelining depth: ELEMENTWISE_STAGES, or none where its
    programs take one step each (nothing to fetch ahead, as in ``_reduction_stages``): S1
    channels_last bf16 normalize, 200 -> 164 SASS instructions per 64 bytes on sm_90."""
    return ELEMENTWISE_STAGES if tiling.steps() > 1 else 1


def _run_fold(x: torch.Tensor, tiling: Tiling) -> int:
    """The channel-run reductions' FOLD: 16-bit steps add their rows in slices of 16 accumulators
    per thread (sm_90, S = 49 bf16 statistics: 138 -> 96 registers with two rows a step, 3 -> 5
    programs per SM), so that the statistics can take twice the rows per step
    (``STATISTICS_FOLD``: 64 elements per thread, the loop's fixed work over 128 bytes)."""
    if x.element_size() != 2:
        return 1
    slice_rows = max(_tile_elements(2) // 2 // tiling.block_s, 1)
    return max(tiling.block_n // slice_rows, 1)


def partial_stats(
    x: torch.Tensor,
    merge_tickets: torch.Tensor | None = None,
    *,
    tiling: Tiling | None = None,
    dispatch: Dispatch = _DEFAULT_DISPATCH,
) -> torch.Tensor:
    """Local per-channel statistics of ``x`` ``[N, C, S]``.

    Returns float64 ``[3, C]``: element count, sum and sum of squares per channel (moments from
    pilot-shifted per-lane sums expanded in float64; see ``kernels/stats.py``). N may be 0. One
    kernel: a channel split over several programs is merged by the last of them, using
    ``merge_tickets`` (``new_merge_tickets``; None: zeros allocated for this call, one more
    launch). ``tiling`` forces block sizes and splits (tests); ``dispatch`` redirects the launches.
    """
    (x,) = _collapsed(x)
    channels = x.shape[1]
    programs = _programs(dispatch, x.device)
    fold = STATISTICS_FOLD if x.element_size() == 2 else 1
    runs = channel_run_tiling(x, programs, reduction=True, fold=fold) if tiling is None else None
    interior = interior_length(x) if tiling is None and runs is None else None
    if runs is not None:
        tiling, fold = runs, 1
    elif interior is not None:  # edges mode: blocks and splits of the rows' aligned interiors
        tiling, fold = _statistics_tiling(_interior_view(x, interior), None, programs)
        tiling = replace(tiling, interior=interior)
    else:
        tiling, fold = _statistics_tiling(x, tiling, programs)
    acc_dtype = accumulation_dtype(x.dtype)
    packed = torch.empty(3, channels, dtype=torch.float64, device=x.device)
    partials, tickets, merge = _merge_arguments(channels, tiling, merge_tickets, x.device)
    int64, vec, cvec, _ = _access(tiling, _geometries(x))
    if runs is not None:  # S odd, contiguous: runs of channels (kernels/stats.py, _run_stats_kernel)
        dispatch.launch(
            _run_stats_kernel, tiling.grid(channels),
            (x, packed, partials, tickets, channels, x.shape[0], x.shape[2], tiling.chunk_n, tiling.splits,
             x.stride(0)),
            dict(ACC_DTYPE=_tl_dtype(acc_dtype), INT64=int64, VEC=vec, NUM_STAGES=_reduction_stages(tiling),
                 RUN_CHANNELS=tiling.run_channels, FOLD=_run_fold(x, tiling), maxnreg=RUN_STATISTICS_REGISTERS,
                 **merge, **_blocks(tiling)),
        )  # fmt: skip
        return packed
    dispatch.launch(
        _partial_stats_kernel, tiling.grid(channels),
        (x, packed, partials, tickets, channels, *_geometry(x, tiling), tiling.splits, *x.stride()),
        dict(ACC_DTYPE=_tl_dtype(acc_dtype), INT64=int64, VEC=vec, CVEC=cvec,
             NUM_STAGES=_reduction_stages(tiling), FOLD=fold, **_whole_steps(x, tiling), **merge,
             **_edges(x, tiling), TAIL_LOOP=_statistics_tail_loop(x), **_blocks(tiling)),
    )  # fmt: skip
    return packed


def normalize(
    x: torch.Tensor,
    out: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    stats: torch.Tensor | None,
    running: RunningStats | None,
    eps: float,
    epilogue: Epilogue,
    *,
    tiling: Tiling | None = None,
    dispatch: Dispatch = _DEFAULT_DISPATCH,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Write ``out`` = ``act(weight * (x - mean) * invstd + bias [+ residual])``, all ``[N, C, S]``.

    ``epilogue.residual`` (an ``[N, C, S]`` view or None) and ``epilogue.activation`` (a code of
    ``kernels.activation.ACTIVATION_CODES``) are fused.

    With ``stats`` (float64 ``[3, C]`` global count, sum, sum of squares) the batch statistics
    are used and ``running`` (when given) is updated in place by its rule
    (``contract.RunningStats``); a zero global count leaves the statistics unchanged, and
    ``running.num_batches_tracked`` is incremented on the device, in this same launch. Without
    ``stats`` ``running`` normalizes and nothing is updated. Returns ``(mean, invstd)`` ``[C]``
    in the accumulation dtype, as used, for backward.
    """
    running_mean, running_var = (None, None) if running is None else (running.mean, running.var)
    num_batches_tracked = None if running is None else running.num_batches_tracked
    momentum = None if running is None else running.momentum
    residual, activation, negative_slope = epilogue.residual, epilogue.activation, epilogue.negative_slope
    x, out, residual = _collapsed(x, out, residual)
    channels = x.shape[1]
    batch_stats = stats is not None
    cumulative = batch_stats and running_mean is not None and momentum is None
    if cumulative and num_batches_tracked is None:
        raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
    geometries = _geometries(x, out, residual)
    tiling = tiling.refit(x) if tiling else elementwise_tiling(
        "normalize", x, lambda: dict(BATCH_STATS=batch_stats, CUMULATIVE=cumulative, ACTIVATION=activation,
                                     RESIDUAL=residual is not None, SAME_STRIDES=_same_strides(geometries)),
        dispatch, runs=(out, residual), one_wave=True, reads=1 + (residual is not None), single_wave=True,
    )  # fmt: skip
    acc_dtype = accumulation_dtype(x.dtype)
    mean = torch.empty(channels, dtype=acc_dtype, device=x.device)
    invstd = torch.empty(channels, dtype=acc_dtype, device=x.device)
    int64, vec, cvec, same_strides = _access(tiling, geometries)
    dispatch.launch(
        _normalize_kernel, tiling.grid(channels),
        (x, out, residual, weight, bias, stats, mean, invstd, running_mean, running_var,
         num_batches_tracked if batch_stats else None,
         *float_halves(momentum or 0.0), *float_halves(eps), *float_halves(negative_slope),
         channels, *_geometry(x, tiling), *x.stride(), *out.stride(), *_strides(residual)),
        dict(BATCH_STATS=batch_stats, CUMULATIVE=cumulative, ACTIVATION=activation,
             ACC_DTYPE=_tl_dtype(acc_dtype), INT64=int64, VEC=vec, CVEC=cvec, SAME_STRIDES=same_strides,
             NUM_STAGES=_elementwise_stages(tiling), **_runs(x, tiling), **_blocks(tiling)),
    )  # fmt: skip
    return mean, invstd


def backward_reduce(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    saved: SavedStatistics,
    epilogue: Epilogue,
    weight_grad_dtype: torch.dtype | None,
    bias_grad_dtype: torch.dtype | None,
    merge_tickets: torch.Tensor | None = None,
    *,
    tiling: Tiling | None = None,
    dispatch: Dispatch = _DEFAULT_DISPATCH,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Per-channel ``sum(dy)`` and ``sum(dy * xhat)`` of ``grad_out``, ``x`` ``[N, C, S]``.

    With a fused activation, ``dy`` is the gradient at the activation's input, recomputed from
    ``x``, the saved ``mean``/``invstd``, ``weight``, ``bias`` and ``epilogue.residual`` (as in
    the forward).

    Returns ``(sums, grad_weight, grad_bias)``: ``sums`` is ``[2, C]`` in the accumulation
    dtype (what backward all-reduces); the local parameter grads ``[C]`` are returned in the
    given dtypes, or None where the dtype is None. One kernel: split channels are merged by
    their last program, using ``merge_tickets`` (as in ``partial_stats``).
    """
    mean, invstd = saved.mean, saved.invstd
    activation, negative_slope = epilogue.activation, epilogue.negative_slope
    residual = epilogue.residual if activation else None
    grad_out, x, residual = _collapsed(grad_out, x, residual)
    channels = x.shape[1]
    programs = _programs(dispatch, x.device)
    runs = channel_run_tiling(x, programs, grad_out, residual, reduction=True) if tiling is None else None
    interior = interior_length(x, grad_out, residual) if tiling is None and runs is None else None
    if runs is not None:
        tiling = runs
    elif interior is not None:  # edges mode: blocks and splits of the rows' aligned interiors
        tiling = replace(choose_tiling(_interior_view(x, interior), programs), interior=interior)
    else:
        tiling = tiling.refit(x) if tiling else choose_tiling(x, programs)
    acc_dtype = accumulation_dtype(x.dtype)
    sums = torch.empty(2, channels, dtype=acc_dtype, device=x.device)
    grad_weight = None if weight_grad_dtype is None else torch.empty(channels, dtype=weight_grad_dtype, device=x.device)
    grad_bias = None if bias_grad_dtype is None else torch.empty(channels, dtype=bias_grad_dtype, device=x.device)
    partials, tickets, merge = _merge_arguments(channels, tiling, merge_tickets, x.device)
    int64, vec, cvec, same_strides = _access(tiling, _geometries(x, grad_out, residual))
    parameters = (mean, invstd, weight if activation else None, bias if activation else None, sums, grad_weight,
                  grad_bias, partials, tickets, channels)  # fmt: skip
    if runs is not None:  # S odd, contiguous: runs of channels (kernels/backward.py, _run_backward_reduce_kernel)
        dispatch.launch(
            _run_backward_reduce_kernel, tiling.grid(channels),
            (grad_out, x, residual, *parameters, x.shape[0], x.shape[2], tiling.chunk_n, tiling.splits,
             *float_halves(negative_slope), x.stride(0)),
            dict(ACTIVATION=activation, ACC_DTYPE=_tl_dtype(acc_dtype), INT64=int64, VEC=vec,
                 NUM_STAGES=_reduction_stages(tiling), RUN_CHANNELS=tiling.run_channels, FOLD=_run_fold(x, tiling),
                 **merge, **_blocks(tiling)),
        )  # fmt: skip
        return sums, grad_weight, grad_bias
    dispatch.launch(
        _backward_reduce_kernel, tiling.grid(channels),
        (grad_out, x, residual, *parameters, *_geometry(x, tiling), tiling.splits, *float_halves(negative_slope),
         *grad_out.stride(), *x.stride(), *_strides(residual)),
        dict(ACTIVATION=activation, ACC_DTYPE=_tl_dtype(acc_dtype), INT64=int64, VEC=vec, CVEC=cvec,
             SAME_STRIDES=same_strides, NUM_STAGES=_reduction_stages(tiling), **merge, **_edges(x, tiling),
             FOLD=_gradient_fold(x, tiling), **_blocks(tiling)),
    )  # fmt: skip
    return sums, grad_weight, grad_bias


def _gradient_fold(x: torch.Tensor, tiling: Tiling) -> int:
    """The gradient sums' FOLD: 16-bit inputs add a step's two row halves into one set of per-lane
    accumulators (``kernels/indexing.py``, ``fold_into``): half the accumulator registers for
    the same additions, where that stays within each thread (``_folds_within_threads``), and not
    in edges mode (S9: already 4 resident programs with 128 bytes in flight each; folded, the
    model's last wave cost it 2%)."""
    fits = _folds_within_threads(tiling, GRADIENT_FOLD) and not tiling.interior
    return GRADIENT_FOLD if x.element_size() == 2 and fits else 1


def backward_dx(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    out: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    saved: SavedStatistics,
    sums: torch.Tensor | None,
    epilogue: Epilogue,
    grad_residual: torch.Tensor | None = None,
    *,
    tiling: Tiling | None = None,
    dispatch: Dispatch = _DEFAULT_DISPATCH,
) -> None:
    """Write the input gradient into ``out`` ``[N, C, S]`` (and the residual's into ``grad_residual``).

    ``out=None`` computes only ``grad_residual``.

    With ``sums`` (global ``[2, C]`` sum_dy, sum_dy_xhat; ``saved.count`` holds the global
    element count) the gradient through the batch statistics is included; without them
    ``dx = weight * invstd * dy`` (the forward used running statistics, or the input needs no
    gradient). With a fused activation, ``dy`` is first taken back through it (recomputed from
    ``x``, the statistics, ``weight``, ``bias`` and ``epilogue.residual``); that gradient is the
    residual's, written to ``grad_residual``, which must have the residual's strides.
    """
    mean, invstd, count = saved.mean, saved.invstd, saved.count if sums is not None else None
    residual, activation, negative_slope = epilogue.residual, epilogue.activation, epilogue.negative_slope
    if grad_residual is not None and residual is not None and grad_residual.stride() != residual.stride():
        raise ValueError("grad_residual must have the residual's strides")
    residual_layout = residual if residual is not None else grad_residual
    residual = residual if activation else None
    grad_out, x, out, residual, grad_residual, residual_layout = _collapsed(
        grad_out, x, out, residual, grad_residual, residual_layout
    )
    channels = x.shape[1]
    geometries = _geometries(x, grad_out, out, residual_layout)
    tiling = tiling.refit(x) if tiling else elementwise_tiling(
        "backward_dx", x, lambda: dict(BATCH_STATS=sums is not None, ACTIVATION=activation,
                                       RESIDUAL=residual is not None, GRAD_RESIDUAL=grad_residual is not None,
                                       INPUT_GRAD=out is not None, SAME_STRIDES=_same_strides(geometries)),
        dispatch, runs=(grad_out, out, residual_layout), reads=2 + (residual is not None),
        single_wave=_dx_single_wave(x),
    )  # fmt: skip
    int64, vec, cvec, same_strides = _access(tiling, geometries)
    stages = _elementwise_stages(tiling) if vec > 1 or cvec > 1 else 1
    dispatch.launch(
        _backward_dx_kernel, tiling.grid(channels),
        (grad_out, x, out, residual, grad_residual, mean, invstd, weight, bias if activation else None, sums, count,
         channels, *_geometry(x, tiling), *float_halves(negative_slope),
         *grad_out.stride(), *x.stride(), *_strides(out), *_strides(residual_layout)),
        dict(BATCH_STATS=sums is not None, ACTIVATION=activation, ACC_DTYPE=_tl_dtype(accumulation_dtype(x.dtype)),
             INT64=int64, VEC=vec, CVEC=cvec, SAME_STRIDES=same_strides, NUM_STAGES=stages,
             **_runs(x, tiling), **_blocks(tiling)),
    )  # fmt: skip


def _dx_single_wave(x: torch.Tensor) -> bool:
    """Whether the input gradient takes the one-wave grid (``_one_wave_tiling``): where it holds 5
    programs per SM or more. Not for 16-bit channels_last: the per-channel coefficients of its 8
    channels a thread take 110-119 registers on sm_90, 4 programs per SM, and the one-wave grid's
    4-5 per SM left a last wave of a few programs (the model: S5-S11 channels_last bf16 backward
    12-20% slower); its grid of 16-step programs runs 1.5 waves or more."""
    return not (x.element_size() == 2 and layout_of(x) == "channels_last")


def derivative_from_output(epilogue: Epilogue) -> bool:
    """``contract.KernelBackend.derivative_from_output``: never. The kernels recompute the
    activation's input from x and the residual in registers, reading the residual where they would
    read the output (the same bytes), so the Function saves nothing the output's size."""
    return False
