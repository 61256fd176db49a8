"""Opt-in tuning of the elementwise kernels (``triton_syncbn/tuning.py``): keys, tables, and that
a tuned configuration changes launches, never results.

The timing itself needs a GPU (``bench/autotune.py``); here the launch decisions are recorded
through ``launchers.Dispatch`` and the kernels run in Triton's interpreter.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kernel_tasks import elementwise_bits_under_tuning
from triton_syncbn import launchers, tuning
from triton_syncbn.contract import Epilogue, RunningStats, SavedStatistics
from triton_syncbn.layout import channel_view, empty_output_like

WIDE = tuning.ElementwiseConfig(thread_elements=4, num_warps=8, steps=64)


def test_key_buckets_shapes_and_keeps_every_flag() -> None:
    key = tuning.TuningKey.of("normalize", "contiguous", (30, 64, 49), 4, {"RESIDUAL": False, "ACTIVATION": 1})
    assert (key.batch, key.channels, key.spatial) == (32, 64, 64)
    assert key == tuning.TuningKey.of("normalize", "contiguous", (17, 33, 64), 4, {"ACTIVATION": 1, "RESIDUAL": False})
    assert key != tuning.TuningKey.of("normalize", "contiguous", (30, 64, 49), 4, {"RESIDUAL": False, "ACTIVATION": 2})
    assert tuning.TuningKey.decode(key.encode()) == key
    with pytest.raises(ValueError, match="only the elementwise kernels"):
        tuning.TuningKey.of("partial_stats", "contiguous", (2, 3, 4), 4, {})


def test_config_rejects_what_a_kernel_cannot_take() -> None:
    for bad in ({"thread_elements": 3}, {"num_warps": 32}, {"steps": 0}):
        fields = {"thread_elements": 16, "num_warps": 4, "steps": 16, **bad}
        with pytest.raises(ValueError, match="power of two"):
            tuning.ElementwiseConfig(**fields)


def test_table_round_trips_through_json(tmp_path: Path) -> None:
    key = tuning.TuningKey.of("backward_dx", "channels_last", (8, 256, 49), 2, {"BATCH_STATS": True})
    table = tuning.TuningTable({key: WIDE}, {"device": "NVIDIA H200", "triton": "3.6.0"})
    table.save(tmp_path / "tuning.json")
    loaded = tuning.TuningTable.load(tmp_path / "tuning.json")
    assert loaded.entries == {key: WIDE} and loaded.meta["device"] == "NVIDIA H200"
    (tmp_path / "old.json").write_text('{"format": 0, "entries": []}')
    with pytest.raises(ValueError, match="format"):
        tuning.TuningTable.load(tmp_path / "old.json")


def _training_step_launches(dispatch: launchers.Dispatch) -> list[tuple[str, tuple, int]]:
    """(kernel, grid, num_warps) of one forward and backward of a (4, 6, 5, 7) fp32 input."""
    records: list[tuple[str, tuple, int]] = []

    def record(kernel: object, grid: tuple[int, ...], args: tuple, kwargs: dict) -> None:
        records.append((kernel.__name__, grid, kwargs["num_warps"] if "num_warps" in kwargs else None))

    dispatch = launchers.Dispatch(132 * 5, record, dispatch.tuning)
    x = channel_view(torch.randn(4, 6, 5, 7))
    per_channel = torch.ones(6)
    stats = launchers.partial_stats(x, dispatch=dispatch)
    _, out = empty_output_like(torch.empty(4, 6, 5, 7))
    running = RunningStats(torch.zeros(6), torch.ones(6), torch.zeros((), dtype=torch.int64), 0.1)
    mean, invstd = launchers.normalize(x, out, per_channel, per_channel, stats, running, 1e-5, Epilogue(),
                                       dispatch=dispatch)  # fmt: skip
    saved = SavedStatistics(mean, invstd, stats[0])
    sums, _, _ = launchers.backward_reduce(x, x, per_channel, per_channel, saved, Epilogue(), torch.float32,
                                           torch.float32, dispatch=dispatch)  # fmt: skip
    launchers.backward_dx(x, x, out, per_channel, per_channel, saved, sums, Epilogue(), dispatch=dispatch)
    return records


def test_a_table_changes_the_elementwise_launches_only() -> None:
    default = _training_step_launches(launchers.Dispatch())
    everything = tuning.UniformTable(WIDE)
    tuned = _training_step_launches(launchers.Dispatch(tuning=everything))
    assert [name for name, _, _ in tuned] == [name for name, _, _ in default]
    for (name, grid, warps), (_, default_grid, default_warps) in zip(tuned, default, strict=True):
        if name in ("_normalize_kernel", "_backward_dx_kernel"):
            assert warps == 8 and default_warps == 4, name
        else:  # reductions: the order of every sum stays the heuristic's
            assert (grid, warps) == (default_grid, default_warps), name


def test_use_installs_a_table_for_the_process_and_a_missing_key_gets_the_heuristic(tmp_path: Path) -> None:
    default = _training_step_launches(launchers.Dispatch())
    key = tuning.TuningKey.of("normalize", "contiguous", (4, 6, 35), 4, {
        "BATCH_STATS": True, "CUMULATIVE": False, "ACTIVATION": 0, "RESIDUAL": False, "SAME_STRIDES": True,
    })  # fmt: skip
    tuning.TuningTable({key: WIDE}).save(tmp_path / "t.json")
    try:
        tuning.use(tmp_path / "t.json")
        tuned = _training_step_launches(launchers.Dispatch())
    finally:
        tuning.use(None)
    changed = {name for (name, grid, warps), old in zip(tuned, default, strict=True) if (name, grid, warps) != old}
    assert changed == {"_normalize_kernel"}  # backward_dx's key is not in the table
    assert tuning.active() is None
    assert _training_step_launches(launchers.Dispatch()) == default


@pytest.mark.interpreter
@pytest.mark.parametrize(
    ("shape", "dtype", "layout", "activation"),
    [((5, 6, 7, 9), torch.float32, "contiguous", "silu"), ((4, 9, 3, 5), torch.bfloat16, "channels_last", "relu")],
    ids=["f32-contiguous-silu", "bf16-channels_last-relu"],
)
def test_tuned_configurations_write_the_same_bits(clusters, shape, dtype, layout, activation) -> None:
    """The claim tuning rests on: normalize and the input gradient write the same bits under any
    configuration (other grids and warps, run through the interpreter)."""
    configs = [(4, 8, 1), (32, 2, 64), (1, 1, 1)]
    result = clusters("interpreter").run(elementwise_bits_under_tuning, shape, dtype, layout, activation, configs)[0]
    for entry in result["configs"]:
        assert entry["same_bits"] == [True, True, True], entry
        assert entry["grids"] != result["reference_grids"], entry  # the configuration did change the launches


def test_autotune_cli_says_it_needs_a_gpu_here() -> None:
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the CLI would tune (bench/gpu_check.sh runs it)")
    result = subprocess.run([sys.executable, str(root / "bench" / "autotune.py"), "--shapes", "S1"],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode != 0 and "needs a CUDA device" in result.stderr
    help_text = subprocess.run([sys.executable, str(root / "bench" / "autotune.py"), "--help"],
                               capture_output=True, text=True, timeout=120).stdout  # fmt: skip
    assert "tuning.use" in help_text and "--min-gain" in help_text
