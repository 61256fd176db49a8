"""``torch.library`` custom ops wrapping ``stages.forward``/``stages.backward`` for ``torch.compile``.

Under ``torch.compile`` the autograd Function calls these ops instead of the stages directly:
dynamo and inductor see two opaque ops with fake (meta) implementations, so a converted model
compiles with ``fullgraph=True`` and no graph break. The all-reduce stays *inside* the ops
(rather than being rewritten into functional collectives): the collective then runs exactly
where and as it does in eager mode, over the process group named by ``group_name``, and the
graph holds no ProcessGroup object. Running statistics and ``num_batches_tracked`` are declared
as mutated arguments, so functionalization orders their updates correctly; ``merge_tickets`` (the
reductions' split-merge scratch) is not: the kernels leave it as they found it, all zeros.

The ops' flat arguments are ``contract.FORWARD_FIELDS`` / ``BACKWARD_FIELDS``, parsed by name
into ``contract.ForwardCall`` / ``BackwardCall``; the signatures below spell them out because
``torch.library`` reads its schema from them (a test checks that they agree).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import stages
from .contract import BACKWARD_FIELDS, FORWARD_FIELDS, BackwardCall, ForwardCall


@torch.library.custom_op("triton_syncbn::forward", mutates_args=("running_mean", "running_var", "num_batches_tracked"))
def forward_op(
    input: Tensor,
    residual: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor | None,
    momentum: float | None,
    eps: float,
    use_batch_stats: bool,
    group_name: str,
    activation: int,
    negative_slope: float,
    check_finite: bool,
    merge_tickets: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``stages.forward`` as an op: ``(output, mean, invstd, count)``."""
    return stages.forward(ForwardCall.from_flat(*_in_order(locals(), FORWARD_FIELDS)))


@forward_op.register_fake
def _forward_fake(*args: object) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return stages.forward_meta(ForwardCall.from_flat(*args))


@torch.library.custom_op("triton_syncbn::backward", mutates_args=())
def backward_op(
    grad_output: Tensor,
    input: Tensor,
    residual: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    invstd: Tensor,
    count: Tensor,
    group_name: str,
    activation: int,
    negative_slope: float,
    needs: list[bool],
    merge_tickets: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``stages.backward`` as an op; gradients that ``needs`` does not ask for come back empty."""
    grads = stages.backward(BackwardCall.from_flat(*_in_order(locals(), BACKWARD_FIELDS)))
    return tuple(grad if grad is not None else input.new_empty(0) for grad in grads)


@backward_op.register_fake
def _backward_fake(*args: object) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    call = BackwardCall.from_flat(*args)
    like = (call.input, call.epilogue.residual, call.weight, call.bias)
    return tuple(
        torch.empty_like(tensor) if need and tensor is not None else call.input.new_empty(0)
        for need, tensor in zip(call.needs.as_list(), like, strict=True)
    )


def _in_order(values: dict[str, object], names: tuple[str, ...]) -> list[object]:
    """An op's arguments, by name, in the contract's order."""
    return [values[name] for name in names]
