"""The fused residual + activation API: construction, conversion, memory saved for backward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from triton_syncbn import SyncBatchNorm, convert_sync_batchnorm, launchers, sync_batch_norm, torch_path
from triton_syncbn.contract import Epilogue
from triton_syncbn.kernels.activation import ACTIVATION_CODES


def conv_norm_activation(channels_in: int, channels_out: int, activation: nn.Module) -> nn.Sequential:
    """torchvision's ``Conv2dNormActivation`` layout: Sequential(conv, bn, act)."""
    return nn.Sequential(
        nn.Conv2d(channels_in, channels_out, 3, padding=1, bias=False), nn.BatchNorm2d(channels_out), activation
    )


def torchvision_style_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        conv_norm_activation(3, 8, nn.ReLU(inplace=True)),
        conv_norm_activation(8, 8, nn.LeakyReLU(0.2)),
        conv_norm_activation(8, 6, nn.SiLU()),
        nn.Sequential(nn.Conv2d(6, 6, 1), nn.BatchNorm2d(6)),  # no activation: stays unfused
        nn.Sequential(nn.BatchNorm2d(6), nn.Tanh()),  # unsupported activation: stays separate
    ).double()


def test_unsupported_activation_lists_the_supported_ones() -> None:
    with pytest.raises(ValueError, match=r"'gelu'.*None, 'identity', 'relu', 'leaky_relu', 'silu'"):
        SyncBatchNorm(4, activation="gelu")
    with pytest.raises(ValueError, match="unsupported activation"):
        sync_batch_norm(torch.randn(3, 4), None, None, training=True, activation="tanh")


def test_repr_shows_the_activation() -> None:
    text = repr(SyncBatchNorm(4, activation="leaky_relu", negative_slope=0.2))
    assert text.endswith("track_running_stats=True, activation='leaky_relu', negative_slope=0.2)")


def test_fuse_activation_conversion_matches_the_unfused_model() -> None:
    reference = torchvision_style_model()
    fused = convert_sync_batchnorm(torchvision_style_model(), fuse_activation=True)
    assert [block[1].activation for block in list(fused)[:3]] == ["relu", "leaky_relu", "silu"]
    assert fused[1][1].negative_slope == 0.2
    assert all(isinstance(block[2], nn.Identity) for block in list(fused)[:3])
    assert fused[3][1].activation is None and fused[4][0].activation is None and isinstance(fused[4][1], nn.Tanh)
    assert list(fused.state_dict()) == list(reference.state_dict())
    for mode in ("train", "eval"):
        getattr(fused, mode)(), getattr(reference, mode)()
        x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
        x_ref = x.clone().requires_grad_(True)
        x.requires_grad_(True)
        out, out_ref = fused(x), reference(x_ref)
        torch.testing.assert_close(out, out_ref)
        out.square().sum().backward()
        out_ref.square().sum().backward()
        torch.testing.assert_close(x.grad, x_ref.grad)
        for (name, param), (_, param_ref) in zip(fused.named_parameters(), reference.named_parameters(), strict=True):
            torch.testing.assert_close(param.grad, param_ref.grad, msg=name)
        fused.zero_grad(), reference.zero_grad()
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(fused.state_dict()[name], value, msg=name)


def test_without_fuse_activation_nothing_fuses() -> None:
    converted = convert_sync_batchnorm(torchvision_style_model())
    assert converted[0][1].activation is None and isinstance(converted[0][2], nn.ReLU)


def test_residual_must_match_the_input() -> None:
    module = SyncBatchNorm(3, activation="relu")
    x = torch.randn(4, 3, 5)
    with pytest.raises(ValueError, match="residual of the input's shape"):
        module(x, torch.randn(4, 3, 6))
    with pytest.raises(TypeError, match="residual of the input's dtype"):
        module(x, torch.randn(4, 3, 5, dtype=torch.float64))
    assert int(module.num_batches_tracked) == 0


def test_only_the_residual_needs_a_gradient() -> None:
    module = SyncBatchNorm(3, activation="silu")
    x = torch.randn(4, 3, 5)
    residual = torch.randn(4, 3, 5, requires_grad=True)
    module.weight.requires_grad_(False), module.bias.requires_grad_(False)
    module(x, residual).sum().backward()
    reference = torch.nn.functional.silu(torch.nn.functional.batch_norm(x, None, None, training=True) + residual)
    (expected,) = torch.autograd.grad(reference.sum(), residual)
    torch.testing.assert_close(residual.grad, expected)


def saved_bytes(step) -> tuple[int, int]:
    """(bytes of every distinct storage autograd saves during ``step``, bytes of those that are
    new allocations rather than the step's inputs or parameters)."""
    storages: dict[int, tuple[int, bool]] = {}
    existing: set[int] = set()

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        pointer = tensor.untyped_storage().data_ptr()
        storages[pointer] = (tensor.untyped_storage().nbytes(), pointer not in existing)
        return tensor

    def register(*tensors: torch.Tensor) -> None:
        existing.update(t.untyped_storage().data_ptr() for t in tensors)

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step(register)
    total = sum(size for size, _ in storages.values())
    new = sum(size for size, is_new in storages.values() if is_new)
    return total, new


@pytest.mark.parametrize("activation", ["relu", "silu"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["bn-act", "bn-add-act"])
def test_fused_layer_saves_no_more_for_backward_than_bn_plus_activation(with_residual: bool, activation: str) -> None:
    """act(bn(x) [+ identity]): ours keeps x, a few [C] vectors and a reference to the residual
    (a tensor that exists anyway); BatchNorm2d + add + act also keeps the activation's input or
    output, a new tensor the size of x. On the CPU path a ReLU's derivative comes from the output,
    which ours then keeps too, as torch's ReLU does (the Triton kernels recompute it: never)."""
    x = torch.randn(8, 16, 12, 12, requires_grad=True)
    identity = torch.randn(8, 16, 12, 12, requires_grad=True) if with_residual else None
    fused = SyncBatchNorm(16, activation=activation)
    separate = nn.BatchNorm2d(16)
    act = getattr(torch, activation) if activation == "relu" else nn.functional.silu
    inputs = [x] + ([identity] if with_residual else [])

    def run_fused(register) -> None:
        register(*inputs, *fused.parameters())
        fused(x, identity)

    def run_separate(register) -> None:
        register(*inputs, *separate.parameters())
        normalized = separate(x)
        act(normalized + identity if with_residual else normalized)

    ours_total, ours_new = saved_bytes(run_fused)
    theirs_total, theirs_new = saved_bytes(run_separate)
    activation_bytes = x.numel() * x.element_size()
    # per-channel vectors: mean, invstd (fp32) and the packed float64 statistics holding the count
    per_channel = (2 * 4 + 3 * 8) * 16
    output_saved = activation == "relu"
    assert launchers.derivative_from_output(Epilogue(None, ACTIVATION_CODES[activation])) is False
    assert torch_path.derivative_from_output(Epilogue(None, ACTIVATION_CODES[activation])) is output_saved
    assert ours_new <= per_channel + (activation_bytes if output_saved else 0)
    assert theirs_new >= activation_bytes  # the activation's input or output
    assert ours_new <= theirs_new + per_channel  # new memory: no more than theirs (the residual exists anyway)
    if not with_residual and not output_saved:
        assert ours_total <= theirs_total - activation_bytes + per_channel


def test_output_modified_in_place_before_backward_is_an_error_where_saved() -> None:
    """On the CPU path a fused ReLU saves its output, as ``torch.relu`` does: changing the output in
    place before backward raises autograd's error (a wrong gradient would be silent). SiLU saves
    no output, so the same change is allowed there."""
    x = torch.randn(4, 3, 5, requires_grad=True)
    output = SyncBatchNorm(3, activation="relu")(x)
    output.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        output.sum().backward()
    output = SyncBatchNorm(3, activation="silu")(x)
    output.mul_(2.0)
    output.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
