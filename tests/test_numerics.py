"""Numerics: accuracy where naive formulas lose digits, exact counts, bitwise determinism, gradcheck.

Accuracy targets (fp32 input, relative L2 error against the float64 oracle on the global batch):

| case                                   | quantity             | bound       |
|----------------------------------------|----------------------|-------------|
| mean = 2e4, std = 2, 2 ranks           | running_var          | 1e-3        |
| same                                   | output / input grad  | 2e-3 / 2e-2 |
| std = 1e-4, eps = 1e-5, momentum = 1   | running_var          | 1e-4        |
| normal data, any shape                 | output               | 2e-5        |
"""

from __future__ import annotations

import pytest
import torch

import kernel_tasks
import rank_tasks
from oracle import Case, oracle, relative_l2_error
from triton_syncbn import sync_batch_norm, torch_path
from triton_syncbn.layout import channel_view

BACKENDS = ["torch-cpu", "interpreter"]
ACCURACY_CHANNELS = kernel_tasks.ACCURACY_SHAPE[1]

LARGE_MEAN = Case(
    batches=(6, 4), tail=(3, 8, 8), mean_offset=2e4, mean_scale=0.0, std_range=(2.0, 2.0), momentum=1.0, steps=1
)
TINY_VARIANCE = Case(
    batches=(5, 3), tail=(3, 6, 6), mean_offset=1.0, mean_scale=0.0, std_range=(1e-4, 1e-4), momentum=1.0, steps=1
)


def errors(case: Case, per_rank: list[dict]) -> dict[str, float]:
    """Relative L2 errors of the group's results (ranks concatenated) against the oracle."""
    expected = oracle(case)
    members = per_rank[: case.world]
    return {
        "running_var": relative_l2_error(members[0]["running_var"], expected["running_var"]),
        "output": relative_l2_error(torch.cat([r["outputs"][0] for r in members]), expected["outputs"][0]),
        "input_grad": relative_l2_error(torch.cat([r["input_grads"][0] for r in members]), expected["input_grads"][0]),
    }


def naive_running_var(case: Case) -> torch.Tensor:
    """What E[x^2] - E[x]^2 in float32 (per-rank sums, all-reduced) gives for ``case``'s running_var."""
    x, _ = oracle_input(case)
    values = x.float().transpose(0, 1).reshape(case.channels, -1)
    count = values.shape[1]
    total, total_sq = values.sum(1), values.square().sum(1)
    var = total_sq / count - (total / count).square()
    return var * count / (count - 1)


def oracle_input(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    from oracle import global_batch

    return global_batch(case, 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_mean_two_ranks(clusters, backend: str) -> None:
    measured = errors(LARGE_MEAN, clusters(backend).run(rank_tasks.run_case, LARGE_MEAN))
    assert measured["running_var"] <= 1e-3, measured
    assert measured["output"] <= 2e-3, measured
    assert measured["input_grad"] <= 2e-2, measured


def test_naive_formula_fails_the_large_mean_case() -> None:
    """The bound above has teeth: the sum / sum-of-squares formula misses it by orders of magnitude."""
    expected = oracle(LARGE_MEAN)["running_var"]
    assert relative_l2_error(naive_running_var(LARGE_MEAN), expected) > 100 * 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_variance_far_below_eps(clusters, backend: str) -> None:
    case = TINY_VARIANCE
    measured = errors(case, clusters(backend).run(rank_tasks.run_case, case))
    assert measured["running_var"] <= 1e-4, measured


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "case",
    [
        Case(batches=(7, 5), tail=(4, 9, 9), steps=1),
        Case(batches=(3, 0, 6), tail=(5, 4, 3, 5), channels_last=True, steps=1),
        Case(batches=(16, 16), tail=(12,), steps=1),
        Case(batches=(2, 3, 4, 1), tail=(3, 50), steps=1),
    ],
    ids=lambda case: case.id,
)
def test_normal_data_output(clusters, backend: str, case: Case) -> None:
    assert errors(case, clusters(backend).run(rank_tasks.run_case, case))["output"] <= 2e-5


def test_counts_exact_beyond_2_24_values_per_channel() -> None:
    """2**24 + 5 values in one channel on one rank: float32 cannot hold that count; we do."""
    count = 2**24 + 5
    generator = torch.Generator().manual_seed(5)
    x = (torch.randn(1, 1, count, generator=generator) * 3 + 7).float()
    assert float(torch.tensor(float(count), dtype=torch.float32)) != count
    stats = torch_path.partial_stats(channel_view(x))
    assert stats[0, 0].item() == count
    running_mean, running_var = torch.zeros(1), torch.ones(1)
    output = sync_batch_norm(x, running_mean, running_var, training=True, momentum=1.0)
    x64 = x.double()
    assert relative_l2_error(running_var, x64.var().view(1)) < 1e-5
    assert relative_l2_error(running_mean, x64.mean().view(1)) < 1e-6
    assert relative_l2_error(output, (x64 - x64.mean()) / torch.sqrt(x64.var(correction=0) + 1e-5)) < 2e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_bitwise_deterministic_run_to_run(clusters, backend: str) -> None:
    case = Case(batches=(5, 2, 0, 4), tail=(3, 6, 7), momentum=None, steps=2)
    first = clusters(backend).run(rank_tasks.run_case, case)
    second = clusters(backend).run(rank_tasks.run_case, case)
    for rank, (a, b) in enumerate(zip(first, second, strict=True)):
        for name in ("outputs", "input_grads", "weight_grads", "bias_grads"):
            assert all(torch.equal(x, y) for x, y in zip(a[name], b[name], strict=True)), f"rank {rank} {name}"
        for name in ("running_mean", "running_var"):
            assert torch.equal(a[name], b[name]), f"rank {rank} {name}"


def test_gradcheck_single_process() -> None:
    x = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    weight = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_()
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)

    def function(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return sync_batch_norm(x, None, None, weight, bias, training=True)

    assert torch.autograd.gradcheck(function, (x, weight, bias))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_two_ranks(clusters, backend: str) -> None:
    assert clusters(backend).run(rank_tasks.gradcheck_global_function, 2) == [True, True, None, None]


def test_gradcheck_single_process_interpreter(clusters) -> None:
    results = clusters("interpreter").run(rank_tasks.gradcheck_global_function, 1)
    assert results[0] is True


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_inputs_through_a_fused_relu(clusters, backend: str) -> None:
    """NaN and +-Inf reach the output through the fused relu and the running statistics as in
    torch.nn.BatchNorm1d followed by torch.relu (``tl.maximum`` would drop the NaN)."""
    results = clusters(backend).run(kernel_tasks.non_finite_fused_relu)
    reference = torch.nn.BatchNorm1d(4)
    expected = torch.relu(reference(kernel_tasks.non_finite_batch_4_ranks())).detach()
    output = torch.cat([result["output"] for result in results])
    assert torch.equal(output.isnan(), expected.isnan()), output
    assert output.isnan()[:, 1:].all() and not output.isnan()[:, 0].any()  # Inf poisons its channel too
    torch.testing.assert_close(output[:, 0], expected[:, 0], atol=1e-5, rtol=1e-5)
    for name in ("running_mean", "running_var"):
        ours, theirs = results[0][name], getattr(reference, name)
        assert torch.equal(ours.isnan(), theirs.isnan()) and torch.equal(ours.isinf(), theirs.isinf()), name
        torch.testing.assert_close(ours[0], theirs[0]), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_mean_and_parameter_grads_as_accurate_as_torch(clusters, backend: str) -> None:
    """On ordinary data with 2**19 values per channel (hundreds of steps per lane), the batch mean
    and the weight/bias grads are within 2x of torch.nn.BatchNorm2d's own error against float64."""
    ours = clusters(backend).run(kernel_tasks.batch_mean_and_parameter_grads)[0]
    x, dy = kernel_tasks.accuracy_inputs()
    x64, dy64 = x.double(), dy.double()
    mean = x64.mean((0, 2, 3))
    xhat = (x64 - mean.view(1, -1, 1, 1)) / torch.sqrt(x64.var((0, 2, 3), correction=0).view(1, -1, 1, 1) + 1e-5)
    exact = {"mean": mean, "grad_weight": (dy64 * xhat).sum((0, 2, 3)), "grad_bias": dy64.sum((0, 2, 3))}
    torch_bn = torch.nn.BatchNorm2d(ACCURACY_CHANNELS, momentum=1.0)
    torch_bn(x).backward(dy)
    theirs = {"mean": torch_bn.running_mean, "grad_weight": torch_bn.weight.grad, "grad_bias": torch_bn.bias.grad}
    for name, value in exact.items():
        our_error = relative_l2_error(ours[name], value)
        torch_error = relative_l2_error(theirs[name], value)
        assert our_error <= 2 * torch_error, (name, our_error, torch_error)
