"""Synchronized batch norm as a composition of differentiable torch ops, for higher-order autograd.

The fused path (``stages``) has hand-written first derivatives: its backward returns gradients
with no graph behind them. Where a gradient must itself be differentiated (``create_graph=True``:
gradient penalties, meta-learning) or the backward runs under ``vmap`` (``is_grads_batched=True``,
``torch.func.jacrev``), ``SyncBatchNormFunction.backward`` runs ``backward`` below instead: the
same formulas in plain torch ops, with the statistics recomputed from the input so that their
dependence on it is part of the graph. Every op is differentiable to any order and batchable,
and the collectives go through the differentiable all-reduce of ``distributed.all_reduce_sum``,
whose derivative is again an all-reduce: every order of derivative is synchronized over the
group.

Forward-mode derivatives (``jvp``) are closed-form (``batch_norm_jvp``) with one all-reduce of
two per-channel sums, like backward.

Statistics are computed in float64 (the precision of the fused path's wire format): the sums are
``[count, sum(x), sum(x**2)]`` per channel, all-reduced in one collective.
"""

from __future__ import annotations

import torch

from triton_syncbn.kernels.activation import ACTIVATION_CODES

from .contract import BackwardCall, Epilogue, SavedStatistics
from .distributed import all_reduce_sum, group_from_name


def _channel_dims(input: torch.Tensor) -> list[int]:
    """The dims of ``(N, C, *)`` reduced per channel: all but dim 1."""
    return [0, *range(2, input.dim())]


def _per_channel(vector: torch.Tensor, input: torch.Tensor) -> torch.Tensor:
    """``[C]`` -> ``[1, C, 1, ...]`` broadcasting over ``input`` ``(N, C, *)``."""
    return vector.view(1, -1, *([1] * (input.dim() - 2)))


def _activation_slope(
    xhat: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    epilogue: Epilogue,
    input: torch.Tensor,
) -> torch.Tensor | float:
    """``act'(z)`` for ``z = xhat * weight + bias + residual`` (xhat's dtype), 1.0 without an activation."""
    if not epilogue.fused_activation:
        return 1.0
    acc = xhat.dtype
    z = xhat if weight is None else xhat * _per_channel(weight.to(acc), input)
    if bias is not None:
        z = z + _per_channel(bias.to(acc), input)
    if epilogue.residual is not None:
        z = z + epilogue.residual.to(acc)
    return activation_derivative(z, epilogue.activation, epilogue.negative_slope)


def activation_derivative(z: torch.Tensor, code: int, negative_slope: float) -> torch.Tensor | None:
    """``act'(z)`` (None for the identity)."""
    if code == ACTIVATION_CODES["relu"]:
        return (z > 0).to(z.dtype)
    if code == ACTIVATION_CODES["leaky_relu"]:
        return torch.where(z > 0, 1.0, negative_slope).to(z.dtype)
    if code == ACTIVATION_CODES["silu"]:
        sigmoid = torch.sigmoid(z)
        return sigmoid * (1 + z * (1 - sigmoid))
    return None


def batch_statistics(input: torch.Tensor, group_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Global ``(mean, var, count)`` per channel of ``input`` ``(N, C, *)``: float64 ``[C]``.

    ``var`` is the biased variance; mean and var are differentiable in ``input`` through the
    group's all-reduce (one collective of ``[3, C]``).
    """
    dims = _channel_dims(input)
    x = input.to(torch.float64)
    local_count = torch.full((input.shape[1],), input.numel() / input.shape[1], dtype=torch.float64, device=x.device)
    stats = torch.stack([local_count, x.sum(dims), (x * x).sum(dims)])
    group = group_from_name(group_name)
    if group is not None:
        stats = all_reduce_sum(stats, group)
    count, total, total_sq = stats.unbind(0)
    safe_count = count.clamp(min=1.0)
    mean = total / safe_count
    var = (total_sq / safe_count - mean * mean).clamp(min=0.0)
    return mean, var, count


def backward(
    call: BackwardCall, eps: float
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients ``(input, residual, weight, bias)`` (where ``call.needs`` asks) in differentiable ops.

    The same formulas as the fused backward (``kernels/backward.py``), written so that autograd
    and vmap can see through them: with batch statistics, mean and invstd are recomputed from
    the input (``batch_statistics``, with the forward's ``eps``), so a gradient of these
    gradients includes the dependence of the statistics on every rank's input. With running
    statistics the saved mean and invstd are constants. As in ``stages.backward``, the
    residual's gradient is returned only for a fused activation. Collectives: one to recompute
    the statistics and, when the input needs a gradient, one for the two global gradient sums,
    each differentiable again.
    """
    input, weight, bias, residual = call.input, call.weight, call.bias, call.epilogue.residual
    grad_output, group_name, saved = call.grad_output, call.group_name, call.saved
    need_input, need_residual, need_weight, need_bias = call.needs.as_list()
    acc = saved.mean.dtype
    if saved.batch_stats:
        mean, var, count = batch_statistics(input, group_name)
        invstd = torch.rsqrt(var + eps).to(acc)
        mean = mean.to(acc)
    else:
        mean, invstd = saved.mean, saved.invstd
    xhat = (input.to(acc) - _per_channel(mean, input)) * _per_channel(invstd, input)
    grad = grad_output.to(acc) * _activation_slope(xhat, weight, bias, call.epilogue, input)
    dims = _channel_dims(input)
    sum_grad = grad.sum(dims)
    sum_grad_xhat = (grad * xhat).sum(dims)
    grad_input = None
    if need_input:
        scale = invstd if weight is None else invstd * weight.to(acc)
        grad_xhat = grad
        if saved.batch_stats:
            sums = torch.stack([sum_grad, sum_grad_xhat]).to(torch.float64)
            group = group_from_name(group_name)
            if group is not None:
                sums = all_reduce_sum(sums, group)
            means = (sums / count.clamp(min=1.0)).to(acc)
            grad_xhat = grad - _per_channel(means[0], input) - xhat * _per_channel(means[1], input)
        grad_input = (grad_xhat * _per_channel(scale, input)).to(input.dtype)
    return (
        grad_input,
        grad.to(residual.dtype) if need_residual else None,
        sum_grad_xhat.to(weight.dtype) if need_weight else None,
        sum_grad.to(bias.dtype) if need_bias else None,
    )


def batch_norm_jvp(
    input: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    epilogue: Epilogue,
    saved: SavedStatistics,
    group_name: str,
    tangents: dict[str, torch.Tensor | None],
) -> torch.Tensor:
    """The forward-mode derivative of the output, ``(N, C, *)`` in ``input``'s dtype.

    ``saved`` holds the statistics the forward used; ``epilogue.residual`` is needed only for a
    fused activation. ``tangents`` maps the names of ``contract.FORWARD_FIELDS`` (``input``,
    ``residual``, ``weight``, ``bias``, ``running_mean``, ``running_var``, ...) to their tangents
    (or None). With batch statistics, with ``xhat = (x - mean) * invstd`` and global sums:

        d xhat = invstd * (dx - sum(dx) / n - xhat * sum(dx * xhat) / n)

    (one all-reduce of the two sums); with running statistics
    ``d xhat = (dx - d running_mean) * invstd - xhat * invstd**2 * d running_var / 2``. Then
    ``dz = weight * d xhat + xhat * d weight + d bias + d residual`` and ``dy = act'(z) * dz``.
    """
    mean, invstd, count = saved.mean, saved.invstd, saved.count
    acc = mean.dtype
    x = input.to(acc)
    xhat = (x - _per_channel(mean, input)) * _per_channel(invstd, input)
    dx = tangents.get("input")
    dxhat: torch.Tensor | None = None
    if saved.batch_stats:
        if dx is not None:
            dx = dx.to(acc)
            dims = _channel_dims(input)
            sums = torch.stack([dx.sum(dims), (dx * xhat).sum(dims)]).to(torch.float64)
            group = group_from_name(group_name)
            if group is not None:
                sums = all_reduce_sum(sums, group)
            means = (sums / count.clamp(min=1.0)).to(acc)
            dxhat = _per_channel(invstd, input) * (
                dx - _per_channel(means[0], input) - xhat * _per_channel(means[1], input)
            )
    else:
        d_mean, d_var = tangents.get("running_mean"), tangents.get("running_var")
        terms = []
        if dx is not None:
            terms.append(dx.to(acc) * _per_channel(invstd, input))
        if d_mean is not None:
            terms.append(-_per_channel(d_mean.to(acc) * invstd, input))
        if d_var is not None:
            terms.append(-xhat * _per_channel(0.5 * invstd * invstd * d_var.to(acc), input))
        dxhat = sum(terms[1:], terms[0]) if terms else None
    dz = torch.zeros_like(xhat)
    if dxhat is not None:
        dz = dz + (dxhat if weight is None else dxhat * _per_channel(weight.to(acc), input))
    if tangents.get("weight") is not None:
        dz = dz + xhat * _per_channel(tangents["weight"].to(acc), input)
    if tangents.get("bias") is not None:
        dz = dz + _per_channel(tangents["bias"].to(acc), input)
    if tangents.get("residual") is not None:
        dz = dz + tangents["residual"].to(acc)
    dz = dz * _activation_slope(xhat, weight, bias, epilogue, input)
    return dz.to(input.dtype)
