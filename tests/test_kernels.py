"""Each kernel contract, through Triton's interpreter and the plain-torch path, against float64.

Runs in a worker process started with ``TRITON_INTERPRET=1`` (the interpreter must be chosen
before triton is imported). Outputs are poisoned with NaN before the kernels run, so an
element a kernel fails to write shows up.
"""

from __future__ import annotations

import pytest
import torch

from kernel_tasks import (
    NEGATIVE_SLOPE,
    KernelCase,
    make_inputs,
    module_merge_tickets,
    parameter_dtype,
    run_kernel_case,
    run_reductions_keep_non_finite_channels_apart,
    split_merges_in_any_arrival_order,
)
from oracle import assert_close, fused_epilogue
from triton_syncbn.contract import Epilogue

pytestmark = pytest.mark.interpreter

EPS, MOMENTUM, NUM_BATCHES = 1e-3, 0.25, 3

CASES = [
    KernelCase((6, 5, 7, 9)),  # launchers' own tiling
    KernelCase((6, 5, 7, 9), tiles=(2, 16, 5)),  # 5 splits, a short last chunk, a partial channel block
    KernelCase((1, 4, 6, 10), tiles=(1, 16, 4)),  # batch 1: the channel split along S only
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
    # channels_last with C a multiple of 8: 128-bit channel runs (CVEC = 8 for bf16)
    KernelCase((3, 16, 2, 3), torch.bfloat16, "channels_last", activation="relu", residual="same"),
    # 300 splits per channel, 8 channels per program: one merge level, three steps of 128 rows
    KernelCase((300, 5, 1, 16), torch.float32, "channels_last", tiles=(8, 16, 300)),
    # 64 channels per program (the launchers' channels_last block), 64 splits: 4 groups of 16, then
    # a second merge level over the groups
    KernelCase((64, 64, 1, 2), torch.float32, "channels_last", tiles=(64, 1, 64), activation="relu"),
    # fused epilogues: act(bn(x) [+ residual]), backward through the recomputed pre-activation
    KernelCase((6, 5, 7, 9), tiles=(2, 16, 5), activation="relu", residual="same"),
    KernelCase(
        (4, 5, 3, 6), torch.bfloat16, "channels_last", tiles=(4, 8, 3), activation="silu", residual="contiguous"
    ),
    KernelCase((6, 4, 10), tiles=(2, 8, 4), mode="running", activation="leaky_relu", residual="same"),
    KernelCase((37, 6), torch.float16, tiles=(8, 4, 4), activation="leaky_relu", weight=False, bias=False),
    KernelCase((3, 4, 2, 3, 5), torch.float64, "channels_last", activation="silu", residual="same"),
    # the launchers' own tiling aimed at a GPU's grid (4 x 132 programs): many splits along N and S
    KernelCase((4, 2, 16, 64), programs=528),
    KernelCase((3, 2, 40, 72), programs=528, mode="cumulative"),  # S % 4 == 0: 128-bit runs, 3 x 6 splits
    KernelCase((6, 3, 8, 12), tiles=(1, 32, 16), activation="silu"),  # 6 N splits x 2 S splits, short last S chunk
    KernelCase((4, 5, 3, 6), torch.bfloat16, "channels_last", programs=528, activation="relu", residual="same"),
    KernelCase((6, 4, 10), mode="running", programs=528),
    # the statistics' parked lanes (kernels/stats.py): 128-bit runs with partial steps along N and
    # S (lanes shifted by 8 different elements; 16-bit: two lanes per accumulator), along S only,
    # whole steps only, and channels_last channels past C parked on channels c mod C
    KernelCase((5, 3, 4, 12), torch.bfloat16, tiles=(1, 128, 3)),
    KernelCase((8, 3, 4, 12), torch.bfloat16, tiles=(1, 256, 3), activation="silu"),
    KernelCase((4, 3, 8, 8), tiles=(1, 128, 2), activation="relu"),
    KernelCase((6, 12, 3, 3), torch.float32, "channels_last", tiles=(8, 32, 3)),
    # ... 16-bit with N whole and S not: the whole columns in a loop with no select, then the partial
    # last column in a loop of its own (TAIL_LOOP): 2 row blocks per split, 2 whole columns of 128
    # positions and one of 64; split along S, a split of 3 whole columns and one of a whole column
    # and a partial one of 64 (the (8, 3, 4, 12) case above: a split of only a partial column)
    KernelCase((16, 3, 16, 20), torch.bfloat16, tiles=(1, 512, 2)),
    KernelCase((4, 3, 24, 24), torch.float16, tiles=(1, 256, 4), activation="relu", residual="same"),
    # the gradient sums' folded accumulators (16-bit, 32 elements per thread and step): channels_last
    # 300 rows in 2 splits of 64-row steps (whole and masked steps), and contiguous rows of 1024
    # positions, 4 samples per step (6 samples: a whole and a masked step), both through an activation
    KernelCase((50, 64, 2, 3), torch.bfloat16, "channels_last", tiles=(64, 64, 2), activation="relu", residual="same"),
    KernelCase((6, 3, 32, 32), torch.bfloat16, tiles=(1, 4096, 1), activation="silu", residual="contiguous"),
    # channels_last_3d with one sample: the view does not collapse to rows, so the walk steps along
    # S one position at a time (BLOCK_S = 1 with S > 1), split along S
    KernelCase((1, 3, 2, 3, 4), torch.float32, "channels_last", tiles=(4, 4, 4)),
    # channel runs (S odd, contiguous): 2 runs of 4 fp32 channels; runs of 20 with C = 28 (the last
    # run 8 channels) and many splits along N; bf16 runs of 8 channels x 25. The reductions'
    # splits along N: 2 whole steps of 8 samples and a masked step of 4 (fp32); bf16 splits of 40
    # samples: statistics 1 whole step of 32 in 4 folded slices of 8 and a masked step of 8 (one
    # slice read, three skipped), gradient sums 2 whole steps of 16 (2 slices) and a masked 8
    KernelCase((3, 8, 7, 7), activation="relu", residual="same"),
    KernelCase((5, 28, 7, 7), programs=528),
    KernelCase((2, 16, 5, 5), torch.bfloat16, activation="silu", residual="contiguous"),
    KernelCase((40, 8, 7, 7), activation="leaky_relu", residual="same"),
    KernelCase((80, 16, 5, 5), torch.bfloat16, mode="cumulative"),
    # edges mode (S odd and long, contiguous): each row's aligned interior with 128-bit accesses, the
    # elements around it after the loop. fp32 S = 169 (interior 164, 5 edge elements per row); fp32
    # S = 961 split along N and S for a GPU-sized grid (interior 956: a whole and a partial step);
    # bf16 S = 361 (interior 352, 9 edge elements)
    KernelCase((3, 4, 13, 13), activation="relu", residual="same"),
    KernelCase((3, 4, 31, 31), programs=528, mode="cumulative"),
    KernelCase((2, 8, 19, 19), torch.bfloat16, activation="silu", residual="same"),
]

# the channels per run (launchers.channel_run_tiling) of the channel-run cases above, and the
# FOLD of their statistics and gradient sums there
CHANNEL_RUN_CASES = {
    CASES[-8].id: (4, 1, 1),
    CASES[-7].id: (20, 1, 1),
    CASES[-6].id: (8, 1, 1),
    CASES[-5].id: (4, 1, 1),
    CASES[-4].id: (8, 4, 2),
}
# the edges-mode cases above: their aligned interiors' length
EDGE_CASES = {CASES[-3].id: 164, CASES[-2].id: 956, CASES[-1].id: 352}

# the FOLD of the gradient sums of these cases (the two folded cases above; 16-bit cases with
# small steps and fp32 do not fold)
GRADIENT_FOLD_CASES = {
    KernelCase((50, 64, 2, 3), torch.bfloat16, "channels_last", tiles=(64, 64, 2), activation="relu",
               residual="same").id: 2,
    KernelCase((6, 3, 32, 32), torch.bfloat16, tiles=(1, 4096, 1), activation="silu", residual="contiguous").id: 2,
    KernelCase((5, 3, 4, 12), torch.bfloat16, tiles=(1, 128, 3)).id: 1,
    KernelCase((4, 3, 8, 8), tiles=(1, 128, 2), activation="relu").id: 1,
}  # fmt: skip

# (WHOLE_N, WHOLE_S, FOLD, TAIL_LOOP) of the statistics launch of each parked-lane case above
PARKED_LANE_CASES = {
    KernelCase((5, 3, 4, 12), torch.bfloat16, tiles=(1, 128, 3)).id: (False, False, 2, True),
    KernelCase((8, 3, 4, 12), torch.bfloat16, tiles=(1, 256, 3), activation="silu").id: (True, False, 2, True),
    KernelCase((4, 3, 8, 8), tiles=(1, 128, 2), activation="relu").id: (True, True, 1, False),
    KernelCase((6, 12, 3, 3), torch.float32, "channels_last", tiles=(8, 32, 3)).id: (False, True, 1, False),
    KernelCase((16, 3, 16, 20), torch.bfloat16, tiles=(1, 512, 2)).id: (True, False, 2, True),
    KernelCase((4, 3, 24, 24), torch.float16, tiles=(1, 256, 4), activation="relu", residual="same").id: (
        True, False, 2, True
    ),
}  # fmt: skip


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
        assert 0 < results["tiling"].splits <= case.tiles[2]
    if case.tiles == (64, 1, 64):
        assert results["merge_groups"] > 1, "the second merge level is not exercised"
    assert results["tickets_left_zero"], "the split merges left a ticket non-zero"
    for backend in ("triton", "torch"):
        got = results[backend]
        # normalize bumps num_batches_tracked (on the device) whenever it uses batch statistics
        assert got["num_batches_tracked"] == NUM_BATCHES + (case.mode == "running") * -1, backend
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


def test_gpu_sized_grid_splits_along_n_and_s() -> None:
    """The GPU-grid and forced cases above really run many programs per channel, along N and S."""
    from triton_syncbn import launchers

    case = next(case for case in CASES if case.programs and case.mode == "cumulative")
    view = torch.empty(case.shape).view(case.shape[0], case.shape[1], -1)
    tiling = launchers.choose_tiling(view, case.programs)
    assert (tiling.n_splits, tiling.s_splits, tiling.block_s) == (3, 6, 512)
    assert launchers.spatial_vector(tiling, view) == 4
    case = next(case for case in CASES if case.tiles == (1, 32, 16))
    view = torch.empty(case.shape).view(case.shape[0], case.shape[1], -1)
    tiling = launchers.Tiling.split(view, *case.tiles)
    assert (tiling.n_splits, tiling.s_splits, tiling.chunk_s) == (6, 2, 64)


@pytest.mark.parametrize("case", [case for case in CASES if case.id in PARKED_LANE_CASES], ids=lambda case: case.id)
def test_parked_lane_cases_cover_partial_and_whole_steps(case: KernelCase) -> None:
    """The statistics kernel leaves out the masks where every step is whole (WHOLE_N/WHOLE_S) and
    parks the other lanes; the cases above reach each combination, with 128-bit runs, and 16-bit
    ones walk a partial last column in a loop of its own (TAIL_LOOP)."""
    from kernel_tasks import _layout, _tiling
    from triton_syncbn import launchers
    from triton_syncbn.layout import channel_view

    launches = []
    dispatch = launchers.Dispatch(4, lambda kernel, grid, args, kwargs: launches.append(kwargs))
    view = channel_view(_layout(torch.empty(case.shape, dtype=case.dtype), case.layout))
    launchers.partial_stats(view, tiling=_tiling(case, view), dispatch=dispatch)
    (kwargs,) = launches
    flags = (kwargs["WHOLE_N"], kwargs["WHOLE_S"], kwargs["FOLD"], kwargs["TAIL_LOOP"])
    assert flags == PARKED_LANE_CASES[case.id], kwargs
    assert kwargs["VEC"] * kwargs["CVEC"] > 1, kwargs


def test_tail_loop_cases_have_whole_and_partial_columns() -> None:
    """The two TAIL_LOOP cases above walk what their comment says: (block_n, chunk_n, block_s,
    chunk_s, s_splits) of their forced tilings."""
    from triton_syncbn import launchers

    expected = {(16, 3, 16, 20): (4, 8, 128, 384, 1), (4, 3, 24, 24): (2, 2, 128, 384, 2)}
    for shape, geometry in expected.items():
        view = torch.empty(shape, dtype=torch.bfloat16).view(shape[0], shape[1], -1)
        case = next(case for case in CASES if case.shape == shape)
        tiling = launchers.Tiling.split(view, *case.tiles)
        assert (tiling.block_n, tiling.chunk_n, tiling.block_s, tiling.chunk_s, tiling.s_splits) == geometry


@pytest.mark.parametrize("case", [case for case in CASES if case.id in GRADIENT_FOLD_CASES], ids=lambda case: case.id)
def test_gradient_fold_cases_fold_where_expected(case: KernelCase) -> None:
    """The gradient sums fold their per-lane accumulators (FOLD = 2) in the cases above that should,
    so the oracle cases check the folded kernel, and not where steps are small or fp32."""
    from kernel_tasks import _layout, _tiling
    from triton_syncbn import launchers
    from triton_syncbn.contract import SavedStatistics
    from triton_syncbn.layout import channel_view

    launches = []
    dispatch = launchers.Dispatch(4, lambda kernel, grid, args, kwargs: launches.append(kwargs))
    view = channel_view(_layout(torch.empty(case.shape, dtype=case.dtype), case.layout))
    channels = case.shape[1]
    saved = SavedStatistics(torch.zeros(channels), torch.ones(channels), torch.full((channels,), 2.0))
    launchers.backward_reduce(view, view, None, None, saved, Epilogue(), None, None, tiling=_tiling(case, view),
                              dispatch=dispatch)  # fmt: skip
    (kwargs,) = launches
    assert kwargs["FOLD"] == GRADIENT_FOLD_CASES[case.id], kwargs


def _training_step_launches(case: KernelCase) -> tuple[list[tuple[str, dict, dict]], torch.Tensor]:
    """``(launches, x)``: the (kernel name, positional arguments by name and its ``"grid"``, keyword
    arguments) of the four launches of a training step on ``case``'s ``[N, C, S]`` view ``x``,
    recorded, not run."""
    from kernel_tasks import _layout
    from triton_syncbn import launchers
    from triton_syncbn.contract import SavedStatistics
    from triton_syncbn.layout import channel_view

    launches = []

    def record(kernel: object, grid: tuple[int, ...], args: tuple[object, ...], kwargs: dict) -> None:
        launches.append((kernel.__name__, {**dict(zip(kernel.arg_names, args, strict=False)), "grid": grid}, kwargs))

    dispatch = launchers.Dispatch(case.programs or 4, record)
    x = channel_view(_layout(torch.empty(case.shape, dtype=case.dtype), case.layout))
    stats = torch.rand(3, case.shape[1], dtype=torch.float64)
    launchers.partial_stats(x, dispatch=dispatch)
    mean, invstd = launchers.normalize(
        x, torch.empty_like(x), None, None, stats, None, 1e-5, Epilogue(), dispatch=dispatch
    )
    saved = SavedStatistics(mean, invstd, stats[0])
    sums = torch.zeros(2, case.shape[1], dtype=mean.dtype)
    launchers.backward_reduce(x, x, None, None, saved, Epilogue(), None, None, dispatch=dispatch)
    launchers.backward_dx(x, x, torch.empty_like(x), None, None, saved, sums, Epilogue(), dispatch=dispatch)
    return launches, x


@pytest.mark.parametrize("case", [case for case in CASES if case.id in CHANNEL_RUN_CASES], ids=lambda case: case.id)
def test_channel_run_cases_walk_runs_with_128_bit_accesses(case: KernelCase) -> None:
    """Every kernel walks channel runs in these cases (S odd: no aligned runs within a channel),
    with 16-byte vectors along the runs; the oracle cases above check what they compute."""
    from triton_syncbn import launchers

    launches, x = _training_step_launches(case)
    names = [name for name, _, _ in launches]
    assert names == ["_run_stats_kernel", "_normalize_kernel", "_run_backward_reduce_kernel", "_backward_dx_kernel"]
    run, *folds = CHANNEL_RUN_CASES[case.id]
    for name, args, kwargs in launches:
        assert kwargs.get("RUN_CHANNELS") == run, kwargs
        assert kwargs["VEC"] == 16 // x.element_size(), kwargs
        if name.startswith("_run_"):  # the reductions: FOLD, and at most RUN_REDUCTION_STEPS whole steps each
            assert kwargs["FOLD"] == folds[name == "_run_backward_reduce_kernel"], kwargs
            assert args["chunk_n"] // kwargs["BLOCK_N"] <= launchers.RUN_REDUCTION_STEPS, (args, kwargs)


@pytest.mark.parametrize("case", [case for case in CASES if case.id in EDGE_CASES], ids=lambda case: case.id)
def test_edge_cases_walk_aligned_interiors_with_128_bit_accesses(case: KernelCase) -> None:
    """Every kernel of the edges-mode cases walks the rows' aligned interiors (S passed as the
    interior's length, the true one as channel_size) with 16-byte vectors; the oracle cases above
    check what they compute, edges included. The GPU-grid case splits rows along S too, so the
    edges belong to one split of each row."""
    launches, x = _training_step_launches(case)
    names = [name for name, _, _ in launches]
    assert names == ["_partial_stats_kernel", "_normalize_kernel", "_backward_reduce_kernel", "_backward_dx_kernel"]
    for name, args, kwargs in launches:
        assert kwargs["EDGES"] and kwargs["VEC"] == 16 // x.element_size(), (name, kwargs)
        assert (args["S"], kwargs["channel_size"]) == (EDGE_CASES[case.id], x.shape[2]), (name, args)
        if case.programs:
            assert args["s_splits"] > 1, (name, args)


def test_channel_run_reductions_split_deep_batches_into_short_walks() -> None:
    """A channel-run reduction's program takes at most RUN_REDUCTION_STEPS whole steps (its fp32
    lanes then sum a bounded number of values, as the flushing per-channel kernel's do); a batch
    too deep for that within MAX_SPLITS keeps the per-channel walk. The grid aims at one wave."""
    from triton_syncbn import launchers

    deep = launchers.channel_run_tiling(torch.empty(3000, 4, 49), 660, reduction=True)
    assert deep is not None and deep.run_channels == 4
    assert deep.chunk_n <= launchers.RUN_REDUCTION_STEPS * deep.block_n
    assert deep.chunk_n * deep.n_splits >= 3000 and deep.s_splits == 1
    assert launchers.channel_run_tiling(torch.empty(300000, 4, 49), 660, reduction=True) is None
    s1 = launchers.channel_run_tiling(torch.empty(32, 2048, 49), 660, reduction=True)  # S1 fp32 on an H200
    assert (s1.run_channels, s1.chunk_n, s1.n_splits) == (20, 6, 6)  # 618 programs: 4.7 per SM, one wave
    for channels in (8, 28, 2048):
        tiling = launchers.channel_run_tiling(torch.empty(32, channels, 49), 660, reduction=True)
        needed = launchers._tickets_needed(channels, tiling.block_c, tiling.splits, tiling.run_channels)
        assert needed <= launchers.merge_tickets_size(channels), channels


def test_normalize_runs_split_small_tensors_into_one_wave() -> None:
    """normalize (5 programs per SM fit) splits a small tensor's runs in samples, for one wave of
    at least 4 programs per SM on an H200; the input gradient (4 fit) keeps whole steps."""
    from triton_syncbn import launchers

    x = torch.empty(32, 2048, 49, dtype=torch.bfloat16)  # S1 bf16: 52 runs of 40 channels
    normalize = launchers.channel_run_tiling(x, 660, one_wave=True)
    assert (normalize.run_channels, normalize.chunk_n, normalize.n_splits) == (40, 3, 11)  # 572 programs
    dx = launchers.channel_run_tiling(x, 660)
    assert dx.chunk_n % dx.block_n == 0 and dx.n_splits == 16


def test_channel_run_reductions_keep_non_finite_channels_apart(clusters) -> None:
    """An Inf or NaN in one channel of a run stays in that channel: the segmented sums over a
    run's positions restart at every channel (a select, not a subtraction)."""
    report = clusters("interpreter").run(run_reductions_keep_non_finite_channels_apart)[0]
    assert report["kernels"] == ["_run_stats_kernel", "_run_backward_reduce_kernel"]
    for name in ("stats", "sums"):
        got, expected = report[name], report[f"expected_{name}"]
        # (a non-finite channel's sums may be Inf or NaN: the moments subtract them; torch's variance is NaN)
        assert torch.equal(torch.isfinite(got), torch.isfinite(expected)), (name, got, expected)
        finite = torch.isfinite(expected)
        torch.testing.assert_close(got[finite], expected[finite], rtol=1e-5, atol=1e-4)


def test_splits_actually_split(clusters) -> None:
    """The forced tilings above really run several programs per channel (the in-kernel merges)."""
    results = clusters("interpreter").run(run_kernel_case, CASES[1])[0]
    assert results["tiling"].splits > 1


def test_float_arguments_reach_the_kernels_as_exact_float32_halves() -> None:
    """Compiled Triton passes Python floats as float32 (the interpreter keeps float64, so the
    oracle tests cannot see it): on an H200 a float64 layer with leaky_relu(0.01) was off by 2e-8
    relative. Every float a launcher passes is half of a (float32-exact high, remainder) pair,
    and eps, momentum and the slope come back whole from the two halves as the GPU sees them."""
    import numpy as np

    from triton_syncbn import launchers
    from triton_syncbn.contract import Epilogue, RunningStats, SavedStatistics
    from triton_syncbn.kernels.activation import ACTIVATION_CODES

    floats: list[float] = []

    def record(kernel: object, grid: tuple[int, ...], args: tuple[object, ...], kwargs: dict) -> None:
        floats.extend(arg for arg in args if isinstance(arg, float))

    dispatch = launchers.Dispatch(programs=4, launch=record)
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    weight, bias = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    stats = torch.rand(3, 4, dtype=torch.float64)
    running = RunningStats(torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64),
                           torch.zeros((), dtype=torch.int64), 0.1)  # fmt: skip
    epilogue = Epilogue(None, ACTIVATION_CODES["leaky_relu"], 0.01)
    out = torch.empty_like(x)
    mean, invstd = launchers.normalize(x, out, weight, bias, stats, running, 1e-5, epilogue, dispatch=dispatch)
    saved = SavedStatistics(mean, invstd, torch.full((4,), 15.0, dtype=torch.float64))
    sums, _, _ = launchers.backward_reduce(
        x, x, weight, bias, saved, epilogue, torch.float64, torch.float64, dispatch=dispatch
    )
    launchers.backward_dx(x, x, out, weight, bias, saved, sums, epilogue, dispatch=dispatch)
    assert floats and len(floats) % 2 == 0, floats
    highs, lows = np.float32(floats[0::2]), np.float32(floats[1::2])  # what a compiled kernel receives
    assert all(float(high) == value for high, value in zip(highs, floats[0::2], strict=True)), floats
    pairs = {float(np.float64(high) + np.float64(low)) for high, low in zip(highs, lows, strict=True)}
    for value in (0.1, 1e-5, 0.01):
        assert any(abs(pair - value) <= 1e-15 * value for pair in pairs), (value, floats)


@pytest.mark.parametrize(
    ("shape", "dtype", "memory_format", "expected"),
    [
        ((4, 256, 7, 7), torch.bfloat16, torch.channels_last, 8),
        ((4, 256, 7, 7), torch.float32, torch.channels_last, 4),
        ((2, 64, 3, 4, 5), torch.float16, torch.channels_last_3d, 8),
        ((4, 250, 7, 7), torch.bfloat16, torch.channels_last, 1),  # C not a multiple of the run
        ((4, 256, 7, 7), torch.bfloat16, torch.contiguous_format, 1),  # channels are not the unit stride
        ((64, 1024), torch.bfloat16, torch.contiguous_format, 8),  # 2-D: channels contiguous
    ],
    ids=["cl-bf16", "cl-f32", "cl3d-f16", "cl-c250", "contiguous", "2d"],
)
def test_channel_runs_are_vectorized_only_where_aligned(shape, dtype, memory_format, expected) -> None:
    """CVEC, the channels per 16-byte access the launchers promise the compiler (Triton 3.6 emits
    scalar channels_last accesses without it): set exactly where every run of channels is
    contiguous, inside one row and one program, and 16-byte aligned."""
    from triton_syncbn import launchers
    from triton_syncbn.layout import channel_view

    launches = []
    dispatch = launchers.Dispatch(660, lambda kernel, grid, args, kwargs: launches.append((kernel, kwargs)))
    x = torch.empty(shape, dtype=dtype).contiguous(memory_format=memory_format)
    stats = launchers.partial_stats(channel_view(x), dispatch=dispatch)
    out = torch.empty_like(x)
    launchers.normalize(channel_view(x), channel_view(out), None, None, stats, None, 1e-5, Epilogue(),
                        dispatch=dispatch)  # fmt: skip
    streaming = [kwargs["CVEC"] for kernel, kwargs in launches if "CVEC" in kwargs]
    assert streaming and all(cvec == expected for cvec in streaming), streaming


def test_module_keeps_its_merge_tickets_zero(clusters) -> None:
    """The module makes its split-merge tickets once per device, keeps them out of its state, and
    its split reductions leave them zero; the functional API (tickets per call) agrees bitwise."""
    result = clusters("interpreter").run(module_merge_tickets)[0]
    assert result == {"kept": True, "zero": True, "same_output": True, "not_state": True}


def test_split_merges_give_the_same_bits_in_any_arrival_order(clusters) -> None:
    """The in-kernel merges with the programs run in shuffled orders (a different program takes
    each last ticket, one and two merge levels): the same bits as in grid order, float64-accurate,
    tickets left zero. On a GPU the order is the hardware's; this is the interpreter's stand-in."""
    report = clusters("interpreter").run(split_merges_in_any_arrival_order, 7)[0]
    assert report == {"same_bits": True, "accurate": True, "tickets_zero": True, "orders": 6}, report


def test_merge_tickets_are_checked() -> None:
    """Tickets of the wrong size, dtype or device are a clear error, not a silent wrong merge."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from codegen import recording

    from triton_syncbn import launchers

    x = torch.empty(64, 8, 32, 32, device="meta")
    dispatch, launches = recording(528)
    view = x.view(64, 8, 1024)
    launchers.partial_stats(view, None, dispatch=dispatch)  # None: allocated for the call
    assert dict(zip(launches[0].kernel.arg_names, launches[0].args, strict=False))["num_splits"] > 1
    for bad in (torch.zeros(1, dtype=torch.int32, device="meta"), torch.zeros(64, device="meta")):
        with pytest.raises(ValueError, match="merge_tickets must be int32 zeros"):
            launchers.partial_stats(view, bad, dispatch=dispatch)
    assert launchers.new_merge_tickets(8, x.device).numel() == launchers.merge_tickets_size(8) >= 8


@pytest.mark.parametrize(
    ("case", "warps"),
    [
        (KernelCase((256, 4096), torch.bfloat16, programs=660), [2, 2, 2, 2]),
        (KernelCase((256, 4096), torch.float32, programs=660), [4, 4, 4, 4]),
        (KernelCase((32, 2048, 7, 7), torch.bfloat16, "channels_last", programs=660), [4, 2, 4, 4]),
    ],
    ids=["S2-bf16", "S2-f32", "S1-channels_last-bf16"],
)
def test_small_one_step_programs_run_on_half_the_warps(case: KernelCase, warps: list[int]) -> None:
    """A 16-bit tensor so small that every program takes one short step (S2, 256 x 4096, on an
    H200's grid: 132 SMs x PROGRAMS_PER_SM) runs each program on 2 warps, the same elements per
    program: every kernel of S2's step. S1 channels_last's steps are 64 bytes a thread and tensor:
    its normalize (x, fewer than 128 bytes a thread in all) runs on 2, not the reductions (64
    bytes of a tensor) or dx (dy and x). fp32 keeps 4 (the model's S2 fp32 forward was slower on 2)."""
    launches, _ = _training_step_launches(case)
    assert [kwargs["num_warps"] for _, _, kwargs in launches] == warps, launches


@pytest.mark.parametrize(
    ("case", "normalize_programs", "dx_programs"),
    [
        (KernelCase((128, 512, 28, 28), torch.bfloat16, "channels_last", programs=660), (528, 660), 784),
        (KernelCase((128, 512, 28, 28), torch.float32, "channels_last", programs=660), (528, 660), (528, 660)),
        (KernelCase((2, 32, 128, 128, 128), torch.bfloat16, programs=660), (528, 660), (528, 660)),
        (KernelCase((32, 2048, 7, 7), torch.bfloat16, "channels_last", programs=660), 800, 800),
    ],
    ids=["S5-channels_last-bf16", "S5-channels_last-f32", "S11-bf16", "S1-channels_last-bf16"],
)
def test_elementwise_kernels_run_one_wave_of_long_programs(
    case: KernelCase, normalize_programs: int | tuple[int, int], dx_programs: int | tuple[int, int]
) -> None:
    """normalize and dx take one wave of 4-5 programs per SM (on a GPU of 132 SMs: 528-660) where
    the tensor has two steps or more for each, instead of a grid of 16-step programs whose last
    partial wave ran a few programs per SM (the model: channels_last bf16 normalize at 67-76% of
    copy). Not dx on 16-bit channels_last (4 programs per SM resident: 5.9 per SM run 1.5 waves),
    nor where programs take one step each (S1)."""
    launches, _ = _training_step_launches(case)
    programs = {name: args["grid"][0] * args["grid"][1] for name, args, _ in launches}
    for name, expected in (("_normalize_kernel", normalize_programs), ("_backward_dx_kernel", dx_programs)):
        if isinstance(expected, tuple):
            assert expected[0] <= programs[name] <= expected[1], programs
        else:
            assert programs[name] == expected, programs


@pytest.mark.parametrize(
    ("shape", "geometry"),
    [((2, 2048, 97, 97), (2, 2048, 2, 2, True, 168)), ((128, 512, 28, 28), (64, 128, 4, 2, True, None)),
     ((32, 256, 56, 56), (32, 256, 4, 2, True, None))],
    ids=["S9", "S5", "S4"],
)  # fmt: skip
def test_padded_16_bit_statistics_take_the_usual_steps_on_half_the_warps(
    shape: tuple[int, ...], geometry: tuple[int, int, int, int, bool, int | None]
) -> None:
    """16-bit statistics take twice the elements a step, unless that pads the rows more: S9's rows
    of 9400 interior positions (edges mode) in steps of 2 x 4096 would leave 23% of the lanes idle,
    so they take the usual 2 x 2048 on 2 warps (each thread the same 64 elements). S5 and S4 keep
    the doubled step. (BLOCK_N, BLOCK_S, num_warps, FOLD, TAIL_LOOP, maxnreg) of the launch on a
    GPU's grid: the 2-warp programs are capped at 168 registers, 6 per SM."""
    launches, _ = _training_step_launches(KernelCase(shape, torch.bfloat16, programs=660))
    _, _, kwargs = launches[0]
    flags = ("BLOCK_N", "BLOCK_S", "num_warps", "FOLD", "TAIL_LOOP")
    got = (*(kwargs[flag] for flag in flags), kwargs.get("maxnreg"))
    assert got == geometry, kwargs
