"""Split merges folded into the reduction kernels: the last program of a channel block merges.

A reduction that splits a channel block over ``num_splits`` programs (grid axis 1) has every
program store its float64 partial sums as one row of ``partials[2, num_splits + groups, C]``,
then take a ticket; the program that takes the last ticket of its group adds the group's rows up
and, with several groups, stores the group's sum in row ``num_splits + group`` and takes a
ticket of the second level, whose last program adds the group rows. So a direction needs no
separate merge kernel. A merge adds ``MERGE_ROWS`` rows per step (its loads issued together).

Order: rows are added in a fixed order (``MERGE_ROWS`` rows per step, a lane per row, one tree
at the end), whichever program arrives last, so results are bitwise reproducible and the same
on every rank.

Tickets (``tickets[channel_blocks x groups (+ channel_blocks when groups > 1)]`` int32) must be
zero when the kernel starts; each is reset to zero by the program that takes its last ticket, so
a buffer that outlives the call needs zeroing once (the module owns one per device).

Memory ordering (the pattern of CUDA's threadFenceReduction sample and CUTLASS's semaphores):
every thread's partial stores, a CTA barrier, then one thread's ``atom.add.acq_rel.gpu``
(release: the stores are visible before the ticket; acquire in the last program: the other
programs' stores are visible to it, and the barrier that broadcasts the ticket orders its other
threads' loads after it). The merge loads bypass L1 (``.cg``). Triton's interpreter runs
programs one after another and so cannot catch a missing fence; ``tests/test_gpu.py`` runs split
shapes on a GPU.
"""

import triton
import triton.language as tl


@triton.jit
def _is_last_arrival(tickets_ptr, index, arrivals):
    """Take a ticket at ``tickets_ptr[index]``: True in the program that takes the
    ``arrivals``-th (which then owns the merge, and resets the ticket to zero)."""
    tl.debug_barrier()  # every thread's partial stores come before the release below
    ticket = tl.atomic_add(tickets_ptr + index, 1, sem="acq_rel", scope="gpu")
    last = ticket == arrivals - 1
    if last:  # every other program of the group has taken its ticket: zero for the next launch
        tl.store(tickets_ptr + index, 0)
    return last


@triton.jit
def _sum_rows(
    partials_ptr, array_stride, first_row, rows, channels, channel_mask, C,
    BLOCK_C: tl.constexpr, ROWS: tl.constexpr,
):  # fmt: skip
    """Sums over ``rows`` rows from ``first_row`` of the two float64 arrays ``[rows, C]`` at
    ``partials_ptr`` and ``partials_ptr + array_stride``: two ``[BLOCK_C]``, in a fixed order."""
    first_sum = tl.zeros([ROWS, BLOCK_C], dtype=tl.float64)
    second_sum = tl.zeros([ROWS, BLOCK_C], dtype=tl.float64)
    for start in range(0, rows, ROWS):
        row = start + tl.arange(0, ROWS)
        mask = (row < rows)[:, None] & channel_mask[None, :]
        offsets = (first_row + row)[:, None] * C + channels[None, :]
        first_sum += tl.load(partials_ptr + offsets, mask=mask, other=0.0, cache_modifier=".cg")
        second_sum += tl.load(partials_ptr + array_stride + offsets, mask=mask, other=0.0, cache_modifier=".cg")
    return tl.sum(first_sum, axis=0), tl.sum(second_sum, axis=0)


@triton.jit
def _store_row(partials_ptr, array_stride, row, channels, channel_mask, C, first, second):
    offsets = row * C + channels
    tl.store(partials_ptr + offsets, first, mask=channel_mask)
    tl.store(partials_ptr + array_stride + offsets, second, mask=channel_mask)


@triton.jit
def merge_splits(
    partials_ptr, tickets_ptr, channels, channel_mask, C, num_splits, first, second,
    BLOCK_C: tl.constexpr, GROUP_SPLITS: tl.constexpr, MERGE_ROWS: tl.constexpr,
):  # fmt: skip
    """Store this program's float64 partials ``first``, ``second`` ``[BLOCK_C]`` as row
    ``program_id(1)`` of ``partials_ptr[2, num_splits + groups, C]`` and merge (see the module
    docstring). Returns ``(done, first, second)``: ``done`` is True in exactly one program per
    channel block, which then holds the sums over every split."""
    split = tl.program_id(1)
    block = tl.program_id(0)
    groups = tl.cdiv(num_splits, GROUP_SPLITS)
    array_stride = (num_splits + groups) * C
    _store_row(partials_ptr, array_stride, split, channels, channel_mask, C, first, second)
    group = split // GROUP_SPLITS
    group_first = group * GROUP_SPLITS
    members = tl.minimum(num_splits - group_first, GROUP_SPLITS)
    done = split < 0  # False, as a tensor (both branches below must yield one)
    ticket = block * groups + group
    if _is_last_arrival(tickets_ptr, ticket, members):
        first, second = _sum_rows(
            partials_ptr, array_stride, group_first, members, channels, channel_mask, C, BLOCK_C, MERGE_ROWS
        )
        if groups == 1:
            done = split >= 0
        else:
            _store_row(partials_ptr, array_stride, num_splits + group, channels, channel_mask, C, first, second)
            top = tl.num_programs(0) * groups + block
            if _is_last_arrival(tickets_ptr, top, groups):
                first, second = _sum_rows(
                    partials_ptr, array_stride, num_splits, groups, channels, channel_mask, C, BLOCK_C, MERGE_ROWS
                )
                done = split >= 0
    return done, first, second
