"""Functions the tests run on every rank of a ``GlooCluster`` (or in-process, as one rank).

Each builds what it needs from a ``Case`` and returns small CPU tensors for the test process to
check against the oracle. Ranks outside the case's group return None.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

import triton_syncbn
from oracle import Case, global_batch, global_residual, initial_state, memory_format_of, rank_rows

# Process groups built so far in this worker, by member ranks. new_group must be called by all
# ranks in the same order; every task runs on every rank, so they do.
_GROUPS: dict[tuple[int, ...], dist.ProcessGroup] = {}


def subgroup(world: int) -> dist.ProcessGroup | None:
    """The group of ranks ``0..world-1`` (None when torch.distributed is not initialized)."""
    if not dist.is_initialized():
        if world != 1:
            raise RuntimeError(f"a world of {world} ranks needs an initialized process group")
        return None
    ranks = tuple(range(world))
    if ranks not in _GROUPS:
        _GROUPS[ranks] = dist.new_group(list(ranks))
    return _GROUPS[ranks]


def current_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def build_module(case: Case, group: dist.ProcessGroup | None) -> triton_syncbn.SyncBatchNorm:
    module = triton_syncbn.SyncBatchNorm(
        case.channels,
        eps=case.eps,
        momentum=case.momentum,
        affine=case.affine,
        track_running_stats=case.track_running_stats,
        process_group=group,
        dtype=case.param_dtype,
        bias=case.bias,
        activation=case.activation,
        negative_slope=case.negative_slope,
    )
    with torch.no_grad():
        for name, value in initial_state(case).items():
            target = getattr(module, name)
            if target is not None:
                target.copy_(value)
    return module.train(case.training)


def run_case(case: Case) -> dict[str, object] | None:
    """Train/eval ``case.steps`` steps of one SyncBatchNorm on this rank's rows of the data."""
    group = subgroup(case.world)
    rank = current_rank()
    if rank >= case.world:
        return None
    return run_case_as(case, group, rank)


def run_case_as(case: Case, group: dist.ProcessGroup | None, rank: int) -> dict[str, object]:
    """``run_case`` as member ``rank`` of the case's batches, synchronizing over ``group``."""
    device = torch.device(case.device)
    module = build_module(case, group).to(device)
    memory_format = memory_format_of(case)
    result: dict[str, list] = {
        "outputs": [],
        "input_grads": [],
        "weight_grads": [],
        "bias_grads": [],
        "residual_grads": [],
    }
    layouts_kept = True
    for step in range(case.steps):
        x_global, dy_global = global_batch(case, step)
        rows = rank_rows(case, rank)
        x = x_global[rows].to(device, case.dtype).contiguous(memory_format=memory_format)
        dy = dy_global[rows].to(device, case.dtype).contiguous(memory_format=memory_format)
        if case.strided:  # every other channel of a tensor twice as wide: a non-contiguous view
            x, dy = (torch.repeat_interleave(t, 2, dim=1)[:, ::2] for t in (x, dy))
        x.requires_grad_(True)
        module.zero_grad(set_to_none=True)
        residual = None
        if case.residual is not None:
            residual_format = memory_format if case.residual == "same" else torch.contiguous_format
            residual = (
                global_residual(case, step)[rows].to(device, case.dtype).contiguous(memory_format=residual_format)
            )
            residual.requires_grad_(True)
        y = module(x, residual)
        y.backward(dy)
        if residual is not None:
            layouts_kept &= residual.grad.dtype == case.dtype and residual.grad.shape == residual.shape
            result["residual_grads"].append(residual.grad.cpu())
        expected_format = torch.contiguous_format if case.strided else memory_format
        layouts_kept &= y.dtype == case.dtype and y.is_contiguous(memory_format=expected_format)
        layouts_kept &= x.grad.dtype == case.dtype and x.grad.is_contiguous(memory_format=expected_format)
        result["outputs"].append(y.detach().cpu())
        result["input_grads"].append(x.grad.cpu())
        result["weight_grads"].append(None if module.weight is None else module.weight.grad.cpu())
        result["bias_grads"].append(None if module.bias is None else module.bias.grad.cpu())
    result["layouts_kept"] = layouts_kept
    result["running_mean"] = None if module.running_mean is None else module.running_mean.cpu()
    result["running_var"] = None if module.running_var is None else module.running_var.cpu()
    tracked = module.num_batches_tracked
    result["num_batches_tracked"] = None if tracked is None else int(tracked)
    result["param_dtypes"] = {name: p.dtype for name, p in module.named_parameters()}
    return result


def run_pair_groups(first: Case, second: Case) -> dict[str, object]:
    """Ranks 0-1 run ``first`` in group [0, 1]; ranks 2-3 run ``second`` in group [2, 3]."""
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    rank = current_rank()
    return run_case_as((first, second)[rank // 2], pairs[rank // 2], rank % 2)


def run_outside_group(member_case: Case, outsider_case: Case) -> dict[str, object]:
    """Ranks 0-1 run ``member_case`` in group [0, 1]; ranks 2 and 3 hold modules bound to that
    same group, which they are not part of, and run ``outsider_case`` (one rank) on their own."""
    group = subgroup(2)
    rank = current_rank()
    if rank < 2:
        return run_case_as(member_case, group, rank)
    return run_case_as(outsider_case, group, 0)


def gloo_events(profile: torch.profiler.profile) -> int:
    return sum(1 for event in profile.events() if event.name.startswith("gloo:"))


def count_collectives(case: Case, input_requires_grad: bool) -> dict[str, int] | None:
    """Collectives issued by one forward and one backward, counted from the profiler's gloo events."""
    group = subgroup(case.world)
    rank = current_rank()
    if rank >= case.world:
        return None
    module = build_module(case, group)
    x_global, dy_global = global_batch(case, 0)
    rows = rank_rows(case, rank)
    x = x_global[rows].to(case.dtype).requires_grad_(input_requires_grad)
    module(x).backward(dy_global[rows].to(case.dtype))  # the first call also checks that ranks agree
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities) as forward_profile:
        y = module(x)
    with torch.profiler.profile(activities=activities) as backward_profile:
        y.backward(dy_global[rows].to(case.dtype))
    return {"forward": gloo_events(forward_profile), "backward": gloo_events(backward_profile)}


def expect_value_error(case: Case) -> dict[str, object] | None:
    """Run one training step that must raise ValueError; report the message and the buffers."""
    group = subgroup(case.world)
    rank = current_rank()
    if rank >= case.world:
        return None
    module = build_module(case, group)
    before = {name: value.clone() for name, value in module.state_dict().items()}
    x_global, _ = global_batch(case, 0)
    try:
        module(x_global[rank_rows(case, rank)].to(case.dtype))
    except ValueError as error:
        message = str(error)
    else:
        message = None
    unchanged = all(torch.equal(before[name], value) for name, value in module.state_dict().items())
    return {"message": message, "state_unchanged": unchanged}


def train_ddp(batches: tuple[int, ...], steps: int, ddp_options: dict[str, object]) -> dict[str, torch.Tensor] | None:
    """Train a converted conv net under DistributedDataParallel; return its final state dict."""
    from torch.nn.parallel import DistributedDataParallel

    world = len(batches)
    group = subgroup(world)
    rank = current_rank()
    if rank >= world:
        return None
    model = triton_syncbn.convert_sync_batchnorm(small_convnet(), process_group=group)
    ddp = DistributedDataParallel(model, process_group=group, **ddp_options)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    start = sum(batches[:rank])
    for step in range(steps):
        inputs, targets = convnet_batch(sum(batches), step)
        rows = slice(start, start + batches[rank])
        # DDP averages gradients over ranks, so scaling by world / global N makes the
        # averaged gradient that of the global-batch mean loss.
        loss = (ddp(inputs[rows]) - targets[rows]).square().sum() * world / sum(batches)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def small_convnet() -> torch.nn.Module:
    """A float64 conv net with BatchNorm1d/2d layers, identical on every rank (fixed seed)."""
    torch.manual_seed(1234)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 6, 3, stride=2),
        torch.nn.BatchNorm2d(6, momentum=None),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(6 * 3 * 3, 5),
        torch.nn.BatchNorm1d(5),
        torch.nn.Linear(5, 2),
    ).double()


def convnet_batch(size: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    inputs = torch.randn(size, 3, 8, 8, generator=gen, dtype=torch.float64) * 2 + 1
    targets = torch.randn(size, 2, generator=gen, dtype=torch.float64)
    return inputs, targets


def train_single_process(size: int, steps: int) -> dict[str, torch.Tensor]:
    """The reference for ``train_ddp``: the unconverted model on the whole batch, one process."""
    model = small_convnet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(steps):
        inputs, targets = convnet_batch(size, step)
        loss = (model(inputs) - targets).square().sum() / size
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


class _RowsOfReplicated(torch.autograd.Function):
    """Forward: this rank's rows of a tensor that every rank holds whole. Backward: every rank's
    row gradients summed over the group, so each rank gets the gradient of the global function."""

    @staticmethod
    def forward(ctx, full: torch.Tensor, rows: slice, group: dist.ProcessGroup | None) -> torch.Tensor:
        ctx.rows, ctx.group, ctx.shape = rows, group, full.shape
        return full[rows].clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        full = grad.new_zeros(ctx.shape)
        full[ctx.rows] = grad
        if ctx.group is not None:
            dist.all_reduce(full, group=ctx.group)
        return full, None, None


class _Replicated(torch.autograd.Function):
    """Identity on a tensor every rank holds; backward sums its gradient over the group (as DDP
    would for a parameter, up to DDP's averaging)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        ctx.group = group
        return tensor.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.clone()
        if ctx.group is not None:
            dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _GatherRows(torch.autograd.Function):
    """Concatenate every rank's (equal-sized) rows; backward keeps this rank's rows' gradient."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, rank: int, group: dist.ProcessGroup | None) -> torch.Tensor:
        ctx.rank, ctx.rows = rank, local.shape[0]
        if group is None:
            return local.clone()
        pieces = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(pieces, local.contiguous(), group=group)
        return torch.cat(pieces)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows].clone(), None, None


def gradcheck_global_function(world: int) -> bool | None:
    """``torch.autograd.gradcheck`` of the group's whole function: global input -> global output.

    Every rank holds the same float64 global batch; the function takes this rank's rows, runs
    ``sync_batch_norm`` over the group and gathers every rank's output. Ranks run gradcheck in
    lockstep (same shapes, same calls), so their collectives pair up.
    """
    group = subgroup(world)
    rank = current_rank()
    if rank >= world:
        return None
    sync = group if world > 1 else None
    gen = torch.Generator().manual_seed(7)
    rows_per_rank = 2
    x = torch.randn(world * rows_per_rank, 2, 3, generator=gen, dtype=torch.float64).requires_grad_()
    weight = (torch.rand(2, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
    bias = torch.randn(2, generator=gen, dtype=torch.float64).requires_grad_()
    rows = slice(rank * rows_per_rank, (rank + 1) * rows_per_rank)

    def global_function(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        local = _RowsOfReplicated.apply(x, rows, sync)
        output = triton_syncbn.sync_batch_norm(
            local, None, None, _Replicated.apply(weight, sync), _Replicated.apply(bias, sync), training=True,
            process_group=group,
        )  # fmt: skip
        return _GatherRows.apply(output, rank, sync)

    return torch.autograd.gradcheck(global_function, (x, weight, bias))


def compiled_matches_eager(batches: tuple[int, ...], steps: int) -> dict[str, float] | None:
    """Train a converted model eagerly and under ``torch.compile(fullgraph=True)`` side by side.

    Returns the largest differences in outputs, parameter grads and buffers over ``steps``
    steps; ``fullgraph=True`` makes any graph break an error.
    """
    import copy

    world = len(batches)
    group = subgroup(world)
    rank = current_rank()
    if rank >= world:
        return None
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 4, 3, padding=1),
        torch.nn.BatchNorm2d(4, momentum=None),
        torch.nn.SiLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 6 * 6, 3),
        torch.nn.BatchNorm1d(3, affine=False),
    )
    eager = triton_syncbn.convert_sync_batchnorm(model, process_group=group, fuse_activation=True)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True)
    worst = {"output": 0.0, "grad": 0.0, "buffer": 0.0}
    start = sum(batches[:rank])
    for step in range(steps):
        gen = torch.Generator().manual_seed(step)
        inputs = torch.randn(sum(batches), 3, 6, 6, generator=gen)[start : start + batches[rank]]
        out_eager, out_compiled = eager(inputs), compiled(inputs)
        out_eager.square().sum().backward()
        out_compiled.square().sum().backward()
        worst["output"] = max(worst["output"], (out_eager - out_compiled).abs().max().item() if inputs.numel() else 0)
    for p, q in zip(eager.parameters(), compiled_model.parameters(), strict=True):
        worst["grad"] = max(worst["grad"], (p.grad - q.grad).abs().max().item())
    for p, q in zip(eager.buffers(), compiled_model.buffers(), strict=True):
        worst["buffer"] = max(worst["buffer"], (p.double() - q.double()).abs().max().item())
    return worst


def train_with_join(steps_per_rank: tuple[int, ...]) -> dict[str, object] | None:
    """DDP training with uneven numbers of batches under ``ddp.join(throw_on_early_termination=True)``.

    As for torch.nn.SyncBatchNorm (DDP's docs), a model with collectives in its forward needs
    that flag: every rank then raises at the first step some rank lacks, instead of hanging.
    Returns the steps this rank completed, whether it raised, and its final parameters.
    """
    from torch.nn.parallel import DistributedDataParallel

    world = len(steps_per_rank)
    group = subgroup(world)
    rank = current_rank()
    if rank >= world:
        return None
    model = triton_syncbn.convert_sync_batchnorm(small_convnet(), process_group=group)
    ddp = DistributedDataParallel(model, process_group=group)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    completed, raised = 0, False
    try:
        with ddp.join(throw_on_early_termination=True):
            for step in range(steps_per_rank[rank]):
                inputs, targets = convnet_batch(3, 100 * rank + step)
                loss = (ddp(inputs) - targets).square().mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                completed += 1
    except RuntimeError:
        raised = True
    return {"completed": completed, "raised": raised, "state": {k: v.clone() for k, v in model.state_dict().items()}}


def first_call_handshake(case: Case) -> dict[str, int] | None:
    """Collectives in a module's first and second synchronized forward (the first checks agreement)."""
    group = subgroup(case.world)
    rank = current_rank()
    if rank >= case.world:
        return None
    module = build_module(case, group)
    x = global_batch(case, 0)[0][rank_rows(case, rank)].to(case.dtype)
    counts = {}
    for name in ("first", "second"):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            module(x)
        counts[name] = gloo_events(profile)
    return counts


def disagreeing_ranks(kind: str) -> dict[str, object] | None:
    """Rank 1 of a 2-rank group differs from rank 0 in ``kind``; report what each rank raised."""
    group = subgroup(2)
    rank = current_rank()
    if rank >= 2:
        return None
    channels = 5 if (kind == "channels" and rank == 1) else 4
    dtype = torch.float64 if (kind == "dtype" and rank == 1) else torch.float32
    requires_grad = not (kind == "requires_grad" and rank == 1)
    module = triton_syncbn.SyncBatchNorm(channels, process_group=group, dtype=dtype)
    x = torch.randn(3, channels, 6, dtype=dtype, requires_grad=requires_grad)
    try:
        module(x)
    except ValueError as error:
        return {"error": str(error), "num_batches_tracked": int(module.num_batches_tracked)}
    return {"error": None, "num_batches_tracked": int(module.num_batches_tracked)}


def non_finite_inputs(check_finite: bool) -> dict[str, object] | None:
    """2 ranks; rank 0's input has a NaN in channel 1 and an Inf in channel 2. Returns this
    rank's output, running statistics, or the error the opt-in check raised."""
    group = subgroup(2)
    rank = current_rank()
    if rank >= 2:
        return None
    x_global = non_finite_batch()
    module = triton_syncbn.SyncBatchNorm(4, process_group=group, check_finite=check_finite)
    try:
        output = module(x_global[rank * 3 : rank * 3 + 3])
    except FloatingPointError as error:
        return {"error": str(error), "num_batches_tracked": int(module.num_batches_tracked)}
    return {"output": output.detach(), "running_mean": module.running_mean, "running_var": module.running_var}


def non_finite_batch() -> torch.Tensor:
    x = torch.randn(6, 4, 5, generator=torch.Generator().manual_seed(3))
    x[1, 1, 2] = float("nan")
    x[2, 2, 0] = float("inf")
    return x


def _large_allocations(function: Callable[[], object], threshold: int) -> list[int]:
    """Sizes of the CPU allocations of at least ``threshold`` bytes made by ``function()``."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profile:
        function()
    sizes = (event.self_cpu_memory_usage for event in profile.events())  # self: each allocation once
    return [size for size in sizes if size >= threshold]


def synchronized_allocations(
    dtype: torch.dtype, channels_last: bool, activation: str | None
) -> dict[str, object] | None:
    """Full-size (>= half the input's bytes) allocations of one synchronized forward and backward
    on ranks 0-1, each with an ``[8, 16, 64, 64]`` input (1-2 MB), after a warm-up step; with an
    activation, the layer also takes a residual that needs a gradient."""
    group = subgroup(2)
    if current_rank() >= 2:
        return None
    x = torch.randn(8, 16, 64, 64, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    residual = None if activation is None else torch.randn_like(x, requires_grad=True)
    dy = torch.randn_like(x)
    module = triton_syncbn.SyncBatchNorm(16, process_group=group, activation=activation)
    module(x, residual).backward(dy)  # first call: the ranks' handshake, lazy state
    output = None

    def forward() -> None:
        nonlocal output
        output = module(x, residual)

    forward_allocations = _large_allocations(forward, x.numel() * x.element_size() // 2)
    backward_allocations = _large_allocations(lambda: output.backward(dy), x.numel() * x.element_size() // 2)
    return {"size": x.numel() * x.element_size(), "forward": forward_allocations, "backward": backward_allocations}


def synchronized_input_grad(
    x: torch.Tensor, dy: torch.Tensor, weight: torch.Tensor, memory_format: torch.memory_format
) -> torch.Tensor | None:
    """The input gradient of a 2-rank SyncBatchNorm (float32 weight) on rows ``rank::2`` of the
    global 4-D ``x``/``dy``, each rank's rows in ``memory_format``, for the test to reassemble."""
    group = subgroup(2)
    rank = current_rank()
    if rank >= 2:
        return None
    leaf = x[rank::2].contiguous(memory_format=memory_format).requires_grad_(True)
    module = triton_syncbn.SyncBatchNorm(x.shape[1], process_group=group)
    with torch.no_grad():
        module.weight.copy_(weight)
    module(leaf).backward(dy[rank::2].contiguous(memory_format=memory_format))
    return leaf.grad
