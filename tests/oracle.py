"""Test cases, their data, and the float64 oracle: BatchNorm over the concatenated global batch.

Imported both by the tests and by the worker processes of ``cluster.GlooCluster``; everything
here is deterministic in the case's seed, so every rank and the oracle see the same numbers.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

DTYPE_NAMES = {torch.float64: "f64", torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}

# (atol, rtol) by dtype, for values of order 1. Low-precision inputs are compared with an oracle
# run on the same (already rounded) values, so the budget is a few output roundings.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-4, 2e-4),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (6e-2, 6e-2),
}


# torch 2.13 added BatchNorm's ``bias`` argument; the GPU machines run torch 2.11.
TORCH_HAS_BIAS_ARGUMENT = "bias" in inspect.signature(_BatchNorm.__init__).parameters


def unsupported_here(case: Case) -> str | None:
    """Why this torch cannot run ``case`` (the module raises a TypeError saying so), or None."""
    if not case.bias and not TORCH_HAS_BIAS_ARGUMENT:
        return f"bias=False needs torch's BatchNorm bias argument (torch >= 2.13; this is {torch.__version__})"
    return None


@dataclass(frozen=True)
class Case:
    """One SyncBatchNorm scenario: per-rank batch sizes, shape, dtypes and module options."""

    batches: tuple[int, ...]  # N on each rank of the group; the world size is len(batches)
    tail: tuple[int, ...] = (3, 4, 5)  # (C, *spatial)
    dtype: torch.dtype = torch.float32
    channels_last: bool = False
    affine: bool = True
    bias: bool = True
    track_running_stats: bool = True
    momentum: float | None = 0.1
    training: bool = True
    param_dtype: torch.dtype = torch.float32
    steps: int = 2
    seed: int = 0
    eps: float = 1e-5
    mean_offset: float = 0.0  # per-channel means drawn from mean_offset + mean_scale * N(0, 1)
    mean_scale: float = 2.0
    std_range: tuple[float, float] = field(default=(0.5, 2.0))
    device: str = "cpu"  # "cuda": each rank uses its own GPU (compiled kernels; NCCL with several ranks)
    activation: str | None = None  # fused activation (SyncBatchNorm(activation=...))
    negative_slope: float = 0.01
    residual: str | None = None  # fused residual add: None, "same" or "contiguous" memory format
    strided: bool = False  # x and dy as non-contiguous views (every other channel of a wider tensor)

    @property
    def world(self) -> int:
        return len(self.batches)

    @property
    def channels(self) -> int:
        return self.tail[0]

    @property
    def id(self) -> str:
        layout = "cl" if self.channels_last else "contig"
        shape = "x".join(map(str, self.tail))
        parts = [f"w{self.world}", "n" + "-".join(map(str, self.batches)), shape, DTYPE_NAMES[self.dtype], layout]
        if self.param_dtype != torch.float32:
            parts.append("p" + DTYPE_NAMES[self.param_dtype])
        if not self.affine:
            parts.append("noaffine")
        elif not self.bias:
            parts.append("nobias")
        if not self.track_running_stats:
            parts.append("notrack")
        if self.momentum is None:
            parts.append("cumulative")
        if not self.training:
            parts.append("eval")
        if self.device != "cpu":
            parts.append(self.device)
        if self.activation is not None:
            parts.append(self.activation)
        if self.residual is not None:
            parts.append(f"residual_{self.residual}")
        if self.strided:
            parts.append("strided")
        return "-".join(parts)


def memory_format_of(case: Case) -> torch.memory_format:
    if not case.channels_last:
        return torch.contiguous_format
    return torch.channels_last if len(case.tail) == 3 else torch.channels_last_3d


def _generator(case: Case, *salt: int) -> torch.Generator:
    return torch.Generator().manual_seed(hash((case.seed, *salt)) % (2**63))


def global_residual(case: Case, step: int) -> torch.Tensor | None:
    """The residual of the whole group for one step (rounded to ``case.dtype``), if the case has one."""
    if case.residual is None:
        return None
    gen = _generator(case, 3, step)
    shape = (sum(case.batches), *case.tail)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(case.dtype).double()


def global_batch(case: Case, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, dy) of the whole group for one step, float64 values already rounded to ``case.dtype``."""
    gen = _generator(case, 1, step)
    shape = (sum(case.batches), *case.tail)
    broadcast = (1, case.channels) + (1,) * (len(case.tail) - 1)
    means = case.mean_offset + case.mean_scale * torch.randn(case.channels, generator=gen, dtype=torch.float64)
    low, high = case.std_range
    stds = low + (high - low) * torch.rand(case.channels, generator=gen, dtype=torch.float64)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * stds.view(broadcast) + means.view(broadcast)
    dy = torch.randn(shape, generator=gen, dtype=torch.float64)
    return x.to(case.dtype).double(), dy.to(case.dtype).double()


def rank_rows(case: Case, rank: int) -> slice:
    start = sum(case.batches[:rank])
    return slice(start, start + case.batches[rank])


def initial_state(case: Case) -> dict[str, torch.Tensor]:
    """Parameters and buffers every rank starts from (float64; cast to the module's dtype)."""
    gen = _generator(case, 2)
    channels = case.channels
    return {
        "weight": 1.0 + 0.5 * torch.randn(channels, generator=gen, dtype=torch.float64),
        "bias": torch.randn(channels, generator=gen, dtype=torch.float64),
        "running_mean": 0.5 * torch.randn(channels, generator=gen, dtype=torch.float64),
        "running_var": 0.5 + torch.rand(channels, generator=gen, dtype=torch.float64),
    }


def oracle(case: Case) -> dict[str, object]:
    """float64 BatchNorm on the concatenated global batch, step by step, like ``torch.nn.BatchNorm``."""
    state = {name: value.to(case.param_dtype).double() for name, value in initial_state(case).items()}
    weight = state["weight"].clone().requires_grad_(case.affine)
    bias = state["bias"].clone().requires_grad_(case.affine and case.bias)
    running_mean = state["running_mean"].clone() if case.track_running_stats else None
    running_var = state["running_var"].clone() if case.track_running_stats else None
    num_batches = 0
    use_batch_stats = case.training or not case.track_running_stats
    outputs, input_grads, weight_grads, bias_grads, residual_grads = [], [], [], [], []
    for step in range(case.steps):
        x, dy = global_batch(case, step)
        x.requires_grad_(True)
        residual = global_residual(case, step)
        if residual is not None:
            residual.requires_grad_(True)
        factor = case.momentum if case.momentum is not None else 0.0
        if case.training and case.track_running_stats:
            num_batches += 1
            if case.momentum is None:
                factor = 1.0 / num_batches
        update = case.training and case.track_running_stats
        if x.shape[0] == 0:  # documented: an all-empty step leaves the running statistics alone
            y = x * 0
        else:
            y = F.batch_norm(
                x,
                running_mean if (update or not case.training) else None,
                running_var if (update or not case.training) else None,
                weight if case.affine else None,
                bias if case.affine and case.bias else None,
                use_batch_stats,
                factor,
                case.eps,
            )
        y = fused_epilogue(y, residual, case.activation, case.negative_slope)
        params = [x] + ([weight] if case.affine else []) + ([bias] if case.affine and case.bias else [])
        params += [residual] if residual is not None else []
        grads = torch.autograd.grad(y, params, dy, allow_unused=True, materialize_grads=True)
        residual_grads.append(grads[-1] if residual is not None else None)
        outputs.append(y.detach())
        input_grads.append(grads[0])
        weight_grads.append(grads[1] if case.affine else None)
        bias_grads.append(grads[2] if case.affine and case.bias else None)
    return {
        "outputs": outputs,
        "input_grads": input_grads,
        "weight_grads": weight_grads,
        "bias_grads": bias_grads,
        "residual_grads": residual_grads,
        "running_mean": running_mean,
        "running_var": running_var,
        "num_batches_tracked": num_batches if case.track_running_stats else None,
    }


def fused_epilogue(
    y: torch.Tensor, residual: torch.Tensor | None, activation: str | None, negative_slope: float
) -> torch.Tensor:
    """The reference for the fused tail: ``act(y + residual)`` with torch's own activations."""
    if residual is not None:
        y = y + residual
    if activation == "relu":
        return F.relu(y)
    if activation == "leaky_relu":
        return F.leaky_relu(y, negative_slope)
    if activation == "silu":
        return F.silu(y)
    return y


def relative_l2_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected|| / ||expected||`` in float64."""
    return float((actual.double() - expected).norm() / expected.norm())


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """Compare against the float64 oracle with the tolerance of ``dtype``, scaled to the values."""
    atol, rtol = TOLERANCES[dtype]
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(actual.double(), expected, atol=atol * scale, rtol=rtol, msg=lambda m: f"{what}: {m}")


def check_case(case: Case, per_rank: list[dict[str, object] | None]) -> None:
    """Check the results of ``rank_tasks.run_case`` on every rank of the group against the oracle.

    Outputs and input grads row-slice the oracle's; weight/bias grads summed over ranks equal the
    oracle's (DDP averages them); running statistics equal the oracle's and are bitwise identical
    on every rank; num_batches_tracked matches; dtypes and memory formats are kept.
    """
    expected = oracle(case)
    members = per_rank[: case.world]
    assert all(result is not None for result in members)
    assert all(result is None for result in per_rank[case.world :]), "ranks outside the group must do nothing"
    for step in range(case.steps):
        for rank, result in enumerate(members):
            rows = rank_rows(case, rank)
            where = f"{case.id} step {step} rank {rank}"
            assert_close(result["outputs"][step], expected["outputs"][step][rows], case.dtype, f"{where} output")
            assert_close(result["input_grads"][step], expected["input_grads"][step][rows], case.dtype, f"{where} dx")
            if case.residual is not None:
                got = result["residual_grads"][step]
                assert_close(got, expected["residual_grads"][step][rows], case.dtype, f"{where} residual grad")
        for name in ("weight_grads", "bias_grads"):
            if expected[name][step] is None:
                assert all(result[name][step] is None for result in members), name
                continue
            total = sum(result[name][step].double() for result in members)
            assert_close(total, expected[name][step], case.param_dtype, f"{case.id} step {step} summed {name}")
    for name in ("running_mean", "running_var"):
        if expected[name] is None:
            assert all(result[name] is None for result in members), name
            continue
        assert_close(members[0][name], expected[name], case.param_dtype, f"{case.id} {name}")
        for rank, result in enumerate(members):
            assert torch.equal(result[name], members[0][name]), f"{case.id} {name} differs on rank {rank}"
    for result in members:
        assert result["num_batches_tracked"] == expected["num_batches_tracked"]
        assert result["layouts_kept"], f"{case.id}: output or grad lost the input's dtype/memory format"
        assert all(dtype == case.param_dtype for dtype in result["param_dtypes"].values())
