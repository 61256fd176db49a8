"""Multi-process SyncBatchNorm against the float64 oracle on the concatenated global batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import rank_tasks
from oracle import Case, assert_close, check_case, global_batch, initial_state, rank_rows, unsupported_here
from rank_tasks import run_case

pytestmark = pytest.mark.distributed

CASES = [
    Case(batches=(4,)),  # a group of one rank: local statistics, same kernels
    Case(batches=(3, 5)),  # uneven batches weight correctly
    Case(batches=(2, 0, 5), tail=(5, 3, 4), channels_last=True),  # an empty rank takes part
    Case(batches=(1, 2, 3, 1), tail=(6,)),  # 2-D input (BatchNorm1d)
    Case(batches=(2, 3, 1, 4), tail=(4, 7)),  # 3-D input
    Case(batches=(2, 1, 2, 0), tail=(3, 2, 3, 4), channels_last=True),  # 5-D channels_last_3d
    Case(batches=(2, 3), tail=(3, 2, 3, 4)),  # 5-D contiguous
    Case(batches=(1, 1), tail=(3,)),  # one value per channel per rank: fine globally
    Case(batches=(0, 0), tail=(3, 4, 4)),  # every rank empty: running statistics unchanged
    Case(batches=(3, 2, 4), dtype=torch.float64),
    Case(batches=(3, 2, 4), dtype=torch.float16, channels_last=True),
    Case(batches=(3, 2, 4), dtype=torch.bfloat16),
    Case(batches=(3, 2), dtype=torch.float16, param_dtype=torch.float16),  # model.half()
    # model.half() with more values per channel than float16 can count (65504; torch #70901)
    Case(batches=(1, 1), tail=(2, 200, 200), dtype=torch.float16, param_dtype=torch.float16, steps=1),
    Case(batches=(3, 2), dtype=torch.bfloat16, param_dtype=torch.bfloat16, channels_last=True),
    Case(batches=(3, 2, 4), momentum=None, steps=3),  # cumulative moving average
    Case(batches=(3, 2), affine=False),
    Case(batches=(3, 2), bias=False),
    Case(batches=(3, 2, 1), track_running_stats=False),
    Case(batches=(3, 2), training=False),  # eval: running statistics, no collective
    # fused residual add and activation
    Case(batches=(3, 0, 4), activation="relu"),
    Case(
        batches=(2, 3),
        tail=(4, 3, 5),
        channels_last=True,
        activation="leaky_relu",
        negative_slope=0.2,
        residual="contiguous",
    ),  # fmt: skip
    Case(batches=(3, 2), dtype=torch.bfloat16, activation="silu", residual="same"),
    Case(batches=(3, 2), residual="same"),  # identity activation: the residual's grad is dy
    Case(batches=(3, 2), training=False, activation="relu", residual="same"),  # eval fuses the same way
    Case(
        batches=(2, 2), tail=(3, 2, 3, 4), channels_last=True, dtype=torch.float16, activation="relu", residual="same"
    ),  # fmt: skip
    Case(batches=(3, 2), affine=False, activation="silu", residual="contiguous"),
    Case(batches=(2, 3), tail=(5,), dtype=torch.float64, activation="leaky_relu", residual="same", momentum=None),
    # S odd, contiguous: channel runs (S = 49: runs of 4 fp32 channels; S = 25: 8 bf16 channels) and
    # edges mode (S = 169: each row's aligned interior, its edges after), with an empty rank
    Case(batches=(3, 0, 5), tail=(8, 7, 7), activation="relu", residual="same"),
    Case(batches=(2, 1), tail=(16, 5, 5), dtype=torch.bfloat16, activation="silu", residual="same"),
    Case(batches=(2, 0, 3), tail=(4, 13, 13), momentum=None, steps=2),
]


@pytest.mark.parametrize("backend", ["torch-cpu", "interpreter"])
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_matches_global_batch_norm(clusters, case: Case, backend: str) -> None:
    if unsupported_here(case):
        pytest.skip(unsupported_here(case))
    check_case(case, clusters(backend).run(run_case, case))


def local_batch_norm(case: Case, rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 BatchNorm of one rank's rows alone (output, input grad)."""
    x_global, dy_global = global_batch(case, step)
    rows = rank_rows(case, rank)
    x = x_global[rows].clone().requires_grad_(True)
    state = initial_state(case)
    y = F.batch_norm(x, None, None, state["weight"], state["bias"], True, 0.0, case.eps)
    (grad,) = torch.autograd.grad(y, x, dy_global[rows])
    return y.detach(), grad


def test_eval_without_running_stats_uses_local_batch(clusters) -> None:
    """Like torch: no collective in eval mode; without buffers each rank uses its own batch."""
    case = Case(batches=(3, 4), training=False, track_running_stats=False, steps=1)
    results = clusters("torch-cpu").run(run_case, case)
    for rank in range(case.world):
        output, grad = local_batch_norm(case, rank, 0)
        assert_close(results[rank]["outputs"][0], output, case.dtype, f"rank {rank} output")
        assert_close(results[rank]["input_grads"][0], grad, case.dtype, f"rank {rank} dx")


@pytest.mark.parametrize("backend", ["torch-cpu", "interpreter"])
def test_process_subgroups_are_independent(clusters, backend: str) -> None:
    first, second = Case(batches=(3, 5), seed=1), Case(batches=(2, 0), tail=(3, 5), channels_last=False, seed=2)
    results = clusters(backend).run(rank_tasks.run_pair_groups, first, second)
    check_case(first, results[:2])
    check_case(second, results[2:])


def test_rank_outside_its_group_uses_local_statistics(clusters) -> None:
    member, outsider = Case(batches=(3, 5), seed=3), Case(batches=(4,), seed=4)
    results = clusters("torch-cpu").run(rank_tasks.run_outside_group, member, outsider)
    check_case(member, results[:2])
    check_case(outsider, results[2:3])
    check_case(outsider, results[3:4])


@pytest.mark.parametrize("backend", ["torch-cpu", "interpreter"])
@pytest.mark.parametrize(
    ("case", "input_requires_grad", "expected"),
    [
        (Case(batches=(3, 0, 2, 4)), True, {"forward": 1, "backward": 1}),
        (Case(batches=(3, 2)), False, {"forward": 1, "backward": 0}),  # no grad for x: no backward sync
        (Case(batches=(3, 2), training=False), True, {"forward": 0, "backward": 0}),
        (Case(batches=(5,)), True, {"forward": 0, "backward": 0}),  # a one-rank group
    ],
    ids=["train", "train-x-no-grad", "eval", "one-rank"],
)
def test_collectives_per_direction(clusters, backend: str, case: Case, input_requires_grad: bool, expected) -> None:
    results = clusters(backend).run(rank_tasks.count_collectives, case, input_requires_grad)
    assert results[: case.world] == [expected] * case.world


def test_one_value_per_channel_globally_is_an_error(clusters) -> None:
    case = Case(batches=(1, 0, 0), tail=(3,))
    results = clusters("torch-cpu").run(rank_tasks.expect_value_error, case)
    for result in results[: case.world]:
        assert result["message"] is not None and "more than 1 value per channel" in result["message"]
        assert result["state_unchanged"]


@pytest.mark.parametrize(
    ("backend", "ddp_options"),
    [
        ("torch-cpu", {}),
        ("torch-cpu", {"broadcast_buffers": False}),
        ("torch-cpu", {"static_graph": True}),
        ("interpreter", {}),
    ],
    ids=["default", "no-broadcast-buffers", "static-graph", "interpreter"],
)
def test_ddp_training_matches_one_process(clusters, backend: str, ddp_options: dict) -> None:
    batches, steps = (3, 0, 5, 2), 3
    results = clusters(backend).run(rank_tasks.train_ddp, batches, steps, ddp_options)
    expected = rank_tasks.train_single_process(sum(batches), steps)
    for rank, state in enumerate(results):
        assert state.keys() == expected.keys()
        for name, value in expected.items():
            torch.testing.assert_close(state[name], value, atol=1e-9, rtol=1e-9, msg=f"rank {rank} {name}")


def test_ddp_join_with_uneven_inputs_stops_every_rank_together(clusters) -> None:
    """DDP's documented recipe for models with collectives in forward (torch's SyncBatchNorm
    included): ``join(throw_on_early_termination=True)``. Every rank stops at the same step."""
    steps = (4, 2, 3)
    results = clusters("torch-cpu").run(rank_tasks.train_with_join, steps)[: len(steps)]
    assert [result["completed"] for result in results] == [min(steps)] * len(steps)
    assert all(result["raised"] for result in results if result["completed"] < max(steps))
    for result in results[1:]:
        for name, value in results[0]["state"].items():
            assert torch.equal(result["state"][name], value), name


def test_agreement_check_runs_once_per_signature(clusters) -> None:
    results = clusters("torch-cpu").run(rank_tasks.first_call_handshake, Case(batches=(3, 2)))
    assert results[:2] == [{"first": 2, "second": 1}] * 2


@pytest.mark.parametrize(
    ("kind", "named"),
    [("channels", "channels (from 4 to 5"), ("dtype", "dtype (from float32 to float64"),
     ("requires_grad", "input requires_grad (from 0 to 1")],
)  # fmt: skip
def test_disagreeing_ranks_all_raise_instead_of_hanging(clusters, kind: str, named: str) -> None:
    results = clusters("torch-cpu").run(rank_tasks.disagreeing_ranks, kind)
    for result in results[:2]:
        assert result["error"] is not None and named in result["error"], result
        assert result["num_batches_tracked"] == 0


@pytest.mark.parametrize("backend", ["torch-cpu", "interpreter"])
def test_non_finite_inputs_behave_like_batchnorm_on_the_global_batch(clusters, backend: str) -> None:
    """NaN/Inf in one rank's input poison those channels on every rank, exactly where
    torch.nn.BatchNorm1d on the concatenated batch puts NaN/Inf; other channels are unaffected."""
    results = clusters(backend).run(rank_tasks.non_finite_inputs, False)[:2]
    reference = torch.nn.BatchNorm1d(4)
    expected = reference(rank_tasks.non_finite_batch()).detach()
    output = torch.cat([result["output"] for result in results])
    assert torch.equal(output.isnan(), expected.isnan()) and torch.equal(output.isinf(), expected.isinf())
    finite = expected.isfinite()
    torch.testing.assert_close(output[finite], expected[finite], atol=1e-5, rtol=1e-5)
    for name in ("running_mean", "running_var"):
        ours, theirs = results[0][name], getattr(reference, name)
        assert torch.equal(ours.isnan(), theirs.isnan()) and torch.equal(ours.isinf(), theirs.isinf()), name
        assert torch.equal(results[1][name].isnan(), ours.isnan())


@pytest.mark.parametrize("backend", ["torch-cpu", "interpreter"])
def test_opt_in_finite_check_names_the_channels_on_every_rank(clusters, backend: str) -> None:
    results = clusters(backend).run(rank_tasks.non_finite_inputs, True)[:2]
    assert "in channels [1, 2] of the global batch" in results[0]["error"]
    assert "has them in channels [1, 2]" in results[0]["error"]
    assert "has them in channels []" in results[1]["error"]
    assert all(result["num_batches_tracked"] == 0 for result in results)
