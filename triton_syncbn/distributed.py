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
