"""Models and rank functions for tests/test_convert.py (importable by the cluster's workers).

``TimmStyleBatchNormAct2d`` is a faithful small copy of timm's ``BatchNormAct2d``
(``timm/layers/norm_act.py``): a subclass of ``nn.BatchNorm2d`` with ``drop`` and ``act``
children whose own ``forward`` runs torch's batch norm, then ``self.drop``, then ``self.act``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import triton_syncbn
from rank_tasks import current_rank, subgroup
from triton_syncbn.convert import convert_batchnorm_act


class TimmStyleBatchNormAct2d(nn.BatchNorm2d):
    """BatchNorm2d -> drop -> act, as timm's BatchNormAct2d (state_dict keys of a BatchNorm2d plus
    whatever state ``drop`` and ``act`` hold)."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        act_layer: type[nn.Module] | None = nn.ReLU,
        act_kwargs: dict[str, object] | None = None,
        inplace: bool = True,
        drop_layer: type[nn.Module] | None = None,
    ) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.drop = drop_layer(num_features) if drop_layer is not None else nn.Identity()
        kwargs = dict(act_kwargs or {})
        if act_layer in (nn.ReLU, nn.LeakyReLU, nn.SiLU, nn.Hardswish):
            kwargs.setdefault("inplace", inplace)
        self.act = act_layer(**kwargs) if act_layer is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.ndim == 4, f"expected 4D input (got {x.ndim}D input)"
        if self.momentum is None:
            exponential_average_factor = 0.0
        else:
            exponential_average_factor = self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                exponential_average_factor = 1.0 / float(self.num_batches_tracked)
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        x = F.batch_norm(
            x,
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight,
            self.bias,
            bn_training,
            exponential_average_factor,
            self.eps,
        )
        x = self.drop(x)
        x = self.act(x)
        return x


class ChannelDrop(nn.Module):
    """A deterministic stand-in for timm's drop layers (DropBlock is random): zeroes every third
    channel. Holds a buffer so that a converted model's state_dict keys show it is kept."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("keep", (torch.arange(channels) % 3 != 0).double().view(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.keep.to(x.dtype)


def timm_style_model() -> nn.Sequential:
    """A float64 conv net whose norm layers cover every conversion case of a norm+act layer:
    fused (ReLU inplace, LeakyReLU with its slope, SiLU), kept as a module after ours (GELU,
    Hardswish, PReLU with a parameter), no activation, and a drop layer before the activation."""
    torch.manual_seed(1234)

    def conv(cin: int, cout: int) -> nn.Conv2d:
        return nn.Conv2d(cin, cout, 3, padding=1, bias=False)

    return nn.Sequential(
        conv(3, 6),
        TimmStyleBatchNormAct2d(6),
        conv(6, 6),
        TimmStyleBatchNormAct2d(6, act_layer=nn.LeakyReLU, act_kwargs={"negative_slope": 0.2}),
        conv(6, 6),
        TimmStyleBatchNormAct2d(6, act_layer=nn.SiLU, momentum=None),
        conv(6, 6),
        TimmStyleBatchNormAct2d(6, act_layer=nn.GELU),
        conv(6, 6),
        TimmStyleBatchNormAct2d(6, act_layer=nn.Hardswish),
        conv(6, 6),
        TimmStyleBatchNormAct2d(6, act_layer=nn.PReLU, act_kwargs={"num_parameters": 6, "init": 0.3}),
        conv(6, 6),
        TimmStyleBatchNormAct2d(6, act_layer=nn.ReLU, drop_layer=ChannelDrop),
        conv(6, 6),
        TimmStyleBatchNormAct2d(6, act_layer=None),
        nn.Sequential(nn.BatchNorm2d(6), nn.ReLU(inplace=True)),  # torchvision-style pair
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 3),
    ).double()


def model_batch(size: int, step: int, spatial: int = 6) -> torch.Tensor:
    """A fixed float64 image batch ``[size, 3, spatial, spatial]`` for ``step``."""
    gen = torch.Generator().manual_seed(500 + step)
    return torch.randn(size, 3, spatial, spatial, generator=gen, dtype=torch.float64) * 1.5 + 0.5


def loss_weights(size: int, classes: int) -> torch.Tensor:
    """Fixed per-element weights of a linear loss over the global batch (rows sliced per rank)."""
    return torch.linspace(-1, 2, size * classes, dtype=torch.float64).view(size, classes)


def train_timm_style(batches: tuple[int, ...], steps: int) -> dict[str, object] | None:
    """Train the converted timm-style model on ``len(batches)`` ranks (one rank's rows each); per
    step return this rank's output and input gradient, and the final gradients and state."""
    world = len(batches)
    group = subgroup(world)
    rank = current_rank()
    if rank >= world:
        return None
    model = triton_syncbn.convert_sync_batchnorm(
        timm_style_model(), group, fuse_activation=True, custom={TimmStyleBatchNormAct2d: convert_batchnorm_act}
    )
    start = sum(batches[:rank])
    outputs, input_grads = [], []
    for step in range(steps):
        model.zero_grad()
        x = model_batch(sum(batches), step)[start : start + batches[rank]].requires_grad_(True)
        out = model(x)
        # the loss of the global batch is the sum of the ranks' losses
        (out * loss_weights(sum(batches), out.shape[1])[start : start + batches[rank]]).sum().backward()
        outputs.append(out.detach())
        input_grads.append(x.grad)
    grads = {name: param.grad.clone() for name, param in model.named_parameters()}
    return {"outputs": outputs, "input_grads": input_grads, "grads": grads, "state": model.state_dict()}
