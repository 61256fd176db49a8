"""The autograd Function: orchestration only (the work is in ``stages`` and ``composite``)."""

from __future__ import annotations

from typing import Any

import torch

from . import composite, ops, stages

# The Function's inputs, in order; backward and jvp return one gradient per name.
INPUT_NAMES = (
    "input", "residual", "weight", "bias", "running_mean", "running_var", "num_batches_tracked", "momentum", "eps",
    "use_batch_stats", "group_name", "activation", "negative_slope", "check_finite",
)  # fmt: skip
_DIFFERENTIABLE = ("input", "residual", "weight", "bias")


def _is_batched(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is batched by ``torch.vmap`` or by the vmap that
    ``autograd.grad(is_grads_batched=True)`` and gradcheck's batched checks use."""
    functorch = torch._C._functorch
    return functorch.is_batchedtensor(tensor) or functorch.is_legacy_batchedtensor(tensor)


class CompilableSyncBatchNormFunction(torch.autograd.Function):
    """``act(batch_norm(input) + residual)`` over the union of the group's batches.

    ``input`` is ``(N, C, *)`` (N may be 0 on some ranks); ``residual`` has its shape or is None;
    ``weight``, ``bias``, ``running_mean``, ``running_var`` are ``[C]`` or None. Returns
    ``(output, mean, invstd, count)``; only ``output`` is differentiable. One all-reduce forward
    and at most one backward. Inputs are validated by the caller
    (``functional.batch_norm_function``). Eagerly the stages run directly; under
    ``torch.compile`` they run behind the custom ops of ``ops.py``.

    Derivatives: first-order backward runs the fused kernels. Where the gradient must itself be
    differentiable (``create_graph=True``) or runs under ``vmap``, backward runs the same formulas
    in differentiable torch ops (``composite.backward``), synchronized to every order.
    Forward-mode AD lives in the eager subclass ``SyncBatchNormFunction``: dynamo cannot trace a
    Function that defines ``jvp``, so ``torch.compile`` sees this class.
    """

    @staticmethod
    def forward(
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
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        cumulative = momentum is None and num_batches_tracked is not None
        run = ops.forward_op if torch.compiler.is_compiling() else stages.forward
        return run(
            input, residual, weight, bias, running_mean, running_var, num_batches_tracked,
            0.0 if momentum is None else momentum, cumulative, eps, use_batch_stats, group_name, activation,
            negative_slope, check_finite,
        )  # fmt: skip

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
        named = dict(zip(INPUT_NAMES, inputs, strict=False))
        _, mean, invstd, count = output
        ctx.mark_non_differentiable(mean, invstd, count)
        # Backward recomputes the activation's input from x and the statistics; it needs the
        # residual only then. Nothing the size of the output is saved (weight and bias are
        # parameters: saving them costs no memory).
        fused = named["activation"] != 0
        saved = (named["input"], named["weight"], named["bias"], named["residual"] if fused else None)
        ctx.save_for_backward(*saved, mean, invstd, count)
        ctx.save_for_forward(*saved, mean, invstd, count)
        ctx.group_name = named["group_name"]
        ctx.activation = named["activation"]
        ctx.negative_slope = named["negative_slope"]
        ctx.eps = named["eps"]

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor, *_: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        input, weight, bias, residual, mean, invstd, count = ctx.saved_tensors
        need_input, need_residual, need_weight, need_bias = ctx.needs_input_grad[:4]
        fused = ctx.activation != 0
        needs = [need_input, need_residual and fused, need_weight, need_bias]
        if torch.compiler.is_compiling():  # (torch.compile itself refuses double backward)
            grads = ops.backward_op(
                grad_output, input, residual, weight, bias, mean, invstd, count, ctx.group_name, ctx.activation,
                ctx.negative_slope, needs,
            )  # fmt: skip
            grads = tuple(grad if need else None for grad, need in zip(grads, needs, strict=True))
        elif torch.is_grad_enabled() or _is_batched(grad_output):
            grads = composite.backward(
                grad_output, input, residual, weight, bias, (mean, invstd), count.numel() > 0, ctx.eps,
                ctx.group_name, ctx.activation, ctx.negative_slope, needs,
            )  # fmt: skip
        else:
            grads = stages.backward(
                grad_output, input, residual, weight, bias, mean, invstd, count, ctx.group_name, ctx.activation,
                ctx.negative_slope, needs,
            )  # fmt: skip
        grad_input, grad_residual, grad_weight, grad_bias = grads
        if need_residual and not fused:
            grad_residual = grad_output  # y = bn(x) + residual: the residual's gradient is dy
        padding = (None,) * (len(INPUT_NAMES) - len(_DIFFERENTIABLE))
        return (grad_input, grad_residual, grad_weight, grad_bias) + padding


class SyncBatchNormFunction(CompilableSyncBatchNormFunction):
    """The Function run eagerly: ``CompilableSyncBatchNormFunction`` plus forward-mode AD
    (dual tensors, ``torch.func.jvp``: closed-form, one all-reduce) and a clear error for
    ``torch.func.vmap`` over the forward."""

    @staticmethod
    def jvp(ctx: Any, *tangents: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        input, weight, bias, residual, mean, invstd, count = ctx.saved_tensors
        named = dict(zip(INPUT_NAMES, tangents, strict=True))
        grad = composite.batch_norm_jvp(
            input, residual, weight, bias, mean, invstd, count, named, ctx.group_name, ctx.activation,
            ctx.negative_slope,
        )  # fmt: skip
        return grad, None, None, None

    @staticmethod
    def vmap(info: Any, in_dims: tuple[int | None, ...], *args: Any) -> tuple[Any, ...]:
        raise NotImplementedError(
            "triton_syncbn.SyncBatchNorm does not support torch.func.vmap over its forward (each vmapped "
            "slice would need batch statistics of its own, synchronized over the group). vmap over its "
            "backward works (torch.func.vmap of torch.func.vjp, torch.func.jacrev/hessian of a loss, and "
            "autograd.grad(..., is_grads_batched=True) in one process); for per-sample transforms of a "
            "model, use triton_syncbn.revert_sync_batchnorm(model) first."
        )
