"""The static performance model: predicted speed of every launch, read off the compiled sm_90 code.

    python bench/perf_model.py [--gpu H200] [--shapes S1 S4] [--dtypes fp32 bf16]
                               [--layouts contiguous channels_last] [--out bench/results/model]

For every PERF.md shape (``bench/shapes.GPU_SHAPES``), both layouts (4-D/5-D), fp32 and bf16, it records
the exact launches the launchers make for one training forward and backward on the chosen GPU
(``launchers.Dispatch`` with that GPU's program target; meta tensors, no GPU needed), compiles
each for the GPU's architecture (``bench/codegen.py``), disassembles the cubin with the
``nvdisasm`` shipped in Triton's NVIDIA backend and reads, per kernel:

- the main loop: the innermost backward branch whose body holds global loads, other than the
  split merge's (its loads are coherent, ``LDG.*.STRONG.GPU``); its SASS count ``I`` and the
  bytes it loads and stores per thread ``B`` (LDG/STG widths);
- registers and shared memory (``cuobjdump -res-usage``), hence resident programs per SM;
- integer division (``I2F.*RP`` + ``MUFU.RCP``, the reciprocal sequence) and block-wide
  reductions (``BAR``/``SHFL``) inside that loop.

The formula (constants per GPU in ``GPUS``; one place):

    bytes per SM per cycle      b   = copy_bandwidth / (SMs x clock)              (H200: ~16.5)
    issue needed (warp-instr/cycle/SM)   q = I / (32 x B) x b / u
        I = the main loop's SASS; a kernel that walks each split's partial last column in a loop
        of its own (the statistics, N whole and S not): the mean of both loops' SASS over steps
        u = lane utilization: valid elements / (lanes stepped over), masked padding included
    resident programs per SM    r   = min(occupancy limit (registers, warps, blocks, smem),
                                          programs / SMs)
    loads in flight per SM      F   = (load bytes per thread per iteration) x threads x r x depth
        depth: NUM_STAGES - 1 when the loop's loads are asynchronous copies (LDGSTS: Triton
        software-pipelined them, tl.range(num_stages=...)), else 1; at most the program's steps
    Little's law need           L   = copy_bandwidth x latency / SMs              (H200: ~46 KB)
        latency: an effective 1.4 us, fitted to the first H200 measurements (bench/NOTES.md: 74 of
        88 directions within 20%, against 51 with the 700 ns DRAM latency): the loops do not keep
        F in flight all the time (a step's loads wait behind the previous step's arithmetic), so
        F of 32-56 KB streamed at 35-64% of copy, 78-144 KB at 83-98%.
    limits (fractions of copy bandwidth):
        issue  f_i = min(1, sustained_issue / q)           (sustained_issue = 2.5 of 4)
        memory f_m = min(1, F / L)
        grid   full waves of r_max = occupancy-limited programs per SM run at min(f_i, f_m(r_max));
               the last partial wave at min(f_i, f_m(its programs per SM)) x min(1, programs / SMs)
    kernel fraction   f = waves / (full waves / f_full + partial wave / f_partial)   (= min(f_i, f_m, f_g))
    merge steps       M = for a split reduction, the serial round trips of its in-kernel merge
                          (kernels/merge.py): per level, one ticket (an acq_rel atomic) plus
                          cdiv(rows, MERGE_ROWS) steps of loads; 1 level, 2 with several groups
                          (the separate merge kernels of older revisions: their loop's steps)
    direction time    T = sum_k bytes_k / (BW x f_k) + launches x launch_us + M x merge_step_ns
    predicted fraction of copy bandwidth (actual traffic) = sum_k bytes_k / BW / T

Checks (exit status 1 when any fails; the issue-12 targets): every streaming loop needs
``q <= 1.5``; no integer division and no register spills in a main loop; where the tensor is >= 1 MB, ``F >= 48 KB``
(or every byte the kernel loads, when that is less per SM: S2 bf16 holds 16 KB per SM in all)
and ``programs / SMs >= 4`` for every streaming kernel; no merge of more than 64 serial steps;
at most 2 kernels per direction. Prints a table, writes ``model.csv`` and
``model.png`` under ``--out`` and a short ``summary.md``.
"""

from __future__ import annotations

import argparse
import csv
import math
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
from codegen import (  # noqa: E402
    STREAMING_ROLES,
    KernelLaunch,
    compile_launch,
    specialization,
    training_step_launches,
)
from shapes import GPU_SHAPES  # noqa: E402

from triton_syncbn import launchers  # noqa: E402


@dataclass(frozen=True)
class Gpu:
    """What the model needs to know about a GPU (per SM unless said)."""

    name: str
    arch: int  # compute capability x 10: the cubin's target
    sms: int
    clock_ghz: float
    copy_tb_s: float  # device-to-device copy bandwidth, bytes read + written
    latency_ns: float = 1400.0  # effective load latency for Little's law, fitted to H200 measurements
    sustained_issue: float = 2.5  # warp-instructions per cycle per SM sustained (4 peak)
    registers: int = 65536
    max_warps: int = 64
    max_blocks: int = 32
    shared_bytes: int = 228 * 1024
    launch_us: float = 2.0  # per dependent kernel on the critical path: launch, ramp-up and drain
    merge_step_ns: float = 1500.0  # per serial merge step or ticket: a dependent round trip (H200: ~1.5 us)

    @property
    def bytes_per_cycle(self) -> float:
        return self.copy_tb_s * 1e12 / (self.sms * self.clock_ghz * 1e9)

    @property
    def little_bytes(self) -> float:
        return self.copy_tb_s * 1e12 * self.latency_ns * 1e-9 / self.sms


GPUS = {
    "H200": Gpu("H200", 90, 132, 1.98, 4.3),  # copy measured on one H200 (PERF.md)
    "H100": Gpu("H100", 90, 132, 1.98, 3.0),  # SXM, HBM3 3.35 TB/s peak, ~90% as copy
    "A100": Gpu("A100", 80, 108, 1.41, 1.7, shared_bytes=164 * 1024),  # SXM 80 GB, 2.0 TB/s peak
}

# The issue-12 targets the exit status enforces.
MAX_ISSUE = 1.5
MIN_IN_FLIGHT = 48 * 1024
MIN_PROGRAMS_PER_SM = 4
LARGE_TENSOR = 1 << 20
MAX_MERGE_STEPS = 64
MAX_KERNELS = 2

STREAMING = tuple(STREAMING_ROLES)
# The separate merge kernels of older revisions (the model still reads those, e.g. the baseline).
MERGES = {"_combine_stats_kernel", "_combine_grad_sums_kernel"}
_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
_INSTRUCTION = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)(.*?);")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_TARGET = re.compile(r"`\((\.L_x_\d+)\)")


@dataclass
class Sass:
    """What the model reads from one compiled kernel."""

    registers: int
    shared: int
    num_warps: int
    loop_instructions: int  # SASS in the main loop body (0: no loop with loads)
    tail_instructions: int  # ... in a loop of the same loads for a partial last column (kernels/stats.py); 0: none
    loop_load_bytes: int  # bytes loaded per thread per iteration
    loop_store_bytes: int
    integer_division: bool
    block_reduction: bool
    widest_load: int  # bytes of the widest global load anywhere
    pipelined: bool = False  # the loop's loads are asynchronous copies (LDGSTS): software-pipelined
    loop_spills: int = 0  # local-memory accesses (LDL/STL: register spills) in the main loop
    spills: int = 0  # ... anywhere in the kernel (outside the loop: a capped register count's setup/epilogue)


def disassemble(cubin: bytes) -> tuple[str, str]:
    """(SASS text, resource usage text) of a cubin, with Triton's own nvdisasm and cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        sass = subprocess.run([str(_BIN / "nvdisasm"), "-c", file.name], capture_output=True, text=True, check=True)
        usage = subprocess.run(
            [str(_BIN / "cuobjdump"), "-res-usage", file.name], capture_output=True, text=True, check=True
        )
    return sass.stdout, usage.stdout


def _is_global_load(opcode: str) -> bool:
    """LDG and the asynchronous global-to-shared copies (LDGSTS) of a software-pipelined loop."""
    return opcode.startswith("LDG") and not opcode.startswith("LDGDEPBAR")


def _access_bytes(opcode: str) -> int:
    for suffix, size in ((".128", 16), (".64", 8), (".U16", 2), (".S16", 2), (".U8", 1), (".S8", 1)):
        if suffix in opcode:
            return size
    return 4


def _load_bytes(opcodes: Iterable[str]) -> int:
    """Bytes per thread the global loads among ``opcodes`` read."""
    return sum(_access_bytes(op) for op in opcodes if _is_global_load(op))


def read_sass(sass: str, usage: str, num_warps: int) -> Sass:
    """Parse the SASS of one kernel: main loop, its bytes, registers (see module docstring)."""
    instructions: list[tuple[str, str]] = []  # (opcode, operands)
    labels: dict[str, int] = {}
    for line in sass.splitlines():
        label = _LABEL.match(line.strip())
        if label:
            labels[label.group(1)] = len(instructions)
            continue
        match = _INSTRUCTION.match(line)
        if match:
            instructions.append((match.group(2), match.group(3)))
    spans = []  # (first, last) instruction of every loop: a backward branch to a label
    for index, (opcode, operands) in enumerate(instructions):
        target = _TARGET.search(operands)
        if opcode.startswith("BRA") and target and labels.get(target.group(1), index + 1) <= index:
            spans.append((labels[target.group(1)], index))
    loops = []
    for first, last in spans:
        if any(first <= other_first and other_last <= last and (other_first, other_last) != (first, last)
               for other_first, other_last in spans):  # fmt: skip
            continue  # an outer loop (the flushes around the gradient sums' steps)
        body = instructions[first : last + 1]
        loads = [op for op, _ in body if _is_global_load(op)]
        if loads and not all(".STRONG.GPU" in op for op in loads):  # not the split merge's loop
            loops.append(body)
    # the main loop: the innermost loop that loads the most bytes per iteration, not a kernel's
    # short epilogue loops (edges mode's, after the main loop); the shortest such loop where a
    # kernel has two (the statistics' whole columns, then their partial last column with selects)
    widest = max((_load_bytes(op for op, _ in loop) for loop in loops), default=0)
    candidates = sorted((loop for loop in loops if _load_bytes(op for op, _ in loop) == widest), key=len)
    body = candidates[0] if candidates else []
    tail = candidates[-1] if len(candidates) > 1 else []
    opcodes = [op for op, _ in body]
    registers = int(re.search(r"REG:(\d+)", usage).group(1))
    shared = int(re.search(r"SHARED:(\d+)", usage).group(1))
    return Sass(
        registers=registers,
        shared=shared,
        num_warps=num_warps,
        loop_instructions=len(body),
        tail_instructions=len(tail),
        loop_load_bytes=_load_bytes(opcodes),
        loop_store_bytes=sum(_access_bytes(op) for op in opcodes if op.startswith("STG")),
        integer_division=any(op.startswith("I2F") and "RP" in op for op in opcodes)
        and any(op.startswith("MUFU.RCP") for op in opcodes),
        block_reduction=any(op.startswith(("BAR", "SHFL")) for op in opcodes),
        widest_load=max((_access_bytes(op) for op, _ in instructions if _is_global_load(op)), default=0),
        pipelined=any(op.startswith("LDGSTS") for op in opcodes),
        loop_spills=sum(op.startswith(("LDL", "STL")) for op in opcodes),
        spills=sum(op.startswith(("LDL", "STL")) for op, _ in instructions),
    )


_CACHE: dict[str, Sass] = {}


def compiled_sass(launch: KernelLaunch, arch: int) -> Sass:
    """``read_sass`` of ``launch`` compiled for ``sm_<arch>``; equal specializations compile once."""
    key = repr((launch.name, arch, specialization(launch)))
    if key not in _CACHE:
        compiled = compile_launch(launch, arch)
        sass, usage = disassemble(compiled.asm["cubin"])
        figures = read_sass(sass, usage, launch.kwargs.get("num_warps", 4))
        figures.shared = max(figures.shared, int(compiled.metadata.shared))  # + the pipeline's dynamic buffers
        _CACHE[key] = figures
    return _CACHE[key]


def resident_programs(sass: Sass, gpu: Gpu) -> int:
    """Programs of this kernel one SM can hold at once (registers, warps, blocks, shared memory)."""
    regs_per_warp = math.ceil(max(sass.registers, 1) * 32 / 256) * 256
    by_registers = gpu.registers // (regs_per_warp * sass.num_warps)
    by_warps = gpu.max_warps // sass.num_warps
    by_shared = gpu.shared_bytes // (sass.shared + 1024)
    return max(min(by_registers, by_warps, gpu.max_blocks, by_shared), 0)


def _full_tensors(launch: KernelLaunch, numel: int) -> list[torch.Tensor]:
    return [arg for arg in launch.args if isinstance(arg, torch.Tensor) and arg.numel() == numel and arg.dim() == 3]


@dataclass
class KernelFigures:
    """The model's row for one launch."""

    shape: str
    layout: str
    dtype: str
    direction: str
    kernel: str
    grid: str
    programs_per_sm: float
    registers: int
    resident: int
    loop_sass: int
    loop_bytes: int
    issue_needed: float  # warp-instr/cycle/SM at the copy bandwidth
    in_flight_kb: float  # per SM
    utilization: float
    integer_division: bool
    block_reduction: bool
    merge_steps: int  # serial round trips of the split merge (folded in, or a merge kernel's loop)
    traffic_mb: float
    fraction: float  # predicted fraction of copy bandwidth for this kernel
    failures: list[str] = field(default_factory=list)


def _utilization(launch: KernelLaunch, numel: int) -> float:
    """Valid elements over the lanes the programs step over (masked padding and idle channels)."""
    kwargs = launch.kwargs
    values = dict(zip(launch.kernel.arg_names, launch.args, strict=False))
    try:
        block_c, block_n, block_s = kwargs["BLOCK_C"], kwargs["BLOCK_N"], kwargs["BLOCK_S"]
        n, s, chunk_n = values["N"], values["S"], values["chunk_n"]
    except KeyError:  # kernels without the (n, s) walk (the model also reads older revisions)
        return 1.0
    if "chunk_s" not in values:  # the channel-run reductions: a run is one step wide, N is split;
        rows = block_n // kwargs.get("FOLD", 1)  # a split's last step reads only its slices that hold rows
        slices = sum(triton.cdiv(min(chunk_n, n - n_lo), rows) for n_lo in range(0, n, chunk_n))
        return numel / (slices * launch.grid[0] * rows * block_s) if slices else 1.0
    if kwargs.get("EDGES"):  # the loop walks each row's aligned interior; its few edge elements come after
        numel = numel * s // kwargs["channel_size"]
    steps = sum(column_steps(launch))
    tile_channels = 1 if kwargs.get("RUN_CHANNELS") else block_c  # channel runs: a [1, BLOCK_M] tile
    lanes = steps * launch.grid[0] * tile_channels * block_n * block_s
    return numel / lanes if lanes else 1.0


def loop_instructions(launch: KernelLaunch, sass: Sass) -> float:
    """``I``: SASS per step of the main loop; where the kernel walks a split's partial last column
    in a loop of its own (``sass.tail_instructions``: the statistics, N whole and S not), the mean
    over the steps of both loops."""
    if not sass.tail_instructions:
        return float(sass.loop_instructions)
    whole, tail = column_steps(launch)
    if whole + tail == 0:
        return float(sass.loop_instructions)
    return (sass.loop_instructions * whole + sass.tail_instructions * tail) / (whole + tail)


def column_steps(launch: KernelLaunch) -> tuple[int, int]:
    """Steps of a channel block's programs in all, in whole columns (``BLOCK_S`` positions inside
    the split) and in partial last columns."""
    values = dict(zip(launch.kernel.arg_names, launch.args, strict=False))
    block_n, block_s = launch.kwargs["BLOCK_N"], launch.kwargs["BLOCK_S"]
    n, s, chunk_n, chunk_s = values["N"], values["S"], values["chunk_n"], values["chunk_s"]
    rows = sum(triton.cdiv(min(chunk_n, n - n_lo), block_n) for n_lo in range(0, n, chunk_n))
    whole = tail = 0
    for s_lo in range(0, s, chunk_s):
        length = min(chunk_s, s - s_lo)
        whole += rows * (length // block_s)
        tail += rows * (length % block_s > 0)
    return whole, tail


def program_steps(launch: KernelLaunch) -> int:
    """Steps of a streaming kernel's longest program: its split's samples and positions over the
    step's (channel runs: samples only; a run is one step wide)."""
    values = dict(zip(launch.kernel.arg_names, launch.args, strict=False))
    steps = triton.cdiv(values["chunk_n"], launch.kwargs["BLOCK_N"])
    if "chunk_s" in values:
        steps *= triton.cdiv(values["chunk_s"], launch.kwargs["BLOCK_S"])
    return max(steps, 1)


def folded_merge_steps(launch: KernelLaunch) -> int:
    """Serial round trips of a split reduction's in-kernel merge (``kernels/merge.py``): per
    level one ticket and ``cdiv(rows, MERGE_ROWS)`` load steps; 0 for an unsplit launch or a
    kernel without one."""
    if "GROUP_SPLITS" not in launch.kwargs:
        return 0
    splits = dict(zip(launch.kernel.arg_names, launch.args, strict=False))["num_splits"]
    if splits <= 1:
        return 0
    group_splits = launch.kwargs["GROUP_SPLITS"]
    plan = launchers.MergePlan(group_splits, launch.kwargs["MERGE_ROWS"], triton.cdiv(splits, group_splits))
    return plan.serial_steps(splits)


def kernel_figures(
    launch: KernelLaunch, label: dict[str, str], numel: int, element_bytes: int, gpu: Gpu
) -> KernelFigures:
    """Predict one launch (see the module docstring for the formula) and check its targets."""
    sass = compiled_sass(launch, gpu.arch)
    programs = launch.programs
    per_sm = programs / gpu.sms
    resident = resident_programs(sass, gpu)
    traffic = len(_full_tensors(launch, numel)) * numel * element_bytes
    failures: list[str] = []
    if launch.name in MERGES:
        splits = dict(zip(launch.kernel.arg_names, launch.args, strict=False))["num_splits"]
        steps = triton.cdiv(splits, launch.kwargs.get("SPLIT_BLOCK", 1))  # serial steps of the merge loop
        if steps > MAX_MERGE_STEPS:
            failures.append(f"serial merge of {steps} steps > {MAX_MERGE_STEPS}")
        return KernelFigures(
            **label, kernel=launch.name, grid=str(launch.grid), programs_per_sm=per_sm, registers=sass.registers,
            resident=resident, loop_sass=sass.loop_instructions, loop_bytes=0, issue_needed=0.0, in_flight_kb=0.0,
            utilization=1.0, integer_division=False, block_reduction=False, merge_steps=steps, traffic_mb=0.0,
            fraction=1.0, failures=failures,
        )  # fmt: skip
    moved = sass.loop_load_bytes + sass.loop_store_bytes
    utilization = _utilization(launch, numel)
    instructions = loop_instructions(launch, sass)
    issue = instructions / (32 * moved) * gpu.bytes_per_cycle / utilization if moved else math.inf
    issue_limit = min(1.0, gpu.sustained_issue / issue)
    # load bytes in flight per resident program: one iteration's, or NUM_STAGES - 1 iterations'
    # when the loop's loads are software-pipelined (asynchronous copies issued that far ahead)
    # (never more steps than a program has: a one-step program has one step in flight)
    depth = max(launch.kwargs.get("NUM_STAGES", 1) - 1, 1) if sass.pipelined else 1
    depth = min(depth, program_steps(launch))
    per_program = sass.loop_load_bytes * 32 * sass.num_warps * depth
    in_flight = per_program * min(resident, per_sm)
    # Full waves run with `resident` programs per SM; a last partial wave with fewer, each limited
    # by issue and memory parallelism; SMs without a program idle (min(1, programs / SMs)).
    waves = programs / (gpu.sms * max(resident, 1))
    full, rest = math.floor(waves), waves - math.floor(waves)
    full_fraction = min(issue_limit, min(1.0, per_program * resident / gpu.little_bytes))
    rest_per_sm = rest * resident  # programs per SM in the partial wave
    rest_fraction = min(issue_limit, min(1.0, per_program * max(rest_per_sm, 1.0) / gpu.little_bytes))
    rest_fraction *= min(1.0, rest_per_sm)  # SMs without a program idle
    wave_time = full / full_fraction + (rest / rest_fraction if rest > 0 else 0.0)
    fraction = waves / wave_time if wave_time > 0 else 1.0
    merge_steps = folded_merge_steps(launch)
    if merge_steps > MAX_MERGE_STEPS:
        failures.append(f"serial merge of {merge_steps} steps > {MAX_MERGE_STEPS}")
    if issue > MAX_ISSUE:
        failures.append(f"issue {issue:.2f} > {MAX_ISSUE}")
    if sass.integer_division:
        failures.append("integer division in the main loop")
    if sass.loop_spills:
        failures.append(f"{sass.loop_spills} register spills (local memory) in the main loop")
    if numel * element_bytes >= LARGE_TENSOR:
        # 48 KB per SM, or every byte the kernel loads at once when the tensor is smaller than that
        loaded = traffic - (sass.loop_store_bytes / max(moved, 1)) * traffic
        if in_flight < min(MIN_IN_FLIGHT, loaded / gpu.sms):
            failures.append(f"{in_flight / 1024:.1f} KB in flight < {MIN_IN_FLIGHT // 1024} KB")
        if per_sm < MIN_PROGRAMS_PER_SM:
            failures.append(f"{per_sm:.2f} programs/SM < {MIN_PROGRAMS_PER_SM}")
    return KernelFigures(
        **label, kernel=launch.name, grid=str(launch.grid), programs_per_sm=per_sm, registers=sass.registers,
        resident=resident, loop_sass=round(instructions), loop_bytes=moved, issue_needed=issue,
        in_flight_kb=in_flight / 1024, utilization=utilization, integer_division=sass.integer_division,
        block_reduction=sass.block_reduction, merge_steps=merge_steps, traffic_mb=traffic / 1e6, fraction=fraction,
        failures=failures,
    )  # fmt: skip


@dataclass
class DirectionFigures:
    shape: str
    layout: str
    dtype: str
    direction: str
    kernels: int
    predicted_time_us: float
    predicted_fraction: float  # actual traffic / (copy bandwidth x predicted time)
    failures: list[str]


def direction_figures(rows: list[KernelFigures], gpu: Gpu) -> DirectionFigures:
    """Time of one direction: streaming kernels at their fractions, plus launch and merge latency."""
    bandwidth = gpu.copy_tb_s * 1e12
    traffic = sum(row.traffic_mb * 1e6 for row in rows)
    time_s = sum(row.traffic_mb * 1e6 / (bandwidth * row.fraction) for row in rows if row.traffic_mb)
    time_s += len(rows) * gpu.launch_us * 1e-6 + sum(row.merge_steps for row in rows) * gpu.merge_step_ns * 1e-9
    failures = [f"{row.kernel}: {failure}" for row in rows for failure in row.failures]
    if len(rows) > MAX_KERNELS:
        failures.append(f"{len(rows)} kernels > {MAX_KERNELS}")
    first = rows[0]
    return DirectionFigures(
        first.shape, first.layout, first.dtype, first.direction, len(rows), time_s * 1e6,
        traffic / bandwidth / time_s, failures,
    )  # fmt: skip


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def cases(shape_ids: list[str] | None, dtypes: list[str], layouts: list[str]) -> list[tuple[str, tuple, str, str]]:
    """(shape id, shape, layout, dtype) for every PERF.md shape, layout (4-D/5-D only for
    channels_last) and dtype asked for."""
    result = []
    for entry in GPU_SHAPES:
        shape_id, shape = entry.id, entry.dims
        if shape_ids and shape_id not in shape_ids:
            continue
        for layout in layouts:
            if layout == "channels_last" and len(shape) not in (4, 5):
                continue
            for dtype in dtypes:
                result.append((shape_id, shape, layout, dtype))
    return result


def model_case(shape_id: str, shape: tuple, layout: str, dtype: str, gpu: Gpu) -> list[KernelFigures]:
    """Every launch of one training forward + backward of ``shape``, predicted."""
    memory_format = torch.contiguous_format
    if layout == "channels_last":
        memory_format = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    x = torch.empty(shape, device="meta", dtype=DTYPES[dtype]).contiguous(memory_format=memory_format)
    launches = training_step_launches(x, launchers.PROGRAMS_PER_SM * gpu.sms)
    rows = []
    for direction, direction_launches in launches.items():
        label = {"shape": shape_id, "layout": layout, "dtype": dtype, "direction": direction}
        for launch in direction_launches:
            rows.append(kernel_figures(launch, label, x.numel(), x.element_size(), gpu))
    return rows


def run(shape_ids: list[str] | None, dtypes: list[str], layouts: list[str], gpu: Gpu, verbose: bool = True):
    """Model every case; returns (kernel rows, direction rows)."""
    kernel_rows: list[KernelFigures] = []
    direction_rows: list[DirectionFigures] = []
    todo = cases(shape_ids, dtypes, layouts)
    start = time.monotonic()
    for index, (shape_id, shape, layout, dtype) in enumerate(todo, 1):
        rows = model_case(shape_id, shape, layout, dtype, gpu)
        kernel_rows += rows
        for direction in ("forward", "backward"):
            direction_rows.append(direction_figures([row for row in rows if row.direction == direction], gpu))
        if verbose:
            print(
                f"[{index}/{len(todo)}] {shape_id} {layout} {dtype}: {len(_CACHE)} binaries compiled, "
                f"{time.monotonic() - start:.0f} s",
                file=sys.stderr,
                flush=True,
            )
    return kernel_rows, direction_rows


def print_table(kernel_rows: list[KernelFigures], direction_rows: list[DirectionFigures]) -> None:
    header = (
        f"{'shape':5} {'layout':13} {'dtype':5} {'kernel':26} {'grid':12} {'prog/SM':>7} {'regs':>4} {'res':>3} "
        f"{'SASS':>5} {'B/it':>5} {'issue':>6} {'KB fly':>7} {'util':>5} {'frac':>5}  failures"
    )
    print(header)
    for row in kernel_rows:
        issue = "-" if row.kernel in MERGES else f"{row.issue_needed:.2f}"
        print(
            f"{row.shape:5} {row.layout:13} {row.dtype:5} {row.kernel[1:27]:26} {row.grid:12} "
            f"{row.programs_per_sm:7.2f} {row.registers:4d} {row.resident:3d} {row.loop_sass:5d} {row.loop_bytes:5d} "
            f"{issue:>6} "
            f"{row.in_flight_kb:7.1f} {row.utilization:5.2f} {row.fraction:5.2f}  {'; '.join(row.failures)}"
        )
    print()
    print(
        f"{'shape':5} {'layout':13} {'dtype':5} {'direction':9} {'kernels':>7} {'time us':>8} {'pred %':>6}  failures"
    )
    for row in direction_rows:
        print(
            f"{row.shape:5} {row.layout:13} {row.dtype:5} {row.direction:9} {row.kernels:7d} "
            f"{row.predicted_time_us:8.1f} {100 * row.predicted_fraction:6.1f}  {'; '.join(row.failures)}"
        )


# PERF.md's targets per shape (one H200, world size 1): large shapes stream at >= 90% of copy
# bandwidth (actual traffic) in each direction, mid shapes at >= 60% forward and 55% backward of
# algorithmic bytes (2 tensors forward, 3 backward), small ones take <= 8 / 10 us and 2 kernels.
LARGE_SHAPES = ("S5", "S6", "S9", "S11")
SMALL_SHAPES = ("S1", "S2")


def perf_target(forward: DirectionFigures, backward: DirectionFigures, gpu: Gpu) -> tuple[str, float, float, bool]:
    """``(target, forward algorithmic fraction, backward algorithmic fraction, predicted to meet)``
    of one case against PERF.md (its traffic targets are stated for an H200)."""
    numel = next(entry.numel for entry in GPU_SHAPES if entry.id == forward.shape)
    tensor = numel * DTYPES[forward.dtype].itemsize
    bandwidth = gpu.copy_tb_s * 1e12
    algorithmic = [
        moved * tensor / (bandwidth * row.predicted_time_us * 1e-6) for moved, row in ((2, forward), (3, backward))
    ]
    if forward.shape in LARGE_SHAPES:
        met = forward.predicted_fraction >= 0.9 and backward.predicted_fraction >= 0.9
        target = "actual >= 90% fwd and bwd"
    elif forward.shape in SMALL_SHAPES:
        met = forward.predicted_time_us <= 8 and backward.predicted_time_us <= 10
        met = met and forward.kernels <= MAX_KERNELS and backward.kernels <= MAX_KERNELS
        target = "fwd <= 8 us, bwd <= 10 us, <= 2 kernels"
    else:
        met = algorithmic[0] >= 0.6 and algorithmic[1] >= 0.55
        target = "alg fwd >= 60%, bwd >= 55%"
    return target, algorithmic[0], algorithmic[1], met


def write_outputs(
    kernel_rows: list[KernelFigures], direction_rows: list[DirectionFigures], out: Path, gpu: Gpu
) -> None:
    """``model.csv`` (one row per launch), ``directions.csv``, ``model.png``, ``summary.md``."""
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("model.csv", kernel_rows), ("directions.csv", direction_rows)):
        with open(out / name, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=list(asdict(rows[0])))
            writer.writeheader()
            for row in rows:
                record = asdict(row)
                record["failures"] = "; ".join(record["failures"])
                writer.writerow(record)
    failed = [row for row in direction_rows if row.failures]
    worst_issue = max((row for row in kernel_rows if row.kernel in STREAMING), key=lambda row: row.issue_needed)
    worst_fraction = min(direction_rows, key=lambda row: row.predicted_fraction)
    lines = [
        f"# Static model summary ({gpu.name}, sm_{gpu.arch})",
        "",
        f"- cases: {len(direction_rows) // 2}, launches modelled: {len(kernel_rows)}, "
        f"directions missing a target: {len(failed)}",
        f"- worst issue need: {worst_issue.issue_needed:.2f} warp-instr/cycle/SM "
        f"({worst_issue.shape} {worst_issue.layout} {worst_issue.dtype} {worst_issue.kernel})",
        f"- lowest predicted fraction of copy bandwidth: {100 * worst_fraction.predicted_fraction:.1f}% "
        f"({worst_fraction.shape} {worst_fraction.layout} {worst_fraction.dtype} {worst_fraction.direction})",
        "",
        "| shape | layout | dtype | forward % | backward % | kernels fwd/bwd | failures |",
        "|---|---|---|---|---|---|---|",
    ]
    for forward, backward in zip(direction_rows[::2], direction_rows[1::2], strict=True):
        failures = "; ".join(forward.failures + backward.failures) or "-"
        lines.append(
            f"| {forward.shape} | {forward.layout} | {forward.dtype} | {100 * forward.predicted_fraction:.0f} | "
            f"{100 * backward.predicted_fraction:.0f} | {forward.kernels}/{backward.kernels} | {failures} |"
        )
    lines += [
        "",
        "Next to PERF.md's targets (stated for an H200): actual = the bytes the kernels move, "
        "algorithmic = 2 tensors forward, 3 backward, both over copy bandwidth x predicted time.",
        "",
        "| shape | layout | dtype | fwd us | fwd actual % | fwd alg % | bwd us | bwd actual % | bwd alg % "
        "| PERF.md target | predicted to meet |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for forward, backward in zip(direction_rows[::2], direction_rows[1::2], strict=True):
        target, forward_alg, backward_alg, met = perf_target(forward, backward, gpu)
        lines.append(
            f"| {forward.shape} | {forward.layout} | {forward.dtype} | {forward.predicted_time_us:.1f} | "
            f"{100 * forward.predicted_fraction:.0f} | {100 * forward_alg:.0f} | {backward.predicted_time_us:.1f} | "
            f"{100 * backward.predicted_fraction:.0f} | {100 * backward_alg:.0f} | {target} | "
            f"{'yes' if met else 'no'} |"
        )
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no model.png", file=sys.stderr)
        return
    labels = [f"{row.shape} {row.layout[:2]} {row.dtype}" for row in direction_rows[::2]]
    positions = range(len(labels))
    figure, axis = plt.subplots(figsize=(max(8, 0.35 * len(labels)), 4.5))
    axis.bar([p - 0.2 for p in positions], [100 * r.predicted_fraction for r in direction_rows[::2]], 0.4, label="fwd")
    axis.bar([p + 0.2 for p in positions], [100 * r.predicted_fraction for r in direction_rows[1::2]], 0.4, label="bwd")
    axis.axhline(90, color="gray", linestyle="--", linewidth=0.8)
    axis.set_xticks(list(positions), labels, rotation=90, fontsize=7)
    axis.set_ylabel(f"predicted % of {gpu.name} copy bandwidth (actual traffic)")
    axis.set_ylim(0, 105)
    axis.legend()
    figure.tight_layout()
    figure.savefig(out / "model.png", dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", choices=sorted(GPUS), default="H200")
    parser.add_argument("--shapes", nargs="+", help="shape ids (default: all of PERF.md)")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--layouts", nargs="+", choices=["contiguous", "channels_last"], default=None)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "model")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)
    gpu = GPUS[args.gpu]
    layouts = args.layouts or ["contiguous", "channels_last"]
    kernel_rows, direction_rows = run(args.shapes, args.dtypes, layouts, gpu, verbose=not args.quiet)
    print_table(kernel_rows, direction_rows)
    write_outputs(kernel_rows, direction_rows, args.out, gpu)
    failed = [row for row in direction_rows if row.failures]
    print(f"\nperf model ({gpu.name}): {len(direction_rows)} directions, {len(failed)} missing a target; "
          f"results in {args.out}")  # fmt: skip
    return int(bool(failed))


if __name__ == "__main__":
    sys.exit(main())
