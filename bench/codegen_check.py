"""Prove GPU readiness without a GPU: compile every kernel specialization for sm_90 and sm_80.

    python bench/codegen_check.py [--arch 90 80] [--verbose]

For each specialization the launchers pick (captured from real launcher calls on meta tensors,
so the check compiles exactly what would run) it asserts:
- it builds (PTX and a cubin from ptxas),
- no local memory (register spills or a stack frame), and at most ``MAX_PTX_LINES`` of PTX (a
  larger kernel took Triton 3.6 a minute or more to compile),
- 128-bit global loads (or 16-byte cp.async copies, where the loop is pipelined) and stores in
  the streaming kernels for 16-byte aligned inputs, in both
  the contiguous and the channels_last layout,
- 64-bit lane offsets (``INT64``) when the tensor can have 2**31 elements or more, and none below,
- in split reductions, the in-kernel merge's ordering (``kernels/merge.py``): a CTA barrier
  before the ticket, the ticket an ``atom.global.gpu.acq_rel``, the merge's loads ``ld.global.cg``.
Launches are recorded for an H200-sized grid (132 SMs x ``launchers.PROGRAMS_PER_SM``). Speed (instructions per
byte, loads in flight, grids) is ``bench/perf_model.py``'s job. Exit status 0 when every check
holds.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass

import torch
from codegen import STREAMING_ROLES, KernelLaunch, compile_launch, training_step_launches

from triton_syncbn import launchers
from triton_syncbn.kernels.activation import ACTIVATION_CODES
from triton_syncbn.layout import channel_view

H200_PROGRAMS = launchers.PROGRAMS_PER_SM * 132

STREAMING = STREAMING_ROLES


@dataclass(frozen=True)
class Spec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    memory_format: torch.memory_format = torch.contiguous_format
    splits: int | None = None  # force a split count (None: the launchers' choice)
    activation: str | None = None
    residual: bool = False
    expect_vector: bool = True  # 128-bit accesses expected in the streaming kernels
    expect_int64: bool = False


SPECS = [
    Spec("S4 fp32 contiguous", (32, 256, 56, 56), torch.float32),
    Spec("S4 bf16 channels_last", (32, 256, 56, 56), torch.bfloat16, torch.channels_last),
    Spec("S3 fp32 contiguous, 8 splits", (32, 64, 112, 112), torch.float32, splits=8),
    # batch 1 per rank (detection, segmentation): N is the JIT's constant 1, channels split along S
    Spec("batch 1, splits along S", (1, 8, 512, 512), torch.float32),
    Spec("S2 fp16 2-D", (256, 4096), torch.float16),
    Spec("S11 fp64 channels_last_3d", (2, 32, 128, 128, 128), torch.float64, torch.channels_last_3d),
    Spec("S6 bf16 relu + residual", (256, 256, 56, 56), torch.bfloat16, activation="relu", residual=True),
    Spec("S1 fp32 (S = 49: channel runs)", (32, 2048, 7, 7), torch.float32),
    Spec(
        "S8 bf16 relu + residual (S = 49: channel runs, folded reductions)",
        (1024, 256, 7, 7),
        torch.bfloat16,
        activation="relu",
        residual=True,
    ),  # fmt: skip
    Spec(
        "S9 bf16 silu + residual (S = 9409: aligned interiors, edges after the loop)",
        (2, 2048, 97, 97),
        torch.bfloat16,
        activation="silu",
        residual=True,
    ),  # fmt: skip
    # 2**31+ elements: 64-bit step offsets, 32-bit lane offsets within a tile suffice
    Spec("2**31+ elements fp32", (32, 64, 1024, 1056), torch.float32),
    Spec("one tile spans 2**31+ elements fp16", (1, 4096, 1024, 1024), torch.float16, expect_int64=True),
]


def record_launches(spec: Spec) -> list[KernelLaunch]:
    """The kernel launches of one training forward + backward, as the launchers make them."""
    x = torch.empty(spec.shape, device="meta", dtype=spec.dtype).contiguous(memory_format=spec.memory_format)
    tiling = None
    if spec.splits:
        view = channel_view(x)
        heuristic = launchers.choose_tiling(launchers.collapse(view), H200_PROGRAMS)
        tiling = launchers.Tiling.split(view, heuristic.block_c, heuristic.block_m, spec.splits)
    activation = ACTIVATION_CODES[spec.activation or "identity"]
    directions = training_step_launches(x, H200_PROGRAMS, activation, spec.residual, tiling)
    return directions["forward"] + directions["backward"]


def check(spec: Spec, arch: int) -> list[tuple[str, list[str]]]:
    """(kernel name, failed checks) for every launch of ``spec`` compiled for ``sm_<arch>``."""
    results = []
    launches = [(launch.name, launch) for launch in record_launches(spec)]
    for label, launch in launches:
        failures = []
        try:
            compiled = compile_launch(launch, arch)
        except Exception as error:  # noqa: BLE001 - a build failure is a reported result
            results.append((label, [f"does not build: {type(error).__name__}: {error}"[:300]]))
            continue
        ptx = compiled.asm["ptx"]
        if not compiled.asm.get("cubin"):
            failures.append("no cubin")
        failures += ptx_failures(ptx)
        if launch.name in STREAMING:
            # plain 128-bit loads, or 16-byte asynchronous copies of a software-pipelined loop
            vector = bool(re.search(r"ld\.global(\.\w+)*\.(v4\.b32|v2\.b64)", ptx)) or bool(
                re.search(r"cp\.async\.c[ag]\.shared\.global[^;]*,\s*(0x10|16)\s*[,;]", ptx)
            )
            if spec.expect_vector and not vector:
                failures.append("no 128-bit global loads")
            if spec.expect_vector and STREAMING[launch.name] in ("normalize", "input gradient"):
                if not re.search(r"st\.global(\.\w+)*\.(v4\.b32|v2\.b64)", ptx):
                    failures.append("no 128-bit global stores")
            failures += merge_ordering_failures(launch, ptx)
            wide = bool(launch.kwargs["INT64"])
            if spec.expect_int64 != wide:
                failures.append("64-bit indexing expected" if spec.expect_int64 else "needless 64-bit indexing")
        results.append((label, failures))
    return results


# PTX lines a kernel may have: Triton 3.6 (the GPU machines') took 30-100 s to compile statistics
# kernels of 20-29 thousand lines (a [BLOCK_C, RUNS, VEC] reshape in their epilogue); every
# kernel now has at most ~7700 and compiles in about a second.
MAX_PTX_LINES = 12000


def ptx_failures(ptx: str) -> list[str]:
    """What is wrong with a kernel's PTX as such: local memory, or a size that compiles slowly."""
    failures = []
    if ".local" in ptx:
        failures.append("local memory (spills or stack)")
    lines = ptx.count("\n")
    if lines > MAX_PTX_LINES:
        failures.append(f"{lines} PTX lines > {MAX_PTX_LINES} (slow to compile)")
    return failures


def merge_ordering_failures(launch: KernelLaunch, ptx: str) -> list[str]:
    """What is missing from a split reduction's merge ordering in its PTX (nothing for others):
    every ticket must follow a CTA barrier that follows the last global store before it (the
    partials), and the merge loads after the first ticket must bypass L1."""
    values = dict(zip(launch.kernel.arg_names, launch.args, strict=False))
    if "GROUP_SPLITS" not in launch.kwargs or values.get("num_splits", 1) <= 1:
        return []
    tickets = list(re.finditer(r"atom\.global\.gpu\.acq_rel\.add\.u32", ptx))
    if not tickets:
        return ["split merge: no acq_rel gpu-scope ticket"]
    failures = []
    for ticket in tickets:
        before = ptx[: ticket.start()]
        if "bar.sync" not in before[max(before.rfind("st.global"), 0) :]:
            failures.append("split merge: no barrier between the partials' stores and a ticket")
    if not re.search(r"ld\.global\.cg", ptx[tickets[0].end() :]):
        failures.append("split merge: merge loads not ld.global.cg")
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80])
    parser.add_argument("--verbose", action="store_true", help="print every kernel, not only failures")
    args = parser.parse_args(argv)
    failed = 0
    for arch in args.arch:
        for spec in SPECS:
            print(f"sm_{arch} {spec.name} ...", flush=True)
            for kernel, failures in check(spec, arch):
                failed += bool(failures)
                if failures or args.verbose:
                    print(f"  {kernel}: {'; '.join(failures) or 'ok'}")
    print("codegen check: " + ("all checks hold" if not failed else f"{failed} kernel builds failed a check"))
    return int(failed > 0)


if __name__ == "__main__":
    sys.exit(main())
