"""torch.compile(fullgraph=True): no graph break, same results as eager (inductor's CPU backend)."""

from __future__ import annotations

import pytest
import torch

import rank_tasks
from triton_syncbn import ops
from triton_syncbn.contract import (
    BACKWARD_FIELDS,
    FORWARD_FIELDS,
    BackwardCall,
    Epilogue,
    ForwardCall,
    Gradients,
    RunningStats,
    SavedStatistics,
)

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

TOLERANCE = {"output": 1e-5, "grad": 5e-5, "buffer": 1e-6}


def test_compiled_single_process_matches_eager() -> None:
    worst = rank_tasks.compiled_matches_eager((6,), steps=2)
    assert all(worst[name] <= bound for name, bound in TOLERANCE.items()), worst


def test_compiled_in_a_gloo_group_matches_eager(clusters) -> None:
    # No empty rank here: inductor itself mis-strides a 0-batch convolution's backward
    # (plain torch layers fail the same way); empty ranks are covered in eager tests.
    results = clusters("torch-cpu").run(rank_tasks.compiled_matches_eager, (4, 2, 3), 2)
    for worst in results[:3]:
        assert all(worst[name] <= bound for name, bound in TOLERANCE.items()), worst
    assert results[3] is None


def forward_call(x: torch.Tensor, residual: torch.Tensor, per_channel: list[torch.Tensor], case: str) -> ForwardCall:
    """One named ``triton_syncbn::forward`` case, as the contract object the ops are built from."""
    weight, bias, running_mean, running_var = per_channel
    if case == "train-fused":  # relu + residual, momentum 0.1
        running = RunningStats(running_mean, running_var, torch.tensor(1), 0.1)
        return ForwardCall(x, weight, bias, running, Epilogue(residual, 1, 0.01), 1e-5, True, "")
    if case == "train-cumulative":  # momentum=None, no bias, finite check on
        running = RunningStats(running_mean, running_var, torch.tensor(1), None)
        return ForwardCall(x, weight, None, running, Epilogue(), 1e-5, True, "", check_finite=True)
    # eval: running statistics, no affine
    return ForwardCall(x, None, None, RunningStats(running_mean, running_var), Epilogue(), 1e-5, False, "")


OPCHECK_CASES = ["train-fused", "train-cumulative", "eval"]


@pytest.mark.parametrize("case", OPCHECK_CASES)
def test_custom_ops_pass_opcheck(case: str) -> None:
    """Schema, fake (meta) implementations and AOT dispatch of the ops that torch.compile sees."""
    x = torch.randn(4, 3, 5, 5).to(memory_format=torch.channels_last)
    per_channel = [torch.rand(3) + 0.5, torch.randn(3), torch.zeros(3), torch.ones(3)]
    call = forward_call(x, torch.randn(4, 3, 5, 5), per_channel, case)
    torch.library.opcheck(ops.forward_op, call.flat())
    output, mean, invstd, count = ops.forward_op(*call.flat())
    epilogue = call.epilogue if call.epilogue.fused_activation else Epilogue()
    needs = Gradients(True, epilogue.residual is not None, call.weight is not None, call.bias is not None)
    backward = BackwardCall(
        torch.randn_like(output), x, call.weight, call.bias, SavedStatistics(mean, invstd, count), epilogue, "", needs
    )
    torch.library.opcheck(ops.backward_op, backward.flat())


@pytest.mark.parametrize(("op", "fields"), [("forward_op", FORWARD_FIELDS), ("backward_op", BACKWARD_FIELDS)])
def test_op_schemas_follow_the_contract(op: str, fields: tuple[str, ...]) -> None:
    """The custom ops' arguments are the contract's fields, in its order (parsed by name)."""
    schema = getattr(ops, op)._opoverload._schema
    assert tuple(argument.name for argument in schema.arguments) == fields


class _NormBlock(torch.nn.Module):
    """Two BatchNorms around a ReLU and a skip: no convolution, whose CPU backward inductor
    specializes to static spatial sizes by itself (plain torch layers recompile there too)."""

    def __init__(self) -> None:
        super().__init__()
        self.bn1, self.act, self.bn2 = torch.nn.BatchNorm2d(3), torch.nn.ReLU(), torch.nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.act(self.bn1(x)) * 2.0 + x)


def test_dynamic_batch_and_spatial_sizes_compile_once() -> None:
    """mark_dynamic on N, H and W: one graph serves every shape, results equal eager's."""
    import copy

    from torch._dynamo.utils import counters

    from triton_syncbn import convert_sync_batchnorm

    model = convert_sync_batchnorm(_NormBlock(), fuse_activation=True)
    eager = copy.deepcopy(model)
    exact = copy.deepcopy(model).double()
    compiled = torch.compile(model, fullgraph=True)
    torch._dynamo.reset()
    counters.clear()
    for batch, height, width in [(4, 8, 8), (6, 10, 12), (3, 7, 9), (5, 16, 6), (2, 3, 3)]:
        x = torch.randn(batch, 3, height, width)
        for dim in (0, 2, 3):
            torch._dynamo.mark_dynamic(x, dim)
        x_eager = x.clone().requires_grad_()
        x.requires_grad_()
        compiled(x).square().sum().backward()
        eager(x_eager).square().sum().backward()
        exact(x.detach().double()).square().sum().backward()
        torch.testing.assert_close(x.grad, x_eager.grad, rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    for (name, value), (_, value_eager) in zip(model.state_dict().items(), eager.state_dict().items(), strict=True):
        torch.testing.assert_close(value, value_eager, rtol=1e-6, atol=1e-6, msg=name)
    # bn1's parameter gradients (~4e-3) are what is left of sums of ~2000 terms of size ~1 (bn2
    # renormalizes; bn2's own are ~3e3, held to float32 precision), and eager (ATen's batch norm
    # for the plain layer) and the graph (our ops, inductor's elementwise code) sum in different
    # orders: both are held to the float64 model within the float32 round-off of such a sum,
    # 2000 * 2^-24 ~ 1.2e-4 (measured: 1.6e-5 eager, 4.4e-5 compiled); a missing or wrong term
    # would be off by 1e-2 or more.
    for param, param_eager, param_exact in zip(
        model.parameters(), eager.parameters(), exact.parameters(), strict=True
    ):  # fmt: skip
        for grad in (param.grad, param_eager.grad):
            torch.testing.assert_close(grad.double(), param_exact.grad, rtol=1e-6, atol=1.2e-4)
