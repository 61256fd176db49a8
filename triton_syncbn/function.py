"""The autograd Function: orchestration only (the work is in ``stages`` and ``composite``)."""

from __future__ import annotations

from typing import Any

import torch

from . import composite, ops, stages
from .contract import (
    DIFFERENTIABLE_FIELDS,
    FORWARD_FIELDS,
    BackwardCall,
    Epilogue,
    ForwardCall,
    Gradients,
    SavedStatistics,
)


def _is_batched(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is batched by ``torch.vmap`` or by the vmap that
    ``autograd.grad(is_grads_batched=True)`` and gradcheck's batched checks use."""
    functorch = torch._C._functorch
    return functorch.is_batchedtensor(tensor) or functorch.is_legacy_batchedtensor(tensor)


def _save(ctx: Any, call: ForwardCall, output: tuple[torch.Tensor, ...]) -> None:
    """What backward and jvp need, saved on ``ctx`` (shared by every Function below)."""
    result, mean, invstd, count = output
    ctx.mark_non_differentiable(mean, invstd, count)
    # Backward recomputes the activation's input from x and the statistics; it needs the
    # residual only then (weight and bias are parameters: saving them costs no memory). The
    # output itself is saved only where the backend takes the activation's derivative from it
    # (the CPU path's ReLU and leaky ReLU, as torch's ReLU saves its output); the Triton kernels
    # recompute, and under torch.compile the backward op recomputes.
    epilogue = call.epilogue
    residual = epilogue.residual if epilogue.fused_activation else None
    saves_output = not torch.compiler.is_compiling() and stages.saves_output(call)
    saved = (call.input, call.weight, call.bias, residual, mean, invstd, count)
    ctx.save_for_backward(*saved, result if saves_output else None)
    ctx.save_for_forward(*saved, None)
    ctx.epilogue = Epilogue(None, epilogue.activation, epilogue.negative_slope)  # the residual is saved
    ctx.group_name = call.group_name
    ctx.eps = call.eps
    ctx.merge_tickets = call.merge_tickets  # scratch the kernels leave zero: not saved for autograd


def _backward(ctx: Any, grad_output: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """One gradient per ``contract.FORWARD_FIELDS`` entry (None for the non-differentiable ones).
    ``grad_output`` None (gradients not materialized, and none reached the output): all None."""
    if grad_output is None:
        return (None,) * len(FORWARD_FIELDS)
    call = _backward_call(ctx, grad_output)
    if torch.compiler.is_compiling():  # (torch.compile itself refuses double backward)
        grads = ops.backward_op(*call.flat())
        grads = tuple(grad if need else None for grad, need in zip(grads, call.needs.as_list(), strict=True))
    elif torch.is_grad_enabled() or _is_batched(grad_output):
        grads = composite.backward(call, ctx.eps)
    else:
        grads = stages.backward(call)
    grad_input, grad_residual, grad_weight, grad_bias = grads
    if ctx.needs_input_grad[1] and not call.epilogue.fused_activation:
        grad_residual = grad_output  # y = bn(x) + residual: the residual's gradient is dy
    padding = (None,) * (len(FORWARD_FIELDS) - len(DIFFERENTIABLE_FIELDS))
    return (grad_input, grad_residual, grad_weight, grad_bias) + padding


def _jvp(ctx: Any, tangents: tuple[torch.Tensor | None, ...]) -> tuple[torch.Tensor | None, ...]:
    """The output's tangent (closed form, one all-reduce); the statistics have none."""
    input, weight, bias, epilogue, saved = _saved(ctx)
    named = dict(zip(FORWARD_FIELDS, tangents, strict=True))
    tangent = composite.batch_norm_jvp(input, weight, bias, epilogue, saved, ctx.group_name, named)
    return tangent, None, None, None


def _saved(ctx: Any) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, Epilogue, SavedStatistics]:
    """What ``setup_context`` saved: ``(input, weight, bias, epilogue, statistics)``."""
    input, weight, bias, residual, mean, invstd, count, output = ctx.saved_tensors
    epilogue = Epilogue(residual, ctx.epilogue.activation, ctx.epilogue.negative_slope, output)
    return input, weight, bias, epilogue, SavedStatistics(mean, invstd, count)


def _backward_call(ctx: Any, grad_output: torch.Tensor) -> BackwardCall:
    """The saved forward and the gradients autograd asks for, as one ``contract.BackwardCall``."""
    input, weight, bias, epilogue, saved = _saved(ctx)
    need_input, need_residual, need_weight, need_bias = ctx.needs_input_grad[:4]
    needs = Gradients(need_input, need_residual and epilogue.fused_activation, need_weight, need_bias)
    return BackwardCall(grad_output, input, weight, bias, saved, epilogue, ctx.group_name, needs, ctx.merge_tickets)


class SyncBatchNormFunction(torch.autograd.Function):
    """``act(batch_norm(input) + residual)`` over the union of the group's batches.

    ``apply(*call.flat())`` for a ``contract.ForwardCall``; returns ``(output, mean, invstd,
    count)``, of which only ``output`` is differentiable. One all-reduce forward and at most one
    backward. Calls are validated by the caller (``functional.batch_norm_function``).

    Derivatives: first-order backward runs the fused kernels. Where the gradient must itself be
    differentiable (``create_graph=True``) or runs under ``vmap``, backward runs the same formulas
    in differentiable torch ops (``composite.backward``), synchronized to every order.
    Forward-mode AD (dual tensors) is closed-form with one all-reduce.

    This is the eager class, in the classic ``forward(ctx, ...)`` form: ``torch.func`` transforms
    need the ``setup_context`` form, whose ``apply`` binds arguments through ``inspect`` on every
    call (tens of microseconds a layer), so they get ``FunctorchSyncBatchNormFunction`` and
    ``torch.compile`` gets ``CompilableSyncBatchNormFunction`` (dynamo traces no ``jvp``). All
    three share the code above.
    """

    @staticmethod
    def forward(ctx: Any, *flat: object) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        call = ForwardCall.from_flat(*flat)
        output = stages.forward(call)
        _save(ctx, call, output)
        # Backward uses only the output's gradient: no zero-filled gradients for mean, invstd and
        # count (three fill kernels and their launches per backward on CUDA).
        ctx.set_materialize_grads(False)
        return output

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor, *_: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        return _backward(ctx, grad_output)

    @staticmethod
    def jvp(ctx: Any, *tangents: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        return _jvp(ctx, tangents)


class CompilableSyncBatchNormFunction(torch.autograd.Function):
    """``SyncBatchNormFunction`` in the ``setup_context`` form, as ``torch.compile`` traces it:
    the stages run behind the custom ops of ``ops.py``; no ``jvp``."""

    @staticmethod
    def forward(*flat: object) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        if torch.compiler.is_compiling():
            return ops.forward_op(*flat)
        return stages.forward(ForwardCall.from_flat(*flat))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[object, ...], output: tuple[torch.Tensor, ...]) -> None:
        _save(ctx, ForwardCall.from_flat(*inputs), output)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor, *_: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        return _backward(ctx, grad_output)


class FunctorchSyncBatchNormFunction(CompilableSyncBatchNormFunction):
    """The Function under ``torch.func`` transforms: ``jvp`` (``torch.func.jvp``, ``jacfwd``,
    ``hessian``), vmap over its backward through ``composite``, and a clear error for
    ``torch.func.vmap`` over its forward."""

    @staticmethod
    def jvp(ctx: Any, *tangents: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        return _jvp(ctx, tangents)

    @staticmethod
    def vmap(info: Any, in_dims: tuple[int | None, ...], *args: Any) -> tuple[Any, ...]:
        raise NotImplementedError(
            "triton_syncbn.SyncBatchNorm does not support torch.func.vmap over its forward (each vmapped "
            "slice would need batch statistics of its own, synchronized over the group). vmap over its "
            "backward works (torch.func.vmap of torch.func.vjp, torch.func.jacrev/hessian of a loss, and "
            "autograd.grad(..., is_grads_batched=True) in one process); for per-sample transforms of a "
            "model, use triton_syncbn.revert_sync_batchnorm(model) first."
        )


def function_for_this_call() -> type[torch.autograd.Function]:
    """The Function class for the current context (see ``SyncBatchNormFunction``)."""
    if torch.compiler.is_compiling():
        return CompilableSyncBatchNormFunction
    if torch._C._are_functorch_transforms_active():
        return FunctorchSyncBatchNormFunction
    return SyncBatchNormFunction
