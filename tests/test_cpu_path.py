"""The plain-torch CPU path: as accurate as torch's BatchNorm on ordinary data, and lean.

Issue 10 item 5 (CPU side): on normal data the batch mean (observed as ``running_mean`` after one
step with momentum 1.0), the running variance and the weight/bias gradients are held to at most 2x
the relative error of ``torch.nn.functional.batch_norm`` run in float32 on the same (global)
batch, both against the float64 oracle; in one process and on 2 gloo ranks. The large-offset
bounds stay in ``test_numerics.py``. Issue 13: no full-size temporary beyond the output
(forward) and the input gradient (backward) in the steady state.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import rank_tasks
from oracle import Case, check_case, global_batch, initial_state, memory_format_of, oracle, relative_l2_error
from triton_syncbn import SyncBatchNorm

QUANTITIES = ("running_mean", "running_var", "weight_grad", "bias_grad", "output", "input_grad")

# Ordinary data: per-channel means N(0, 2), stds in [0.5, 2], random weights; one step, momentum 1.
SINGLE = [
    Case(batches=(32,), tail=(16, 14, 14), momentum=1.0, steps=1),
    Case(batches=(32,), tail=(16, 14, 14), momentum=1.0, steps=1, channels_last=True),
    Case(batches=(256,), tail=(64,), momentum=1.0, steps=1),
    Case(batches=(4,), tail=(8, 4, 8, 8), momentum=1.0, steps=1, channels_last=True),
]
TWO_RANKS = [
    Case(batches=(16, 12), tail=(16, 12, 12), momentum=1.0, steps=1),
    Case(batches=(16, 12), tail=(16, 12, 12), momentum=1.0, steps=1, channels_last=True),
]


def torch_float32(case: Case) -> dict[str, torch.Tensor]:
    """torch's BatchNorm in float32 on the whole global batch of ``case`` (one step)."""
    state = initial_state(case)
    x, dy = (t.float().contiguous(memory_format=memory_format_of(case)) for t in global_batch(case, 0))
    x.requires_grad_(True)
    weight = state["weight"].float().requires_grad_(True)
    bias = state["bias"].float().requires_grad_(True)
    running_mean, running_var = state["running_mean"].float(), state["running_var"].float()
    y = F.batch_norm(x, running_mean, running_var, weight, bias, True, case.momentum, case.eps)
    input_grad, weight_grad, bias_grad = torch.autograd.grad(y, (x, weight, bias), dy)
    return {
        "running_mean": running_mean, "running_var": running_var, "weight_grad": weight_grad,
        "bias_grad": bias_grad, "output": y.detach(), "input_grad": input_grad,
    }  # fmt: skip


def ours_from_ranks(per_rank: list[dict]) -> dict[str, torch.Tensor]:
    """The group's results: outputs and input grads concatenated, weight/bias grads (local on each
    rank, as DDP expects) summed over the ranks, running statistics of rank 0."""
    return {
        "running_mean": per_rank[0]["running_mean"],
        "running_var": per_rank[0]["running_var"],
        "weight_grad": sum(rank["weight_grads"][0] for rank in per_rank),
        "bias_grad": sum(rank["bias_grads"][0] for rank in per_rank),
        "output": torch.cat([rank["outputs"][0] for rank in per_rank]),
        "input_grad": torch.cat([rank["input_grads"][0] for rank in per_rank]),
    }


def assert_within_twice_torch(case: Case, ours: dict[str, torch.Tensor]) -> None:
    expected = oracle(case)
    expected = {
        "running_mean": expected["running_mean"], "running_var": expected["running_var"],
        "weight_grad": expected["weight_grads"][0], "bias_grad": expected["bias_grads"][0],
        "output": expected["outputs"][0], "input_grad": expected["input_grads"][0],
    }  # fmt: skip
    reference = torch_float32(case)
    report = {}
    for name in QUANTITIES:
        mine = relative_l2_error(ours[name], expected[name])
        theirs = relative_l2_error(reference[name], expected[name])
        # 2**-24: one float32 rounding of the stored result, which no float32 output avoids
        report[name] = (mine, theirs, mine <= max(2 * theirs, 2.0**-24))
    failed = {name: values for name, values in report.items() if not values[2]}
    assert not failed, f"{case.id}: (ours, torch) relative errors above 2x torch's: {failed}; all: {report}"


@pytest.mark.parametrize("case", SINGLE, ids=lambda case: case.id)
def test_accuracy_within_twice_torch_single_process(case: Case) -> None:
    result = rank_tasks.run_case_as(case, None, 0)
    assert_within_twice_torch(case, ours_from_ranks([result]))


@pytest.mark.distributed
@pytest.mark.parametrize("case", TWO_RANKS, ids=lambda case: case.id)
def test_accuracy_within_twice_torch_two_ranks(clusters, case: Case) -> None:
    per_rank = clusters("torch-cpu").run(rank_tasks.run_case, case)[: case.world]
    assert_within_twice_torch(case, ours_from_ranks(per_rank))


# Far from zero (|mean| / std = 1e4) and far below eps: the per-rank means come back from ATen
# rounded to float32, which alone would bias the between-rank variance by ~1e-5 (the sum of
# deviations from the rounded mean is measured for such channels instead).
OFFSET_CASES = [
    Case(batches=(6, 4), tail=(3, 8, 8), mean_offset=2e4, mean_scale=0.0, std_range=(2.0, 2.0), momentum=1.0, steps=1),
    Case(
        batches=(5, 3), tail=(3, 6, 6), mean_offset=1.0, mean_scale=0.0, std_range=(1e-4, 1e-4), momentum=1.0, steps=1
    ),
    Case(
        batches=(6, 4),
        tail=(3, 8, 8),
        mean_offset=2e4,
        mean_scale=0.0,
        std_range=(2.0, 2.0),
        momentum=1.0,
        steps=1,
        channels_last=True,
    ),  # fmt: skip
]


@pytest.mark.distributed
@pytest.mark.parametrize("case", OFFSET_CASES, ids=lambda case: case.id)
def test_running_var_within_twice_torch_far_from_zero_two_ranks(clusters, case: Case) -> None:
    per_rank = clusters("torch-cpu").run(rank_tasks.run_case, case)[: case.world]
    expected = oracle(case)["running_var"]
    mine = relative_l2_error(per_rank[0]["running_var"], expected)
    theirs = relative_l2_error(torch_float32(case)["running_var"], expected)
    assert mine <= max(2 * theirs, 2.0**-24), (mine, theirs)


def large_allocations(function, threshold: int) -> list[int]:
    """Sizes of the CPU allocations of at least ``threshold`` bytes made by ``function()``."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profile:
        function()
    sizes = (event.self_cpu_memory_usage for event in profile.events())  # self: each allocation once
    return [size for size in sizes if size >= threshold]


@pytest.mark.distributed
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contig", "cl"])
def test_no_full_size_temporaries(clusters, dtype: torch.dtype, channels_last: bool) -> None:
    """Synchronized over 2 gloo ranks: forward allocates the output and nothing else full-size;
    backward the input gradient (1-2 MB tensors: below 256 KB of float32 temporaries a layer is
    not sliced)."""
    for result in clusters("torch-cpu").run(rank_tasks.synchronized_allocations, dtype, channels_last, None)[:2]:
        assert result["forward"] == [result["size"]], result
        assert result["backward"] == [result["size"]], result


def test_unsynchronized_plain_layer_is_torch_batch_norm() -> None:
    """No group, no epilogue: ATen's batch norm runs the layer, as ``torch.nn.SyncBatchNorm`` runs
    ``F.batch_norm`` at world size 1: output, every gradient, running statistics and the counter
    bitwise equal to ``torch.nn.BatchNorm2d``'s over 2 steps, in both layouts and in eval, and the
    same full-size allocations (ATen's backward makes one transient temporary)."""
    for memory_format in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(8, 16, 32, 32).contiguous(memory_format=memory_format) * 3 + 1
        dy = torch.randn_like(x)
        ours, theirs = SyncBatchNorm(16), torch.nn.BatchNorm2d(16)
        with torch.no_grad():
            for module in (ours, theirs):
                module.weight.copy_(torch.linspace(0.5, 2, 16))
                module.bias.copy_(torch.linspace(-1, 1, 16))
        results = {}
        for name, module in (("ours", ours), ("torch", theirs)):
            outputs = []
            for _ in range(2):
                leaf = x.clone().requires_grad_(True)
                output = module(leaf)
                output.backward(dy)
                outputs += [output, leaf.grad]
            module.eval()
            outputs += [module(x), module.weight.grad, module.bias.grad, *module.buffers()]
            results[name] = outputs
        for mine, reference in zip(results["ours"], results["torch"], strict=True):
            assert torch.equal(mine, reference)
        assert results["ours"][0].is_contiguous(memory_format=memory_format)
        mine, reference = (step_allocations(module.train(), x, dy) for module in (ours, theirs))
        assert mine["forward"] == [x.numel() * x.element_size()], mine
        assert mine == reference, (mine, reference)


def step_allocations(module: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor) -> dict[str, list[int]]:
    """Full-size allocations (>= half of ``x``'s bytes) of one forward and one backward of ``module``."""
    leaf = x.clone().requires_grad_(True)
    threshold = x.numel() * x.element_size() // 2
    outputs = []
    forward = large_allocations(lambda: outputs.append(module(leaf)), threshold)
    return {"forward": forward, "backward": large_allocations(lambda: outputs[0].backward(dy), threshold)}


@pytest.mark.distributed
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_fused_activation_backward_makes_no_full_size_temporaries(clusters, dtype: torch.dtype) -> None:
    """relu(bn(x) + residual) on bf16/fp16 over 2 ranks: backward allocates the input's and the
    residual's gradients and nothing else full-size (float32 slices of an eighth of the tensor).
    float32 input recomputes the pre-activation whole, into one buffer of its own dtype (faster)."""
    for result in clusters("torch-cpu").run(rank_tasks.synchronized_allocations, dtype, False, "relu")[:2]:
        assert result["forward"] == [result["size"]], result
        assert result["backward"] == [result["size"]] * 2, result


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_unsynchronized_fused_backward_allocates_no_more_than_torch(dtype: torch.dtype) -> None:
    """One process: relu(bn(x) + residual) allocates no more full-size tensors than torch's
    BatchNorm + add + ReLU, in each direction (ATen's backward makes the same transient temporary)."""
    x = torch.randn(8, 16, 64, 64, dtype=dtype)
    residual, dy = torch.randn_like(x), torch.randn_like(x)
    ours = SyncBatchNorm(16, activation="relu")
    batch_norm = torch.nn.BatchNorm2d(16).to(dtype)
    layers = {"ours": lambda leaf, skip: ours(leaf, skip), "torch": lambda leaf, skip: F.relu(batch_norm(leaf) + skip)}
    threshold = x.numel() * x.element_size() // 2
    counts = {}
    for name, layer in layers.items():
        leaf, skip = x.clone().requires_grad_(True), residual.clone().requires_grad_(True)
        layer(leaf, skip).backward(dy)  # warm-up
        outputs = []
        forward = large_allocations(lambda: outputs.append(layer(leaf, skip)), threshold)  # noqa: B023
        backward = large_allocations(lambda: outputs[0].backward(dy), threshold)  # noqa: B023
        counts[name] = (len(forward), len(backward))
    assert counts["ours"][0] <= counts["torch"][0] and counts["ours"][1] <= counts["torch"][1], counts


@pytest.mark.distributed
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contig", "cl"])
def test_low_precision_input_gradient_within_twice_torch(clusters, dtype: torch.dtype, channels_last: bool) -> None:
    """bf16/fp16 input, float32 parameters, synchronized over 2 ranks: the input gradient's two
    terms cancel where it is small, so they must be summed before rounding (as torch does), not
    each rounded first; held to 2x the error of torch's BatchNorm on the whole batch."""
    generator = torch.Generator().manual_seed(3)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x = (torch.randn(16, 8, 12, 12, generator=generator) * 1.5 + 0.5).to(dtype).contiguous(memory_format=memory_format)
    # dy close to a per-channel affine function of x: the gradient through the statistics cancels most of it
    dy = (x.float() * 0.8 + 0.3 + 0.05 * torch.randn(x.shape, generator=generator)).to(dtype)
    weight = torch.rand(8, generator=generator) + 0.5
    per_rank = clusters("torch-cpu").run(rank_tasks.synchronized_input_grad, x, dy, weight, memory_format)
    ours = torch.empty(x.shape, dtype=dtype)
    ours[0::2], ours[1::2] = per_rank[0], per_rank[1]
    module = torch.nn.BatchNorm2d(8)
    with torch.no_grad():
        module.weight.copy_(weight)
    leaf = x.clone().requires_grad_(True)
    module(leaf).backward(dy)
    exact_x = x.double().requires_grad_(True)
    F.batch_norm(exact_x, None, None, weight.double(), None, True).backward(dy.double())
    mine, theirs = (relative_l2_error(grad, exact_x.grad) for grad in (ours, leaf.grad))
    assert mine <= 2 * theirs, (mine, theirs)


# One process, nothing to synchronize: layers that the ATen shortcut does not take (a fused
# epilogue) run backward as one ATen BatchNorm backward where the dtypes allow it.
UNSYNCHRONIZED = [
    Case(batches=(5,), tail=(4, 6, 5), activation="relu", residual="same", steps=2),
    Case(batches=(5,), tail=(4, 6, 5), activation="silu", residual="contiguous", channels_last=True),
    Case(batches=(6,), tail=(7,), activation="leaky_relu", negative_slope=0.2, momentum=None, steps=2),
    Case(batches=(3,), tail=(3, 2, 3, 4), activation="relu", channels_last=True, affine=False),
    Case(batches=(4,), tail=(5, 9), dtype=torch.float64, param_dtype=torch.float64, activation="silu", residual="same"),
    Case(batches=(3,), tail=(4, 5, 5), residual="same"),  # identity activation: dresidual is dy
    Case(batches=(4,), tail=(4, 5, 5), dtype=torch.float64, activation="relu"),  # float32 weight
    Case(batches=(4,), tail=(4, 5, 5), dtype=torch.bfloat16, residual="same"),  # no activation
    Case(batches=(4,), tail=(4, 5, 5), dtype=torch.float16, residual="same", channels_last=True),
    Case(batches=(4,), tail=(4, 5, 5), dtype=torch.bfloat16, activation="silu", residual="same"),  # z in float32
    Case(batches=(4,), tail=(4, 5, 5), dtype=torch.bfloat16, activation="relu"),
    Case(batches=(4,), tail=(4, 5, 5), dtype=torch.float16, param_dtype=torch.float16, residual="same"),  # fp16 weight
    Case(batches=(4,), tail=(6,), dtype=torch.bfloat16, activation="relu", track_running_stats=False),
]
# Whether the backward runs on ATen's whole-batch BatchNorm backward (always here: the weight goes
# to ATen in the accumulation dtype), and whether the forward's statistics are one ATen call (where
# the running statistics are in the accumulation dtype: not for float64 input with float32
# buffers, nor for fp16 ones).
SERVED = [True] * 13
FORWARD_SERVED = [True] * 6 + [False] + [True] * 4 + [False, True]


@pytest.mark.parametrize(
    ("case", "served", "forward_served"),
    list(zip(UNSYNCHRONIZED, SERVED, FORWARD_SERVED, strict=True)),
    ids=lambda value: getattr(value, "id", ""),
)
def test_unsynchronized_fused_layer_matches_the_oracle(
    monkeypatch, case: Case, served: bool, forward_served: bool
) -> None:
    """Output, input/residual/weight/bias gradients, running statistics and the counter against
    the float64 oracle, and the one-call ATen forward statistics and backward taken exactly where
    they serve."""
    from triton_syncbn import torch_path

    calls = {"forward": 0, "backward": 0}
    for direction in calls:
        original = getattr(torch_path, f"unsynchronized_{direction}")

        def counted(*args, direction=direction, original=original):
            calls[direction] += 1
            return original(*args)

        monkeypatch.setattr(torch_path, f"unsynchronized_{direction}", counted)
    check_case(case, [rank_tasks.run_case(case)])
    assert (calls["backward"] > 0, calls["forward"] > 0) == (served, forward_served), calls


@pytest.mark.parametrize("activation", [None, "relu"])
def test_one_value_per_channel_in_one_process_changes_nothing(activation: str | None) -> None:
    module = SyncBatchNorm(3, activation=activation)
    before = {name: value.clone() for name, value in module.state_dict().items()}
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        module(torch.randn(1, 3))
    for name, value in module.state_dict().items():
        assert torch.equal(value, before[name]), name


@pytest.mark.parametrize("activation", ["relu", "leaky_relu"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_low_precision_activation_mask_is_exact(dtype: torch.dtype, activation: str) -> None:
    """bf16/fp16 relu(bn(x) + residual): backward takes the activation's derivative from the saved
    output, so the output must be positive exactly where the pre-activation is. Rounding bn(x)
    before the residual is added (torch's BN + add + ReLU) flips that sign for ~0.2% of the
    elements, every one a full dy of error in the gradients; the forward rounds z once, from
    float32. Checked against z in float64 from the same statistics (up to float32 rounding of z),
    and the bias gradient (a sum of dy over the mask) against float64."""
    generator = torch.Generator().manual_seed(5)
    shape = (16, 32, 28, 28)
    x, residual, dy = (torch.randn(shape, generator=generator).to(dtype) for _ in range(3))
    layer = SyncBatchNorm(32, activation=activation, negative_slope=0.1)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 2.0, generator=generator)
        layer.bias.uniform_(-0.5, 0.5, generator=generator)
    leaf = x.clone().requires_grad_(True)
    output = layer(leaf, residual)
    output.backward(dy)
    exact = x.double().requires_grad_(True)
    weight, bias = layer.weight.detach().double(), layer.bias.detach().double()
    z = F.batch_norm(exact, None, None, weight, bias, True) + residual.double()
    near_zero = z.abs() < 1e-5 * (z - residual.double()).abs().clamp(min=1.0)
    flipped = ((output > 0) != (z > 0)) & ~near_zero
    assert int(flipped.sum()) == 0, f"{int(flipped.sum())} of {z.numel()} outputs have the wrong sign"
    activated = F.relu(z) if activation == "relu" else F.leaky_relu(z, 0.1)
    activated.backward(dy.double())
    expected_bias_grad = (dy.double() * (z > 0)).sum((0, 2, 3)) if activation == "relu" else None
    if expected_bias_grad is not None:
        assert relative_l2_error(layer.bias.grad, expected_bias_grad) < 1e-4
    assert relative_l2_error(leaf.grad, exact.grad) < (2e-2 if dtype == torch.bfloat16 else 4e-3)
