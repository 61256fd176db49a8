"""The one place that talks to ``torch.distributed``.

Forward all-reduces one float64 ``[3, C]`` vector (count, sum, sum of squares per channel) and
backward one ``[2, C]`` vector (sum_dy, sum_dy_xhat): O(C) whatever the world size. Ranks with
an empty batch still take part, with zeros, so every rank issues the same collectives.
"""

from __future__ import annotations

import socket

import torch
import torch.distributed as dist


def free_local_port() -> int:
    """A free TCP port on the loopback interface, for the rendezvous of a process group whose
    ranks all run on this machine (tests, benchmarks, single-machine demos)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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


def group_size(group: dist.ProcessGroup) -> int:
    """The number of ranks in ``group``."""
    return dist.get_world_size(group)


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


class _AllReduceSum(torch.autograd.Function):
    """A differentiable all-reduce (SUM): ``y = sum over ranks of x``.

    The adjoint of a sum over ranks is again a sum over ranks (every rank's ``y`` depends on every
    rank's ``x`` with weight 1), so backward all-reduces the gradient, through this same Function:
    derivatives of any order stay synchronized. Forward-mode: the tangent is all-reduced. Under
    ``vmap`` the whole batched tensor is all-reduced at once (ranks run in lockstep, so the batch
    sizes agree).
    """

    @staticmethod
    def forward(tensor: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        reduced = tensor.clone()
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM, group=group)
        return reduced

    @staticmethod
    def setup_context(ctx: object, inputs: tuple[torch.Tensor, dist.ProcessGroup], output: torch.Tensor) -> None:
        ctx.group = inputs[1]

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _AllReduceSum.apply(grad, ctx.group), None

    @staticmethod
    def jvp(ctx: object, tangent: torch.Tensor, _: None) -> torch.Tensor:
        return _AllReduceSum.apply(tangent, ctx.group)

    @staticmethod
    def vmap(
        info: object, in_dims: tuple[int | None, None], tensor: torch.Tensor, group: dist.ProcessGroup
    ) -> tuple[torch.Tensor, int | None]:
        return _AllReduceSum.apply(tensor, group), in_dims[0]


def all_reduce_sum(tensor: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """The sum of ``tensor`` over ``group`` as a new tensor, differentiable to any order (one
    collective per call, and one per derivative taken through it).

    Raises ``NotImplementedError`` under the vmap of ``autograd.grad(..., is_grads_batched=True)``
    (and gradcheck's batched checks), which cannot batch a collective; ``torch.func.vmap`` can.
    """
    if torch._C._functorch.is_legacy_batchedtensor(tensor):
        raise NotImplementedError(
            "SyncBatchNorm: autograd.grad(..., is_grads_batched=True) (and gradcheck's check_batched_grad) "
            f"cannot batch the collective over a process group of {dist.get_world_size(group)} ranks; "
            "use torch.func.vmap / torch.func.jacrev over the backward, which are supported, or loop over "
            "the cotangents"
        )
    return _AllReduceSum.apply(tensor, group)
