"""The autograd Function: launch, synchronize, launch. No module state, no kernel details."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from .backend import kernel_backend
from .distributed import all_reduce_sum_
from .layout import channel_view, empty_output_like


class SyncBatchNormFunction(torch.autograd.Function):
    """Batch norm over the union of the group's batches, with one all-reduce per direction.

    ``input`` is ``(N, C, *)`` (N may be 0 on some ranks); ``weight``, ``bias``,
    ``running_mean``, ``running_var`` are ``[C]`` or None. Inputs are validated by the caller
    (``functional.batch_norm_function``).
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
        group: dist.ProcessGroup | None,
        activation: int,
        negative_slope: float,
    ) -> torch.Tensor:
        ops = kernel_backend(input)
        x = channel_view(input)
        residual_view = None if residual is None else channel_view(residual)
        output, output_view = empty_output_like(input)
        epilogue = {"residual": residual_view, "activation": activation, "negative_slope": negative_slope}
        count = None
        if use_batch_stats:
            stats = ops.partial_stats(x)
            if group is not None:
                all_reduce_sum_(stats, group)
            local_values = x.shape[0] * x.shape[2]
            # Only a rank with <= 1 value per channel can be part of a 1-value global batch, so
            # only such ranks read the global count back (a host sync in that case alone).
            if local_values <= 1 and int(stats[0, 0].item()) == 1:
                raise ValueError(
                    "Expected more than 1 value per channel when training, got 1 value per channel "
                    f"in the global batch (local input shape {tuple(input.shape)})"
                )
            if num_batches_tracked is not None:
                num_batches_tracked.add_(1)
            cumulative = momentum is None and num_batches_tracked is not None
            mean, invstd = ops.normalize(
                x, output_view, weight, bias, stats, running_mean, running_var,
                num_batches_tracked if cumulative else None, 0.0 if momentum is None else momentum, eps, **epilogue,
            )  # fmt: skip
            count = stats[0]
        else:
            mean, invstd = ops.normalize(
                x, output_view, weight, bias, None, running_mean, running_var, None, 0.0, eps, **epilogue
            )
        # Backward recomputes the activation's input from x and the statistics; it needs the
        # residual (and bias) only then. Nothing the size of the output is saved.
        fused = activation != 0
        ctx.save_for_backward(input, weight, bias if fused else None, residual if fused else None, mean, invstd, count)
        ctx.group = group
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.activation = activation
        ctx.negative_slope = negative_slope
        return output

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        input, weight, bias, residual, mean, invstd, count = ctx.saved_tensors
        need_input, need_residual, need_weight, need_bias = ctx.needs_input_grad[:4]
        use_batch_stats = count is not None
        fused = ctx.activation != 0
        ops = kernel_backend(input)
        x = channel_view(input)
        grad_out = channel_view(grad_output)
        residual_view = None if residual is None else channel_view(residual)
        epilogue = {"activation": ctx.activation, "negative_slope": ctx.negative_slope}
        grad_input = grad_residual = grad_weight = grad_bias = sums = None
        if need_residual and not fused:
            grad_residual = grad_output  # y = bn(x) + residual: the residual's gradient is dy
        if need_weight or need_bias or (need_input and use_batch_stats):
            sums, grad_weight, grad_bias = ops.backward_reduce(
                grad_out, x, mean, invstd,
                weight.dtype if need_weight else None, ctx.bias_dtype if need_bias else None,
                weight=weight, bias=bias, residual=residual_view, **epilogue,
            )  # fmt: skip
        if need_input and use_batch_stats and ctx.group is not None:
            all_reduce_sum_(sums, ctx.group)
        grad_residual_view = None
        if need_residual and fused:
            grad_residual, grad_residual_view = empty_output_like(residual)
            if grad_residual_view.stride() != residual_view.stride():  # a broadcast/strided residual
                residual_view = residual_view.contiguous()
        if need_input or grad_residual_view is not None:
            grad_input_view = None
            if need_input:
                grad_input, grad_input_view = empty_output_like(input)
            ops.backward_dx(
                grad_out, x, grad_input_view, mean, invstd, weight,
                sums if use_batch_stats and need_input else None, count,
                bias=bias, residual=residual_view, grad_residual=grad_residual_view, **epilogue,
            )  # fmt: skip
        return (grad_input, grad_residual, grad_weight, grad_bias) + (None,) * 9
