"""The forward and backward of synchronized batch norm as plain functions over tensors.

``forward`` is: local statistics -> one all-reduce -> normalize (+ residual, activation, running
statistics update); ``backward`` is: gradient sums -> one all-reduce (only when the input needs
a gradient) -> input (and residual) gradient. Both run eagerly from the autograd Function and,
under ``torch.compile``, behind the opaque custom ops of ``ops.py``: one implementation either way.
On the CPU path with nothing to synchronize, the local batch is the global one: ``torch_path``'s
``unsynchronized_forward``/``unsynchronized_backward`` then run each direction on ATen's own
BatchNorm kernels (statistics and running update in one call; every gradient from one backward).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from . import torch_path
from .backend import kernel_backend
from .contract import BackwardCall, Epilogue, ForwardCall
from .distributed import all_reduce_sum_, group_from_name
from .layout import accumulation_dtype, channel_view, empty_output_like


def one_value_per_channel_error(shape: torch.Size) -> ValueError:
    """torch's error for a training batch of exactly 1 value per channel, over the global batch
    (``shape``: the local input's)."""
    return ValueError(
        "Expected more than 1 value per channel when training, got 1 value per channel "
        f"in the global batch (local input shape {tuple(shape)})"
    )


def forward(call: ForwardCall) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``call.input`` ``(N, C, *)`` -> ``(output, mean, invstd, count)``.

    ``output`` has the input's shape, dtype and memory format; ``mean``, ``invstd`` ``[C]`` are
    the statistics used (accumulation dtype); ``count`` is the float64 ``[C]`` global element
    count with batch statistics, else empty. With batch statistics the running statistics (when
    given) are updated in place by their rule (``contract.RunningStats``). ``check_finite``
    raises ``FloatingPointError`` naming the channels whose global statistics are not finite (a
    host sync; off by default), before anything is written.
    """
    input, running = call.input, call.running
    ops = kernel_backend(input)
    x = channel_view(input)
    output, output_view = empty_output_like(input)
    epilogue = _channel_views(call.epilogue)
    if not call.use_batch_stats:
        mean, invstd = ops.normalize(x, output_view, call.weight, call.bias, None, running, call.eps, epilogue)
        return output, mean, invstd, torch.empty(0, dtype=torch.float64, device=input.device)
    group = group_from_name(call.group_name)
    if (
        group is None and ops is torch_path and not call.check_finite
        and torch_path.unsynchronized_forward_serves(x, running)
    ):  # fmt: skip
        if _global_batch_has_one_value(x, None, synchronized=False):
            raise one_value_per_channel_error(input.shape)
        mean, invstd, count = torch_path.unsynchronized_forward(
            x, output_view, call.weight, call.bias, running, call.eps, epilogue
        )
        return output, mean, invstd, count
    stats = ops.partial_stats(x, call.merge_tickets)
    local_stats = stats.clone() if call.check_finite else None
    if group is not None:
        all_reduce_sum_(stats, group)
    if local_stats is not None:
        _raise_if_not_finite(stats, local_stats, input.shape)
    if _global_batch_has_one_value(x, stats, group is not None):
        raise one_value_per_channel_error(input.shape)
    # normalize increments num_batches_tracked itself, on the device, in the same launch.
    mean, invstd = ops.normalize(x, output_view, call.weight, call.bias, stats, running, call.eps, epilogue)
    return output, mean, invstd, stats[0]


def saves_output(call: ForwardCall) -> bool:
    """Whether backward takes the fused activation's derivative from this forward's output
    (``contract.KernelBackend.derivative_from_output``): the autograd Function saves it then."""
    return kernel_backend(call.input).derivative_from_output(call.epilogue)


def _channel_views(epilogue: Epilogue) -> Epilogue:
    """The epilogue as the backends take it: the residual (and a saved output) viewed as ``[N, C, S]``."""
    if epilogue.residual is None and epilogue.output is None:
        return epilogue
    residual, output = (epilogue.residual, epilogue.output)
    return replace(
        epilogue,
        residual=None if residual is None else channel_view(residual),
        output=None if output is None else channel_view(output),
    )


def _raise_if_not_finite(stats: torch.Tensor, local_stats: torch.Tensor, shape: torch.Size) -> None:
    """The opt-in non-finite check: every rank sees the same global statistics, so all raise."""
    bad = (~torch.isfinite(stats).all(dim=0)).nonzero().flatten().tolist()
    if bad:
        local = (~torch.isfinite(local_stats).all(dim=0)).nonzero().flatten().tolist()
        raise FloatingPointError(
            f"SyncBatchNorm: non-finite batch statistics (NaN or Inf in the input) in channels {bad} of the "
            f"global batch; this rank's input (shape {tuple(shape)}) has them in channels {local}"
        )


def _global_batch_has_one_value(x: torch.Tensor, stats: torch.Tensor | None, synchronized: bool) -> bool:
    """Whether the global batch has exactly 1 value per channel (torch rejects that in training).

    Without synchronization the local count is the global one: no device read (``stats`` may be
    None then). Synchronized,
    only a rank with <= 1 local value per channel can be part of such a batch, so only such a
    rank reads the global count back (a host sync in that degenerate case alone), and not while
    a CUDA graph is being captured, where a read is impossible and the check is skipped.
    """
    local_values = x.shape[0] * x.shape[2]
    if not synchronized:
        return local_values == 1
    if local_values > 1 or (x.is_cuda and torch.cuda.is_current_stream_capturing()):
        return False
    return int(stats[0, 0].item()) == 1


def backward(call: BackwardCall) -> tuple[torch.Tensor | None, ...]:
    """Gradients ``(input, residual, weight, bias)`` where ``call.needs`` asks for them.

    With no fused activation the residual's gradient is ``grad_output`` itself and is left to
    the caller (``call.needs.residual`` must be False then).
    """
    needs, saved, epilogue = call.needs, call.saved, call.epilogue
    weight, bias = call.weight, call.bias
    ops = kernel_backend(call.input)
    x = channel_view(call.input)
    grad_out = channel_view(call.grad_output)
    views = _channel_views(epilogue)
    grad_input = grad_residual = grad_weight = grad_bias = sums = None
    group = group_from_name(call.group_name)
    if group is None and ops is torch_path and torch_path.unsynchronized_backward_serves(x, saved):
        return _unsynchronized_cpu_backward(call, x, grad_out, views)
    if needs.weight or needs.bias or (needs.input and saved.batch_stats):
        sums, grad_weight, grad_bias = ops.backward_reduce(
            grad_out, x, weight, bias, saved, views,
            weight.dtype if needs.weight else None, bias.dtype if needs.bias else None, call.merge_tickets,
        )  # fmt: skip
    if needs.input and saved.batch_stats and group is not None:
        all_reduce_sum_(sums, group)
    grad_residual_view = None
    if needs.residual:
        grad_residual, grad_residual_view = empty_output_like(epilogue.residual)
        if grad_residual_view.stride() != views.residual.stride():  # a broadcast/strided residual
            views = replace(views, residual=views.residual.contiguous())
    if needs.input or needs.residual:
        grad_input_view = None
        if needs.input:
            grad_input, grad_input_view = empty_output_like(call.input)
        ops.backward_dx(
            grad_out, x, grad_input_view, weight, bias, saved, sums if saved.batch_stats and needs.input else None,
            views, grad_residual_view,
        )  # fmt: skip
    return grad_input, grad_residual, grad_weight, grad_bias


def _unsynchronized_cpu_backward(
    call: BackwardCall, x: torch.Tensor, grad_out: torch.Tensor, views: Epilogue
) -> tuple[torch.Tensor | None, ...]:
    """``backward`` on the CPU path with nothing to synchronize: the local sums are the global
    ones, so ATen's BatchNorm backward makes every gradient in one call (``torch_path``)."""
    needs = call.needs
    grad_residual = grad_residual_view = None
    if needs.residual:
        grad_residual, grad_residual_view = empty_output_like(call.epilogue.residual)
    grad_input_view, grad_weight, grad_bias = torch_path.unsynchronized_backward(
        grad_out, x, call.weight, call.bias, call.saved, views, needs.input, grad_residual_view,
        call.weight.dtype if needs.weight else None, call.bias.dtype if needs.bias else None,
    )  # fmt: skip
    grad_input = None if grad_input_view is None else grad_input_view.view(call.input.shape)
    return grad_input, grad_residual, grad_weight, grad_bias


def forward_meta(call: ForwardCall) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shapes, dtypes and layouts of ``forward``'s outputs, for fake/meta tensors."""
    input, use_batch_stats = call.input, call.use_batch_stats
    channels = input.shape[1]
    acc_dtype = accumulation_dtype(input.dtype)
    output, _ = empty_output_like(input)
    mean = input.new_empty(channels, dtype=acc_dtype)
    invstd = input.new_empty(channels, dtype=acc_dtype)
    count = input.new_empty(channels if use_batch_stats else 0, dtype=torch.float64)
    return output, mean, invstd, count
