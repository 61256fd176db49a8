"""The one place that talks to ``torch.distributed``.

Forward all-reduces one float64 ``[3, C]`` vector (count, sum, sum of squares per channel) and
backward one ``[2, C]`` vector (sum_dy, sum_dy_xhat): O(C) whatever the world size. Ranks with
an empty batch still take part, with zeros, so every rank issues the same collectives.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def sync_group(process_group: dist.ProcessGroup | None) -> dist.ProcessGroup | None:
    """The group to synchronize statistics over, or None when there is nothing to synchronize.

    ``process_group=None`` means the default (WORLD) group. Returns None when torch.distributed
    is unavailable or uninitialized, when the group has a single rank, and on a rank outside
    the group (``get_world_size`` is -1 there), which then uses its local statistics as
    ``torch.nn.SyncBatchNorm`` does.
    """
    if not dist.is_available() or not dist.is_initialized():
        return None
    group = process_group if process_group is not None else dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def all_reduce_sum_(tensor: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Sum ``tensor`` over ``group`` in place (one collective) and return it."""
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def group_name(group: dist.ProcessGroup | None) -> str:
    """A name that ``group_from_name`` resolves back to ``group`` ("" for None).

    Names, not ProcessGroup objects, cross the custom-op boundary under ``torch.compile``.
    """
    return "" if group is None else group.group_name


def group_from_name(name: str) -> dist.ProcessGroup | None:
    """The process group registered under ``name`` (None for "")."""
    if not name:
        return None
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(name)


def verify_same_on_all_ranks(
    fields: dict[str, int],
    group: dist.ProcessGroup,
    device: torch.device,
    labels: dict[str, dict[int, str]] | None = None,
) -> None:
    """Raise ``ValueError`` on every rank of ``group`` unless every rank passed the same ``fields``.

    ``labels`` optionally names a field's values in the message (e.g. dtype codes).

    One all-reduce (MAX) of a fixed-size int64 vector ``[values, -values]``, so ranks that
    disagree still issue identical collectives: they all learn the minimum and maximum of each
    field and all raise the same error, instead of hanging or aborting in a mismatched
    collective later. ``device`` must suit the group's backend (the input's device).
    """
    values = list(fields.values())
    extremes = torch.tensor(values + [-value for value in values], dtype=torch.int64, device=device)
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX, group=group)
    maxima, minima = extremes[: len(values)].tolist(), [-value for value in extremes[len(values) :].tolist()]
    labels = labels or {}

    def show(name: str, value: int) -> str:
        return labels.get(name, {}).get(value, str(value))

    mismatched = [
        f"{name} (from {show(name, low)} to {show(name, high)} across ranks; this rank: {show(name, value)})"
        for (name, value), low, high in zip(fields.items(), minima, maxima, strict=True)
        if low != high
    ]
    if mismatched:
        raise ValueError(
            "SyncBatchNorm: the ranks of the process group disagree on " + "; ".join(mismatched) + ". Every rank "
            "must run the same layer on inputs of the same channel count and dtype, all with or all without "
            "requires_grad."
        )
