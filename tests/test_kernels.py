"""Each kernel contract, through Triton's interpreter and the plain-torch path, against float64.

Runs in a worker process started with ``TRITON_INTERPRET=1`` (the interpreter must be chosen
before triton is imported). Outputs are poisoned with NaN before the kernels run, so an
element a kernel fails to write shows up.
"""

from __future__ import annotations

import pytest
import torch

from kernel_tasks import NEGATIVE_SLOPE, KernelCase, make_inputs, parameter_dtype, run_kernel_case
from oracle import assert_close, fused_epilogue

pytestmark = pytest.mark.interpreter

EPS, MOMENTUM, NUM_BATCHES = 1e-3, 0.25, 3

CASES = [
    KernelCase((6, 5, 7, 9)),  # launchers' own tiling
    KernelCase((6, 5, 7, 9), tiles=(2, 16, 5)),  # 5 splits, a short last chunk, a partial channel block
    KernelCase((4, 5, 3, 6), torch.bfloat16, "channels_last", tiles=(4, 8, 3)),
    KernelCase((37, 6), torch.float16, tiles=(8, 4, 4)),  # 2-D: channels contiguous, C < BLOCK_C
    KernelCase((3, 4, 2, 3, 5), torch.float64, "channels_last", tiles=(2, 8, 2)),  # channels_last_3d
    KernelCase((5, 3, 4, 6), layout="sliced", grad_layout="expanded", tiles=(1, 16, 4)),
    KernelCase((4, 3, 5, 6), layout="permuted", grad_layout="contiguous"),
    KernelCase((4, 3, 5, 6), layout="channels_last", grad_layout="contiguous", tiles=(2, 8, 2)),
    KernelCase((6, 4, 10), tiles=(2, 8, 4), mode="running"),
    KernelCase((6, 4, 10), mode="cumulative", weight=False, bias=False),
    KernelCase((6, 4, 10), torch.float16, tiles=(4, 16, 2), bias=False),
    KernelCase((0, 4, 3, 3)),  # an empty local batch: zero counts, running statistics unchanged
    # fused epilogues: act(bn(x) [+ residual]), backward through the recomputed pre-activation
    KernelCase((6, 5, 7, 9), tiles=(2, 16, 5), activation="relu", residual="same"),
    KernelCase(
        (4, 5, 3, 6), torch.bfloat16, "channels_last", tiles=(4, 8, 3), activation="silu", residual="contiguous"
    ),
    KernelCase((6, 4, 10), tiles=(2, 8, 4), mode="running", activation="leaky_relu", residual="same"),
    KernelCase((37, 6), torch.float16, tiles=(8, 4, 4), activation="leaky_relu", weight=False, bias=False),
    KernelCase((3, 4, 2, 3, 5), torch.float64, "channels_last", activation="silu", residual="same"),
    # the autotuned path (grid lambdas, META block sizes, restore_value, tuned chunking)
    KernelCase((4, 2, 16, 64), tuned=True),  # contiguous: 2 splits of 2048-element chunks
    KernelCase((4, 5, 3, 6), torch.bfloat16, "channels_last", tuned=True, activation="relu", residual="same"),
    KernelCase((6, 4, 10), mode="running", tuned=True),
]


def reference(case: KernelCase) -> dict[str, torch.Tensor]:
    """float64 results of every contract for one local batch."""
    inputs = make_inputs(case)
    x, dy = inputs["x"], inputs["dy"]
    channels = case.shape[1]
    per_channel = x.transpose(0, 1).reshape(channels, -1)
    count = per_channel.shape[1]
    rounded = {
        name: inputs[name].to(parameter_dtype(case)).double()
        for name in ("weight", "bias", "running_mean", "running_var")
    }
    weight = rounded["weight"] if case.weight else torch.ones(channels, dtype=torch.float64)
    bias = rounded["bias"] if case.weight and case.bias else torch.zeros(channels, dtype=torch.float64)
    running_mean, running_var = rounded["running_mean"], rounded["running_var"]
    stats = torch.stack(
        [torch.full((channels,), float(count), dtype=torch.float64), per_channel.sum(1), per_channel.square().sum(1)]
    )
    if case.mode == "running":
        mean, var = running_mean, running_var
        new_mean, new_var = running_mean, running_var
    else:
        mean = per_channel.mean(1) if count else torch.zeros(channels, dtype=torch.float64)
        var = per_channel.var(1, correction=0) if count else torch.zeros(channels, dtype=torch.float64)
        factor = 1 / NUM_BATCHES if case.mode == "cumulative" else MOMENTUM
        if count:
            new_mean = running_mean + factor * (mean - running_mean)
            new_var = running_var + factor * (per_channel.var(1, correction=1) - running_var)
        else:
            new_mean, new_var = running_mean, running_var
    invstd = 1 / torch.sqrt(var + EPS)
    view = (1, channels) + (1,) * (len(case.shape) - 2)
    xhat = (x - mean.view(view)) * invstd.view(view)
    normalized = xhat * weight.view(view) + bias.view(view)
    residual = inputs["residual"] if case.residual is not None else None
    pre_activation = normalized.detach().requires_grad_(True)
    output = fused_epilogue(pre_activation, residual, case.activation, NEGATIVE_SLOPE)
    (dy,) = torch.autograd.grad(output, pre_activation, dy)  # the gradient before the activation
    output = output.detach()
    grad_per_channel = dy.transpose(0, 1).reshape(channels, -1)
    sum_dy = grad_per_channel.sum(1)
    sum_dy_xhat = (dy * xhat).transpose(0, 1).reshape(channels, -1).sum(1)
    grad = dy
    if case.mode != "running" and count:
        grad = dy - (sum_dy / count).view(view) - xhat * (sum_dy_xhat / count).view(view)
    return {
        "stats": stats,
        "output": output,
        "mean": mean,
        "invstd": invstd,
        "running_mean": new_mean,
        "running_var": new_var,
        "sums": torch.stack([sum_dy, sum_dy_xhat]),
        "grad_weight": sum_dy_xhat,
        "grad_bias": sum_dy,
        "grad_input": grad * (weight * invstd).view(view),
        "grad_residual": dy if residual is not None else None,
    }


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_kernel_contracts(clusters, case: KernelCase) -> None:
    results = clusters("interpreter").run(run_kernel_case, case)[0]
    expected = reference(case)
    if case.tiles is not None:
        assert results["tiling"].splits == min(case.tiles[2], results["tiling"].splits) > 0
    for backend in ("triton", "torch"):
        got = results[backend]
        assert results["strides_kept"][backend], f"{backend}: output/grad memory format not kept"
        for name, value in expected.items():
            actual = got[name]
            if value is None or (
                name in ("grad_weight", "grad_bias") and not (case.weight and (case.bias or name == "grad_weight"))
            ):
                assert actual is None, f"{backend} {name} should not be computed"
                continue
            if name == "grad_residual" and case.residual == "same":
                assert actual.stride() == results[backend]["grad_input"].stride(), "residual grad layout"
            assert not torch.isnan(actual).any(), f"{backend} {name}: unwritten (NaN-poisoned) elements"
            dtype = case.dtype if name in ("output", "grad_input", "grad_residual") else torch.float32
            if name == "stats":  # float64 sums of values up to ~10 over a few hundred elements
                dtype = torch.float64 if case.dtype == torch.float64 else torch.float32
            if case.dtype == torch.float64:  # parameters and buffers are float64 too
                dtype = torch.float64
            assert_close(actual, value, dtype, f"{backend} {name} ({case.id})")


def test_tuned_case_really_splits(clusters) -> None:
    case = next(case for case in CASES if case.tuned)
    assert clusters("interpreter").run(run_kernel_case, case)[0]["tiling"] is None  # launchers' own choice
    from triton_syncbn import launchers
    from triton_syncbn.kernels.autotune import MAX_BLOCK_M

    view = torch.empty(case.shape).view(case.shape[0], case.shape[1], -1)
    heuristic = launchers.choose_tiling(view)
    assert launchers.Tiling.split(view, heuristic.block_c, MAX_BLOCK_M, heuristic.splits).splits == 2


def test_splits_actually_split(clusters) -> None:
    """The forced tilings above really run several programs per channel (the combine kernels)."""
    results = clusters("interpreter").run(run_kernel_case, CASES[1])[0]
    assert results["tiling"].splits == 5
