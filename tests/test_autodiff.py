"""Higher-order, batched and forward-mode autograd: synchronized, on both backends, against torch.

``torch.nn.SyncBatchNorm`` supports none of these (its backward is once-differentiable). Ours:
double backward (gradient penalties, meta-learning) differentiates the backward formulas with
the statistics recomputed from the input and differentiable all-reduces; ``jvp`` is closed-form
with one all-reduce; vmap over the backward runs the same differentiable formulas. The oracle is
``F.batch_norm`` in float64 on the concatenated global batch (``autodiff_tasks``), and
``torch.autograd.gradgradcheck`` (finite differences) in one process.
"""

from __future__ import annotations

import pytest
import torch

import autodiff_tasks
from triton_syncbn import SyncBatchNorm, sync_batch_norm

BACKENDS = ["torch-cpu", "interpreter"]
ACTIVATIONS = [None, "relu", "silu", "leaky_relu"]


def _close(results: dict[str, torch.Tensor], names: list[str]) -> None:
    for name in names:
        torch.testing.assert_close(
            results[f"ours_{name}"], results[f"reference_{name}"], rtol=1e-9, atol=1e-10, msg=name
        )


def _check_all(per_rank: list, names: list[str]) -> None:
    checked = [results for results in per_rank if results is not None]
    assert checked, "no rank returned results"
    for results in checked:
        _close(results, names)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradgradcheck_single_process(activation: str | None) -> None:
    torch.manual_seed(1)
    x = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    weight = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_()
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
    residual = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)

    def function(x, weight, bias, residual):
        return sync_batch_norm(
            x, None, None, weight, bias, training=True, residual=residual, activation=activation, negative_slope=0.2
        )

    inputs = (x, weight, bias, residual)
    assert torch.autograd.gradcheck(function, inputs, check_batched_grad=True, check_forward_ad=True)
    assert torch.autograd.gradgradcheck(function, inputs, check_batched_grad=True, check_fwd_over_rev=True)


def test_gradgradcheck_eval_with_dual_running_statistics() -> None:
    torch.manual_seed(2)
    x = torch.randn(5, 3, 4, dtype=torch.float64, requires_grad=True)
    weight = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_()
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
    running_mean = torch.randn(3, dtype=torch.float64, requires_grad=True)
    running_var = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_()

    def function(x, weight, bias):
        return sync_batch_norm(x, running_mean.detach(), running_var.detach(), weight, bias, training=False)

    assert torch.autograd.gradgradcheck(function, (x, weight, bias), check_batched_grad=True)

    def of_statistics(x, running_mean, running_var):
        return sync_batch_norm(x, running_mean, running_var, weight, bias, training=False)

    # forward mode only: the running statistics are not differentiable in reverse mode (as torch's)
    assert torch.autograd.gradcheck(
        of_statistics, (x, running_mean, running_var), check_forward_ad=True, check_backward_ad=False
    )


@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_in_process_matches_torch(training: bool, activation: str | None) -> None:
    """World size 1, in this process: every derivative kind against F.batch_norm."""
    _close(autodiff_tasks.hessian_vector_products((6,), training, activation, True), ["x", "weight", "bias"])
    results = autodiff_tasks.forward_mode((6,), training, activation, True)
    for name in ("ours_func_jvp", "ours_dual"):
        torch.testing.assert_close(results[name], results["reference"], rtol=1e-9, atol=1e-10, msg=name)
    _close(autodiff_tasks.batched_backward((6,), training), ["x", "weight", "jacrev"])


# Uneven and empty per-rank batches; the empty rank still joins every collective of every order.
GROUPS = [(3, 5), (4, 0, 2)]


@pytest.mark.distributed
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batches", GROUPS, ids=lambda batches: "n" + "-".join(map(str, batches)))
@pytest.mark.parametrize("activation", [None, "relu"])
def test_double_backward_synchronized(clusters, backend: str, batches: tuple[int, ...], activation) -> None:
    per_rank = clusters(backend).run(autodiff_tasks.hessian_vector_products, batches, True, activation, True)
    _check_all(per_rank, ["first_x", "x", "weight", "bias", "residual"])


@pytest.mark.distributed
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_forward_mode_synchronized(clusters, backend: str, training: bool) -> None:
    per_rank = clusters(backend).run(autodiff_tasks.forward_mode, (3, 0, 4), training, "silu", True)
    for results in [results for results in per_rank if results is not None]:
        for name in ("ours_func_jvp", "ours_dual"):
            torch.testing.assert_close(results[name], results["reference"], rtol=1e-9, atol=1e-10, msg=name)


@pytest.mark.distributed
@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_backward_synchronized(clusters, backend: str) -> None:
    per_rank = clusters(backend).run(autodiff_tasks.batched_backward, (2, 5), True)
    _check_all(per_rank, ["x", "weight", "jacrev"])


def test_vmap_over_the_forward_is_a_clear_error() -> None:
    layer = SyncBatchNorm(3)
    with pytest.raises(NotImplementedError, match="does not support torch.func.vmap over its forward"):
        torch.func.vmap(layer)(torch.randn(2, 4, 3, 5))


def test_first_order_backward_still_runs_the_fused_path() -> None:
    """Without create_graph the gradients carry no graph (the kernels' backward ran)."""
    x = torch.randn(4, 3, 5, requires_grad=True)
    layer = SyncBatchNorm(3)
    layer(x).sum().backward()
    assert x.grad is not None and x.grad.grad_fn is None


@pytest.mark.distributed
# the interpreter runs every finite-difference evaluation through the kernels: the thorough run only
@pytest.mark.parametrize("backend", ["torch-cpu", pytest.param("interpreter", marks=pytest.mark.slow)])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_gradgradcheck_of_the_group_function(clusters, backend: str, activation: str | None) -> None:
    """Finite differences of the whole 2-rank function, first and second order."""
    assert clusters(backend).run(autodiff_tasks.gradgradcheck_global_function, 2, activation) == [
        True, True, None, None,
    ]  # fmt: skip
