"""The autograd Function: orchestration only (the work is in ``stages``)."""

from __future__ import annotations

from typing import Any

import torch

from . import ops, stages


class SyncBatchNormFunction(torch.autograd.Function):
    """``act(batch_norm(input) + residual)`` over the union of the group's batches.

    ``input`` is ``(N, C, *)`` (N may be 0 on some ranks); ``residual`` has its shape or is None;
    ``weight``, ``bias``, ``running_mean``, ``running_var`` are ``[C]`` or None. One all-reduce
    forward and at most one backward. Inputs are validated by the caller
    (``functional.batch_norm_function``). Eagerly the stages run directly; under
    ``torch.compile`` they run behind the custom ops of ``ops.py``.
    """

    @staticmethod
    def forward(
        ctx: Any,
        input: torch.Tensor,
        residual: torch.Tensor | None,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        running_mean: torch.Tensor | None,
        running_var: torch.Tensor | None,
        num_batches_tracked: torch.Tensor | None,
        momentum: float | None,
        eps: float,
        use_batch_stats: bool,
        group_name: str,
        activation: int,
        negative_slope: float,
        check_finite: bool = False,
    ) -> torch.Tensor:
        cumulative = momentum is None and num_batches_tracked is not None
        run = ops.forward_op if torch.compiler.is_compiling() else stages.forward
        output, mean, invstd, count = run(
            input, residual, weight, bias, running_mean, running_var, num_batches_tracked,
            0.0 if momentum is None else momentum, cumulative, eps, use_batch_stats, group_name, activation,
            negative_slope, check_finite,
        )  # fmt: skip
        # Backward recomputes the activation's input from x and the statistics; it needs the
        # residual only then. Nothing the size of the output is saved (weight and bias are
        # parameters: saving them costs no memory).
        fused = activation != 0
        ctx.save_for_backward(input, weight, bias, residual if fused else None, mean, invstd, count)
        ctx.group_name = group_name
        ctx.activation = activation
        ctx.negative_slope = negative_slope
        return output

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        input, weight, bias, residual, mean, invstd, count = ctx.saved_tensors
        need_input, need_residual, need_weight, need_bias = ctx.needs_input_grad[:4]
        fused = ctx.activation != 0
        needs = [need_input, need_residual and fused, need_weight, need_bias]
        if torch.compiler.is_compiling():
            grads = ops.backward_op(
                grad_output, input, residual, weight, bias, mean, invstd, count, ctx.group_name, ctx.activation,
                ctx.negative_slope, needs,
            )  # fmt: skip
            grads = tuple(grad if need else None for grad, need in zip(grads, needs, strict=True))
        else:
            grads = stages.backward(
                grad_output, input, residual, weight, bias, mean, invstd, count, ctx.group_name, ctx.activation,
                ctx.negative_slope, needs,
            )  # fmt: skip
        grad_input, grad_residual, grad_weight, grad_bias = grads
        if need_residual and not fused:
            grad_residual = grad_output  # y = bn(x) + residual: the residual's gradient is dy
        return (grad_input, grad_residual, grad_weight, grad_bias) + (None,) * 10
