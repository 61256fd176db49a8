"""Kernel-contract checks run inside an interpreter worker (``TRITON_INTERPRET=1``).

``run_kernel_case`` feeds the same inputs to the Triton launchers (through Triton's interpreter)
and to the plain-torch path, with outputs poisoned (NaN) before the kernels run, and returns
both results for the test process to hold against float64 references.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from triton_syncbn import launchers, torch_path
from triton_syncbn.contract import Epilogue, RunningStats, SavedStatistics
from triton_syncbn.kernels import INTERPRETED
from triton_syncbn.kernels.activation import ACTIVATION_CODES
from triton_syncbn.layout import channel_view, empty_output_like

NEGATIVE_SLOPE = 0.1
# num_batches_tracked before the forward; normalize increments it (cumulative factor 1 / 3).
NUM_BATCHES_BEFORE = 2


@dataclass(frozen=True)
class KernelCase:
    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    layout: str = "contiguous"  # contiguous | channels_last | sliced | permuted
    grad_layout: str = "same"  # same | contiguous | expanded
    tiles: tuple[int, int, int] | None = None  # (block_c, block_m, splits); None: launchers' choice
    mode: str = "batch"  # batch | cumulative | running
    weight: bool = True
    bias: bool = True
    seed: int = 0
    activation: str | None = None  # fused activation
    residual: str | None = None  # fused residual's layout: None, "same" or "contiguous"
    programs: int | None = None  # launchers' own tiling aimed at this many programs (e.g. a GPU's 4 x 132)

    @property
    def id(self) -> str:
        tiles = "auto" if self.tiles is None else "t" + "-".join(map(str, self.tiles))
        params = "wb" if self.weight and self.bias else ("w" if self.weight else "noaffine")
        shape = "x".join(map(str, self.shape))
        fused = f"-{self.activation}" if self.activation else ""
        fused += f"-residual_{self.residual}" if self.residual else ""
        fused += f"-programs_{self.programs}" if self.programs else ""
        return f"{shape}-{str(self.dtype)[6:]}-{self.layout}-dy_{self.grad_layout}-{tiles}-{self.mode}-{params}{fused}"


def make_inputs(case: KernelCase) -> dict[str, torch.Tensor]:
    """Deterministic float64 inputs (values rounded to the case's dtype)."""
    gen = torch.Generator().manual_seed(case.seed)
    channels = case.shape[1]
    means = 3 * torch.randn(channels, generator=gen, dtype=torch.float64)
    view = (1, channels) + (1,) * (len(case.shape) - 2)
    x = torch.randn(case.shape, generator=gen, dtype=torch.float64) * 1.5 + means.view(view)
    dy = torch.randn(case.shape, generator=gen, dtype=torch.float64)
    if case.grad_layout == "expanded":
        dy = torch.full((1,) * len(case.shape), 0.75, dtype=torch.float64).expand(case.shape)
    return {
        "x": x.to(case.dtype).double(),
        "dy": dy.to(case.dtype).double(),
        "weight": 1 + 0.5 * torch.randn(channels, generator=gen, dtype=torch.float64),
        "bias": torch.randn(channels, generator=gen, dtype=torch.float64),
        "running_mean": torch.randn(channels, generator=gen, dtype=torch.float64),
        "running_var": 0.5 + torch.rand(channels, generator=gen, dtype=torch.float64),
        "residual": torch.randn(case.shape, generator=gen, dtype=torch.float64).to(case.dtype).double(),
    }


def parameter_dtype(case: KernelCase) -> torch.dtype:
    """Parameters and running statistics: float64 for float64 input, float32 otherwise."""
    return torch.float64 if case.dtype == torch.float64 else torch.float32


def _layout(tensor: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last":
        memory_format = torch.channels_last if tensor.dim() == 4 else torch.channels_last_3d
        return tensor.contiguous(memory_format=memory_format)
    if layout == "sliced":  # every other channel of a twice-as-wide tensor: channel stride 2 * S
        wide = torch.repeat_interleave(tensor, 2, dim=1)
        return wide[:, ::2]
    if layout == "permuted":  # spatial dims stored W-major: no single spatial stride, so a copy
        return tensor.transpose(-1, -2).contiguous().transpose(-1, -2)
    return tensor.contiguous()


def _tiling(case: KernelCase, view: torch.Tensor) -> launchers.Tiling | None:
    if case.tiles is None:
        return None
    return launchers.Tiling.split(view, *case.tiles)


def run_kernel_case(case: KernelCase) -> dict[str, object] | None:
    """Both backends on the same inputs; rank 0 of the cluster only."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    if not INTERPRETED:
        raise RuntimeError("run_kernel_case needs a worker started with TRITON_INTERPRET=1")
    return _run_kernel_case(case)


def _run_kernel_case(case: KernelCase) -> dict[str, object]:
    inputs = make_inputs(case)
    x = _layout(inputs["x"].to(case.dtype), case.layout)
    dy = inputs["dy"].to(case.dtype)
    dy = (
        dy
        if case.grad_layout == "expanded"
        else _layout(dy, "contiguous" if case.grad_layout == "contiguous" else case.layout)
    )
    weight = inputs["weight"].to(parameter_dtype(case)) if case.weight else None
    bias = inputs["bias"].to(parameter_dtype(case)) if case.weight and case.bias else None
    residual = None
    if case.residual is not None:
        residual = _layout(inputs["residual"].to(case.dtype), case.layout if case.residual == "same" else "contiguous")
    code = ACTIVATION_CODES[case.activation or "identity"]
    x_view, dy_view = channel_view(x), channel_view(dy)
    residual_view = None if residual is None else channel_view(residual)
    epilogue = Epilogue(residual_view, code, NEGATIVE_SLOPE)
    tiling = _tiling(case, x_view)
    results: dict[str, object] = {"tiling": tiling, "strides_kept": {}}
    launched = launchers.collapse(x_view)
    launched_tiling = tiling.refit(launched) if tiling else launchers.choose_tiling(launched, case.programs or 4)
    results["merge_groups"] = launchers.merge_plan(launched_tiling.block_c, launched_tiling.splits).groups
    # merge tickets kept across calls, as the module keeps them: they must come back all zero
    tickets = launchers.new_merge_tickets(case.shape[1], x.device)
    for name, backend in (("triton", launchers), ("torch", torch_path)):
        options = {"tiling": tiling} if name == "triton" else {}
        if name == "triton" and case.programs:
            options["dispatch"] = launchers.Dispatch(programs=case.programs)
        running_mean = inputs["running_mean"].to(parameter_dtype(case), copy=True)  # each backend its own
        running_var = inputs["running_var"].to(parameter_dtype(case), copy=True)
        num_batches = torch.tensor(NUM_BATCHES_BEFORE, dtype=torch.int64)
        merge_tickets = tickets if name == "triton" else None
        stats = backend.partial_stats(x_view, merge_tickets, **options)
        output, output_view = empty_output_like(x)
        output.fill_(float("nan"))
        batch = case.mode != "running"
        running = RunningStats(running_mean, running_var, num_batches, None if case.mode == "cumulative" else 0.25)
        mean, invstd = backend.normalize(
            x_view, output_view, weight, bias, stats if batch else None, running, 1e-3, epilogue, **options
        )
        saved = SavedStatistics(mean, invstd, stats[0] if batch else stats.new_empty(0))
        sums, grad_weight, grad_bias = backend.backward_reduce(
            dy_view, x_view, weight, bias, saved, epilogue,
            None if weight is None else weight.dtype, None if bias is None else bias.dtype, merge_tickets, **options,
        )  # fmt: skip
        grad_input, grad_input_view = empty_output_like(x)
        grad_input.fill_(float("nan"))
        grad_residual = grad_residual_view = None
        if residual is not None:
            grad_residual, grad_residual_view = empty_output_like(residual)
            grad_residual.fill_(float("nan"))
        backend.backward_dx(
            dy_view, x_view, grad_input_view, weight, bias, saved, sums if batch else None, epilogue,
            grad_residual_view, **options,
        )  # fmt: skip
        results["strides_kept"][name] = output.stride() == grad_input.stride() and (
            case.layout in ("sliced", "permuted") or output.stride() == x.stride()
        )
        results[name] = {
            "stats": stats,
            "output": output,
            "mean": mean,
            "invstd": invstd,
            "running_mean": running_mean,
            "running_var": running_var,
            "sums": sums,
            "grad_weight": grad_weight,
            "grad_bias": grad_bias,
            "grad_input": grad_input,
            "grad_residual": grad_residual,
            "num_batches_tracked": int(num_batches),
        }
    results["tickets_left_zero"] = bool((tickets == 0).all())
    return results


def non_finite_batch_4_ranks() -> torch.Tensor:
    """``(8, 4, 5)``: a NaN in channel 1 (rank 0's rows), an Inf in channel 2 (rank 2's rows), a -Inf
    in channel 3 of rank 3's rows; channel 0 finite."""
    x = torch.randn(8, 4, 5, generator=torch.Generator().manual_seed(11))
    x[1, 1, 2] = float("nan")
    x[4, 2, 0] = float("inf")
    x[7, 3, 4] = float("-inf")
    return x


def non_finite_fused_relu() -> dict[str, torch.Tensor]:
    """Every rank of the cluster normalizes its 2 rows of ``non_finite_batch_4_ranks`` with a fused
    relu, synchronized over the whole group; returns this rank's output and running statistics."""
    import torch.distributed as dist

    from triton_syncbn import sync_batch_norm

    rank = dist.get_rank()
    x = non_finite_batch_4_ranks()[2 * rank : 2 * rank + 2]
    running_mean, running_var = torch.zeros(4), torch.ones(4)
    output = sync_batch_norm(x, running_mean, running_var, training=True, activation="relu")
    return {"output": output, "running_mean": running_mean, "running_var": running_var}


ACCURACY_SHAPE = (32, 2, 128, 128)  # 2**19 values per channel: hundreds of loop steps per lane


def accuracy_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``x`` (per-channel means 3 * randn, std 1.5: ordinary data) and ``dy``."""
    gen = torch.Generator().manual_seed(21)
    channels = ACCURACY_SHAPE[1]
    x = torch.randn(ACCURACY_SHAPE, generator=gen) * 1.5 + 3 * torch.randn(1, channels, 1, 1, generator=gen)
    return x, torch.randn(ACCURACY_SHAPE, generator=gen)


def batch_mean_and_parameter_grads() -> dict[str, torch.Tensor] | None:
    """Rank 0 alone (a one-rank group): a training step of SyncBatchNorm with momentum 1 on
    ``accuracy_inputs``; returns the batch mean (the running mean) and the weight/bias grads."""
    import torch.distributed as dist

    import triton_syncbn

    group = dist.new_group([0])
    if dist.get_rank() != 0:
        return None
    x, dy = accuracy_inputs()
    module = triton_syncbn.SyncBatchNorm(ACCURACY_SHAPE[1], momentum=1.0, process_group=group)
    module(x).backward(dy)
    return {"mean": module.running_mean, "grad_weight": module.weight.grad, "grad_bias": module.bias.grad}


def elementwise_bits_under_tuning(
    shape: tuple[int, ...], dtype: torch.dtype, layout: str, activation: str | None, configs: list[tuple[int, int, int]]
) -> dict[str, object] | None:
    """normalize and backward_dx through the interpreter with the heuristic tiling and with each
    tuned ``(thread_elements, num_warps, steps)``; whether each writes the heuristic's bits, and
    the grids they launched (rank 0 only)."""
    import torch.distributed as dist

    from triton_syncbn import tuning

    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    if not INTERPRETED:
        raise RuntimeError("elementwise_bits_under_tuning needs a worker started with TRITON_INTERPRET=1")
    generator = torch.Generator().manual_seed(7)
    x = _layout(torch.randn(shape, generator=generator).mul_(3).add_(1).to(dtype), layout)
    dy = _layout(torch.randn(shape, generator=generator).to(dtype), layout)
    residual = _layout(torch.randn(shape, generator=generator).to(dtype), layout)
    channels = shape[1]
    weight = torch.rand(channels, generator=generator) + 0.5
    bias = torch.randn(channels, generator=generator)
    x_view, dy_view, residual_view = channel_view(x), channel_view(dy), channel_view(residual)
    epilogue = Epilogue(residual_view, ACTIVATION_CODES[activation or "identity"], NEGATIVE_SLOPE)
    stats = launchers.partial_stats(x_view)
    saved_count = stats[0].clone()

    def run(dispatch: launchers.Dispatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list]:
        grids = []

        def launch(kernel: object, grid: tuple[int, ...], args: tuple, kwargs: dict) -> None:
            grids.append((getattr(kernel, "__name__", str(kernel)), grid, kwargs.get("num_warps")))
            kernel[grid](*args, **kwargs)

        dispatch = launchers.Dispatch(dispatch.programs, launch, dispatch.tuning)
        y, y_view = empty_output_like(x)
        y_view.fill_(float("nan"))
        mean, invstd = launchers.normalize(x_view, y_view, weight, bias, stats, None, 1e-5, epilogue, dispatch=dispatch)
        saved = SavedStatistics(mean, invstd, saved_count)
        sums, _, _ = launchers.backward_reduce(dy_view, x_view, weight, bias, saved, epilogue, None, None)
        dx, dx_view = empty_output_like(x)
        dx_view.fill_(float("nan"))
        grad_residual, grad_residual_view = empty_output_like(residual)
        launchers.backward_dx(
            dy_view, x_view, dx_view, weight, bias, saved, sums, epilogue, grad_residual_view, dispatch=dispatch
        )
        return y, dx, grad_residual, grids

    reference = run(launchers.Dispatch())
    results: dict[str, object] = {"reference_grids": reference[3], "configs": []}
    for thread_elements, num_warps, steps in configs:
        config = tuning.ElementwiseConfig(thread_elements, num_warps, steps)
        table = tuning.UniformTable(config)
        tuned = run(launchers.Dispatch(tuning=table))
        results["configs"].append({
            "config": (thread_elements, num_warps, steps),
            "same_bits": [_same_bits(a, b) for a, b in zip(reference[:3], tuned[:3], strict=True)],
            "grids": tuned[3],
        })  # fmt: skip
    return results


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def module_merge_tickets() -> dict[str, object] | None:
    """Rank 0 alone, under the interpreter: two training steps of a module whose reductions split
    (4 programs aimed at, 2 channels: 2 splits each). Reports whether the module made its merge
    tickets once and kept them, that they came back zero, and the functional API (no tickets)
    against the module, bitwise."""
    import torch.distributed as dist

    import triton_syncbn
    from triton_syncbn.functional import sync_batch_norm

    group = dist.new_group([0])  # a collective: every rank of the cluster takes part
    if dist.get_rank() != 0:
        return None
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(8, 2, 6, 6, generator=gen) + 2
    module = triton_syncbn.SyncBatchNorm(2, process_group=group)
    outputs, tickets = [], []
    for _ in range(2):
        source = x.clone().requires_grad_(True)
        outputs.append(module(source))
        outputs[-1].backward(torch.ones_like(x))
        tickets.append(module.__dict__["_merge_tickets_by_device"][1])
    functional = sync_batch_norm(x, None, None, module.weight, module.bias, training=True, process_group=group)
    return {
        "kept": tickets[0] is tickets[1] and tickets[0] is not None,
        "zero": bool((tickets[0] == 0).all()),
        "same_output": torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], functional),
        "not_state": "_merge_tickets_by_device" not in dict(module.named_buffers())
        and all("ticket" not in key for key in module.state_dict()),
    }


def split_merges_in_any_arrival_order(seed: int) -> dict[str, bool] | None:
    """Rank 0 alone, under the interpreter: the split reductions (one and two merge levels) run
    with their programs in the grid's order and in shuffled orders, so a different program takes
    each last ticket. Reports whether every order gave the same bits, whether those match a
    float64 reference, and whether the tickets came back zero.

    The interpreter runs programs one after another; shuffling goes through its program-id setter
    (``interpreter_builder.set_grid_idx``, a private API: a Triton that renames it fails this
    loudly rather than skipping it)."""
    import torch.distributed as dist
    from triton.runtime import interpreter

    from triton_syncbn.contract import Epilogue, SavedStatistics

    if dist.get_rank() != 0:
        return None
    builder = interpreter.interpreter_builder
    natural = builder.set_grid_idx
    gen = torch.Generator().manual_seed(seed)
    cases = (((64, 64, 1, 2), (64, 1, 64)), ((6, 5, 7, 9), (1, 16, 5)))  # channels_last, 2 levels; contiguous
    report = {"same_bits": True, "accurate": True, "tickets_zero": True}
    for shape, tiles in cases:
        # float64: partials with full 53-bit mantissas, so a different summation order shows in
        # the bits (float32 data summed in float64 is often exact in any order)
        x = torch.randn(shape, generator=gen, dtype=torch.float64) * 3 + 5
        if shape[1] == 64:
            x = x.contiguous(memory_format=torch.channels_last)
        dy = torch.randn(shape, generator=gen, dtype=torch.float64)
        view, grad_view = channel_view(x), channel_view(dy)
        tiling = launchers.Tiling.split(view, *tiles)
        dims = [0, *range(2, x.dim())]
        mean, invstd = x.double().mean(dims), x.double().var(dims, correction=0).add(1e-5).rsqrt()
        saved = SavedStatistics(mean, invstd, torch.full_like(mean, x.numel() / shape[1]))
        tickets = launchers.new_merge_tickets(shape[1], x.device)
        runs = []
        for order in range(4):
            permutations: dict[tuple[int, int, int], list[tuple[int, int, int]]] = {}

            def shuffled(px: int, py: int, pz: int, permutations: dict = permutations) -> None:
                nx, ny, nz = builder.grid_dim
                if (nx, ny, nz) not in permutations:
                    ids = [(a, b, c) for a in range(nx) for b in range(ny) for c in range(nz)]
                    permutations[nx, ny, nz] = [ids[i] for i in torch.randperm(len(ids), generator=gen).tolist()]
                return natural(*permutations[nx, ny, nz][(px * ny + py) * nz + pz])

            if order:
                builder.set_grid_idx = shuffled
            try:
                stats = launchers.partial_stats(view, tickets, tiling=tiling)
                sums, _, _ = launchers.backward_reduce(
                    grad_view, view, None, None, saved, Epilogue(), None, None, tickets, tiling=tiling
                )
            finally:
                builder.set_grid_idx = natural
            runs.append((stats.clone(), sums.clone()))
            report.setdefault("orders", 0)
            report["orders"] += bool(permutations)
        report["same_bits"] &= all(torch.equal(a, b) for run in runs[1:] for a, b in zip(runs[0], run, strict=True))
        exact = x.double()
        count = torch.full_like(mean, x.numel() / shape[1])
        expected_stats = torch.stack([count, exact.sum(dims), exact.square().sum(dims)])
        xhat = (exact - mean.view(1, -1, *[1] * (x.dim() - 2))) * invstd.view(1, -1, *[1] * (x.dim() - 2))
        expected_sums = torch.stack([dy.double().sum(dims), (dy.double() * xhat).sum(dims)])
        report["accurate"] &= torch.allclose(runs[0][0], expected_stats, rtol=1e-6, atol=1e-6)
        report["accurate"] &= torch.allclose(runs[0][1].double(), expected_sums, rtol=1e-4, atol=1e-4)
        report["tickets_zero"] &= bool((tickets == 0).all())
    return report


def run_reductions_keep_non_finite_channels_apart() -> dict[str, object] | None:
    """The channel-run reductions (``(6, 8, 7, 7)`` fp32: two runs of 4 channels) with an Inf in
    channel 2 and a NaN in channel 5 of x and dy: the kernels used, and their statistics and
    gradient sums next to float64 ones. The runs' segmented sums must not carry a non-finite
    value into the next channel of the run."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, 8, 7, 7, generator=gen)
    dy = torch.randn(6, 8, 7, 7, generator=gen)
    for tensor in (x, dy):
        tensor[3, 2, 4, 1] = float("inf")
        tensor[1, 5, 0, 6] = float("nan")
    kernels: list[str] = []

    def record(kernel: object, grid: tuple[int, ...], args: tuple[object, ...], kwargs: dict) -> None:
        kernels.append(getattr(kernel, "__name__", type(kernel).__name__))
        launchers._run(kernel, grid, args, kwargs)

    dispatch = launchers.Dispatch(programs=4, launch=record)
    view, grad_view = x.view(6, 8, 49), dy.view(6, 8, 49)
    stats = launchers.partial_stats(view, dispatch=dispatch)
    mean, invstd = torch.randn(8, generator=gen), torch.rand(8, generator=gen) + 0.5
    saved = SavedStatistics(mean, invstd, torch.full((8,), 294.0, dtype=torch.float64))
    sums, _, _ = launchers.backward_reduce(
        grad_view, view, None, None, saved, Epilogue(), None, None, dispatch=dispatch
    )
    per_channel = x.double().transpose(0, 1).reshape(8, -1)
    grad_per_channel = dy.double().transpose(0, 1).reshape(8, -1)
    xhat = (per_channel - mean.double()[:, None]) * invstd.double()[:, None]
    return {
        "kernels": kernels,
        "stats": stats,
        "expected_stats": torch.stack(
            [torch.full((8,), 294.0, dtype=torch.float64), per_channel.sum(1), per_channel.square().sum(1)]
        ),  # fmt: skip
        "sums": sums.double(),
        "expected_sums": torch.stack([grad_per_channel.sum(1), (grad_per_channel * xhat).sum(1)]),
    }
