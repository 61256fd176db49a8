"""The kernel contracts of ``launchers`` in plain torch ops, for CPU tensors.

Used when Triton's interpreter is off (the normal case on CPU), so CPU training over gloo works.
Same inputs, outputs, dtypes and in-place effects as the Triton launchers; the tests hold both
to the same float64 oracle.

Every full-size pass is one of ATen's vectorized CPU batch-norm kernels, composed so that the
synchronized result is exact: ``batch_norm_update_stats`` for the local moments,
``native_batch_norm`` in eval form (``out = (src - m) * scale + shift`` per channel, written
into the caller's buffer) for every per-channel affine map, and ``native_batch_norm_backward``
(weight/bias gradients only) for the per-channel gradient sums. These kernels take a low-precision
input with float32 per-channel tensors and compute in float32 (``native_batch_norm``'s "mixed
type" mode), so no full-size casted copy is made; where float32 is needed (the backward of a
fused activation on bf16/fp16 recomputes z and act'(z) in float32; bf16/fp16 input gradients are
summed in float32) it is made a slice at a time, in buffers of at most an eighth of the tensor
(or 64K elements) reused across slices.
With nothing to synchronize (one process), the forward's statistics and running-statistics
update are one ``batch_norm_update_stats`` (``unsynchronized_forward``), and the backward's
gradients come from ATen's ``native_batch_norm_backward`` on the whole batch
(``unsynchronized_backward``, called by ``stages.backward``): the local sums are the global ones.
(A plain layer in that case never gets here: ``functional`` runs ``torch.batch_norm`` itself.)
They accept ``[N, C, S, 1]`` views of the ``[N, C, S]`` channel views in both layouts: a
channels_last ``[N, C, S]`` view (strides ``(C * S, 1, C)``) is a channels_last ``[N, C, S, 1]``
tensor (2-D input is passed as ``[N, C]``). Full-size memory per direction: the output
(forward), the input gradient and, with a fused activation and residual, its gradient
(backward), plus, for a fused activation on float32/float64 input, one recomputed buffer (and,
unsynchronized, the transient temporary of x's size that ATen's BatchNorm backward makes).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from triton_syncbn.kernels.activation import ACTIVATION_CODES

from .contract import Epilogue, RunningStats, SavedStatistics
from .layout import accumulation_dtype

_aten = torch.ops.aten


def _four_d(view: torch.Tensor) -> torch.Tensor:
    """``[N, C, S]`` -> ``[N, C, S, 1]``, a view ATen's batch-norm kernels take in either layout.

    The new unit dim gets the stride a dense tensor of that layout would give it (S's stride), so
    ATen reads a channels_last view as channels_last and a contiguous one as contiguous whatever
    its rules for unit dims (with ``unsqueeze``'s stride 1 a channels_last view was taken for
    contiguous by some checks and not others, and gradients came out wrong).
    """
    return view.as_strided((*view.shape, 1), (*view.stride(), view.stride(2)), view.storage_offset())


def _as(tensor: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``tensor`` in ``dtype`` (itself when it already is: no dispatch on the per-call path)."""
    return tensor if tensor is None or tensor.dtype == dtype else tensor.to(dtype)


# Elements of the float32 temporaries that low-precision backward works through at a time: an
# eighth of the tensor, capped at _SLICE_ELEMENTS, but never below _MIN_SLICE_ELEMENTS (256 KB of
# float32), under which the ~10 ATen calls per slice cost more than the memory they save (a small
# fused layer in 8 slices took twice as long as in one).
_SLICE_ELEMENTS = 1 << 20
_MIN_SLICE_ELEMENTS = 1 << 16


def _slices(view: torch.Tensor) -> list[tuple[slice, slice, slice]]:
    """Index tuples cutting ``view`` ``[N, C, S]`` into pieces of at most ``_SLICE_ELEMENTS``
    elements and an eighth of the tensor, but at least ``_MIN_SLICE_ELEMENTS`` (a small tensor is
    one piece) and one element per channel, along N, and along S where one sample is larger."""
    batch, channels, spatial = view.shape
    per_sample = channels * spatial
    limit = max(min(_SLICE_ELEMENTS, view.numel() // 8), _MIN_SLICE_ELEMENTS, channels)
    if per_sample <= limit:
        step = max(limit // max(per_sample, 1), 1)
        return [(slice(n, n + step), slice(None), slice(None)) for n in range(0, batch, step)]
    step = max(limit // channels, 1)
    return [(slice(n, n + 1), slice(None), slice(s, s + step)) for n in range(batch) for s in range(0, spatial, step)]


def _affine_into(
    out: torch.Tensor,
    src: torch.Tensor,
    center: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor | None,
) -> None:
    """``out = (src - center) * scale + shift`` per channel, ``[N, C, S]`` views, one pass.

    ATen's eval-mode batch norm with unit variance and ``eps = 0``: its invstd is exactly 1, its
    multiplier ``scale`` and its constant ``shift - center * scale`` (float32 for low-precision
    input, float64 for float64), so the arithmetic is torch's own BatchNorm forward.
    ``center``/``scale``/``shift`` are ``[C]`` in the accumulation dtype.

    With ``S == 1`` (BatchNorm1d's ``[N, C]``) the same map is one ``addcmul`` over ``[N, C]``
    (``src * scale + (shift - center * scale)``, computed in the accumulation dtype, stored in
    ``out``'s): ATen's eval batch norm takes a per-(sample, channel) path there, ~5x slower
    (256 x 1024 fp32: ~280 us a pass, of a ~1 ms forward + backward).
    """
    if src.shape[2] == 1:
        constant = -center * scale if shift is None else shift - center * scale
        torch.addcmul(constant, src.select(2, 0), scale, out=out.select(2, 0))
        return
    empty = center.new_empty(0)
    _aten.native_batch_norm.out(
        _four_d(src), scale, shift, center, torch.ones_like(center), False, 0.0, 0.0,
        out=_four_d(out), save_mean=empty, save_invstd=empty,
    )  # fmt: skip


def _activation_(z: torch.Tensor, activation: int, negative_slope: float) -> None:
    """``z = act(z)`` in place, for the codes of ``kernels.activation.ACTIVATION_CODES``."""
    if activation == ACTIVATION_CODES["relu"]:
        z.relu_()
    elif activation == ACTIVATION_CODES["leaky_relu"]:
        F.leaky_relu_(z, negative_slope)
    elif activation == ACTIVATION_CODES["silu"]:
        F.silu(z, inplace=True)


def _activation_backward_(z: torch.Tensor, grad: torch.Tensor, activation: int, negative_slope: float) -> None:
    """``z = grad * act'(z)`` in place (``z`` holds the pre-activation and is overwritten)."""
    _activation_backward_into(z, grad, z, activation, negative_slope, source_is_output=False)


def _activation_backward_into(
    into: torch.Tensor,
    grad: torch.Tensor,
    source: torch.Tensor,
    activation: int,
    negative_slope: float,
    source_is_output: bool,
) -> None:
    """``into = grad * act'(z)`` from ``source``: z itself, or (``source_is_output``, ReLU and
    leaky ReLU with a non-negative slope only) the forward's output ``act(z)``, which is positive
    exactly where z is."""
    if activation == ACTIVATION_CODES["relu"]:
        _aten.threshold_backward.grad_input(grad, source, 0.0, grad_input=into)
    elif activation == ACTIVATION_CODES["leaky_relu"]:
        _aten.leaky_relu_backward.grad_input(grad, source, negative_slope, source_is_output, grad_input=into)
    elif activation == ACTIVATION_CODES["silu"] and not source_is_output:
        _aten.silu_backward.grad_input(grad, source, grad_input=into)
    else:
        raise ValueError(f"no activation backward for code {activation} from {'output' if source_is_output else 'z'}")


def derivative_from_output(epilogue: Epilogue) -> bool:
    """``contract.KernelBackend.derivative_from_output``: for ReLU and leaky ReLU with a
    non-negative slope, whose output is positive exactly where their input is. Backward then makes
    ``dy * act'(z)`` in one pass over (dy, output) in the input's dtype, as torch's ReLU does, instead
    of recomputing z (for bf16/fp16 in float32 slices, ~2x torch's whole BatchNorm backward). The
    forward computes z for these in float32 and rounds the output once (``_output_into``), so the
    output's sign is the float32 z's, the one a recomputation would find."""
    relu, leaky_relu = ACTIVATION_CODES["relu"], ACTIVATION_CODES["leaky_relu"]
    return epilogue.activation == relu or (epilogue.activation == leaky_relu and epilogue.negative_slope >= 0.0)


def _pre_activation_into(
    buffer: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
) -> None:
    """``buffer = (x - mean) * invstd * weight + bias (+ residual)`` ``[N, C, S]``, x's dtype.

    Bitwise the forward's pre-activation (same kernels, same per-channel values), so the
    backward's activation masks match the forward's.
    """
    acc_dtype = mean.dtype
    scale = invstd if weight is None else invstd * _as(weight, acc_dtype)
    _affine_into(buffer, x, mean, scale, _as(bias, acc_dtype))
    if residual is not None:
        buffer.add_(residual)


def partial_stats(x: torch.Tensor, merge_tickets: torch.Tensor | None = None) -> torch.Tensor:
    """Local per-channel float64 ``[3, C]`` (count, sum, sum of squares) of ``x`` ``[N, C, S]``
    (``merge_tickets`` is unused: nothing is split here).

    The moments come from ATen's ``batch_norm_update_stats`` (torch's own BatchNorm statistics:
    float64 accumulation of the sum for float32 input, the squared deviations ``V = mean((x -
    m)^2)`` taken about the mean ``m`` in a second pass, float32 accumulation for bf16/fp16,
    float64 for float64), so a local batch is exactly as accurate as torch's BatchNorm on it.
    They are expanded into float64 sums ``[n, n * m + d, n * V + n * m^2 + 2 * m * d]`` with
    ``d = sum(x - m)``, an exact identity. ``m`` comes back rounded to float32, so ``d`` is
    not 0: it is below half an ulp of ``m`` per value, and negligible unless |m| >> std, where it
    would bias the between-rank part of the global variance by ~2^-23 * |m| / std (1.6e-5 at
    mean 2e4, std 2). Channels with |m| > 8 std therefore get ``d`` measured (one extra pass and
    a float32 temporary, only for such data; ordinary data, even after a ReLU, never pays it).
    """
    channels = x.shape[1]
    count = x.shape[0] * x.shape[2]
    if count == 0:
        return torch.zeros(3, channels, dtype=torch.float64, device=x.device)
    acc_dtype = accumulation_dtype(x.dtype)
    # A float32 placeholder makes the kernel run in its "mixed type" mode for bf16/fp16 input,
    # which returns float32 moments (without it they come back rounded to bf16/fp16); with a
    # momentum of 0 it is left as it is.
    placeholder = None if acc_dtype == x.dtype else x.new_zeros(channels, dtype=acc_dtype)
    mean, var = torch.batch_norm_update_stats(_four_d(x), placeholder, placeholder, 0.0)
    mean64, var64 = torch.stack((mean, var)).to(torch.float64).unbind(0)
    packed = torch.stack((torch.ones_like(mean64), mean64, torch.addcmul(var64, mean64, mean64))).mul_(count)
    # |m| > 8 std  <=>  V - m^2 / 64 < 0 (one op and a CPU read, which costs no sync)
    if acc_dtype != torch.float64 and float(torch.addcmul(var, mean, mean, value=-1.0 / 64.0).min()) < 0.0:
        offset = torch.sub(x, mean.view(1, -1, 1)).sum(dim=(0, 2)).to(torch.float64)  # d = sum(x - m)
        packed[1].add_(offset)
        packed[2].add_(offset * mean64, alpha=2.0)
    return packed


def count_batch(running: RunningStats) -> float:
    """Count one training call: increment ``num_batches_tracked`` (when tracked) and return this
    call's factor of ``RunningStats``' rule (``momentum``, or ``1 / num_batches_tracked`` after
    the increment for the cumulative average). A CPU counter: reading it costs no sync."""
    if running.num_batches_tracked is not None:
        running.num_batches_tracked.add_(1)
    return 1.0 / float(running.num_batches_tracked) if running.cumulative else running.momentum


def _finalize(stats: torch.Tensor, running: RunningStats | None, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Global float64 ``(mean, invstd)`` from the all-reduced sums; running statistics updated
    (``momentum=None``: the cumulative average) and ``num_batches_tracked`` incremented.

    Every channel has the same count, and this is the CPU path: reading it (and the cumulative
    momentum's ``num_batches_tracked``) as Python numbers costs no device synchronization and
    saves a dozen per-channel ops.
    """
    count = float(stats[0, 0])
    inv_count = 1.0 / max(count, 1.0)
    mean64 = stats[1] * inv_count
    m2 = torch.addcmul(stats[2], stats[1], mean64, value=-1.0).clamp_(min=0.0)
    invstd64 = torch.mul(m2, inv_count).add_(eps).rsqrt_()
    if running is None:
        return mean64, invstd64
    factor = count_batch(running)
    # An all-empty global batch (count 0) leaves the running statistics as they are.
    if count > 0:
        running.mean.lerp_(mean64.to(running.mean.dtype), factor)
        running.var.lerp_(torch.mul(m2, 1.0 / max(count - 1.0, 1.0)).to(running.var.dtype), factor)
    return mean64, invstd64


def normalize(
    x: torch.Tensor,
    out: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    stats: torch.Tensor | None,
    running: RunningStats | None,
    eps: float,
    epilogue: Epilogue,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``launchers.normalize``.

    One pass writes ``out`` (ATen's BatchNorm transform with the global statistics); a residual
    and an activation are applied to ``out`` in place (one pass each, as torch's BN + add + act).
    """
    acc_dtype = accumulation_dtype(x.dtype)
    if stats is not None:
        mean64, invstd64 = _finalize(stats, running, eps)
        mean, invstd = mean64.to(acc_dtype), invstd64.to(acc_dtype)
    else:
        mean = running.mean.to(acc_dtype, copy=True)  # an output must not alias the buffer
        invstd = torch.rsqrt(running.var.to(acc_dtype) + eps)
    if x.numel() > 0:
        _output_into(out, x, mean, invstd, weight, bias, epilogue)
    return mean, invstd


def _output_into(
    out: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    epilogue: Epilogue,
) -> None:
    """``out = act((x - mean) * invstd * weight + bias + residual)`` ``[N, C, S]``.

    In x's dtype, one pass per step (as torch's BN + add + act), except where backward takes the
    activation's derivative from this output on bf16/fp16 input: z is then computed in float32 a
    slice at a time, exactly as backward recomputes it elsewhere (``_activation_grad_slices``),
    and rounded once. Rounding ``bn(x)`` to bf16 before the residual is added would flip the sign
    of z wherever it is within rounding of 0 (~0.2% of elements at unit scale), and a ReLU mask
    taken from such an output is off by ~3% in every gradient against float64.
    """
    residual = epilogue.residual
    if not (derivative_from_output(epilogue) and accumulation_dtype(x.dtype) != x.dtype):
        _pre_activation_into(out, x, mean, invstd, weight, bias, residual)
        _activation_(out, epilogue.activation, epilogue.negative_slope)
        return
    slices = _slices(x)
    buffers = _SliceBuffers(x, slices, mean.dtype, count=1)
    for rows in slices:
        (z,) = buffers.views(x[rows])
        z.copy_(x[rows])
        _pre_activation_into(z, z, mean, invstd, weight, bias, None if residual is None else residual[rows])
        _activation_(z, epilogue.activation, epilogue.negative_slope)
        out[rows].copy_(z)


def unsynchronized_forward_serves(x: torch.Tensor, running: RunningStats | None) -> bool:
    """Whether ``unsynchronized_forward`` can take a training forward with nothing to
    synchronize: a non-empty batch, and running statistics (if any) in the accumulation dtype,
    which ATen's statistics kernel updates in place (bf16/fp16 running statistics would make it
    return rounded moments)."""
    return x.shape[0] * x.shape[2] > 0 and (running is None or running.mean.dtype == accumulation_dtype(x.dtype))


def unsynchronized_forward(
    x: torch.Tensor,
    out: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running: RunningStats | None,
    eps: float,
    epilogue: Epilogue,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``partial_stats`` + ``normalize`` when the local batch is the global one (where
    ``unsynchronized_forward_serves``): ATen's ``batch_norm_update_stats`` gives the moments and
    updates the running statistics by torch's own rule in the same call (``momentum=None``: the
    cumulative factor), then the output is written as ``normalize`` writes it (so backward's
    recomputed pre-activation is bitwise this one). No float64 sums: ~30 small ops fewer.

    Returns ``(mean, invstd, count)``: ``[C]`` in the accumulation dtype, and the float64 count.
    """
    acc_dtype = accumulation_dtype(x.dtype)
    channels, count = x.shape[1], x.shape[0] * x.shape[2]
    factor = 0.0
    running_mean = running_var = None
    if running is not None:
        running_mean, running_var = running.mean, running.var
        factor = count_batch(running)
    elif acc_dtype != x.dtype:  # float32 moments for bf16/fp16 input (see partial_stats)
        running_mean = running_var = x.new_zeros(channels, dtype=acc_dtype)
    mean, var = torch.batch_norm_update_stats(_four_d(x), running_mean, running_var, factor)
    invstd = var.add_(eps).rsqrt_()
    _output_into(out, x, mean, invstd, weight, bias, epilogue)
    return mean, invstd, torch.full((channels,), float(count), dtype=torch.float64, device=x.device)


def _sliced_activation(x: torch.Tensor, epilogue: Epilogue) -> bool:
    """A fused activation on bf16/fp16 input whose derivative is not taken from the saved output:
    its backward recomputes z in float32, a slice at a time (float32/float64 input recomputes it
    whole, into one buffer of the input's dtype: a slice at a time cost 10-50% more there, in ATen
    calls, on every CPU shape measured)."""
    return (
        epilogue.activation != ACTIVATION_CODES["identity"]
        and epilogue.output is None
        and accumulation_dtype(x.dtype) != x.dtype
    )


def _low_precision_from_output(x: torch.Tensor, epilogue: Epilogue) -> bool:
    """A fused activation on bf16/fp16 input whose derivative comes from the saved output: the
    two-stage backward makes ``dy * act'(z)`` a slice at a time (``_output_grad_slices``), so no
    temporary is the tensor's size."""
    return epilogue.output is not None and accumulation_dtype(x.dtype) != x.dtype


def _output_grad_slices(
    grad_out: torch.Tensor, x: torch.Tensor, epilogue: Epilogue, into: torch.Tensor | None = None
) -> Iterator[tuple[tuple[slice, slice, slice], torch.Tensor, torch.Tensor]]:
    """``(rows, dy * act'(z), x[rows])`` of ``[N, C, S]`` views a slice at a time, in x's dtype,
    from the saved output: written into ``into[rows]`` when given (the residual's gradient), else
    into one slice buffer reused for every slice. For ReLU the values are exact (dy or 0)."""
    slices = _slices(x)
    buffers = None if into is not None else _SliceBuffers(x, slices, x.dtype, count=1)
    for rows in slices:
        grad = into[rows] if buffers is None else buffers.views(x[rows])[0]
        _activation_backward_into(
            grad, grad_out[rows], epilogue.output[rows], epilogue.activation, epilogue.negative_slope, True
        )
        yield rows, grad, x[rows]


def _grad_before_activation(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    epilogue: Epilogue,
    buffer: torch.Tensor | None = None,
) -> torch.Tensor:
    """``grad_out * act'(z)`` ``[N, C, S]`` into ``buffer`` (used when laid out like x, else a
    new one): from the saved output in one pass (any dtype), else with z recomputed (input in its
    accumulation dtype, float32/64). Identity: ``grad_out`` itself, no pass."""
    if epilogue.activation == ACTIVATION_CODES["identity"]:
        return grad_out
    if buffer is None or buffer.stride() != x.stride():
        buffer = torch.empty_like(x)
    if epilogue.output is not None:
        _activation_backward_into(buffer, grad_out, epilogue.output, epilogue.activation, epilogue.negative_slope, True)
        return buffer
    _pre_activation_into(buffer, x, mean, invstd, weight, bias, epilogue.residual)
    _activation_backward_(buffer, grad_out, epilogue.activation, epilogue.negative_slope)
    return buffer


def _activation_grad_slices(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    epilogue: Epilogue,
) -> Iterator[tuple[tuple[slice, slice, slice], torch.Tensor, torch.Tensor]]:
    """``(rows, dy * act'(z), x)`` of bf16/fp16 ``[N, C, S]`` views a slice at a time, both in
    float32: z is recomputed as the forward computed it, in float32 buffers of one slice reused
    for every slice (``_SliceBuffers``), like the float32 copies of x and dy. The consumer may
    overwrite both yielded tensors."""
    residual = epilogue.residual
    slices = _slices(x)
    buffers = _SliceBuffers(x, slices, mean.dtype, count=3)
    for rows in slices:
        z, source, grad = buffers.views(x[rows])
        source.copy_(x[rows])
        grad.copy_(grad_out[rows])
        _pre_activation_into(z, source, mean, invstd, weight, bias, None if residual is None else residual[rows])
        _activation_backward_(z, grad, epilogue.activation, epilogue.negative_slope)
        yield rows, z, source


class _SliceBuffers:
    """``count`` float32 buffers of the largest of ``slices`` of ``x``, viewed per slice.

    Fresh multi-hundred-KB buffers for every slice page-faulted on every call (the allocator
    returns them to the OS): bf16 -> float32 copies ran at ~1.4 ns an element instead of ~0.2,
    and the fused bf16 backward at 3-4x torch's BatchNorm + add + ReLU."""

    def __init__(self, x: torch.Tensor, slices: list[tuple[slice, slice, slice]], dtype: torch.dtype, count: int):
        largest = max(x[rows].numel() for rows in slices)
        self.flat = [torch.empty(largest, dtype=dtype, device=x.device) for _ in range(count)]

    def views(self, like: torch.Tensor) -> list[torch.Tensor]:
        """Views of the buffers with ``like``'s shape, dense in ``like``'s dimension order (a
        channels_last slice gets channels_last buffers: ATen's batch-norm kernels want their
        input's and output's layouts to match)."""
        order = sorted(range(like.dim()), key=lambda dim: (-like.stride(dim), dim))
        strides = [0] * like.dim()
        step = 1
        for dim in reversed(order):
            strides[dim] = step
            step *= like.shape[dim]
        return [flat[: like.numel()].as_strided(like.shape, strides) for flat in self.flat]


def _channel_sums(
    dy: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum(dy), sum(dy * xhat))`` ``[C]`` of ``[N, C, S]`` views in one pass: ATen's BatchNorm
    backward asked for the weight and bias gradients only."""
    _, sum_dy_xhat, sum_dy = _aten.native_batch_norm_backward(
        _four_d(dy), _four_d(x), None, None, None, mean, invstd, True, 0.0, [False, True, True]
    )
    return sum_dy, sum_dy_xhat


def _sliced_channel_sums(
    slices: Iterator[tuple[tuple[slice, slice, slice], torch.Tensor, torch.Tensor]],
    mean: torch.Tensor,
    invstd: torch.Tensor,
    grad: torch.Tensor | None = None,
) -> torch.Tensor:
    """float64 ``[2, C]`` ``(sum(dy), sum(dy * xhat))`` over the slices of
    ``_activation_grad_slices`` (float32) or ``_output_grad_slices`` (x's dtype); each slice's
    ``dy`` is also rounded into ``grad[rows]`` when ``grad`` is given."""
    totals = torch.zeros(2, mean.shape[0], dtype=torch.float64, device=mean.device)
    for rows, dy, source in slices:
        sum_dy, sum_dy_xhat = _channel_sums(dy, source, mean, invstd)
        totals[0] += sum_dy
        totals[1] += sum_dy_xhat
        if grad is not None:
            grad[rows].copy_(dy)
    return totals


def backward_reduce(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    saved: SavedStatistics,
    epilogue: Epilogue,
    weight_grad_dtype: torch.dtype | None,
    bias_grad_dtype: torch.dtype | None,
    merge_tickets: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Same contract as ``launchers.backward_reduce`` (``merge_tickets`` unused).

    ``sum(dy)`` and ``sum(dy * (x - mean)) * invstd`` per channel in one pass (ATen's BatchNorm
    backward asked for the weight and bias gradients only).
    """
    channels = x.shape[1]
    mean, invstd = saved.mean, saved.invstd
    acc_dtype = mean.dtype
    if x.shape[0] * x.shape[2] == 0:
        sums = torch.zeros(2, channels, dtype=acc_dtype, device=x.device)
    elif _sliced_activation(x, epilogue):
        slices = _activation_grad_slices(grad_out, x, mean, invstd, weight, bias, epilogue)
        sums = _sliced_channel_sums(slices, mean, invstd).to(acc_dtype)
    elif _low_precision_from_output(x, epilogue):
        sums = _sliced_channel_sums(_output_grad_slices(grad_out, x, epilogue), mean, invstd).to(acc_dtype)
    else:
        dy = _grad_before_activation(grad_out, x, mean, invstd, weight, bias, epilogue)
        sum_dy, sum_dy_xhat = _channel_sums(dy, x, mean, invstd)
        # ``sums`` is a new tensor (the caller all-reduces it in place); the gradients are ATen's.
        sums = torch.stack((sum_dy, sum_dy_xhat))
        grad_weight = None if weight_grad_dtype is None else _as(sum_dy_xhat, weight_grad_dtype)
        grad_bias = None if bias_grad_dtype is None else _as(sum_dy, bias_grad_dtype)
        return sums, grad_weight, grad_bias
    grad_weight = None if weight_grad_dtype is None else sums[1].to(weight_grad_dtype, copy=True)
    grad_bias = None if bias_grad_dtype is None else sums[0].to(bias_grad_dtype, copy=True)
    return sums, grad_weight, grad_bias


def unsynchronized_backward_serves(x: torch.Tensor, saved: SavedStatistics) -> bool:
    """Whether ``unsynchronized_backward`` can take a backward with nothing to synchronize:
    batch statistics and a non-empty ``[N, C, S]`` view of a contiguous or channels_last input
    (the layouts ATen returns its gradient in). The weight may be of any dtype: ATen's backward
    gets it in the accumulation dtype (a ``[C]`` conversion), as ``_pre_activation_into`` uses it."""
    return (
        saved.batch_stats
        and x.shape[0] * x.shape[2] > 0
        and (x.is_contiguous() or _four_d(x).is_contiguous(memory_format=torch.channels_last))
    )


def unsynchronized_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    saved: SavedStatistics,
    epilogue: Epilogue,
    need_input: bool,
    grad_residual: torch.Tensor | None,
    weight_grad_dtype: torch.dtype | None,
    bias_grad_dtype: torch.dtype | None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``backward_reduce`` and ``backward_dx`` in one ATen ``native_batch_norm_backward`` when the
    local batch is the global one (where ``unsynchronized_backward_serves``): ``dy * act'(z)``
    (from the saved output for ReLU and leaky ReLU, else with z recomputed as the forward did;
    written into ``grad_residual`` when given) and then the input, weight and bias gradients in
    one call, as torch's ReLU + BatchNorm backward: one pass over (dy, output), one over (dy, x)
    for the sums and one for dx, instead of a reduce pass and two dx passes.

    SiLU on bf16/fp16 input computes ``dy * act'(z)`` from z in float32, a slice
    at a time, as the two-stage path does (z rounded to bf16 would flip ReLU masks wherever |z|
    is within rounding of 0: ~3% error in every gradient at 16 x 32 x 28 x 28), sums it in
    float32 for the weight and bias gradients, and rounds it once into a buffer of the input's
    dtype (the residual's gradient, when wanted) from which ATen computes the input gradient, as
    torch's BatchNorm backward does from the bf16 gradient its activation hands it.

    Returns ``(grad_input [N, C, S], grad_weight, grad_bias)``, each None where not asked for;
    ATen allocates the input gradient in x's layout (plus one transient temporary of x's size).
    """
    mean, invstd = saved.mean, saved.invstd
    totals = None
    if _sliced_activation(x, epilogue):
        # ReLU's dy * act'(z) is dy or 0, exact in bf16: ATen's backward makes the weight and bias
        # gradients from the rounded buffer too. Other activations' are summed in float32 first.
        exact = epilogue.activation == ACTIVATION_CODES["relu"]
        dy = grad_residual
        if (need_input or exact) and (dy is None or dy.stride() != x.stride()):
            dy = torch.empty_like(x)
        slices = _activation_grad_slices(grad_out, x, mean, invstd, weight, bias, epilogue)
        if exact:
            for rows, grad_slice, _ in slices:
                dy[rows].copy_(grad_slice)
        else:
            totals = _sliced_channel_sums(slices, mean, invstd, grad=dy)
    else:
        dy = _grad_before_activation(grad_out, x, mean, invstd, weight, bias, epilogue, buffer=grad_residual)
    if grad_residual is not None and dy is not grad_residual:
        grad_residual.copy_(dy)
    from_aten = totals is None
    mask = [need_input, from_aten and weight_grad_dtype is not None, from_aten and bias_grad_dtype is not None]
    grad_input = grad_weight = grad_bias = None
    if any(mask):
        grad_input, grad_weight, grad_bias = _aten.native_batch_norm_backward(
            _four_d(dy), _four_d(x), _as(weight, mean.dtype), None, None, mean, invstd, True, 0.0, mask
        )
        grad_input = None if grad_input is None else grad_input.view(x.shape)
    if totals is not None:
        grad_weight = None if weight_grad_dtype is None else totals[1]
        grad_bias = None if bias_grad_dtype is None else totals[0]
    return grad_input, _as(grad_weight, weight_grad_dtype), _as(grad_bias, bias_grad_dtype)


def _input_grad_terms(
    weight: torch.Tensor | None, invstd: torch.Tensor, sums: torch.Tensor | None, count: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(s, x_factor, shift)`` ``[C]`` of ``dx = s * dy + (x - mean) * x_factor + shift``:
    ``s = weight * invstd``; with the global ``sums`` (else None, None) ``x_factor = -s * invstd *
    sum_dy_xhat / n`` and ``shift = -s * sum_dy / n`` (every channel has the same count ``n``; a
    Python number on the CPU path)."""
    scale = invstd if weight is None else invstd * _as(weight, invstd.dtype)
    if sums is None:
        return scale, None, None
    negative_means = sums * (-1.0 / max(float(count[0]), 1.0))  # -[mean(dy), mean(dy * xhat)]
    return scale, (scale * invstd).mul_(negative_means[1]), scale * negative_means[0]


def backward_dx(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    out: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    saved: SavedStatistics,
    sums: torch.Tensor | None,
    epilogue: Epilogue,
    grad_residual: torch.Tensor | None = None,
) -> None:
    """Same contract as ``launchers.backward_dx``.

    With batch statistics, ``dx = s * (dy - sum_dy / n - (x - mean) * invstd * sum_dy_xhat / n)``
    (``s = weight * invstd``) in two passes over ``out``: the x term
    ``(x - mean) * (-s * k) - s * sum_dy / n`` (``k = invstd * sum_dy_xhat / n``) by ATen's
    BatchNorm transform, then ``out += s * dy`` (``torch.addcmul``). With running statistics,
    ``dx = s * dy`` in one pass.
    """
    if x.shape[0] * x.shape[2] == 0:
        return
    mean, invstd, count = saved.mean, saved.invstd, saved.count
    if _sliced_activation(x, epilogue):
        _low_precision_activation_dx(grad_out, x, out, weight, bias, saved, sums, epilogue, grad_residual)
        return
    scale, x_factor, shift = _input_grad_terms(weight, invstd, sums, count)
    if _low_precision_from_output(x, epilogue) and grad_residual is None:
        # dy * act'(z) a slice at a time (no residual gradient to hold it whole)
        if out is not None:
            _low_precision_dx(out, x, _output_grad_slices(grad_out, x, epilogue), mean, scale, x_factor, shift)
        return
    # A fused activation's dy * act'(z) goes into the residual's gradient, which it is, when that
    # is wanted; else into a new buffer (``out`` is overwritten below while dy is still read).
    dy = _grad_before_activation(grad_out, x, mean, invstd, weight, bias, epilogue, buffer=grad_residual)
    if grad_residual is not None and dy is not grad_residual:
        grad_residual.copy_(dy)
    if out is None:
        return
    if sums is None:
        _affine_into(out, dy, torch.zeros_like(scale), scale, None)
    elif out.dtype != scale.dtype:
        _low_precision_dx(out, x, ((rows, dy[rows], x[rows]) for rows in _slices(x)), mean, scale, x_factor, shift)
    else:
        _affine_into(out, x, mean, x_factor, shift)
        out.addcmul_(dy, scale.view(1, -1, 1))  # out += s * dy


def _low_precision_dx(
    out: torch.Tensor,
    x: torch.Tensor,
    dy_slices: Iterator[tuple[tuple[slice, slice, slice], torch.Tensor, torch.Tensor]],
    mean: torch.Tensor,
    scale: torch.Tensor,
    x_factor: torch.Tensor | None,
    shift: torch.Tensor | None,
) -> None:
    """bf16/fp16 ``out = (x - mean) * x_factor + shift + scale * dy`` (``out = scale * dy`` when
    ``x_factor`` is None: running statistics) over ``(rows, dy, x)`` slices of ``_slices(x)``.

    The x term and ``s * dy`` cancel where dx is small, so they are summed in float32 and rounded
    once, as torch's BatchNorm backward does (summing in bf16 cost several ulps of dx); a slice at
    a time, so the float32 temporaries stay a fraction of the tensor.
    """
    if x_factor is None:
        zeros = torch.zeros_like(scale)
        for rows, dy_rows, _ in dy_slices:
            _affine_into(out[rows], dy_rows, zeros, scale, None)
        return
    buffers = _SliceBuffers(x, _slices(x), scale.dtype, count=2)
    for rows, dy_rows, x_rows in dy_slices:
        total, dy_buffer = buffers.views(x_rows)
        total.copy_(x_rows)  # ATen's transform keeps its input's dtype: float32, in place
        _affine_into(total, total, mean, x_factor, shift)
        total.addcmul_(dy_rows if dy_rows.dtype == scale.dtype else dy_buffer.copy_(dy_rows), scale.view(1, -1, 1))
        out[rows].copy_(total)


def _low_precision_activation_dx(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    out: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    saved: SavedStatistics,
    sums: torch.Tensor | None,
    epilogue: Epilogue,
    grad_residual: torch.Tensor | None,
) -> None:
    """``backward_dx`` for a fused activation on bf16/fp16 input, a float32 slice at a time:
    ``dy * act'(z)`` (the residual's gradient) and the input gradient from it, each summed in
    float32 and rounded once into its output. No temporary is the tensor's size."""
    mean, invstd = saved.mean, saved.invstd
    scale, x_factor, shift = _input_grad_terms(weight, invstd, sums, saved.count)
    for rows, dy, source in _activation_grad_slices(grad_out, x, mean, invstd, weight, bias, epilogue):
        if grad_residual is not None:
            grad_residual[rows].copy_(dy)
        if out is None:
            continue
        if sums is None:
            source = torch.mul(dy, scale.view(1, -1, 1), out=source)
        else:
            _affine_into(source, source, mean, x_factor, shift)  # the x term, in place of x's copy
            source.addcmul_(dy, scale.view(1, -1, 1))  # + s * dy
        out[rows].copy_(source)
