"""The functional form and the input checks shared with the module."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.autograd import forward_ad

from triton_syncbn.kernels.activation import ACTIVATION_CODES

from . import torch_path
from .backend import kernel_backend
from .contract import Epilogue, ForwardCall, RunningStats
from .distributed import group_name, sync_group
from .function import function_for_this_call
from .stages import one_value_per_channel_error

_FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_REDUCED = (torch.float16, torch.bfloat16)
_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def activation_code(activation: str | None) -> int:
    """The kernels' code for a supported activation name; ``ValueError`` listing them otherwise."""
    if activation is None:
        return ACTIVATION_CODES["identity"]
    if not isinstance(activation, str) or activation not in ACTIVATION_CODES:
        raise ValueError(
            f"unsupported activation {activation!r}; supported: None, "
            + ", ".join(repr(name) for name in ACTIVATION_CODES)
        )
    return ACTIVATION_CODES[activation]


def check_residual(residual: torch.Tensor | None, input: torch.Tensor) -> None:
    """A residual must match the input's shape, dtype and device (any memory format)."""
    if residual is None:
        return
    if not isinstance(residual, torch.Tensor):
        raise TypeError(f"expected residual to be a torch.Tensor or None, got {type(residual).__name__}")
    if residual.shape != input.shape:
        raise ValueError(f"expected residual of the input's shape {tuple(input.shape)}, got {tuple(residual.shape)}")
    if residual.dtype != input.dtype:
        raise TypeError(f"expected residual of the input's dtype {input.dtype}, got {residual.dtype}")
    if residual.device != input.device:
        raise ValueError(f"expected residual on the input's device {input.device}, got {residual.device}")


def check_input(input: torch.Tensor, num_features: int | None = None) -> None:
    """Raise ``TypeError``/``ValueError`` naming expected and actual values for unusable input."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"expected input to be a torch.Tensor, got {type(input).__name__}")
    if input.dim() < 2:
        raise ValueError(
            f"expected at least 2-D input (N, C, *), got {input.dim()}-D input of shape {tuple(input.shape)}"
        )
    if input.shape[1] == 0:
        raise ValueError(f"expected a non-zero number of channels (dim 1), got input of shape {tuple(input.shape)}")
    if num_features is not None and input.shape[1] != num_features:
        raise ValueError(
            f"expected input with {num_features} channels (num_features), got {input.shape[1]} "
            f"(input shape {tuple(input.shape)})"
        )
    if input.dtype not in _FLOATING:
        raise TypeError(f"expected a floating-point input (float16, bfloat16, float32, float64), got {input.dtype}")


def check_eps(eps: float, use_batch_stats: bool) -> None:
    """torch's rule, with its messages: ``eps > 0`` with batch statistics, ``eps >= 0`` otherwise
    (``eps <= 0`` would divide by a zero variance: NaN, not an error, without this check)."""
    if use_batch_stats and not eps > 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if not eps >= 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")


def check_per_channel(name: str, tensor: torch.Tensor | None, input: torch.Tensor) -> None:
    """Check that a weight/bias/running-statistic tensor fits ``input`` ``(N, C, *)``."""
    if tensor is None:
        return
    channels = input.shape[1]
    if tensor.shape != (channels,):
        raise ValueError(f"expected {name} of shape ({channels},), got {tuple(tensor.shape)}")
    if tensor.device != input.device:
        raise ValueError(f"expected {name} on the input's device {input.device}, got {tensor.device}")
    if tensor.dtype not in (input.dtype, torch.float32):
        raise TypeError(f"expected {name} of dtype {input.dtype} (the input's) or torch.float32, got {tensor.dtype}")


def running_stats(
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    num_batches_tracked: torch.Tensor | None,
    momentum: float | None,
) -> RunningStats | None:
    """The running statistics as one object (None when not tracked); both or neither tensor."""
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together (both tensors or both None)")
    return None if running_mean is None else RunningStats(running_mean, running_var, num_batches_tracked, momentum)


def epilogue(residual: torch.Tensor | None, activation: str | None, negative_slope: float) -> Epilogue:
    """The fused epilogue ``act(bn(x) + residual)``; ``ValueError`` for an unknown activation name."""
    return Epilogue(residual, activation_code(activation), float(negative_slope))


def batch_norm_function(
    input: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running: RunningStats | None,
    fused: Epilogue,
    *,
    use_batch_stats: bool,
    eps: float,
    group: dist.ProcessGroup | None,
    num_features: int | None = None,
    check_finite: bool = False,
    before_collectives: Callable[[], None] | None = None,
    merge_tickets: Callable[[], torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """Validate everything, then run the autograd Function; a rejected call changes nothing.

    Returns ``act(batch_norm(input) + residual)`` for the epilogue ``fused`` (``input``
    ``(N, C, *)``; ``weight``, ``bias`` ``[C]`` or None). ``group`` is the resolved group to
    synchronize over (None: local statistics). ``running`` (None: not tracked) is read in eval
    and updated in training by its rule (``contract.RunningStats``). ``before_collectives``
    runs once the arguments are known to be valid, before any collective (the module's
    cross-rank agreement check), so a rank never fails a local check after it.
    ``merge_tickets``, called once the arguments are valid, gives the caller's zeroed split-merge
    scratch (``backend.new_merge_tickets``, kept across calls); None, or a None from it, has the
    launchers allocate it per call (one more small launch per split reduction).
    """
    check_input(input, num_features)
    check_residual(fused.residual, input)
    per_channel = {"weight": weight, "bias": bias}
    if running is not None:
        per_channel.update(running_mean=running.mean, running_var=running.var)
    for name, tensor in per_channel.items():
        check_per_channel(name, tensor, input)
    if not use_batch_stats and running is None:
        raise ValueError("running_mean and running_var must be given when not training (they normalize the input)")
    counter = None if running is None else running.num_batches_tracked
    if counter is not None and counter.device != input.device:
        raise ValueError(f"expected num_batches_tracked on the input's device {input.device}, got {counter.device}")
    check_eps(eps, use_batch_stats)
    if use_batch_stats and running is not None and running.cumulative and counter is None:
        raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
    if before_collectives is not None:
        before_collectives()
    if _aten_batch_norm_serves(input, weight, bias, running, fused, group, check_finite):
        return _aten_batch_norm(input, weight, bias, running, use_batch_stats, eps)
    tickets = merge_tickets() if merge_tickets is not None and use_batch_stats else None
    call = ForwardCall(
        input, weight, bias, running, fused, eps, use_batch_stats, group_name(group), check_finite, tickets
    )
    output, _, _, _ = function_for_this_call().apply(*call.flat())
    return output


def _aten_batch_norm_serves(
    input: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running: RunningStats | None,
    fused: Epilogue,
    group: dist.ProcessGroup | None,
    check_finite: bool,
) -> bool:
    """Whether this call is exactly ``torch.batch_norm`` on a CPU tensor of the plain-torch backend
    (not Triton's interpreter), so that ATen's own autograd-aware batch norm runs it, as
    ``torch.nn.SyncBatchNorm`` runs ``F.batch_norm`` when there is nothing to synchronize.

    Needs: no group, no fused epilogue, no finite check, a non-empty dense input (contiguous or
    channels_last), per-channel tensors of a dtype ATen's CPU kernel takes (the input's, or
    float32 for bf16/fp16 input), running statistics that need no gradient, and neither
    compiling nor a torch.func/forward-AD transform (where our Function's documented, tested
    behaviour holds). The result is the same function (the global batch is the local one); only
    the per-call cost differs (~40 small ops fewer), and ATen's backward makes one transient
    temporary of the input's size, as torch's BatchNorm does."""
    if kernel_backend(input) is not torch_path or group is not None or check_finite or fused.residual is not None:
        return False
    if torch.compiler.is_compiling() or _transform_active():
        return False  # compiled graphs and torch.func/forward-AD transforms keep our Function's rules
    if fused.activation != ACTIVATION_CODES["identity"] or input.numel() == 0:
        return False
    channels_last = _CHANNELS_LAST.get(input.dim(), torch.contiguous_format)
    if not (input.is_contiguous() or input.is_contiguous(memory_format=channels_last)):
        return False
    if running is not None and (running.mean.requires_grad or running.var.requires_grad):
        return False  # ATen's batch norm does not differentiate through running statistics
    per_channel = [weight, bias] + ([] if running is None else [running.mean, running.var])
    dtypes = {tensor.dtype for tensor in per_channel if tensor is not None}
    return not dtypes or dtypes == {input.dtype} or (dtypes == {torch.float32} and input.dtype in _REDUCED)


def _transform_active() -> bool:
    """Whether a torch.func transform (vmap, grad, ...) or a forward-AD dual level is active."""
    return torch._C._functorch.peek_interpreter_stack() is not None or forward_ad._current_level >= 0


def _aten_batch_norm(
    input: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running: RunningStats | None,
    use_batch_stats: bool,
    eps: float,
) -> torch.Tensor:
    """``torch.batch_norm`` with ``RunningStats``' update rule (``input`` ``(N, C, *)``; output of
    its shape, dtype and memory format). One value per channel in training raises the error the
    composed path raises (before any buffer changes)."""
    if use_batch_stats and input.numel() == input.shape[1]:
        raise one_value_per_channel_error(input.shape)
    momentum = 0.0
    running_mean = running_var = None
    if running is not None:
        running_mean, running_var = running.mean, running.var
        if use_batch_stats:
            momentum = torch_path.count_batch(running)
    return torch.batch_norm(
        input, weight, bias, running_mean, running_var, use_batch_stats, momentum, eps, torch.backends.cudnn.enabled
    )


def sync_batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    process_group: dist.ProcessGroup | None = None,
    *,
    residual: torch.Tensor | None = None,
    activation: str | None = None,
    negative_slope: float = 0.01,
    check_finite: bool = False,
) -> torch.Tensor:
    """Synchronized ``F.batch_norm``: same arguments, plus the group to synchronize over, and
    an optional fused epilogue: returns ``act(batch_norm(input) + residual)``.

    ``input`` ``(N, C, *)`` with 2 to 5 dims in any memory format; ``weight``, ``bias``,
    ``running_mean``, ``running_var`` ``[C]``. With ``training=True`` the statistics are those
    of the union of the batches of ``process_group`` (default: WORLD) when torch.distributed is
    initialized, else the local batch's; the running statistics, when given, are updated in
    place with ``momentum``. With ``training=False`` the running statistics normalize the input
    and nothing is communicated. ``residual`` (input's shape, dtype and device; any memory
    format) is added before ``activation`` (None/"identity", "relu", "leaky_relu" with
    ``negative_slope``, "silu") and receives its gradient. Returns a tensor of ``input``'s shape,
    dtype and memory format. ``check_finite=True`` raises ``FloatingPointError`` naming the
    channels whose batch statistics are not finite (a host sync per call; off by default).
    """
    group = sync_group(process_group) if training else None
    return batch_norm_function(
        input, weight, bias, running_stats(running_mean, running_var, None, momentum),
        epilogue(residual, activation, negative_slope),
        use_batch_stats=training, eps=eps, group=group, check_finite=check_finite,
    )  # fmt: skip
