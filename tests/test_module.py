"""The module and functional API in one process: drop-in compatibility, conversion, bad input.

These run on the plain-torch CPU path (no process group), the path CPU users get.
"""

from __future__ import annotations

import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import triton_syncbn
from oracle import Case, check_case, unsupported_here
from rank_tasks import run_case
from triton_syncbn import SyncBatchNorm, convert_sync_batchnorm, sync_batch_norm

SINGLE_PROCESS_CASES = [
    Case(batches=(6,)),
    Case(batches=(5,), tail=(4,)),
    Case(batches=(3,), tail=(4, 9), dtype=torch.float64),
    Case(batches=(3,), tail=(3, 5, 4), channels_last=True, dtype=torch.bfloat16),
    Case(batches=(2,), tail=(3, 2, 3, 4), channels_last=True, dtype=torch.float16, param_dtype=torch.float16),
    Case(batches=(4,), momentum=None, steps=3),
    Case(batches=(4,), affine=False, track_running_stats=False),
    Case(batches=(4,), training=False),
    Case(batches=(0,)),
]


@pytest.mark.parametrize("case", SINGLE_PROCESS_CASES, ids=lambda case: case.id)
def test_single_process_matches_oracle(case: Case) -> None:
    if unsupported_here(case):
        pytest.skip(unsupported_here(case))
    check_case(case, [run_case(case)])


def test_same_state_as_torch_syncbatchnorm() -> None:
    ours, theirs = SyncBatchNorm(7, momentum=0.2), nn.SyncBatchNorm(7, momentum=0.2)
    assert isinstance(ours, _BatchNorm)
    assert ours._version == theirs._version
    ours_state, theirs_state = ours.state_dict(), theirs.state_dict()
    assert list(ours_state) == list(theirs_state)
    for name, value in theirs_state.items():
        assert torch.equal(ours_state[name], value) and ours_state[name].dtype == value.dtype, name
    assert [name for name, _ in ours.named_parameters()] == [name for name, _ in theirs.named_parameters()]


@pytest.mark.parametrize("other", [nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm])
def test_state_dict_loads_both_ways(other: type[nn.Module]) -> None:
    source = other(5)
    with torch.no_grad():
        source.weight.uniform_()
        source.bias.uniform_()
        source.running_mean.uniform_()
        source.running_var.uniform_(0.5, 2)
        source.num_batches_tracked.fill_(7)
    ours = SyncBatchNorm(5)
    ours.load_state_dict(source.state_dict())
    back = other(5)
    back.load_state_dict(ours.state_dict())
    for name, value in source.state_dict().items():
        assert torch.equal(back.state_dict()[name], value), name


def test_old_state_dict_without_num_batches_tracked_loads() -> None:
    state = nn.BatchNorm2d(3).state_dict()
    del state["num_batches_tracked"]
    state._metadata = {"": {"version": 1}}
    module = SyncBatchNorm(3)
    module.load_state_dict(state)
    assert int(module.num_batches_tracked) == 0


def test_pickle_and_torch_save_round_trip() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), SyncBatchNorm(4, momentum=None))
    model(torch.randn(2, 3, 4, 4))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    copied = pickle.loads(pickle.dumps(model))
    for restored in (loaded, copied):
        assert isinstance(restored[1], SyncBatchNorm) and restored[1].momentum is None
        for name, value in model.state_dict().items():
            assert torch.equal(restored.state_dict()[name], value), name
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(loaded(x), model(x))


def test_repr() -> None:
    text = repr(SyncBatchNorm(8, eps=1e-3, momentum=None, bias=False))
    assert text == "SyncBatchNorm(8, eps=0.001, momentum=None, affine=True, bias=False, track_running_stats=True)"


def test_bias_false_keyword() -> None:
    module = SyncBatchNorm(4, bias=False)
    assert module.bias is None and module.weight is not None
    x = torch.randn(5, 4, requires_grad=True)
    reference = nn.BatchNorm1d(4, bias=False)
    torch.testing.assert_close(module(x), reference(x))
    module(x).sum().backward()
    assert module.weight.grad is not None


def test_matches_batchnorm_in_one_process_train_and_eval() -> None:
    """World size 1: our kernels (not a cuDNN fallback) give nn.BatchNorm's results."""
    torch.manual_seed(3)
    reference = nn.BatchNorm2d(6, momentum=0.3)
    ours = SyncBatchNorm(6, momentum=0.3)
    ours.load_state_dict(reference.state_dict())
    for _ in range(3):
        x = torch.randn(4, 6, 5, 5) * 3 + 1
        torch.testing.assert_close(ours(x), reference(x), atol=1e-5, rtol=1e-5)
    ours.eval(), reference.eval()
    x = torch.randn(4, 6, 5, 5)
    torch.testing.assert_close(ours(x), reference(x), atol=1e-5, rtol=1e-5)
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[name], value)


# ----------------------------------------------------------------------------- conversion


def test_convert_recurses_and_shares_parameters() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4, momentum=None),
        nn.Sequential(nn.Flatten(), nn.LazyLinear(6), nn.BatchNorm1d(6, affine=False)),
        nn.SyncBatchNorm(5, eps=1e-3, track_running_stats=False),
        nn.BatchNorm3d(2, bias=False),
    ).double()
    model[1].weight.requires_grad_(False)
    model[1].qconfig = "qconfig-marker"
    model.eval()
    old = {name: tensor for name, tensor in list(model.named_parameters()) + list(model.named_buffers())}
    converted = convert_sync_batchnorm(model)
    assert converted is model
    for index in (1, 3, 4):
        assert type(converted[index]) is SyncBatchNorm
    assert type(converted[2][2]) is SyncBatchNorm
    new = dict(list(converted.named_parameters()) + list(converted.named_buffers()))
    assert new.keys() == old.keys()
    for name, tensor in old.items():
        assert new[name] is tensor, name
    assert converted[1].momentum is None and converted[3].eps == 1e-3 and not converted[3].track_running_stats
    assert converted[4].bias is None and converted[2][2].weight is None
    assert not converted[1].weight.requires_grad and converted[1].weight.dtype == torch.float64
    assert converted[1].qconfig == "qconfig-marker" and not converted[1].training


def test_convert_root_batchnorm_returns_new_module_with_group() -> None:
    bn = nn.BatchNorm2d(3)
    marker = object()
    converted = SyncBatchNorm.convert_sync_batchnorm(bn, process_group=marker)
    assert converted is not bn and isinstance(converted, SyncBatchNorm)
    assert converted.process_group is marker and converted.weight is bn.weight


def test_convert_uninitialized_lazy_batchnorm_is_an_error() -> None:
    with pytest.raises(ValueError, match="uninitialized lazy BatchNorm"):
        convert_sync_batchnorm(nn.Sequential(nn.LazyBatchNorm2d()))
    lazy = nn.LazyBatchNorm2d()
    lazy(torch.randn(2, 3, 4, 4))
    assert convert_sync_batchnorm(lazy).num_features == 3


# ----------------------------------------------------------------------------- bad input

BAD_INPUTS = [
    (lambda: torch.randn(4), ValueError, "at least 2-D"),
    (lambda: torch.randn(4, 0, 3), ValueError, "non-zero number of channels"),
    (lambda: torch.randn(4, 5, 3), ValueError, "expected input with 3 channels"),
    (lambda: torch.ones(4, 3, 2, dtype=torch.int64), TypeError, "floating-point"),
    (lambda: torch.ones(4, 3, 2, dtype=torch.complex64), TypeError, "floating-point"),
    (lambda: [[1.0, 2.0, 3.0]], TypeError, "torch.Tensor"),
]


@pytest.mark.parametrize(
    ("make_input", "error", "message"),
    BAD_INPUTS,
    ids=["1-d", "zero-channels", "wrong-channel-count", "int64", "complex", "not-a-tensor"],
)
def test_bad_input_raises_and_changes_nothing(make_input, error: type[Exception], message: str) -> None:
    module = SyncBatchNorm(3)
    before = {name: value.clone() for name, value in module.state_dict().items()}
    with pytest.raises(error, match=message):
        module(make_input())
    for name, value in module.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_parameters_on_another_device_are_an_error() -> None:
    module = SyncBatchNorm(3, device="meta")
    with pytest.raises(ValueError, match="on the input's device cpu, got meta"):
        module(torch.randn(2, 3, 4))


def test_parameter_dtype_must_be_input_dtype_or_float32() -> None:
    module = SyncBatchNorm(3, dtype=torch.float16)
    with pytest.raises(TypeError, match="torch.bfloat16"):
        module(torch.randn(2, 3, 4, dtype=torch.bfloat16))


def test_one_value_per_channel_is_an_error_and_changes_nothing() -> None:
    module = SyncBatchNorm(3)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        module(torch.randn(1, 3))
    assert int(module.num_batches_tracked) == 0 and torch.equal(module.running_var, torch.ones(3))
    module.eval()
    assert module(torch.randn(1, 3)).shape == (1, 3)  # eval mode is fine, as in torch


# ----------------------------------------------------------------------------- functional


def test_functional_matches_f_batch_norm() -> None:
    x = torch.randn(6, 4, 3, 3).to(memory_format=torch.channels_last)
    weight, bias = torch.rand(4) + 0.5, torch.randn(4)
    mean_ours, var_ours = torch.randn(4), torch.rand(4) + 0.5
    mean_ref, var_ref = mean_ours.clone(), var_ours.clone()
    for training in (True, False):
        ours = sync_batch_norm(x, mean_ours, var_ours, weight, bias, training, 0.2, 1e-3)
        reference = F.batch_norm(x, mean_ref, var_ref, weight, bias, training, 0.2, 1e-3)
        torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
        assert ours.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(mean_ours, mean_ref)
    torch.testing.assert_close(var_ours, var_ref)


def test_functional_eval_needs_running_stats() -> None:
    with pytest.raises(ValueError, match="must be given when not training"):
        sync_batch_norm(torch.randn(3, 2), None, None, training=False)


def test_odd_strides_and_broadcast_grad() -> None:
    """Spatial dims that cannot merge into one stride, and a stride-0 (expanded) output grad."""
    base = torch.randn(4, 3, 6, 5)
    x = base.permute(0, 1, 3, 2).requires_grad_(True)  # (4, 3, 5, 6), W-major spatial strides
    reference_x = x.detach().clone().requires_grad_(True)
    module, reference = SyncBatchNorm(3), nn.BatchNorm2d(3)
    y, y_ref = module(x), reference(reference_x)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    y.sum().backward()
    y_ref.sum().backward()
    torch.testing.assert_close(x.grad, reference_x.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(module.weight.grad, reference.weight.grad, atol=1e-4, rtol=1e-4)


def test_public_names() -> None:
    assert set(triton_syncbn.__all__) == {
        "SyncBatchNorm",
        "convert_sync_batchnorm",
        "revert_sync_batchnorm",
        "sync_batch_norm",
    }


def test_backward_materializes_no_zero_gradients_for_the_statistics_outputs() -> None:
    """Only the output's gradient reaches backward: autograd fills no zero tensors for the
    non-differentiable mean/invstd/count outputs (three fill kernels per backward on CUDA)."""
    module = SyncBatchNorm(6)
    x = torch.randn(4, 6, 3, 3, requires_grad=True)
    y = module(x)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        y.backward(torch.randn_like(y))
    names = [event.name for event in profile.events()]
    assert "aten::zeros" not in names, [name for name in names if "zero" in name]
    assert x.grad is not None and module.weight.grad is not None
