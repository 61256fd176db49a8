"""Every kernel specialization the launchers pick compiles for real GPUs (sm_80, sm_90), no GPU needed."""

from __future__ import annotations

import pytest
import torch
from triton_syncbn.kernels import INTERPRETED

from triton_syncbn import launchers
from triton_syncbn.codegen import KERNEL_NAMES, capture_launches, compile_launch
from triton_syncbn.layout import channel_view, empty_output_like

pytestmark = pytest.mark.skipif(INTERPRETED, reason="codegen needs the compiled (non-interpreted) kernels")

# (shape, dtype, memory format, batch statistics?, affine?, forced splits)
SPECIALIZATIONS = [
    ((32, 64, 56, 56), torch.float32, torch.contiguous_format, True, True, 4),
    ((32, 64, 56, 56), torch.bfloat16, torch.channels_last, True, True, 1),
    ((256, 4096), torch.float16, torch.contiguous_format, False, False, 1),
    ((2, 32, 16, 16, 16), torch.float64, torch.channels_last_3d, True, True, 2),
]


def record_all_launches(shape, dtype, memory_format, batch_stats: bool, affine: bool, splits: int):
    x = torch.empty(shape, device="meta", dtype=dtype).contiguous(memory_format=memory_format)
    view = channel_view(x)
    tiling = launchers.choose_tiling(view)
    if splits > 1:
        tiling = launchers.Tiling.split(view, tiling.block_c, tiling.block_m, splits)
    per_channel = torch.empty(shape[1], device="meta")
    weight = per_channel if affine else None
    with capture_launches() as launches:
        stats = launchers.partial_stats(view, tiling)
        _, out = empty_output_like(x)
        mean, invstd = launchers.normalize(
            view, out, weight, weight, stats if batch_stats else None, per_channel, per_channel,
            None, 0.1, 1e-5, tiling=tiling,
        )  # fmt: skip
        sums, _, _ = launchers.backward_reduce(view, view, mean, invstd, torch.float32, None, tiling=tiling)
        launchers.backward_dx(
            view, view, out, mean, invstd, weight, sums if batch_stats else None, stats[0], tiling=tiling
        )
    return launches


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("spec", SPECIALIZATIONS, ids=lambda spec: f"{spec[0]}-{str(spec[1])[6:]}")
def test_kernels_compile_for_gpu(spec, arch: int) -> None:
    launches = record_all_launches(*spec)
    if spec[-1] > 1:  # the multi-split path launches the combine kernels too
        assert {launch.name for launch in launches} == set(KERNEL_NAMES)
    for launch in launches:
        compiled = compile_launch(launch, arch)
        ptx = compiled.asm["ptx"]
        assert compiled.asm["cubin"], f"{launch.name}: ptxas produced no cubin"
        assert f".target sm_{arch}" in ptx
        assert ".local" not in ptx, f"{launch.name}: uses local memory (register spills or a stack)"
        assert "ld.global" in ptx and "st.global" in ptx


def test_channels_last_streams_with_128_bit_accesses() -> None:
    """channels_last tiles read C-contiguous rows: the streaming kernels use 16-byte loads."""
    launches = record_all_launches((32, 64, 28, 28), torch.float32, torch.channels_last, True, True, 1)
    for launch in launches:
        if launch.name in ("_partial_stats_kernel", "_normalize_kernel", "_backward_dx_kernel"):
            assert "ld.global.v4.b32" in compile_launch(launch, 90).asm["ptx"], launch.name
