"""Model conversion to and from ``triton_syncbn.SyncBatchNorm``.

``convert_sync_batchnorm`` replaces BatchNorm layers by ours without changing what the model
computes: a ``_BatchNorm`` subclass whose ``forward`` is not torch's own is converted only by a
converter that knows what that forward does (built in for timm's norm+activation layers and for
our own classes, or given by the user), and otherwise left alone with a warning.
``revert_sync_batchnorm`` goes back to torch's ``nn.BatchNorm1d/2d/3d``, restoring fused
activations as modules. Both keep ``state_dict`` keys identical and share parameters and buffers
(same objects) between the input and the output, like ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin

from .module import SyncBatchNorm

Converter = Callable[[nn.Module, "dist.ProcessGroup | None"], nn.Module]

# Activation modules that run inside our kernels. Exact types only: a subclass may change forward.
FUSIBLE_ACTIVATIONS: dict[type[nn.Module], str] = {nn.ReLU: "relu", nn.LeakyReLU: "leaky_relu", nn.SiLU: "silu"}

# timm's norm+activation layers (bn -> drop -> act; read from timm/layers/norm_act.py), named by
# the class that defines ``forward`` so that timm is never imported. A subclass that overrides
# forward again is not matched. ``timm.models.layers`` is where timm < 0.9 kept them.
_TIMM_NORM_ACT = {
    f"{package}.norm_act.{name}"
    for package in ("timm.layers", "timm.models.layers")
    for name in ("BatchNormAct2d", "SyncBatchNormAct")
}


class UnconvertedBatchNormWarning(UserWarning):
    """A ``_BatchNorm`` subclass with its own ``forward`` was left as it is by ``convert_sync_batchnorm``."""


class FusedActivation(nn.Identity):
    """The slot an activation module leaves when it is fused into the SyncBatchNorm before it.

    Returns its input unchanged; keeps the original module (not as a submodule, so ``state_dict``
    keys are unchanged: fusible activations have no state) for ``revert_sync_batchnorm``.
    """

    def __init__(self, activation: nn.Module) -> None:
        super().__init__()
        self.__dict__["fused"] = activation

    def extra_repr(self) -> str:
        return f"{self.fused!r} fused into the SyncBatchNorm"


class SyncBatchNormAct(SyncBatchNorm):
    """``act(drop(SyncBatchNorm(input) [+ residual]))``: the converted form of norm+activation layers
    such as timm's ``BatchNormAct2d``, with their ``drop`` and ``act`` children (same ``state_dict`` keys).

    When ``drop`` is an ``nn.Identity`` and ``act`` a fusible activation (ReLU, LeakyReLU, SiLU),
    the activation runs inside our kernels (``activation=...``) and ``act`` is a ``FusedActivation``
    slot; otherwise both run as modules after the normalization.
    """

    def __init__(self, *args: object, drop: nn.Module | None = None, act: nn.Module | None = None, **kwargs: object):
        super().__init__(*args, **kwargs)
        self.drop = nn.Identity() if drop is None else drop
        self.act = nn.Identity() if act is None else act

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``input`` ``(N, C, *)`` -> same shape, dtype and memory format (``residual`` as in ``SyncBatchNorm``)."""
        return self.act(self.drop(super().forward(input, residual)))


class _BatchNormAct:
    """``act(drop(BatchNorm(input) [+ residual]))`` in plain torch: what ``revert_sync_batchnorm`` makes
    of a layer with a fused activation, a residual add or ``drop``/``act`` children. Mixed into
    ``nn.BatchNorm1d/2d/3d`` so that parameters and buffers stay direct children (same state_dict keys)."""

    def __init__(self, *args: object, drop: nn.Module | None = None, act: nn.Module | None = None, **kwargs: object):
        super().__init__(*args, **kwargs)
        self.drop = nn.Identity() if drop is None else drop
        self.act = nn.Identity() if act is None else act

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``input`` ``(N, C, *)`` -> same shape; ``residual`` (input's shape) is added before drop and act."""
        output = super().forward(input)
        if residual is not None:
            output = output + residual
        return self.act(self.drop(output))


class BatchNormAct1d(_BatchNormAct, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` + optional residual, drop and activation (see ``_BatchNormAct``)."""


class BatchNormAct2d(_BatchNormAct, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` + optional residual, drop and activation (see ``_BatchNormAct``)."""


class BatchNormAct3d(_BatchNormAct, nn.BatchNorm3d):
    """``nn.BatchNorm3d`` + optional residual, drop and activation (see ``_BatchNormAct``)."""


_PLAIN_CLASSES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_ACT_CLASSES: dict[type[_BatchNorm], type[_BatchNorm]] = {
    nn.BatchNorm1d: BatchNormAct1d,
    nn.BatchNorm2d: BatchNormAct2d,
    nn.BatchNorm3d: BatchNormAct3d,
}
_CLASS_FOR_DIMS: dict[int, type[_BatchNorm]] = {
    2: nn.BatchNorm1d,
    3: nn.BatchNorm1d,
    4: nn.BatchNorm2d,
    5: nn.BatchNorm3d,
}


def _forward_owner(cls: type) -> type:
    """The class in ``cls``'s MRO that defines the ``forward`` its instances run."""
    return next(klass for klass in cls.__mro__ if "forward" in vars(klass))


def _qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _plain_revert_class(module: _BatchNorm) -> type[_BatchNorm] | None:
    """The torch class a converted layer reverts to when the original is known (BatchNorm1d/2d/3d,
    a subclass of one with torch's input-dim check, or a layer we converted before)."""
    if isinstance(module, SyncBatchNorm):
        return module.__dict__.get("_reverts_to")
    return next((cls for cls in reversed(_PLAIN_CLASSES) if isinstance(module, cls)), None)


def _new_layer(
    module: _BatchNorm, layer_class: type[SyncBatchNorm], process_group: dist.ProcessGroup | None, **extra: object
) -> SyncBatchNorm:
    """A ``layer_class`` sharing ``module``'s parameters and buffers (same objects), training flag and qconfig."""
    if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
        raise ValueError(
            f"cannot convert an uninitialized lazy BatchNorm ({type(module).__name__}): run one "
            "forward pass (or call initialize_parameters) first so that num_features is known"
        )
    if isinstance(module, SyncBatchNorm):
        extra.setdefault("activation", module.activation)
        extra.setdefault("negative_slope", module.negative_slope)
        extra.setdefault("check_finite", getattr(module, "check_finite", False))
    converted = layer_class(
        module.num_features,
        module.eps,
        module.momentum,
        module.affine,
        module.track_running_stats,
        process_group,
        bias=not module.affine or module.bias is not None,
        **extra,
    )
    _share_state(module, converted)
    # What revert_sync_batchnorm needs to restore torch's class; plain attributes, not state.
    for key in ("_seen_dims", "_seen_residual"):
        if key in module.__dict__:
            converted.__dict__[key] = module.__dict__[key]
    converted.__dict__["_reverts_to"] = _plain_revert_class(module)
    return converted


def _share_state(source: _BatchNorm, target: _BatchNorm) -> None:
    if source.affine:
        with torch.no_grad():
            target.weight = source.weight
            target.bias = source.bias
    target.running_mean = source.running_mean
    target.running_var = source.running_var
    target.num_batches_tracked = source.num_batches_tracked
    target.training = source.training
    if hasattr(source, "qconfig"):
        target.qconfig = source.qconfig


def convert_plain_batchnorm(module: nn.Module, process_group: dist.ProcessGroup | None = None) -> SyncBatchNorm:
    """Converter for a ``_BatchNorm`` whose forward computes exactly torch's BatchNorm: a plain
    ``SyncBatchNorm`` sharing its parameters and buffers. Pass it in ``custom`` for a subclass
    whose own forward you know to be equivalent."""
    return _new_layer(module, SyncBatchNorm, process_group)


def convert_batchnorm_act(module: nn.Module, process_group: dist.ProcessGroup | None = None) -> SyncBatchNormAct:
    """Converter for a norm+activation layer computing ``act(drop(batch_norm(x)))`` with ``drop``
    and ``act`` child modules (either may be absent), like timm's ``BatchNormAct2d``.

    The activation is fused into our kernels when ``drop`` is an ``nn.Identity`` and ``act`` is
    exactly ``nn.ReLU``, ``nn.LeakyReLU`` (its ``negative_slope`` kept) or ``nn.SiLU`` (its module,
    ``inplace`` included, is kept in a ``FusedActivation`` slot for revert); any other activation
    (GELU, Hardswish, ...) and any drop layer run as modules after ours.
    """
    drop = getattr(module, "drop", None)
    act = getattr(module, "act", None)
    drop = nn.Identity() if drop is None else drop
    act = nn.Identity() if act is None else act
    activation = FUSIBLE_ACTIVATIONS.get(type(act)) if type(drop) is nn.Identity else None
    extra: dict[str, object] = {"drop": drop}
    if activation is not None:
        negative_slope = getattr(act, "negative_slope", 0.01)
        extra.update(activation=activation, negative_slope=negative_slope, act=FusedActivation(act))
    else:
        extra["act"] = act
        if isinstance(module, SyncBatchNorm) and module.activation is not None:
            extra.update(activation=module.activation, negative_slope=module.negative_slope)
    return _new_layer(module, SyncBatchNormAct, process_group, **extra)


def _builtin_converter(cls: type) -> Converter | None:
    """The converter that knows ``cls``'s forward, or None."""
    owner = _forward_owner(cls)
    if owner in (_BatchNorm, nn.SyncBatchNorm, SyncBatchNorm):
        return convert_plain_batchnorm
    if owner in (SyncBatchNormAct, _BatchNormAct) or _qualified_name(owner) in _TIMM_NORM_ACT:
        return convert_batchnorm_act
    return None


def convert_sync_batchnorm(
    module: nn.Module,
    process_group: dist.ProcessGroup | None = None,
    fuse_activation: bool = False,
    *,
    custom: Mapping[type[nn.Module], Converter | None] | None = None,
    layer_class: type[SyncBatchNorm] = SyncBatchNorm,
) -> nn.Module:
    """Replace the BatchNorm layers of ``module`` (recursively) by ``triton_syncbn.SyncBatchNorm``.

    As ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``: parameters and buffers are shared (same
    objects), ``training`` and ``qconfig`` carry over, and a new module is returned when ``module``
    itself is converted. Call it before wrapping the model in ``DistributedDataParallel``.

    Which layers are converted, and to what:

    - ``nn.BatchNorm1d/2d/3d``, ``nn.SyncBatchNorm``, ``nn.LazyBatchNorm*`` (initialized), our own
      layers, and any subclass that does not override ``forward``: ``SyncBatchNorm``;
    - norm+activation layers (timm's ``BatchNormAct2d`` and ``SyncBatchNormAct``, and ours):
      ``SyncBatchNormAct`` with the activation fused and the ``drop``/``act`` children kept
      (see ``convert_batchnorm_act``);
    - any other ``_BatchNorm`` subclass with its own ``forward`` is left as it is, with an
      ``UnconvertedBatchNormWarning`` naming its path and class: replacing it would drop
      whatever its forward does;
    - ``custom`` maps a class (exact type, checked before the rules above) to a converter
      ``fn(module, process_group) -> nn.Module`` whose result replaces the module (its children
      are not visited again: the converter owns them), or to ``None`` to leave the class alone
      without a warning. ``convert_plain_batchnorm`` and ``convert_batchnorm_act`` are ready-made
      converters.

    With ``fuse_activation=True``, a converted BatchNorm immediately followed by ``nn.ReLU``,
    ``nn.LeakyReLU`` or ``nn.SiLU`` inside an ``nn.Sequential`` becomes one fused layer and the
    activation's place is taken by a ``FusedActivation`` (an ``nn.Identity``), so indices and
    ``state_dict`` keys stay the same. ``layer_class`` is the class plain layers become
    (``SyncBatchNorm`` or a subclass).
    """
    unconverted: list[str] = []
    converted = _convert(module, process_group, fuse_activation, dict(custom or {}), layer_class, "", unconverted)
    for message in unconverted:  # warned here so that the warning points at the caller's line
        warnings.warn(message, UnconvertedBatchNormWarning, stacklevel=2)
    return converted


def _convert(
    module: nn.Module,
    process_group: dist.ProcessGroup | None,
    fuse_activation: bool,
    custom: dict[type[nn.Module], Converter | None],
    layer_class: type[SyncBatchNorm],
    path: str,
    unconverted: list[str],
) -> nn.Module:
    if type(module) in custom:
        converter = custom[type(module)]
        return module if converter is None else converter(module, process_group)
    converted = module
    if isinstance(module, _BatchNorm):
        converter = _builtin_converter(type(module))
        if converter is convert_plain_batchnorm:
            converted = _new_layer(module, layer_class, process_group)
        elif converter is not None:
            return converter(module, process_group)
        else:
            owner = _forward_owner(type(module))
            unconverted.append(
                f"convert_sync_batchnorm left {path or '<root>'} ({_qualified_name(type(module))}) unconverted: it "
                f"subclasses _BatchNorm with its own forward ({_qualified_name(owner)}.forward), which a "
                "SyncBatchNorm would not run. Pass custom={YourClass: converter} to convert it (e.g. "
                "triton_syncbn.convert.convert_plain_batchnorm if its forward is plain BatchNorm)."
            )
    for name, child in module.named_children():
        child_path = f"{path}.{name}" if path else name
        converted.add_module(
            name, _convert(child, process_group, fuse_activation, custom, layer_class, child_path, unconverted)
        )
    if fuse_activation and isinstance(converted, nn.Sequential):
        _fuse_activations(converted)
    return converted


def _fuse_activations(sequential: nn.Sequential) -> None:
    """Fold each activation that directly follows a (not yet fused) SyncBatchNorm into it."""
    names = list(sequential._modules)
    for name, next_name in zip(names, names[1:], strict=False):
        norm, follower = sequential._modules[name], sequential._modules[next_name]
        activation = FUSIBLE_ACTIVATIONS.get(type(follower))
        if type(norm) is not SyncBatchNormAct and isinstance(norm, SyncBatchNorm) and norm.activation is None:
            if activation is not None:
                norm.activation = activation
                norm.negative_slope = getattr(follower, "negative_slope", norm.negative_slope)
                sequential._modules[next_name] = FusedActivation(follower)


def _activation_module(name: str, negative_slope: float) -> nn.Module:
    if name == "leaky_relu":
        return nn.LeakyReLU(negative_slope)
    return {"relu": nn.ReLU, "silu": nn.SiLU}[name]()


def revert_sync_batchnorm(module: nn.Module, default: type[_BatchNorm] | None = None) -> nn.Module:
    """Replace every ``triton_syncbn.SyncBatchNorm`` in ``module`` (recursively) by torch's BatchNorm.

    For inference, export and single-device evaluation. Parameters and buffers are shared (same
    objects), ``training`` and ``qconfig`` carry over, ``state_dict`` keys stay the same, and a new
    module is returned when ``module`` itself is reverted. The class of each layer is, in order:
    the torch class it was converted from (``nn.BatchNorm1d/2d/3d`` or a subclass of one), else the
    one that accepts the input dims the layer has seen in eager forward calls (2-3 dims:
    ``BatchNorm1d``, 4: ``BatchNorm2d``, 5: ``BatchNorm3d``), else ``default``; ``ValueError``
    naming the layer when none applies or its inputs needed two classes.

    Fused activations come back as modules: into the ``FusedActivation`` slot they left (with
    their original arguments, ``inplace`` included); a layer built with ``activation=...``, that
    has ``drop``/``act`` children (converted from timm's ``BatchNormAct2d``) or that has been called
    with a ``residual`` becomes ``BatchNormAct1d/2d/3d``: the torch class plus ``drop``/``act``
    children and ``forward(input, residual=None)`` computing ``act(drop(bn(input) + residual))``.
    A layer whose residual calls all ran under ``torch.compile`` is not known to take one: its
    reverted plain ``nn.BatchNorm2d`` then rejects ``forward(x, residual)`` with a ``TypeError``.
    """
    if default is not None and default not in _PLAIN_CLASSES:
        raise TypeError(f"default must be nn.BatchNorm1d, nn.BatchNorm2d or nn.BatchNorm3d, got {default!r}")
    return _revert(module, default, "", activation_restored=False)


def _revert(module: nn.Module, default: type[_BatchNorm] | None, path: str, activation_restored: bool) -> nn.Module:
    if isinstance(module, FusedActivation):
        return module.fused
    if isinstance(module, SyncBatchNorm):
        return _revert_layer(module, default, path, activation_restored)
    children = list(module._modules.items())
    for index, (name, child) in enumerate(children):
        if child is None:
            continue
        before = children[index - 1][1] if index > 0 else None
        after = children[index + 1][1] if index + 1 < len(children) else None
        fused_before = isinstance(before, SyncBatchNorm) and before.activation is not None
        if isinstance(child, FusedActivation) and not fused_before:
            # the layer before no longer applies the activation (changed by hand): keep the identity
            module.add_module(name, nn.Identity())
            continue
        restored = isinstance(child, SyncBatchNorm) and child.activation is not None
        restored = restored and isinstance(after, FusedActivation)
        child_path = f"{path}.{name}" if path else name
        module.add_module(name, _revert(child, default, child_path, restored))
    return module


def _revert_layer(layer: SyncBatchNorm, default: type[_BatchNorm] | None, path: str, activation_restored: bool):
    plain_class = _revert_class(layer, default, path)
    drop = getattr(layer, "drop", None) if isinstance(layer, SyncBatchNormAct) else None
    act = getattr(layer, "act", None) if isinstance(layer, SyncBatchNormAct) else None
    if isinstance(act, FusedActivation):
        act = act.fused
    elif layer.activation is not None and not activation_restored:
        if act is not None and type(act) is not nn.Identity:
            raise ValueError(
                f"cannot revert {path or '<root>'}: it has both a fused activation ({layer.activation!r}) and an "
                f"activation module ({act!r}), which no single BatchNormAct holds"
            )
        act = _activation_module(layer.activation, layer.negative_slope)
    needs_act_class = act is not None or drop is not None or layer.__dict__.get("_seen_residual", False)
    target_class = _ACT_CLASSES[plain_class] if needs_act_class else plain_class
    extra: dict[str, object] = {"drop": drop, "act": act} if needs_act_class else {}
    if layer.affine and layer.bias is None:
        extra["bias"] = False  # only possible on a torch whose BatchNorm has the argument
    reverted = target_class(
        layer.num_features, layer.eps, layer.momentum, layer.affine, layer.track_running_stats, **extra
    )
    _share_state(layer, reverted)
    return reverted


def _revert_class(layer: SyncBatchNorm, default: type[_BatchNorm] | None, path: str) -> type[_BatchNorm]:
    known = layer.__dict__.get("_reverts_to")
    if known is not None:
        return known
    seen = layer.__dict__.get("_seen_dims", 0)
    dims = [dim for dim in _CLASS_FOR_DIMS if seen >> dim & 1]
    classes = {_CLASS_FOR_DIMS[dim] for dim in dims}
    if len(classes) > 1:
        raise ValueError(
            f"cannot revert {path or '<root>'}: it has seen inputs of {dims} dims, which no single one of "
            "nn.BatchNorm1d/2d/3d accepts"
        )
    if classes:
        return classes.pop()
    if default is None:
        raise ValueError(
            f"cannot tell which BatchNorm class {path or '<root>'} should revert to: it was not converted from "
            "nn.BatchNorm1d/2d/3d and has seen no eager forward call; pass default=nn.BatchNorm2d (or 1d/3d)"
        )
    return default
