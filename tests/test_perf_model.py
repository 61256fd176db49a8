"""The static performance model (``bench/perf_model.py``) on a small subset, and its SASS reader.

The full run (every PERF.md shape, both layouts and dtypes) is ``python bench/perf_model.py``;
here a few cases compile for sm_90 and the model's targets are held where the kernels meet them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from triton_syncbn.kernels import INTERPRETED

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import codegen  # noqa: E402
import perf_model  # noqa: E402

pytestmark = [
    pytest.mark.skipif(INTERPRETED, reason="the model compiles the real (non-interpreted) kernels"),
    pytest.mark.slow,
]

# A loop of 6 instructions with a 128-bit load and store, a reciprocal-based integer division, a
# second, load-free loop and a shorter split-merge loop (coherent loads) the reader must not pick.
SYNTHETIC_SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   IADD3 R2, R2, 0x1, RZ ;
        /*0020*/                   BRA `(.L_x_0) ;
.L_x_1:
        /*0030*/               @P0 LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0040*/                   I2F.U32.RP R7, R8 ;
        /*0050*/                   MUFU.RCP R7, R7 ;
        /*0060*/                   FADD R4, R4, R5 ;
        /*0070*/               @P0 STG.E.128 desc[UR4][R2.64], R4 ;
        /*0080*/              @!P1 BRA `(.L_x_1) ;
.L_x_2:
        /*0090*/               @P2 LDG.E.128.STRONG.GPU R12, desc[UR4][R10.64] ;
        /*00a0*/              @!P3 BRA `(.L_x_2) ;
        /*00b0*/                   EXIT ;
"""
SYNTHETIC_USAGE = " Function k:\n  REG:40 STACK:0 SHARED:1024 LOCAL:0"


def test_sass_reader_finds_the_loop_with_loads() -> None:
    sass = perf_model.read_sass(SYNTHETIC_SASS, SYNTHETIC_USAGE, num_warps=4)
    assert (sass.loop_instructions, sass.loop_load_bytes, sass.loop_store_bytes) == (6, 16, 16)
    assert sass.integer_division and not sass.block_reduction
    assert (sass.registers, sass.shared) == (40, 1024)
    assert (sass.loop_spills, sass.spills) == (0, 0)


def test_sass_reader_counts_spills_in_and_out_of_the_loop() -> None:
    """A capped register count (``maxnreg``) may spill outside the loop; inside it is a failure."""
    spilling = SYNTHETIC_SASS.replace(
        "        /*0060*/                   FADD R4, R4, R5 ;\n",
        "        /*0060*/                   LDL R5, [R1+0x4] ;\n        /*0068*/                   FADD R4, R4, R5 ;\n",
    ).replace(
        "        /*00b0*/                   EXIT ;",
        "        /*00a8*/                   STL [R1], R4 ;\n        /*00b0*/                   EXIT ;",
    )
    sass = perf_model.read_sass(spilling, SYNTHETIC_USAGE, num_warps=4)
    assert (sass.loop_spills, sass.spills, sass.loop_instructions) == (1, 2, 7)


def test_sass_reader_takes_a_tail_loop_of_the_same_loads() -> None:
    """Two loops with the same loads (the statistics' whole columns, then a partial last column
    with selects): the shorter is the main loop, the longer its tail."""
    tail = """.L_x_3:
        /*00a4*/               @P0 LDG.E.128 R4, desc[UR4][R2.64] ;
        /*00a8*/                   SEL R2, R2, R8, P1 ;
        /*00ac*/                   SEL R3, R3, R9, P1 ;
        /*00ae*/                   IADD3 R2, R2, 0x10, RZ ;
        /*00b0*/                   FADD R4, R4, R5 ;
        /*00b4*/               @P0 STG.E.128 desc[UR4][R2.64], R4 ;
        /*00b8*/              @!P1 BRA `(.L_x_3) ;
"""
    with_tail = SYNTHETIC_SASS.replace("        /*00b0*/                   EXIT", tail + "EXIT")
    sass = perf_model.read_sass(with_tail, SYNTHETIC_USAGE, 4)
    assert (sass.loop_instructions, sass.tail_instructions) == (6, 7)
    assert perf_model.read_sass(SYNTHETIC_SASS, SYNTHETIC_USAGE, 4).tail_instructions == 0


def test_loop_instructions_weigh_whole_and_partial_columns() -> None:
    """``I`` of a kernel with a tail loop: the mean over its steps. 8 samples in splits of 4 (steps of
    4), 320 positions in one split (steps of 128): per channel 4 whole steps and 2 partial ones."""
    from codegen import KernelLaunch

    from triton_syncbn.kernels import _partial_stats_kernel

    values = {"N": 8, "S": 320, "chunk_n": 4, "chunk_s": 384}
    args = tuple(values.get(name, 0) for name in _partial_stats_kernel.arg_names)
    launch = KernelLaunch(_partial_stats_kernel, (3, 2), args, {"BLOCK_N": 4, "BLOCK_S": 128})
    assert perf_model.column_steps(launch) == (4, 2)
    sass = perf_model.read_sass(SYNTHETIC_SASS, SYNTHETIC_USAGE, 4)
    assert perf_model.loop_instructions(launch, sass) == 6
    sass.loop_instructions, sass.tail_instructions = 300, 330
    assert perf_model.loop_instructions(launch, sass) == (300 * 4 + 330 * 2) / 6


def test_folded_merge_steps() -> None:
    """A ticket and one step per level; a second level adds a ticket and cdiv(groups, rows) steps."""
    from codegen import KernelLaunch

    from triton_syncbn.kernels import _partial_stats_kernel
    from triton_syncbn.launchers import merge_plan

    def launch(splits: int, group_splits: int, rows: int) -> KernelLaunch:
        args = [splits if name == "num_splits" else 0 for name in _partial_stats_kernel.arg_names]
        kwargs = {"GROUP_SPLITS": group_splits, "MERGE_ROWS": rows}
        return KernelLaunch(_partial_stats_kernel, (1, splits), tuple(args), kwargs)

    assert perf_model.folded_merge_steps(launch(1, 1, 1)) == 0
    assert perf_model.folded_merge_steps(launch(8, 8, 8)) == 2
    assert perf_model.folded_merge_steps(launch(175, 16, 16)) == 4  # 11 groups: one more ticket and step
    assert perf_model.folded_merge_steps(launch(1024, 16, 16)) == 2 + 1 + 4  # 64 groups: 4 steps of 16
    assert perf_model.folded_merge_steps(launch(25, 32, 16)) == 3  # one level, two steps
    # the launchers' choice is the cheapest plan, and the model counts it the same way
    for block_c, splits, steps in ((64, 25, 3), (64, 175, 4), (64, 1024, 6), (1, 1024, 2), (8, 300, 4)):
        plan = merge_plan(block_c, splits)
        assert plan.serial_steps(splits) == steps, (block_c, splits, plan)
        kwargs = launch(splits, plan.group_splits, plan.rows)
        assert perf_model.folded_merge_steps(kwargs) == steps


def test_occupancy_from_registers() -> None:
    gpu = perf_model.GPUS["H200"]
    sass = perf_model.read_sass(SYNTHETIC_SASS, SYNTHETIC_USAGE, num_warps=4)
    assert perf_model.resident_programs(sass, gpu) == 12  # 40 regs -> 1280 per warp -> 51 warps -> 12 x 4
    sass.registers = 128
    assert perf_model.resident_programs(sass, gpu) == 4


def test_model_subset(tmp_path: Path) -> None:
    """S4 fp32 in both layouts meets every target: each streaming loop within the issue budget,
    no integer division, enough loads in flight (software-pipelined loads) and programs, two
    kernels per direction (split reductions merge in the kernel, in a few serial steps). Outputs
    are written."""
    kernel_rows, direction_rows = perf_model.run(["S4"], ["fp32"], ["contiguous", "channels_last"],
                                                 perf_model.GPUS["H200"], verbose=False)  # fmt: skip
    assert {row.kernel for row in kernel_rows} == set(codegen.PER_CHANNEL_KERNELS)
    for row in kernel_rows:
        assert 0 < row.issue_needed <= perf_model.MAX_ISSUE and row.loop_bytes >= 64
        assert not row.failures, (row.kernel, row.layout, row.failures)
        if row.kernel in ("_partial_stats_kernel", "_backward_reduce_kernel"):
            assert 2 <= row.merge_steps <= 5, row  # split: a ticket and a step, per level
        else:
            assert row.merge_steps == 0, row
    for row in direction_rows:
        assert row.kernels == 2 and not row.failures, row
        assert 0.5 < row.predicted_fraction <= 1.0
    perf_model.write_outputs(kernel_rows, direction_rows, tmp_path, perf_model.GPUS["H200"])
    assert (tmp_path / "model.csv").read_text().count("\n") == len(kernel_rows) + 1
    assert "S4" in (tmp_path / "summary.md").read_text()


def test_exit_status_reports_a_missed_target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """S1 channels_last bf16 (the last direction to meet every target: its one-step normalize on
    2 warps) exits 0; with the issue budget cut to 0.5, its loops miss it: exit 1."""
    argv = ["--shapes", "S1", "--dtypes", "bf16", "--layouts", "channels_last", "--out", str(tmp_path), "--quiet"]
    assert perf_model.main(argv) == 0
    monkeypatch.setattr(perf_model, "MAX_ISSUE", 0.5)
    assert perf_model.main(argv) == 1
    assert "issue" in (tmp_path / "summary.md").read_text()


def test_statistics_of_padded_16_bit_rows_meet_the_issue_budget() -> None:
    """S9 contiguous bf16 (rows of 9400 interior positions, 2 samples): the statistics take steps of
    2 x 2048 on 2 warps (92% of the lanes hold elements, against 77% for 2 x 4096) and walk each
    row's partial last column in a loop of its own, with selects; the whole columns' loop has none,
    and the model's mean over both loops' steps is within the issue budget."""
    kernel_rows, _ = perf_model.run(["S9"], ["bf16"], ["contiguous"], perf_model.GPUS["H200"], verbose=False)
    (row,) = [row for row in kernel_rows if row.kernel == "_partial_stats_kernel"]
    assert row.issue_needed <= perf_model.MAX_ISSUE and not row.failures, row
    assert row.utilization > 0.9, row
