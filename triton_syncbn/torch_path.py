"""The kernel contracts of ``launchers`` in plain torch ops, for CPU tensors.

Used when Triton's interpreter is off (the normal case on CPU), so CPU training over gloo works.
Same inputs, outputs, dtypes and in-place effects as the Triton launchers; the tests hold both
to the same float64 oracle.
"""

from __future__ import annotations

import torch

from triton_syncbn.kernels.activation import ACTIVATION_CODES

from .layout import accumulation_dtype


def _per_channel(view: torch.Tensor) -> torch.Tensor:
    """``[N, C, S]`` -> ``[C, N * S]`` (a copy in the accumulation dtype)."""
    return view.transpose(0, 1).reshape(view.shape[1], -1).to(accumulation_dtype(view.dtype))


def _broadcast(per_channel: torch.Tensor) -> torch.Tensor:
    """``[C]`` -> ``[1, C, 1]`` to broadcast over an ``[N, C, S]`` view."""
    return per_channel.view(1, -1, 1)


def _activation(z: torch.Tensor, activation: int, negative_slope: float) -> torch.Tensor:
    """``act(z)`` for the codes of ``kernels.activation.ACTIVATION_CODES``."""
    if activation == ACTIVATION_CODES["relu"]:
        return torch.relu(z)
    if activation == ACTIVATION_CODES["leaky_relu"]:
        return torch.where(z > 0, z, z * negative_slope)
    if activation == ACTIVATION_CODES["silu"]:
        return z * torch.sigmoid(z)
    return z


def _activation_backward(z: torch.Tensor, grad: torch.Tensor, activation: int, negative_slope: float) -> torch.Tensor:
    """``grad * act'(z)``."""
    if activation == ACTIVATION_CODES["relu"]:
        return torch.where(z > 0, grad, 0.0)
    if activation == ACTIVATION_CODES["leaky_relu"]:
        return torch.where(z > 0, grad, grad * negative_slope)
    if activation == ACTIVATION_CODES["silu"]:
        sigmoid = torch.sigmoid(z)
        return grad * sigmoid * (1 + z * (1 - sigmoid))
    return grad


def _pre_activation(
    x: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
) -> torch.Tensor:
    """``z = (x - mean) * invstd * weight + bias (+ residual)`` ``[N, C, S]`` in the accumulation dtype."""
    acc_dtype = mean.dtype
    scale = invstd if weight is None else invstd * weight.to(acc_dtype)
    z = (x.to(acc_dtype) - _broadcast(mean)) * _broadcast(scale)
    if bias is not None:
        z = z + _broadcast(bias.to(acc_dtype))
    if residual is not None:
        z = z + residual.to(acc_dtype)
    return z


def partial_stats(x: torch.Tensor, tiling: object = None) -> torch.Tensor:
    """Local per-channel float64 ``[3, C]`` (count, sum, sum of squares) of ``x`` ``[N, C, S]``.

    As in the kernels: values are shifted by each channel's first element (the pilot) so the
    accumulation-dtype mean stays accurate when |mean| >> std, the squared deviations are taken
    about that mean (two passes), and the moments are expanded into sums in float64.
    """
    values = _per_channel(x)
    channels, count = values.shape
    packed = torch.zeros(3, channels, dtype=torch.float64, device=x.device)
    packed[0] = count
    if count == 0:
        return packed
    pilot = values[:, :1]
    shifted = values - pilot
    shifted_mean = shifted.mean(dim=1)
    m2 = (shifted - shifted_mean[:, None]).square().sum(dim=1)
    mean64 = pilot[:, 0].to(torch.float64) + shifted_mean.to(torch.float64)
    packed[1] = count * mean64
    packed[2] = m2.to(torch.float64) + count * mean64 * mean64
    return packed


def normalize(
    x: torch.Tensor,
    out: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    stats: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    num_batches_tracked: torch.Tensor | None,
    momentum: float,
    eps: float,
    residual: torch.Tensor | None = None,
    activation: int = 0,
    negative_slope: float = 0.0,
    tiling: object = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``launchers.normalize``."""
    acc_dtype = accumulation_dtype(x.dtype)
    if stats is not None:
        count, total, total_sq = stats.unbind(0)
        safe_count = count.clamp(min=1.0)
        mean64 = total / safe_count
        m2 = (total_sq - total * mean64).clamp(min=0.0)
        var64 = m2 / safe_count
        mean = mean64.to(acc_dtype)
        invstd = (1.0 / torch.sqrt(var64 + eps)).to(acc_dtype)
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        if running_mean is not None and running_var is not None:
            if momentum is None:
                factor = 1.0 / num_batches_tracked.to(torch.float64)
            else:
                factor = torch.tensor(float(momentum), dtype=torch.float64)
            update = count > 0
            unbiased_var = m2 / (count - 1.0).clamp(min=1.0)
            old_mean = running_mean.to(torch.float64)
            old_var = running_var.to(torch.float64)
            new_mean = torch.where(update, old_mean + factor * (mean64 - old_mean), old_mean)
            new_var = torch.where(update, old_var + factor * (unbiased_var - old_var), old_var)
            running_mean.copy_(new_mean)
            running_var.copy_(new_var)
    else:
        mean = running_mean.to(acc_dtype, copy=True)  # an output must not alias the buffer
        invstd = 1.0 / torch.sqrt(running_var.to(acc_dtype) + eps)
    out.copy_(_activation(_pre_activation(x, mean, invstd, weight, bias, residual), activation, negative_slope))
    return mean, invstd


def backward_reduce(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    weight_grad_dtype: torch.dtype | None,
    bias_grad_dtype: torch.dtype | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    activation: int = 0,
    negative_slope: float = 0.0,
    tiling: object = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Same contract as ``launchers.backward_reduce``."""
    grad_out = _grad_before_activation(grad_out, x, mean, invstd, weight, bias, residual, activation, negative_slope)
    dy = _per_channel(grad_out)
    centered = _per_channel(x) - mean[:, None]
    sum_dy = dy.sum(dim=1)
    sum_dy_xhat = (dy * centered).sum(dim=1) * invstd
    sums = torch.stack([sum_dy, sum_dy_xhat])
    grad_weight = None if weight_grad_dtype is None else sum_dy_xhat.to(weight_grad_dtype)
    grad_bias = None if bias_grad_dtype is None else sum_dy.to(bias_grad_dtype)
    return sums, grad_weight, grad_bias


def backward_dx(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    out: torch.Tensor | None,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    weight: torch.Tensor | None,
    sums: torch.Tensor | None,
    count: torch.Tensor | None,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    grad_residual: torch.Tensor | None = None,
    activation: int = 0,
    negative_slope: float = 0.0,
    tiling: object = None,
) -> None:
    """Same contract as ``launchers.backward_dx``."""
    acc_dtype = accumulation_dtype(x.dtype)
    scale = invstd if weight is None else invstd * weight.to(acc_dtype)
    dy = _grad_before_activation(grad_out, x, mean, invstd, weight, bias, residual, activation, negative_slope)
    if grad_residual is not None:
        grad_residual.copy_(dy)
    if out is None:
        return
    if sums is not None and count is not None:
        safe_count = count.clamp(min=1.0)
        mean_dy = (sums[0] / safe_count).to(acc_dtype)
        mean_dy_xhat = (sums[1] / safe_count).to(acc_dtype)
        xhat = (x.to(acc_dtype) - _broadcast(mean)) * _broadcast(invstd)
        dy = dy - _broadcast(mean_dy) - xhat * _broadcast(mean_dy_xhat)
    out.copy_(dy * _broadcast(scale))


def _grad_before_activation(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    activation: int,
    negative_slope: float,
) -> torch.Tensor:
    """``grad_out * act'(z)`` ``[N, C, S]`` in the accumulation dtype, z recomputed from x."""
    grad = grad_out.to(mean.dtype)
    if activation == ACTIVATION_CODES["identity"]:
        return grad
    z = _pre_activation(x, mean, invstd, weight, bias, residual)
    return _activation_backward(z, grad, activation, negative_slope)
