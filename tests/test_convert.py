"""convert_sync_batchnorm / revert_sync_batchnorm on models nobody here wrote: BatchNorm subclasses
with their own forward (timm's norm+activation layers), round trips, export, conv-bn folding, AMP.

Every comparison runs the original model and the converted one on their own copies of the
parameters (conversion shares them), in float64 unless the test is about a lower precision.
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Iterator

import pytest
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from convert_tasks import (
    ChannelDrop,
    TimmStyleBatchNormAct2d,
    loss_weights,
    model_batch,
    timm_style_model,
    train_timm_style,
)
from triton_syncbn import SyncBatchNorm, convert_sync_batchnorm, revert_sync_batchnorm
from triton_syncbn.convert import (
    BatchNormAct2d,
    FusedActivation,
    SyncBatchNormAct,
    UnconvertedBatchNormWarning,
    convert_batchnorm_act,
    convert_plain_batchnorm,
)

CUSTOM = {TimmStyleBatchNormAct2d: convert_batchnorm_act}


def full_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


class ScaledBatchNorm2d(nn.BatchNorm2d):
    """A subclass whose forward does more than BatchNorm: replacing it would change results."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


class CountingBatchNorm2d(nn.BatchNorm2d):
    """A subclass whose forward is plain BatchNorm plus bookkeeping: the user may say so."""

    calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        CountingBatchNorm2d.calls += 1
        return super().forward(x)


class NoOwnForward(nn.BatchNorm2d):
    """A subclass that keeps torch's forward (e.g. a different default momentum)."""

    def __init__(self, num_features: int) -> None:
        super().__init__(num_features, momentum=0.3)


def relative_error(value: torch.Tensor, exact: torch.Tensor) -> float:
    """``|value - exact| / |exact|`` (L2 norms, float64); 0 when both are 0."""
    error = (value.double() - exact.double()).norm().item()
    return error / exact.double().norm().item() if error else 0.0


def mode_steps(model: nn.Module, steps: int) -> Iterator[str]:
    for step in range(steps):
        yield "train" if step < steps - 1 else "eval"


def assert_same_training(
    reference: nn.Module, converted: nn.Module, steps: int = 3, batch: int = 5, spatial: int = 6, **tolerance: float
) -> None:
    """Run both models on the same batches, ``steps - 1`` steps in training then one in eval, and
    compare outputs, the input gradient, every parameter gradient and the whole state (running
    statistics, num_batches_tracked, buffers of drop/act modules)."""
    assert list(converted.state_dict()) == list(reference.state_dict())
    for step, mode in enumerate(mode_steps(reference, steps)):
        getattr(reference, mode)(), getattr(converted, mode)()
        reference.zero_grad(), converted.zero_grad()
        x = model_batch(batch, step, spatial).to(next(reference.parameters()).dtype)
        x_ref, x_conv = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        torch.manual_seed(step)  # random drop layers (timm's DropBlock) draw the same masks in both
        out_ref = reference(x_ref)
        torch.manual_seed(step)
        out_conv = converted(x_conv)
        torch.testing.assert_close(out_conv, out_ref, **tolerance, msg=lambda m, s=step: f"step {s} output: {m}")
        weights = loss_weights(batch, out_ref.shape[1]).to(out_ref.dtype)
        (out_ref * weights).sum().backward()
        (out_conv * weights).sum().backward()
        torch.testing.assert_close(x_conv.grad, x_ref.grad, **tolerance, msg=f"step {step} input grad")
        for (name, param), (_, param_ref) in zip(
            converted.named_parameters(), reference.named_parameters(), strict=True
        ):
            torch.testing.assert_close(param.grad, param_ref.grad, **tolerance, msg=lambda m, n=name: f"{n}: {m}")
        for name, value in reference.state_dict().items():
            torch.testing.assert_close(converted.state_dict()[name], value, **tolerance, msg=name)


# ---------------------------------------------------------------- which layers are converted


@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.BatchNorm1d(4),
        lambda: nn.BatchNorm2d(4),
        lambda: nn.BatchNorm3d(4),
        lambda: nn.SyncBatchNorm(4),
        lambda: NoOwnForward(4),
        lambda: SyncBatchNorm(4, activation="silu"),
    ],
    ids=["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "torch-SyncBatchNorm", "subclass-without-forward", "ours"],
)
def test_layers_with_torchs_forward_convert_silently(make) -> None:
    model = nn.Sequential(nn.Identity(), make())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        converted = convert_sync_batchnorm(model)
    assert type(converted[1]) is SyncBatchNorm
    assert converted[1].momentum == model[1].momentum and converted[1].weight is model[1].weight
    assert converted[1].activation == getattr(model[1], "activation", None)


def test_initialized_lazy_batchnorm_converts_and_reverts_to_its_class() -> None:
    lazy = nn.LazyBatchNorm2d()
    lazy(torch.randn(2, 3, 4, 4))
    converted = convert_sync_batchnorm(lazy)
    assert type(converted) is SyncBatchNorm and type(revert_sync_batchnorm(converted)) is nn.BatchNorm2d


def test_subclass_with_its_own_forward_is_left_alone_with_a_warning_naming_it() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Sequential(nn.BatchNorm2d(4), ScaledBatchNorm2d(4)))
    scaled = model[1][1]
    expected = re.escape(f"1.1 ({full_name(ScaledBatchNorm2d)})")
    with pytest.warns(UnconvertedBatchNormWarning, match=expected) as record:
        converted = convert_sync_batchnorm(model)
    assert len(record) == 1 and "custom=" in str(record[0].message)
    assert record[0].filename == __file__  # points at the caller's line
    assert converted[1][1] is scaled and type(converted[1][0]) is SyncBatchNorm
    with pytest.warns(UnconvertedBatchNormWarning, match=re.escape(f"<root> ({full_name(ScaledBatchNorm2d)})")):
        assert convert_sync_batchnorm(scaled) is scaled


def test_custom_mapping_converts_or_silences_a_class() -> None:
    model = nn.Sequential(ScaledBatchNorm2d(4), CountingBatchNorm2d(4))
    seen = []

    def counting_converter(module: nn.Module, process_group: object) -> nn.Module:
        seen.append((type(module), process_group))
        return convert_plain_batchnorm(module, process_group)

    custom = {ScaledBatchNorm2d: None, CountingBatchNorm2d: counting_converter}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        converted = convert_sync_batchnorm(model, custom=custom)
    assert seen == [(CountingBatchNorm2d, None)]
    assert type(converted[0]) is ScaledBatchNorm2d and type(converted[1]) is SyncBatchNorm
    assert converted[1].running_var is model[1].running_var

    class ScaledSubclass(ScaledBatchNorm2d):
        pass

    with pytest.warns(UnconvertedBatchNormWarning, match="ScaledSubclass"):  # exact types only
        convert_sync_batchnorm(ScaledSubclass(4), custom=custom)


def test_classes_defined_as_timms_are_recognised_without_timm() -> None:
    """The built-in table names timm's classes by module path (timm is never imported): a copy of
    the class declared under timm's name converts without ``custom``; a subclass that overrides
    forward again does not."""
    namespace = {"forward": TimmStyleBatchNormAct2d.forward, "__module__": "timm.layers.norm_act"}
    timm_named = type("BatchNormAct2d", (TimmStyleBatchNormAct2d,), {**namespace, "__qualname__": "BatchNormAct2d"})
    layer = timm_named(4, act_layer=nn.SiLU)
    converted = convert_sync_batchnorm(layer)
    assert type(converted) is SyncBatchNormAct and converted.activation == "silu"

    class Overriding(timm_named):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) + 1

    with pytest.warns(UnconvertedBatchNormWarning, match="Overriding"):
        convert_sync_batchnorm(Overriding(4))


# ---------------------------------------------------------------- the timm pattern, one process


def test_timm_style_layers_convert_to_the_right_fused_layers() -> None:
    model = timm_style_model()
    acts = {index: model[index].act for index in (1, 3, 5, 7, 9, 11, 13)}
    converted = convert_sync_batchnorm(model, custom=CUSTOM)
    layers = [converted[index] for index in (1, 3, 5, 7, 9, 11, 13, 15)]
    assert all(type(layer) is SyncBatchNormAct for layer in layers)
    assert [layer.activation for layer in layers] == ["relu", "leaky_relu", "silu"] + [None] * 5
    assert layers[1].negative_slope == 0.2
    for index in (1, 3, 5):  # fused: the module (inplace=True included) waits in the slot
        assert isinstance(converted[index].act, FusedActivation) and converted[index].act.fused is acts[index]
        assert acts[index].inplace
    for index in (7, 9, 11, 13):  # GELU, Hardswish, PReLU, and ReLU behind a drop layer: kept
        assert converted[index].act is acts[index]
    assert isinstance(converted[13].drop, ChannelDrop) and not isinstance(converted[13].act, FusedActivation)
    assert type(converted[16][0]) is SyncBatchNorm and isinstance(converted[16][1], nn.ReLU)  # no fuse_activation


@pytest.mark.parametrize("fuse_activation", [False, True], ids=["plain", "fuse_activation"])
def test_timm_style_model_converted_trains_and_evaluates_like_the_original(fuse_activation: bool) -> None:
    reference = timm_style_model()
    converted = convert_sync_batchnorm(timm_style_model(), fuse_activation=fuse_activation, custom=CUSTOM)
    assert isinstance(converted[16][1], FusedActivation) == fuse_activation
    assert_same_training(reference, converted, steps=4)


@pytest.mark.distributed
def test_timm_style_model_on_two_gloo_ranks_matches_one_process(clusters) -> None:
    """Two ranks with their halves of the batch train like the original on the whole batch:
    outputs and input gradients per rank's rows, parameter gradients summed over ranks (DDP
    averages them), running statistics on every rank."""
    batches, steps = (3, 4), 3
    results = clusters("torch-cpu").run(train_timm_style, batches, steps)[: len(batches)]
    reference = timm_style_model()
    rows = [slice(sum(batches[:rank]), sum(batches[: rank + 1])) for rank in range(len(batches))]
    for step in range(steps):
        reference.zero_grad()
        x = model_batch(sum(batches), step).requires_grad_(True)
        out = reference(x)
        (out * loss_weights(sum(batches), out.shape[1])).sum().backward()
        for rank, result in enumerate(results):
            torch.testing.assert_close(result["outputs"][step], out[rows[rank]].detach())
            torch.testing.assert_close(result["input_grads"][step], x.grad[rows[rank]])
    for name, param in reference.named_parameters():
        torch.testing.assert_close(sum(result["grads"][name] for result in results), param.grad, msg=name)
    for result in results:
        assert list(result["state"]) == list(reference.state_dict())
        for name, value in reference.state_dict().items():
            torch.testing.assert_close(result["state"][name], value, msg=name)


# ---------------------------------------------------------------- timm itself


def import_timm():
    try:
        import timm
    except Exception as error:  # noqa: BLE001 - a broken torchvision raises RuntimeError, not ImportError
        pytest.skip(f"timm is not importable here ({type(error).__name__}: {error})")
    return timm


@pytest.mark.parametrize("name", ["efficientnet_b0", "mobilenetv3_small_100", "regnetx_002"])
def test_timm_models_convert_equal_to_the_original(name: str) -> None:
    """Real timm models (fp32, random init), one training and one eval step: the converted model's
    output, input gradient and every parameter gradient are as close to the float64 original's
    as the fp32 original's are (2x its relative error, or 1e-5), and its state equals it."""
    timm = import_timm()
    torch.manual_seed(0)
    reference = timm.create_model(name, pretrained=False, num_classes=7)
    converted = convert_sync_batchnorm(copy.deepcopy(reference))
    exact = copy.deepcopy(reference).double()
    norm_layers = [m for m in converted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norm_layers and all(isinstance(m, SyncBatchNormAct) for m in norm_layers)
    assert any(m.activation is not None for m in norm_layers)
    assert list(converted.state_dict()) == list(reference.state_dict())
    for step, mode in enumerate(("train", "eval")):
        results = []
        for model in (converted, reference, exact):
            getattr(model, mode)()
            model.zero_grad()
            x = model_batch(4, step, 32).to(next(model.parameters()).dtype).requires_grad_(True)
            out = model(x)
            (out.double() * loss_weights(4, 7)).sum().backward()
            results.append({"output": out, "input grad": x.grad, **{n: p.grad for n, p in model.named_parameters()}})
        for key, exact_value in results[2].items():
            ours, torchs = relative_error(results[0][key], exact_value), relative_error(results[1][key], exact_value)
            assert ours <= max(2 * torchs, 1e-5), f"{mode} {key}: ours {ours:.2e}, torch's fp32 {torchs:.2e}"
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(converted.state_dict()[key], value, atol=1e-5, rtol=1e-4, msg=key)


def test_timm_batchnormact_layers_and_timms_own_sync_conversion() -> None:
    timm = import_timm()
    from timm.layers import BatchNormAct2d as TimmBatchNormAct2d
    from timm.layers.norm_act import convert_sync_batchnorm as timm_convert

    reference = nn.Sequential(
        TimmBatchNormAct2d(3, act_layer=nn.ReLU),
        TimmBatchNormAct2d(3, act_layer="leaky_relu", act_kwargs={"negative_slope": 0.3}),
        TimmBatchNormAct2d(3, act_layer="silu"),
        TimmBatchNormAct2d(3, act_layer="gelu"),
        TimmBatchNormAct2d(3, act_layer="hard_swish"),
        TimmBatchNormAct2d(3, apply_act=False),
        TimmBatchNormAct2d(3, act_layer="relu", drop_layer=timm.layers.DropBlock2d),
        nn.Flatten(),
    ).double()
    converted = convert_sync_batchnorm(copy.deepcopy(reference))
    assert [layer.activation for layer in list(converted)[:7]] == ["relu", "leaky_relu", "silu"] + [None] * 4
    assert converted[1].negative_slope == 0.3
    assert_same_training(reference, converted, steps=3)
    # timm's converter makes timm.layers.norm_act.SyncBatchNormAct, which is recognised too
    timm_converted = timm_convert(copy.deepcopy(reference))
    assert type(timm_converted[0]).__name__ == "SyncBatchNormAct"
    assert_same_training(reference, convert_sync_batchnorm(timm_converted), steps=3)
    # timm's AugMix SplitBatchNorm2d normalizes each split with its own statistics: left alone
    split = timm.layers.SplitBatchNorm2d(4, num_splits=2)
    with pytest.warns(UnconvertedBatchNormWarning, match=r"timm\.layers\.split_batchnorm\.SplitBatchNorm2d"):
        assert convert_sync_batchnorm(split) is split
    # and back: torch's BatchNorm2d with timm's drop/act children, same keys and results
    reverted = revert_sync_batchnorm(convert_sync_batchnorm(copy.deepcopy(reference), fuse_activation=True))
    assert all(type(layer) is BatchNormAct2d for layer in list(reverted)[:7])
    assert_same_training(reference, reverted, steps=3)


@pytest.mark.slow
def test_converted_timm_style_model_compiles_without_graph_breaks() -> None:
    """SyncBatchNormAct, FusedActivation slots and kept activation modules trace in one graph
    (fullgraph=True) and train as in eager mode; the input dims revert uses are not recorded
    under compile (revert then relies on the class the layer was converted from)."""
    model = convert_sync_batchnorm(timm_style_model(), fuse_activation=True, custom=CUSTOM)
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True)
    x = model_batch(4, 0)
    out, expected = compiled(x), eager(x)
    torch.testing.assert_close(out, expected)
    out.sum().backward(), expected.sum().backward()
    for (name, param), param_eager in zip(model.named_parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(param.grad, param_eager.grad, msg=name)
    assert "_seen_dims" not in model[1].__dict__ and "_seen_dims" in eager[1].__dict__
    assert type(revert_sync_batchnorm(model)[1]) is BatchNormAct2d


# ---------------------------------------------------------------- revert


def plain_model() -> nn.Sequential:
    torch.manual_seed(7)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(inplace=True),
        nn.Conv2d(6, 6, 3, padding=1),
        nn.BatchNorm2d(6, momentum=None),
        nn.LeakyReLU(0.3),
        nn.Flatten(),
        nn.Linear(6 * 36, 5),
        nn.BatchNorm1d(5),
        nn.SiLU(),
        nn.Linear(5, 3),
    ).double()


@pytest.mark.parametrize("fuse_activation", [False, True], ids=["plain", "fuse_activation"])
@pytest.mark.parametrize("make", [plain_model, timm_style_model], ids=["torchvision-style", "timm-style"])
def test_round_trip_convert_revert_equals_the_original(make, fuse_activation: bool) -> None:
    original = make()
    converted = convert_sync_batchnorm(copy.deepcopy(original), fuse_activation=fuse_activation, custom=CUSTOM)
    converted.train()
    converted(model_batch(4, 99).to(torch.float64))  # a step on the converted model: state changes, still equal
    original.train()(model_batch(4, 99).to(torch.float64))
    converted.eval()
    reverted = revert_sync_batchnorm(converted)
    assert not reverted.training
    assert not any(isinstance(m, (SyncBatchNorm, FusedActivation)) for m in reverted.modules())
    for before, after in zip(original.modules(), reverted.modules(), strict=True):
        if type(before) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.ReLU, nn.LeakyReLU, nn.SiLU):
            assert type(after) is type(before)  # torch's classes come back, activations with their arguments
            assert getattr(after, "inplace", None) == getattr(before, "inplace", None)
            assert getattr(after, "negative_slope", None) == getattr(before, "negative_slope", None)
        if isinstance(before, TimmStyleBatchNormAct2d):
            assert type(after) is BatchNormAct2d and type(after.act) is type(before.act)
    assert_same_training(original, reverted, steps=3)


def test_revert_shares_state_and_keeps_training_flag() -> None:
    converted = convert_sync_batchnorm(plain_model(), fuse_activation=True)
    layer = converted[1]
    reverted = revert_sync_batchnorm(converted)
    assert reverted[1].weight is layer.weight and reverted[1].running_mean is layer.running_mean
    assert reverted[1].num_batches_tracked is layer.num_batches_tracked and reverted.training
    assert list(reverted.state_dict()) == list(plain_model().state_dict())
    # convert -> revert -> convert -> revert keeps working
    again = revert_sync_batchnorm(convert_sync_batchnorm(reverted, fuse_activation=True))
    assert_same_training(plain_model(), again, steps=2)


def test_revert_restores_a_fused_activation_only_where_the_layer_still_applies_it() -> None:
    converted = convert_sync_batchnorm(plain_model(), fuse_activation=True)
    converted[4].activation = None  # changed by hand: the model no longer applies this LeakyReLU
    x = model_batch(3, 0)
    converted.eval()
    expected = converted(x)
    reverted = revert_sync_batchnorm(converted)
    assert type(reverted[2]) is nn.ReLU and type(reverted[5]) is nn.Identity
    torch.testing.assert_close(reverted(x), expected)


def test_revert_picks_the_class_from_the_input_dims_seen_or_the_default() -> None:
    layers = nn.ModuleList([SyncBatchNorm(4) for _ in range(5)])
    layers[0](torch.randn(3, 4)), layers[0](torch.randn(3, 4, 5))
    layers[1](torch.randn(3, 4, 5, 5))
    layers[2](torch.randn(3, 4, 2, 5, 5))
    layers[4](torch.randn(3, 4, 5)), layers[4](torch.randn(3, 4, 5, 5))
    with pytest.raises(ValueError, match=r"cannot revert mixed: it has seen inputs of \[3, 4\] dims"):
        revert_sync_batchnorm(nn.ModuleDict({"mixed": copy.deepcopy(layers[4])}))
    with pytest.raises(ValueError, match=r"3 should revert to.*default=nn.BatchNorm2d"):
        revert_sync_batchnorm(copy.deepcopy(layers[:4]))
    with pytest.raises(TypeError, match="default must be"):
        revert_sync_batchnorm(layers[:4], default=nn.SyncBatchNorm)
    reverted = revert_sync_batchnorm(copy.deepcopy(layers[:4]), default=nn.BatchNorm3d)
    assert [type(layer) for layer in reverted] == [nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.BatchNorm3d]
    # a rejected call records nothing
    with pytest.raises(ValueError):
        layers[3](torch.randn(3, 5, 2))
    assert "_seen_dims" not in layers[3].__dict__


def test_fused_activation_and_residual_revert_to_batchnormact_accepting_the_residual() -> None:
    torch.manual_seed(3)
    layer = SyncBatchNorm(4, activation="leaky_relu", negative_slope=0.25).double()
    x, identity = torch.randn(6, 4, 3, 3, dtype=torch.float64), torch.randn(6, 4, 3, 3, dtype=torch.float64)
    expected = layer(x, identity)
    reverted = revert_sync_batchnorm(copy.deepcopy(layer))
    assert type(reverted) is BatchNormAct2d and isinstance(reverted, nn.BatchNorm2d)
    assert type(reverted.act) is nn.LeakyReLU and reverted.act.negative_slope == 0.25
    assert list(reverted.state_dict()) == list(layer.state_dict())
    layer.eval(), reverted.eval()
    torch.testing.assert_close(reverted(x, identity), layer(x, identity))
    # a plain layer that was called with a residual also keeps accepting one
    plain = SyncBatchNorm(4).double()
    plain(x, identity)
    reverted_plain = revert_sync_batchnorm(plain).eval()
    assert type(reverted_plain) is BatchNormAct2d and type(reverted_plain.act) is nn.Identity
    torch.testing.assert_close(reverted_plain(x, identity), plain.eval()(x, identity))
    torch.testing.assert_close(expected, layer.train()(x, identity))  # unchanged by the round trip


# ---------------------------------------------------------------- export, conv-bn folding


def count_ops(exported: torch.export.ExportedProgram, namespace: str) -> int:
    return sum(1 for node in exported.graph.nodes if node.op == "call_function" and namespace in str(node.target))


def test_torch_export_of_a_converted_model_in_eval_and_after_revert() -> None:
    """Exporting the converted model works (the graph holds our custom op: it needs triton_syncbn
    where it runs); after revert the graph holds only aten ops (for ONNX, ExecuTorch, AOTInductor)."""
    model = convert_sync_batchnorm(timm_style_model(), fuse_activation=True, custom=CUSTOM).eval()
    x = model_batch(3, 0)
    exported = torch.export.export(model, (x,))
    assert count_ops(exported, "triton_syncbn") == 9
    torch.testing.assert_close(exported.module()(x), model(x))
    reverted = revert_sync_batchnorm(model)
    exported_reverted = torch.export.export(reverted, (x,))
    assert count_ops(exported_reverted, "triton_syncbn") == 0
    torch.testing.assert_close(exported_reverted.module()(x), model(x))


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_fuse_conv_bn_eval_folds_our_layers_like_torchs(dims: int) -> None:
    conv_class = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    bn_class = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
    conv = conv_class(3, 5, 3).double().eval()
    torch_bn = bn_class(5).double()
    with torch.no_grad():
        torch_bn.running_mean.normal_(), torch_bn.running_var.uniform_(0.5, 2)
        torch_bn.weight.normal_(), torch_bn.bias.normal_()
    ours = convert_sync_batchnorm(copy.deepcopy(torch_bn)).eval()
    torch_bn.eval()
    x = torch.randn(2, 3, *([6] * dims), dtype=torch.float64)
    fused_ours = fuse_conv_bn_eval(conv, ours)
    fused_torch = fuse_conv_bn_eval(conv, torch_bn)
    torch.testing.assert_close(fused_ours(x), ours(conv(x)))
    torch.testing.assert_close(fused_ours(x), fused_torch(x))
    torch.testing.assert_close(fused_ours.weight, fused_torch.weight)


# ---------------------------------------------------------------- automatic mixed precision


def amp_model() -> nn.Sequential:
    torch.manual_seed(11)
    return nn.Sequential(
        # no bias before a BatchNorm (as in real nets): its gradient is 0 up to rounding noise
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8, momentum=None),
        nn.SiLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4, bias=False),
        nn.BatchNorm1d(4),
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_training_matches_torch_batchnorm_under_autocast(dtype: torch.dtype) -> None:
    """fp32 parameters under ``torch.autocast("cpu", dtype)``: three SGD steps of the float64 model
    without autocast; at each step the converted model (activations fused) and the original start
    from its state and run under autocast. Outputs keep torch's dtype, gradients and running
    statistics stay fp32, and the relative error of every output, gradient and running statistic
    is within 2x torch's own autocast error (or 4 ulps of ``dtype``)."""
    models = {"torch": amp_model(), "ours": convert_sync_batchnorm(amp_model(), fuse_activation=True)}
    exact_model = amp_model().double()
    exact_optimizer = torch.optim.SGD(exact_model.parameters(), lr=0.05)
    # A few ulps: where torch's error happens to be tiny, the fused activation (one rounding to
    # ``dtype`` where BatchNorm then SiLU round twice) decorrelates ours from it.
    floor = 4 * torch.finfo(dtype).eps

    def check(name: str, ours: torch.Tensor, theirs: torch.Tensor, exact: torch.Tensor) -> None:
        ours_error, torch_error = relative_error(ours, exact), relative_error(theirs, exact)
        assert ours_error <= max(2 * torch_error, floor), f"{name}: ours {ours_error:.2e}, torch {torch_error:.2e}"

    for step in range(3):
        x = model_batch(8, step)
        start = exact_model.state_dict()
        for model in models.values():
            model.load_state_dict(start)  # copies into the fp32 parameters and buffers
        start = copy.deepcopy(start)
        exact_optimizer.zero_grad()
        exact_out = exact_model(x)
        (exact_out * loss_weights(8, 4)).sum().backward()
        outputs = {}
        for name, model in models.items():
            model.zero_grad()
            with torch.autocast("cpu", dtype=dtype):
                outputs[name] = model(x.float())
            (outputs[name].double() * loss_weights(8, 4)).sum().backward()
        assert outputs["ours"].dtype == outputs["torch"].dtype == dtype
        check(f"step {step} output", outputs["ours"], outputs["torch"], exact_out.detach())
        named = [dict(model.named_parameters()) for model in (models["ours"], models["torch"], exact_model)]
        for name, param in named[0].items():
            assert param.dtype == param.grad.dtype == torch.float32
            check(f"step {step} {name} grad", param.grad, named[1][name].grad, named[2][name].grad)
        states = [model.state_dict() for model in (models["ours"], models["torch"], exact_model)]
        for name, value in states[1].items():
            assert states[0][name].dtype == value.dtype
            if "running" in name:  # the step's update of the running statistics
                updates = [state[name] - start[name] for state in states]
                check(f"step {step} {name} update", *updates)
            else:
                assert torch.equal(states[0][name], value), name
        exact_optimizer.step()
