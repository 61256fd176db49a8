"""What travels together between the layers, stated once.

``Epilogue`` (the fused residual add and activation) and ``RunningStats`` (the buffers and their
update rule) are what every layer below the module passes on; ``ForwardCall`` and
``BackwardCall`` are one call's worth of each direction; ``KernelBackend`` is what a kernel
backend implements. Flat argument lists exist only where
``torch.autograd.Function.apply`` and ``torch.library`` need them: ``FORWARD_FIELDS`` /
``BACKWARD_FIELDS`` name their positions, and ``flat()`` / ``from_flat()`` build and parse
them by name, so adding an option means adding one field here and one name there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from triton_syncbn.kernels.activation import ACTIVATION_CODES

IDENTITY = ACTIVATION_CODES["identity"]


@dataclass(frozen=True)
class Epilogue:
    """What follows the normalization: ``act(bn(x) + residual)``.

    ``residual`` has the input's shape (any memory format) or is None; ``activation`` is a code
    of ``kernels.activation.ACTIVATION_CODES``; ``negative_slope`` is leaky_relu's slope.
    ``output`` (backward only): the forward's output, where the backend takes the activation's
    derivative from it (``KernelBackend.derivative_from_output``); None: backward recomputes the
    activation's input from x and the residual.
    """

    residual: torch.Tensor | None = None
    activation: int = IDENTITY
    negative_slope: float = 0.0
    output: torch.Tensor | None = None

    @property
    def fused_activation(self) -> bool:
        """Whether an activation follows (backward then needs its input, recomputed)."""
        return self.activation != IDENTITY


@dataclass(frozen=True)
class RunningStats:
    """Running statistics ``[C]`` and their update rule.

    Eval reads ``mean``/``var``. A training call updates them in place as
    ``stat += factor * (batch_stat - stat)`` (``var`` takes the unbiased batch variance) with
    ``factor = momentum``, or ``1 / num_batches_tracked`` (after its increment) when
    ``momentum`` is None, the cumulative average (training then needs ``num_batches_tracked``,
    checked by ``functional``); ``num_batches_tracked`` (an int64 scalar tensor), when given, is
    incremented by every training call.
    """

    mean: torch.Tensor
    var: torch.Tensor
    num_batches_tracked: torch.Tensor | None = None
    momentum: float | None = 0.1

    @property
    def cumulative(self) -> bool:
        return self.momentum is None


@dataclass(frozen=True)
class ForwardCall:
    """One forward: ``input`` ``(N, C, *)``, ``weight``/``bias`` ``[C]`` or None, the running
    statistics (None: not tracked), the epilogue, and how to normalize: with the batch
    statistics of the group named ``group_name`` ("" for none) or the running ones.
    ``merge_tickets``: the layer's zeroed int32 scratch for the Triton reductions' in-kernel
    split merges (``launchers.new_merge_tickets``; left zero), or None (allocated per call);
    backward uses it too."""

    input: torch.Tensor
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    running: RunningStats | None
    epilogue: Epilogue
    eps: float
    use_batch_stats: bool
    group_name: str
    check_finite: bool = False
    merge_tickets: torch.Tensor | None = None

    def flat(self) -> tuple[object, ...]:
        """The positional arguments named by ``FORWARD_FIELDS``."""
        running = self.running
        values = {
            "input": self.input,
            "residual": self.epilogue.residual,
            "weight": self.weight,
            "bias": self.bias,
            "running_mean": None if running is None else running.mean,
            "running_var": None if running is None else running.var,
            "num_batches_tracked": None if running is None else running.num_batches_tracked,
            "momentum": None if running is None else running.momentum,
            "eps": self.eps,
            "use_batch_stats": self.use_batch_stats,
            "group_name": self.group_name,
            "activation": self.epilogue.activation,
            "negative_slope": self.epilogue.negative_slope,
            "check_finite": self.check_finite,
            "merge_tickets": self.merge_tickets,
        }
        return tuple(values[name] for name in FORWARD_FIELDS)

    @classmethod
    def from_flat(cls, *args: object) -> ForwardCall:
        """Parse ``flat()``'s arguments back, by name."""
        named = dict(zip(FORWARD_FIELDS, args, strict=True))
        running = None
        if named["running_mean"] is not None:
            running = RunningStats(
                named["running_mean"], named["running_var"], named["num_batches_tracked"], named["momentum"]
            )
        epilogue = Epilogue(named["residual"], named["activation"], named["negative_slope"])
        return cls(
            named["input"], named["weight"], named["bias"], running, epilogue, named["eps"],
            named["use_batch_stats"], named["group_name"], named["check_finite"], named["merge_tickets"],
        )  # fmt: skip


FORWARD_FIELDS = (
    "input", "residual", "weight", "bias", "running_mean", "running_var", "num_batches_tracked", "momentum", "eps",
    "use_batch_stats", "group_name", "activation", "negative_slope", "check_finite", "merge_tickets",
)  # fmt: skip
# The forward arguments that have gradients, in FORWARD_FIELDS order (they come first).
DIFFERENTIABLE_FIELDS = ("input", "residual", "weight", "bias")


@dataclass(frozen=True)
class SavedStatistics:
    """What the forward hands to backward besides its inputs: ``mean``, ``invstd`` ``[C]`` (the
    accumulation dtype) as used, and ``count``, the float64 ``[C]`` global element count with
    batch statistics, empty when the running statistics normalized."""

    mean: torch.Tensor
    invstd: torch.Tensor
    count: torch.Tensor

    @property
    def batch_stats(self) -> bool:
        return self.count.numel() > 0


@dataclass(frozen=True)
class Gradients:
    """Which gradients a backward computes, in ``DIFFERENTIABLE_FIELDS`` order."""

    input: bool
    residual: bool
    weight: bool
    bias: bool

    def as_list(self) -> list[bool]:
        return [self.input, self.residual, self.weight, self.bias]


@dataclass(frozen=True)
class BackwardCall:
    """One backward: ``grad_output`` and ``input`` ``(N, C, *)``, the forward's ``weight`` and
    ``bias``, its epilogue (the residual only when an activation is fused), its statistics, the
    group, and which gradients are needed. With no fused activation the residual's gradient is
    ``grad_output`` itself, left to the caller (``needs.residual`` must be False).
    ``merge_tickets`` as in ``ForwardCall``. ``epilogue.output`` does not travel through
    ``flat()``: the compiled backward op recomputes the activation's input instead."""

    grad_output: torch.Tensor
    input: torch.Tensor
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    saved: SavedStatistics
    epilogue: Epilogue
    group_name: str
    needs: Gradients
    merge_tickets: torch.Tensor | None = None

    def flat(self) -> tuple[object, ...]:
        """The positional arguments named by ``BACKWARD_FIELDS``."""
        values = {
            "grad_output": self.grad_output,
            "input": self.input,
            "residual": self.epilogue.residual,
            "weight": self.weight,
            "bias": self.bias,
            "mean": self.saved.mean,
            "invstd": self.saved.invstd,
            "count": self.saved.count,
            "group_name": self.group_name,
            "activation": self.epilogue.activation,
            "negative_slope": self.epilogue.negative_slope,
            "needs": self.needs.as_list(),
            "merge_tickets": self.merge_tickets,
        }
        return tuple(values[name] for name in BACKWARD_FIELDS)

    @classmethod
    def from_flat(cls, *args: object) -> BackwardCall:
        """Parse ``flat()``'s arguments back, by name."""
        named = dict(zip(BACKWARD_FIELDS, args, strict=True))
        return cls(
            named["grad_output"], named["input"], named["weight"], named["bias"],
            SavedStatistics(named["mean"], named["invstd"], named["count"]),
            Epilogue(named["residual"], named["activation"], named["negative_slope"]), named["group_name"],
            Gradients(*named["needs"]), named["merge_tickets"],
        )  # fmt: skip


BACKWARD_FIELDS = (
    "grad_output", "input", "residual", "weight", "bias", "mean", "invstd", "count", "group_name", "activation",
    "negative_slope", "needs", "merge_tickets",
)  # fmt: skip


@runtime_checkable
class KernelBackend(Protocol):
    """The four stages every kernel backend implements (``launchers``: Triton kernels;
    ``torch_path``: ATen ops on CPU), on ``[N, C, S]`` views (``layout.channel_view``), and
    whether its backward wants the forward's output.

    A backend may take keyword-only options after these (the launchers' ``tiling`` and
    ``dispatch``); ``tests/test_contract.py`` checks that both modules match this signature.
    """

    def partial_stats(self, x: torch.Tensor, merge_tickets: torch.Tensor | None = None) -> torch.Tensor:
        """Local float64 ``[3, C]``: count, sum, sum of squares per channel of ``x``
        (``merge_tickets``: see ``ForwardCall``; a backend that splits nothing ignores it)."""
        ...

    def normalize(
        self,
        x: torch.Tensor,
        out: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        stats: torch.Tensor | None,
        running: RunningStats | None,
        eps: float,
        epilogue: Epilogue,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``out``; batch statistics from the global ``stats`` (updating ``running``) or
        the running ones when ``stats`` is None; return ``(mean, invstd)`` as used."""
        ...

    def backward_reduce(
        self,
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
        """``(sums [2, C], grad_weight, grad_bias)``: local sum(dy), sum(dy * xhat)."""
        ...

    def backward_dx(
        self,
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
        """Write the input gradient into ``out`` (and the residual's into ``grad_residual``)."""
        ...

    def derivative_from_output(self, epilogue: Epilogue) -> bool:
        """Whether backward takes the activation's derivative from the forward's output
        (``Epilogue.output``, which the autograd Function then saves) instead of recomputing the
        activation's input. A backend that says so must write an output whose activation
        derivative is exactly the one at the forward's pre-activation."""
        ...
