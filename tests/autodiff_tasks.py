"""Higher-order and forward-mode autograd on every rank of a group, against a float64 oracle.

Each task builds a float64 global batch (the same on every rank, from a fixed seed), runs the
synchronized layer on this rank's rows, and returns this rank's derivatives together with the
same quantities computed by ``torch.nn.functional.batch_norm`` on the whole global batch in one
process: the test compares them. Derivatives that are local in a data-parallel group (parameter
gradients, which DDP averages) are summed over the group here before they are returned.
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD
import torch.distributed as dist
import torch.nn.functional as F

import triton_syncbn
from rank_tasks import current_rank, subgroup

_ACTIVATIONS = {None: lambda z: z, "relu": F.relu, "silu": F.silu, "leaky_relu": lambda z: F.leaky_relu(z, 0.2)}


def _problem(batches: tuple[int, ...], training: bool, activation: str | None, residual: bool) -> dict:
    """The global batch and parameters (float64, identical on every rank) and this rank's rows."""
    gen = torch.Generator().manual_seed(11)
    channels, spatial = 3, (4, 3)
    total = sum(batches)
    rank = current_rank()
    start = sum(batches[:rank])
    return {
        "x": torch.randn(total, channels, *spatial, generator=gen, dtype=torch.float64) * 1.5 + 0.3,
        "weight": torch.rand(channels, generator=gen, dtype=torch.float64) + 0.5,
        "bias": torch.randn(channels, generator=gen, dtype=torch.float64),
        "residual": torch.randn(total, channels, *spatial, generator=gen, dtype=torch.float64) if residual else None,
        "running_mean": torch.randn(channels, generator=gen, dtype=torch.float64),
        "running_var": torch.rand(channels, generator=gen, dtype=torch.float64) + 0.5,
        # tangents / cotangents, also global
        "v": torch.randn(total, channels, *spatial, generator=gen, dtype=torch.float64),
        "u": torch.randn(channels, generator=gen, dtype=torch.float64),
        "c": torch.randn(total, channels, *spatial, generator=gen, dtype=torch.float64),
        "rows": slice(start, start + batches[rank]),
        "training": training,
        "activation": activation,
    }


def _membership(batches: tuple[int, ...]) -> tuple[dist.ProcessGroup | None, dist.ProcessGroup | None] | None:
    """``(group, sync)`` for a task over ranks ``0..len(batches)-1`` (``sync``: the group when it
    has more than one rank, else None); None on a rank outside it."""
    world = len(batches)
    group = subgroup(world)
    if current_rank() >= world:
        return None
    return group, group if world > 1 else None


def _ours(problem: dict, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, residual, group) -> torch.Tensor:
    return triton_syncbn.sync_batch_norm(
        x, problem["running_mean"].clone(), problem["running_var"].clone(), weight, bias,
        training=problem["training"], process_group=group, residual=residual, activation=problem["activation"],
        negative_slope=0.2,
    )  # fmt: skip


def _reference(problem: dict, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, residual) -> torch.Tensor:
    if problem["training"]:
        z = F.batch_norm(x, None, None, weight, bias, training=True)
    else:  # written out: torch's batch_norm has no forward derivative w.r.t. the running statistics
        shape = (1, -1) + (1,) * (x.dim() - 2)
        mean, var = problem["running_mean"].view(shape), problem["running_var"].view(shape)
        z = (x - mean) * torch.rsqrt(var + 1e-5) * weight.view(shape) + bias.view(shape)
    if residual is not None:
        z = z + residual
    return _ACTIVATIONS[problem["activation"]](z)


def _sum_over(tensor: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    tensor = tensor.detach().clone()
    if group is not None:
        dist.all_reduce(tensor, group=group)
    return tensor


def hessian_vector_products(
    batches: tuple[int, ...], training: bool, activation: str | None, residual: bool
) -> dict[str, torch.Tensor] | None:
    """Double backward: the gradient of a penalty on the first gradients (a gradient penalty).

    With ``L = sum(c * sin(y))`` and first gradients ``g_x, g_w, g_b`` (``create_graph=True``), the
    penalty ``P = <g_x, v> + <g_w, u> + <g_b, u>`` is differentiated again w.r.t. the input,
    the weight, the bias and the residual. The group's ``P`` is the sum of the ranks' ``P``s (the
    parameter gradients are local, as DDP leaves them), so its derivative w.r.t. this rank's
    rows is what each rank gets, and the parameter derivatives sum over the group.
    """
    membership = _membership(batches)
    if membership is None:
        return None
    group, sync = membership
    problem = _problem(batches, training, activation, residual)
    rows = problem["rows"]
    results: dict[str, torch.Tensor] = {}
    for who in ("ours", "reference"):
        if who == "ours":
            x = problem["x"][rows].clone().requires_grad_()
            r = None if problem["residual"] is None else problem["residual"][rows].clone().requires_grad_()
            v, c = problem["v"][rows], problem["c"][rows]
        else:
            x = problem["x"].clone().requires_grad_()
            r = None if problem["residual"] is None else problem["residual"].clone().requires_grad_()
            v, c = problem["v"], problem["c"]
        weight = problem["weight"].clone().requires_grad_()
        bias = problem["bias"].clone().requires_grad_()
        if who == "ours":
            y = _ours(problem, x, weight, bias, r, group)
        else:
            y = _reference(problem, x, weight, bias, r)
        inputs = [x, weight, bias] + ([r] if r is not None else [])
        first = torch.autograd.grad((c * y.sin()).sum(), inputs, create_graph=True)
        penalty = (first[0] * v).sum() + (first[1] * problem["u"]).sum() + (first[2] * problem["u"]).sum()
        second = torch.autograd.grad(penalty, inputs, allow_unused=True)
        names = ["x", "weight", "bias", "residual"]
        for name, grad in zip(names, second, strict=False):
            if grad is None:
                grad = torch.zeros_like(inputs[names.index(name)])
            if who == "ours" and name in ("weight", "bias"):
                grad = _sum_over(grad, sync)
            if who == "reference" and name in ("x", "residual"):
                grad = grad[rows]
            results[f"{who}_{name}"] = grad.detach()
        results[f"{who}_first_x"] = first[0].detach() if who == "ours" else first[0].detach()[rows]
    return results


def forward_mode(
    batches: tuple[int, ...], training: bool, activation: str | None, residual: bool
) -> dict[str, torch.Tensor] | None:
    """The output's tangent for tangents on the input, weight, bias, residual and running stats.

    Twice: with dual tensors (``torch.autograd.forward_ad``) and with ``torch.func.jvp``; the
    reference is ``torch.func.jvp`` of ``F.batch_norm`` on the global batch.
    """
    membership = _membership(batches)
    if membership is None:
        return None
    group, _ = membership
    problem = _problem(batches, training, activation, residual)
    rows = problem["rows"]
    gen = torch.Generator().manual_seed(5)
    channels = problem["weight"].shape[0]
    t_weight = torch.randn(channels, generator=gen, dtype=torch.float64)
    t_bias = torch.randn(channels, generator=gen, dtype=torch.float64)
    t_mean = torch.randn(channels, generator=gen, dtype=torch.float64)
    t_var = torch.randn(channels, generator=gen, dtype=torch.float64)
    t_residual = torch.randn_like(problem["x"]) if residual else None

    def run(f, x, residual_value, t_x, t_residual_rows):
        def function(x, weight, bias, running_mean, running_var, *maybe_residual):
            state = dict(problem, running_mean=running_mean, running_var=running_var)
            res = maybe_residual[0] if maybe_residual else None
            return f(state, x, weight, bias, res)

        primals = (x, problem["weight"], problem["bias"], problem["running_mean"], problem["running_var"])
        tangents = (t_x, t_weight, t_bias, t_mean, t_var)
        if residual_value is not None:
            primals, tangents = primals + (residual_value,), tangents + (t_residual_rows,)
        return torch.func.jvp(function, primals, tangents)[1]

    def ours(state, x, weight, bias, res):
        return triton_syncbn.sync_batch_norm(
            x, state["running_mean"], state["running_var"], weight, bias, training=state["training"],
            process_group=group, residual=res, activation=state["activation"], negative_slope=0.2,
        )  # fmt: skip

    def reference(state, x, weight, bias, res):
        return _reference(state, x, weight, bias, res)

    local_residual = None if not residual else problem["residual"][rows]
    local_t_residual = None if not residual else t_residual[rows]
    results = {
        "ours_func_jvp": run(ours, problem["x"][rows], local_residual, problem["v"][rows], local_t_residual),
        "reference": run(reference, problem["x"], problem["residual"], problem["v"], t_residual)[rows],
    }
    with fwAD.dual_level():
        dual = fwAD.make_dual(problem["x"][rows].clone(), problem["v"][rows])
        weight = fwAD.make_dual(problem["weight"].clone(), t_weight)
        bias = fwAD.make_dual(problem["bias"].clone(), t_bias)
        running_mean = fwAD.make_dual(problem["running_mean"].clone(), t_mean)
        running_var = fwAD.make_dual(problem["running_var"].clone(), t_var)
        res = None if not residual else fwAD.make_dual(local_residual.clone(), local_t_residual)
        output = triton_syncbn.sync_batch_norm(
            dual, running_mean, running_var, weight, bias, training=training, process_group=group, residual=res,
            activation=activation, negative_slope=0.2,
        )  # fmt: skip
        results["ours_dual"] = fwAD.unpack_dual(output).tangent.clone()
    return results


def batched_backward(batches: tuple[int, ...], training: bool) -> dict[str, torch.Tensor] | None:
    """vmap over the backward: ``autograd.grad(..., is_grads_batched=True)`` in one process (a
    clear error in a group), ``torch.func.vmap`` of ``torch.func.vjp`` in a group, and
    ``torch.func.jacrev``; against the reference's, this rank's rows of the input gradient."""
    membership = _membership(batches)
    if membership is None:
        return None
    group, sync = membership
    problem = _problem(batches, training, None, False)
    rows = problem["rows"]
    gen = torch.Generator().manual_seed(3)
    cotangents = torch.randn(4, *problem["x"].shape, generator=gen, dtype=torch.float64)
    weight = problem["weight"].clone().requires_grad_()
    x = problem["x"][rows].clone().requires_grad_()
    ours = _ours(problem, x, weight, problem["bias"], None, group)
    if sync is None:
        grad_x, grad_w = torch.autograd.grad(ours, (x, weight), cotangents[:, rows], is_grads_batched=True)
    else:  # the legacy vmap behind is_grads_batched cannot batch a collective: a clear error
        try:
            torch.autograd.grad(ours, (x, weight), cotangents[:, rows], is_grads_batched=True)
        except NotImplementedError as error:
            assert "is_grads_batched=True" in str(error) and "torch.func" in str(error), str(error)
        else:
            raise AssertionError("is_grads_batched over a group did not raise")
        # the same vector-Jacobian products, one torch.func.vmap over torch.func.vjp
        _, vjp = torch.func.vjp(lambda x, w: _ours(problem, x, w, problem["bias"], None, group), x, weight)
        grad_x, grad_w = torch.func.vmap(vjp)(cotangents[:, rows])
    x_ref = problem["x"].clone().requires_grad_()
    weight_ref = problem["weight"].clone().requires_grad_()
    reference = _reference(problem, x_ref, weight_ref, problem["bias"], None)
    grad_x_ref, grad_w_ref = torch.autograd.grad(reference, (x_ref, weight_ref), cotangents, is_grads_batched=True)

    def loss(f, x_value):
        return (problem["c"][rows if f is _ours else slice(None)] * _call(f, x_value).sin()).sum()

    def _call(f, x_value):
        if f is _ours:
            return _ours(problem, x_value, problem["weight"], problem["bias"], None, group)
        return _reference(problem, x_value, problem["weight"], problem["bias"], None)

    return {
        "ours_x": grad_x.detach(),
        "ours_weight": _sum_over(grad_w, sync),
        "reference_x": grad_x_ref.detach()[:, rows],
        "reference_weight": grad_w_ref.detach(),
        "ours_jacrev": torch.func.jacrev(lambda value: loss(_ours, value))(problem["x"][rows].clone()),
        "reference_jacrev": torch.func.jacrev(lambda value: loss(_reference, value))(problem["x"].clone())[rows],
    }


# Glue for checking the group's whole function, global input -> global output, on every rank.
# Every rank holds the same global ("replicated") tensors; gradcheck perturbs them identically on
# every rank, so its numerical derivative is that of the global function, and a cotangent of a
# replicated tensor is replicated too and counts once. Rank-local quantities (this rank's rows)
# get cotangents of their own. Hence: replicated -> local (taking rows, using a parameter) sums
# the local cotangents over ranks in backward; local -> replicated (gathering rows, summing
# partial gradients) hands the replicated cotangent to each rank once. Every backward below is
# itself differentiable, for double backward; the collectives are plain torch.distributed calls.


class _SumPartials(torch.autograd.Function):
    """Forward: the sum over ranks of per-rank partials (a replicated result). Backward: the
    replicated cotangent reaches each rank's partial once."""

    @staticmethod
    def forward(ctx, partial: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        total = partial.clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class _Replicated(torch.autograd.Function):
    """Identity on a tensor every rank holds, used locally; backward sums the local gradients."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return tensor.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _SumPartials.apply(grad, ctx.group), None


class _GatherRows(torch.autograd.Function):
    """Every rank's rows concatenated (equal counts); backward: this rank's rows of the gradient,
    through ``_Replicated`` so that differentiating the backward w.r.t. the (replicated)
    cotangent sums over the group too."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, rows: slice, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.rows, ctx.group = rows, group
        pieces = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(pieces, local.contiguous(), group=group)
        return torch.cat(pieces)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return _Replicated.apply(grad, ctx.group)[ctx.rows], None, None


def gradgradcheck_global_function(world: int, activation: str | None) -> bool | None:
    """``torch.autograd.gradgradcheck`` (and gradcheck) of the group's whole function.

    The function takes the global input, weight, bias and residual (identical on every rank),
    runs the synchronized layer on this rank's rows and gathers every rank's output; the
    cotangents gradgradcheck differentiates through are identical on every rank too.
    """
    group = subgroup(world)
    rank = current_rank()
    if rank >= world:
        return None
    gen = torch.Generator().manual_seed(17)
    rows_per_rank, shape = 2, (2, 3)
    x = torch.randn(world * rows_per_rank, *shape, generator=gen, dtype=torch.float64).requires_grad_()
    residual = torch.randn(world * rows_per_rank, *shape, generator=gen, dtype=torch.float64).requires_grad_()
    weight = (torch.rand(shape[0], generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
    bias = torch.randn(shape[0], generator=gen, dtype=torch.float64).requires_grad_()
    cotangent = torch.randn(world * rows_per_rank, *shape, generator=gen, dtype=torch.float64).requires_grad_()
    rows = slice(rank * rows_per_rank, (rank + 1) * rows_per_rank)

    def global_function(x, weight, bias, residual):
        output = triton_syncbn.sync_batch_norm(
            _Replicated.apply(x, group)[rows], None, None, _Replicated.apply(weight, group),
            _Replicated.apply(bias, group), training=True, process_group=group,
            residual=_Replicated.apply(residual, group)[rows], activation=activation, negative_slope=0.2,
        )  # fmt: skip
        return _GatherRows.apply(output, rows, group)

    inputs = (x, weight, bias, residual)
    first = torch.autograd.gradcheck(global_function, inputs, check_undefined_grad=False)
    second = torch.autograd.gradgradcheck(global_function, inputs, (cotangent,), check_undefined_grad=False)
    return first and second
