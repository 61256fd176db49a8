"""The benchmark CLI (README's main command) and the accuracy report run end to end on CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # runs the benchmark CLI and the accuracy report end to end

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) in pixels, from the PNG header."""
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", path
    return int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")


def fairscale_installed() -> bool:
    try:
        import fairscale.experimental.nn  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.distributed
def test_benchmark_cli_cpu_default_comparisons(tmp_path: Path) -> None:
    """The CPU default: world size 1 against torch's BatchNorm, then 2 gloo ranks against the
    floor (and fairscale when installed); headline ratios in words; readable plots."""
    result = run(
        "bench/benchmark.py", "--shapes", "S1", "S12", "--dtype", "fp32", "--budget-ms", "20", "--repeats", "3",
        "--out", str(tmp_path),
    )  # fmt: skip
    assert "launching 2 ranks (gloo)" in result.stdout and "GPU numbers need a GPU" in result.stdout
    data = json.loads((tmp_path / "benchmark.json").read_text())
    assert data["meta"]["our_backend"] == "torch-cpu"
    rows = data["rows"]
    modes = {"forward", "backward", "forward+backward", "fused-add-relu"}
    sync_others = {"floor", "fairscale"} if fairscale_installed() else {"floor"}
    for world, others in ((1, {"torch_bn"}), (2, sync_others)):
        ours = [row for row in rows if row["provider"] == "triton_syncbn" and row["world_size"] == world]
        assert {row["mode"] for row in ours} == modes
        # S1 has both layouts, S12 (3-D) only contiguous: 3 layouts x 4 modes, for each provider
        assert len(ours) == 12
        assert len([row for row in rows if row["world_size"] == world]) == 12 * (1 + len(others))
        for row in ours:
            assert row["median_us"] > 0 and row["p20_us"] <= row["median_us"] <= row["p80_us"]
            assert set(row["speedup_vs"]) == others
            # one all-reduce forward, one backward (the backward mode keeps its forward outside the
            # timing); none without a group
            expected = {"forward": 1, "backward": 1, "forward+backward": 2, "fused-add-relu": 2}[row["mode"]]
            assert row["collectives"] == (expected if world == 2 else 0), row
    floor = [row for row in rows if row["provider"] == "floor"]
    assert floor and all(row["collectives"] == {"forward": 1, "backward": 1}.get(row["mode"], 2) for row in floor)
    summary = (tmp_path / "summary.md").read_text().splitlines()
    assert summary[2].startswith("Measured on ") and "ratio below 1" in summary[2]
    assert summary[4].startswith("- world size 1 (no process group): our time / torch_bn's time, geometric mean:")
    assert any(line.startswith("- 2 ranks, synchronized: our time / floor's time") for line in summary[4:8])
    assert "Summary:" in result.stdout
    for name in ("benchmark.csv", "bandwidth.png", "speedup.png", "comm_model.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    for path in tmp_path.glob("*.png"):
        assert png_size(path)[0] <= 2000, (path.name, png_size(path))


def synthetic_rows() -> list[dict]:
    """Rows as the CLI makes them, for every layout, dtype, mode and world size of a CPU run."""
    rows = []
    providers = {1: ["triton_syncbn", "torch_bn"], 2: ["triton_syncbn", "fairscale", "floor"]}
    shapes = {"S1": [8, 256, 7, 7], "S2": [64, 1024], "C1": [8, 64, 56, 56]}
    for world, names in providers.items():
        for shape, dims in shapes.items():
            for layout in ("contiguous", "channels_last") if len(dims) == 4 else ("contiguous",):
                for dtype in ("fp32", "bf16"):
                    for mode in ("forward", "backward", "forward+backward", "fused-add-relu"):
                        for index, provider in enumerate(names):
                            time = 100.0 * (1 + index) * (1 + len(shape))
                            rows.append({
                                "world_size": world, "shape": shape, "dims": dims, "dtype": dtype, "layout": layout,
                                "mode": mode, "provider": provider, "median_us": time, "p20_us": time,
                                "p80_us": time, "algorithmic_gbps": 1.0, "actual_gbps": 2.0,
                                "algorithmic_fraction": 0.1, "actual_fraction": 0.2 / (1 + index),
                                "kernels": None, "collectives": 0,
                            })  # fmt: skip
    return rows


def _from_report(*names: str) -> tuple[object, ...]:
    """Functions of ``bench/report.py`` (bench/ is not a package: imported with it on the path)."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import report
    finally:
        sys.path.remove(str(ROOT / "bench"))
    return tuple(getattr(report, name) for name in names)


def test_every_plot_has_labelled_axes_a_legend_and_fits_2000_px(tmp_path: Path) -> None:
    add_speedups, build_figures, plot = _from_report("add_speedups", "build_figures", "plot")
    rows = synthetic_rows()
    add_speedups(rows)
    meta = {"device_name": "CPU (test)", "copy_gbps": 10.0, "world_size": "1 and 2", "device": "cpu"}
    figures = build_figures(rows, meta)
    assert set(figures) == {"bandwidth.png", "speedup.png"}
    for name, figure in figures.items():
        panels = [axis for axis in figure.axes if axis.get_visible()]
        assert len(panels) >= 4, name  # small multiples: world sizes x layouts, world sizes x modes
        for axis in panels:
            assert axis.get_xlabel() and axis.get_ylabel(), (name, axis.get_title())
            assert axis.get_legend() is not None and axis.get_legend().get_texts(), (name, axis.get_title())
            assert axis.get_yscale() == "log", (name, axis.get_title())
            assert axis.get_title(), name
        assert figure.get_size_inches()[0] * 100 <= 2000, name
    paths = plot(rows, meta, tmp_path)
    assert {path.name for path in paths} == {"bandwidth.png", "speedup.png"}
    for path in paths:
        width, height = png_size(path)
        assert 800 <= width <= 2000 and height <= 2000, (path.name, width, height)
    # the copy-bandwidth line and the 1x line are drawn and named in the legends
    bandwidth_legend = [t.get_text() for t in figures["bandwidth.png"].axes[0].get_legend().get_texts()]
    assert any(text.startswith("copy bandwidth") for text in bandwidth_legend)
    speedup_legend = [t.get_text() for t in figures["speedup.png"].axes[0].get_legend().get_texts()]
    assert "1x (same time)" in speedup_legend


def test_headline_in_words() -> None:
    add_speedups, headline = _from_report("add_speedups", "headline")
    rows = synthetic_rows()
    add_speedups(rows)
    lines = headline(rows)
    assert lines[0].startswith(
        "- world size 1 (no process group): our time / torch_bn's time, geometric mean: forward "
    )
    # ours takes half torch_bn's time in every synthetic case
    assert "forward+backward 0.50x (fp32 0.50x, bf16 0.50x; range 0.50-0.50x" in lines[0]
    assert lines[1].startswith("- 2 ranks, synchronized: our time / fairscale's time")
    assert lines[2].startswith("- 2 ranks, synchronized: our time / floor's time")


def test_benchmark_rejects_unknown_names() -> None:
    result = subprocess.run(
        [sys.executable, "bench/benchmark.py", "--modes", "sideways"], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 2 and "unknown ['sideways']" in result.stderr


def test_benchmark_interpreter_mode(tmp_path: Path) -> None:
    result = run(
        "bench/benchmark.py", "--interpret", "--world-size", "1", "--shapes", "T2", "--dtype", "fp32",
        "--modes", "forward+backward", "--budget-ms", "1", "--no-plots", "--out", str(tmp_path),
    )  # fmt: skip
    assert "our backend: triton-interpreter" in result.stdout
    rows = json.loads((tmp_path / "benchmark.json").read_text())["rows"]
    ours = [row for row in rows if row["provider"] == "triton_syncbn"]
    assert [(row["shape"], row["dtype"], row["mode"]) for row in ours] == [("T2", "fp32", "forward+backward")]
    assert ours[0]["p20_us"] <= ours[0]["median_us"] <= ours[0]["p80_us"] and ours[0]["median_us"] > 0
    assert ours[0]["speedup_vs"]["torch_bn"] > 0 and ours[0]["collectives"] == 0


def test_numerics_report_meets_its_bounds() -> None:
    result = run("bench/numerics.py")
    assert "| mean = 2e4, std = 2 | running_var |" in result.stdout


def test_host_overhead_records_launches_on_cpu() -> None:
    """``--record-launches`` times our Triton path's host work with the 4 launches of a step
    recorded (partial_stats, normalize, backward_reduce, backward_dx), not run."""
    result = run("bench/host_overhead.py", "--record-launches", "--calls", "3", timeout=300)
    assert result.returncode == 0, result.stderr
    assert "ours forward " in result.stdout and "ours forward+backward " in result.stdout, result.stdout
    kernels = "_partial_stats_kernel, _normalize_kernel, _backward_reduce_kernel, _backward_dx_kernel"
    assert f"launches per step: {kernels} (recorded, not run)" in result.stdout, result.stdout
