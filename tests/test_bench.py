"""The benchmark CLI (README's main command) and the accuracy report run end to end on CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.distributed
def test_benchmark_cli_two_gloo_ranks(tmp_path: Path) -> None:
    result = run(
        "bench/benchmark.py", "--shapes", "S1", "S12", "--dtype", "fp32", "--budget-ms", "20", "--repeats", "3",
        "--out", str(tmp_path),
    )  # fmt: skip
    assert "launching 2 ranks (gloo)" in result.stdout and "GPU numbers need a GPU" in result.stdout
    data = json.loads((tmp_path / "benchmark.json").read_text())
    assert data["meta"]["world_size"] == 2 and data["meta"]["our_backend"] == "torch-cpu"
    rows = data["rows"]
    modes = {"forward", "backward", "forward+backward", "fused-relu"}
    ours = [row for row in rows if row["provider"] == "triton_syncbn"]
    assert {row["mode"] for row in ours} == modes
    # S1 has both layouts, S12 (3-D) only contiguous: 3 layouts x 4 modes, for each provider
    assert len(ours) == 12 and len(rows) == 24
    for row in ours:
        assert row["median_us"] > 0 and row["p20_us"] <= row["median_us"] <= row["p80_us"]
        assert set(row["speedup_vs"]) == {"torch_bn"}
        # one all-reduce forward, one backward (the backward mode keeps its forward outside the timing)
        expected = {"forward": 1, "backward": 1, "forward+backward": 2, "fused-relu": 2}[row["mode"]]
        assert row["collectives"] == expected, row
    for name in ("benchmark.csv", "summary.md", "bandwidth.png", "speedup.png", "comm_model.png"):
        assert (tmp_path / name).stat().st_size > 0, name


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
    assert (tmp_path / "benchmark.json").exists()


def test_numerics_report_meets_its_bounds() -> None:
    result = run("bench/numerics.py")
    assert "| mean = 2e4, std = 2 | running_var |" in result.stdout
