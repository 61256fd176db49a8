"""Prove GPU readiness without a GPU: compile every kernel specialization for sm_90 and sm_80.

    python bench/codegen_check.py [--arch 90 80] [--verbose]

For each specialization the launchers pick (captured from real launcher calls on meta tensors,
so the check compiles exactly what would run) it asserts:
- it builds (PTX and a cubin from ptxas),
- no local memory (register spills or a stack frame),
- 128-bit global loads and stores in the streaming kernels for 16-byte aligned inputs, in both
  the contiguous and the channels_last layout,
- 64-bit index arithmetic when the tensor can have 2**31 elements or more, and none below;
and the same for every autotune config of the streaming kernels (``--no-tuned-configs`` skips
those). Exit status 0 when every check holds.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass

import torch

from triton_syncbn import launchers
from triton_syncbn.codegen import KernelLaunch, capture_launches, compile_launch
from triton_syncbn.kernels.activation import ACTIVATION_CODES
from triton_syncbn.kernels.autotune import CONFIGS
from triton_syncbn.layout import channel_view, empty_output_like

STREAMING = ("_partial_stats_kernel", "_normalize_kernel", "_backward_reduce_kernel", "_backward_dx_kernel")


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
    Spec("S2 fp16 2-D", (256, 4096), torch.float16),
    Spec("S11 fp64 channels_last_3d", (2, 32, 128, 128, 128), torch.float64, torch.channels_last_3d),
    Spec("S6 bf16 relu + residual", (256, 256, 56, 56), torch.bfloat16, activation="relu", residual=True),
    Spec("S1 fp32 (S = 49: no aligned runs)", (32, 2048, 7, 7), torch.float32, expect_vector=False),
    Spec("2**31+ elements fp32", (32, 64, 1024, 1056), torch.float32, expect_int64=True),
]


def record_launches(spec: Spec) -> list:
    """The kernel launches of one training forward + backward, as the launchers make them."""
    x = torch.empty(spec.shape, device="meta", dtype=spec.dtype).contiguous(memory_format=spec.memory_format)
    view = channel_view(x)
    tiling = launchers.choose_tiling(view)
    if spec.splits:
        tiling = launchers.Tiling.split(view, tiling.block_c, tiling.block_m, spec.splits)
    per_channel = torch.empty(spec.shape[1], device="meta")
    residual = channel_view(torch.empty_like(x)) if spec.residual else None
    epilogue = {"activation": ACTIVATION_CODES[spec.activation or "identity"], "negative_slope": 0.0}
    with capture_launches() as launches:
        stats = launchers.partial_stats(view, tiling)
        _, out = empty_output_like(x)
        mean, invstd = launchers.normalize(
            view, out, per_channel, per_channel, stats, per_channel, per_channel, None, 0.1, 1e-5,
            residual=residual, **epilogue, tiling=tiling,
        )  # fmt: skip
        sums, _, _ = launchers.backward_reduce(
            view, view, mean, invstd, torch.float32, torch.float32, weight=per_channel, bias=per_channel,
            residual=residual, **epilogue, tiling=tiling,
        )  # fmt: skip
        launchers.backward_dx(
            view, view, out, mean, invstd, per_channel, sums, stats[0], bias=per_channel, residual=residual,
            grad_residual=None if residual is None else channel_view(torch.empty_like(x)), **epilogue, tiling=tiling,
        )  # fmt: skip
    return launches


def tuned_variants(spec: Spec, launch: KernelLaunch) -> list[tuple[str, KernelLaunch]]:
    """``launch`` with each autotune config of its layout instead of the heuristic block sizes."""
    if launch.name not in STREAMING:
        return []
    layout = "channels_last" if spec.memory_format != torch.contiguous_format or len(spec.shape) == 2 else "contiguous"
    variants = []
    for config in CONFIGS[layout]():
        kwargs = {**launch.kwargs, **config.kwargs, "num_warps": config.num_warps}
        label = f"{launch.name}[{config.kwargs['BLOCK_C']}x{config.kwargs['BLOCK_M']}, {config.num_warps} warps]"
        variants.append((label, KernelLaunch(launch.kernel, launch.grid, launch.args, kwargs)))
    return variants


def check(spec: Spec, arch: int, tuned_configs: bool = False) -> list[tuple[str, list[str]]]:
    """(kernel name, failed checks) for every launch of ``spec`` compiled for ``sm_<arch>``,
    and with ``tuned_configs`` for every autotune config of the streaming kernels too."""
    results = []
    launches = [(launch.name, launch) for launch in record_launches(spec)]
    if tuned_configs:
        launches += [variant for _, launch in list(launches) for variant in tuned_variants(spec, launch)]
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
        if ".local" in ptx:
            failures.append("local memory (spills or stack)")
        if launch.name in STREAMING:
            vector = bool(re.search(r"ld\.global(\.\w+)*\.(v4\.b32|v2\.b64)", ptx))
            if spec.expect_vector and not vector:
                failures.append("no 128-bit global loads")
            if (
                spec.expect_vector
                and launch.name != "_partial_stats_kernel"
                and launch.name != "_backward_reduce_kernel"
            ):
                if not re.search(r"st\.global(\.\w+)*\.(v4\.b32|v2\.b64)", ptx):
                    failures.append("no 128-bit global stores")
            wide = bool(re.search(r"(div|rem)\.s64", ptx))
            if spec.expect_int64 != wide:
                failures.append("64-bit indexing expected" if spec.expect_int64 else "needless 64-bit indexing")
        results.append((label, failures))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80])
    parser.add_argument("--verbose", action="store_true", help="print every kernel, not only failures")
    parser.add_argument("--no-tuned-configs", action="store_true", help="skip compiling every autotune config")
    args = parser.parse_args(argv)
    failed = 0
    for arch in args.arch:
        for spec in SPECS:
            print(f"sm_{arch} {spec.name} ...", flush=True)
            for kernel, failures in check(spec, arch, tuned_configs=not args.no_tuned_configs):
                failed += bool(failures)
                if failures or args.verbose:
                    print(f"  {kernel}: {'; '.join(failures) or 'ok'}")
    print("codegen check: " + ("all checks hold" if not failed else f"{failed} kernel builds failed a check"))
    return int(failed > 0)


if __name__ == "__main__":
    sys.exit(main())
