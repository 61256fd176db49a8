"""``SyncBatchNorm``: module state and torch's train/eval decision table; no math here."""

from __future__ import annotations

import copy
import inspect

import torch
import torch.distributed as dist  # type hints only: distributed.py makes every call
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .backend import new_merge_tickets
from .distributed import group_name, group_size, sync_group, verify_same_on_all_ranks
from .functional import activation_code, batch_norm_function, check_input, epilogue, running_stats

_DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}

# torch added the keyword-only ``bias`` argument to the BatchNorm classes in a recent release.
_TORCH_HAS_BIAS_ARGUMENT = "bias" in inspect.signature(_BatchNorm.__init__).parameters


class SyncBatchNorm(_BatchNorm):
    """Drop-in replacement for ``torch.nn.SyncBatchNorm`` running fused Triton kernels.

    Normalizes ``(N, C, *)`` input (2 to 5 dims, any memory format, fp16/bf16/fp32/fp64) with
    statistics over the union of the batches of ``process_group`` (default: WORLD) in training,
    with one all-reduce per direction. Parameters, buffers, their initial values and state_dict
    keys are those of ``torch.nn.SyncBatchNorm`` and ``torch.nn.BatchNorm{1,2,3}d``.

    Differences from ``torch.nn.SyncBatchNorm`` (all deliberate): CPU tensors synchronize over
    gloo; single-process training runs the same kernels on CUDA (on CPU a layer without a fused
    epilogue then runs ``torch.batch_norm``, as torch's class does); a step where every rank's batch is
    empty leaves running_mean/running_var unchanged; no host-device synchronization in forward
    or backward; 1 value per channel is an error only when the *global* batch has 1 value per
    channel.

    ``activation`` (None/"identity", "relu", "leaky_relu" with ``negative_slope``, "silu") and
    ``forward(input, residual)`` fuse ``act(bn(input) + residual)`` into the same kernels, in
    training and in eval; backward saves nothing the size of the output.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: dist.ProcessGroup | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
        activation: str | None = None,
        negative_slope: float = 0.01,
        check_finite: bool = False,
    ) -> None:
        activation_code(activation)  # reject unsupported names before building anything
        bias_kwargs = {}
        if _TORCH_HAS_BIAS_ARGUMENT:
            bias_kwargs["bias"] = bias
        elif not bias:
            raise TypeError(f"bias=False needs a torch whose BatchNorm accepts it; torch {torch.__version__} does not")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, **bias_kwargs)
        self.process_group = process_group
        self.activation = None if activation == "identity" else activation
        self.negative_slope = negative_slope
        # Opt-in: raise FloatingPointError naming the channels whose batch statistics went
        # non-finite (costs a host sync per training step). Settable at any time.
        self.check_finite = check_finite
        # What this layer last verified all ranks agree on (see _verify_ranks_agree).
        self._agreed_signature: tuple[object, ...] | None = None

    def __deepcopy__(self, memo: dict[int, object]) -> SyncBatchNorm:
        """Copy everything but the process group, which is a shared handle (copying it fails, as
        it does for ``torch.nn.SyncBatchNorm``): EMA copies and ``torch.compile`` tests need this."""
        if self.process_group is not None:
            memo.setdefault(id(self.process_group), self.process_group)
        copied = type(self).__new__(type(self))
        memo[id(self)] = copied
        copied.__setstate__(copy.deepcopy(self.__dict__, memo))
        return copied

    def _check_input_dim(self, input: torch.Tensor) -> None:
        check_input(input, self.num_features)

    def extra_repr(self) -> str:
        text = super().extra_repr()
        if self.activation is not None:
            text += f", activation={self.activation!r}"
            if self.activation == "leaky_relu":
                text += f", negative_slope={self.negative_slope}"
        if self.process_group is not None:
            text += f", process_group={self.process_group}"
        return text

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``input`` ``(N, C, *)`` -> ``act(bn(input) + residual)``, same shape, dtype and memory format.

        ``residual`` (optional) has the input's shape and dtype, any memory format.
        """
        # torch's decision table (see torch.nn.modules.batchnorm._BatchNorm.forward): batch
        # statistics in training, and in eval when there are no running statistics; buffers are
        # updated only in training when tracked; synchronization only in training mode.
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        tracks = not self.training or self.track_running_stats
        counts_batch = self.training and self.track_running_stats
        group = sync_group(self.process_group) if (use_batch_stats and self.training) else None
        running = None
        if tracks:
            counter = self.num_batches_tracked if counts_batch else None
            running = running_stats(self.running_mean, self.running_var, counter, self.momentum)
        output = batch_norm_function(
            input,
            self.weight,
            self.bias,
            running,
            epilogue(residual, self.activation, self.negative_slope),
            use_batch_stats=use_batch_stats,
            eps=self.eps,
            group=group,
            num_features=self.num_features,
            check_finite=getattr(self, "check_finite", False),
            before_collectives=None if group is None else lambda: self._verify_ranks_agree(input, group),
            merge_tickets=lambda: self._merge_tickets(input),
        )
        if not torch.compiler.is_compiling():
            # After a successful call, what revert_sync_batchnorm needs to pick torch's class: a bit
            # per input rank seen and whether a residual was passed. Plain attributes (no state, no
            # graph); skipped when compiling, where a Python side effect would cost a graph break.
            seen = self.__dict__.get("_seen_dims", 0) | (1 << input.dim())
            if seen != self.__dict__.get("_seen_dims"):
                self.__dict__["_seen_dims"] = seen
            if residual is not None:
                self.__dict__["_seen_residual"] = True
        return output

    def _merge_tickets(self, input: torch.Tensor) -> torch.Tensor | None:
        """This layer's split-merge scratch on ``input``'s device (``contract.ForwardCall``): int32
        zeros that the reductions leave zero, made on the first training call on a device and
        kept (a plain attribute: not state, not in ``state_dict``, not broadcast by DDP; None on the
        CPU path). Calls of one layer must not overlap on two CUDA streams (they would share it).
        Under ``torch.compile`` a layer with none yet gets None (per-call tickets), no graph break."""
        cached = self.__dict__.get("_merge_tickets_by_device")
        if cached is not None and cached[0] == input.device:
            return cached[1]
        if torch.compiler.is_compiling():
            return None
        tickets = new_merge_tickets(input, self.num_features)
        self.__dict__["_merge_tickets_by_device"] = (input.device, tickets)
        return tickets

    def _verify_ranks_agree(self, input: torch.Tensor, group: dist.ProcessGroup) -> None:
        """On the first synchronized call, and whenever this rank's (channels, dtype,
        requires_grad) changes, check with one small all-reduce that every rank agrees: ranks
        that disagree would otherwise hang or abort in a mismatched collective. Free in steady
        state; skipped inside torch.compile graphs (the eager first call does it)."""
        if torch.compiler.is_compiling():
            return
        requires_grad = input.requires_grad and torch.is_grad_enabled()
        signature = (input.shape[1], input.dtype, requires_grad, group_name(group))
        if getattr(self, "_agreed_signature", None) == signature:
            return
        fields = {
            "channels": input.shape[1],
            "dtype": _DTYPE_CODES[input.dtype],
            "input requires_grad": int(requires_grad),
            "group size": group_size(group),
        }
        dtype_names = {code: str(dtype).removeprefix("torch.") for dtype, code in _DTYPE_CODES.items()}
        verify_same_on_all_ranks(fields, group, input.device, labels={"dtype": dtype_names})
        self._agreed_signature = signature

    @classmethod
    def convert_sync_batchnorm(
        cls, module: nn.Module, process_group: dist.ProcessGroup | None = None, fuse_activation: bool = False
    ) -> nn.Module:
        """``triton_syncbn.convert_sync_batchnorm`` with ``cls`` as the class plain layers become
        (torch's classmethod signature; see ``triton_syncbn.convert`` for the rules)."""
        from .convert import convert_sync_batchnorm

        return convert_sync_batchnorm(module, process_group, fuse_activation, layer_class=cls)
