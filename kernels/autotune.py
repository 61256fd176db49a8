"""Autotuned variants of the streaming kernels, one per memory layout, with named config factories.

Contiguous inputs (``stride_s == 1``) reduce along the spatial axis: tiles are a few channels
wide and long along S. channels_last inputs (``stride_c == 1``) read C-contiguous rows: tiles
are wide along C and a few rows deep. Each layout gets its own tuner (its own configs and its
own tuning cache), keyed on the channel count, the spatial size and the split chunk (the
dtypes of the tensor arguments are part of Triton's key too). The launchers choose the split
count themselves, with chunks a multiple of ``MAX_BLOCK_M``, so every config fits every split.

The normalize kernel updates running statistics in place: its tuner restores them after each
trial (``restore_value``), so tuning never applies the momentum update more than once.

Under Triton's interpreter nothing here is tuned (it cannot benchmark); the launchers then run
the plain kernels with one heuristic config.
"""

import triton

from .backward import _backward_dx_kernel, _backward_reduce_kernel
from .normalize import _normalize_kernel
from .stats import _partial_stats_kernel

MAX_BLOCK_M = 2048
KEY = ["C", "S", "chunk"]
LAYOUTS = ("contiguous", "channels_last")


def contiguous_configs() -> list[triton.Config]:
    """Few channels per program, long runs along the contiguous spatial axis."""
    shapes = [(1, 1024, 4), (1, 2048, 8), (2, 1024, 4), (4, 512, 4), (4, 1024, 8)]
    return [triton.Config({"BLOCK_C": c, "BLOCK_M": m}, num_warps=w) for c, m, w in shapes]


def channels_last_configs() -> list[triton.Config]:
    """Many channels per program (coalesced C-contiguous rows), a few rows deep."""
    shapes = [(32, 64, 4), (64, 32, 4), (64, 64, 8), (128, 16, 4), (128, 32, 8)]
    return [triton.Config({"BLOCK_C": c, "BLOCK_M": m}, num_warps=w) for c, m, w in shapes]


CONFIGS = {"contiguous": contiguous_configs, "channels_last": channels_last_configs}
# The narrowest BLOCK_M any config of a layout may run with (bounds the spatial vector width).
MIN_BLOCK_M = {layout: min(config.kwargs["BLOCK_M"] for config in factory()) for layout, factory in CONFIGS.items()}


def _prune(configs: list[triton.Config], named_args: dict, **kwargs: object) -> list[triton.Config]:
    """Drop configs whose channel block is far wider than C (keep the narrowest otherwise)."""
    channels = named_args["C"]
    fitting = [config for config in configs if config.kwargs["BLOCK_C"] <= max(triton.next_power_of_2(channels), 1)]
    return fitting or [min(configs, key=lambda config: config.kwargs["BLOCK_C"])]


def _tuned(kernel: triton.JITFunction, layout: str, restore_value: tuple[str, ...] = ()) -> triton.runtime.Autotuner:
    return triton.autotune(
        configs=CONFIGS[layout](),
        key=KEY,
        prune_configs_by={"early_config_prune": _prune},
        restore_value=list(restore_value),
    )(kernel)


def _variants(kernel: triton.JITFunction, restore_value: tuple[str, ...] = ()) -> dict[str, object]:
    return {layout: _tuned(kernel, layout, restore_value) for layout in LAYOUTS}


# kernel name -> layout -> autotuned kernel
TUNED = {
    "_partial_stats_kernel": _variants(_partial_stats_kernel),
    "_normalize_kernel": _variants(_normalize_kernel),
    "_normalize_kernel_update": _variants(_normalize_kernel, ("running_mean_ptr", "running_var_ptr")),
    "_backward_reduce_kernel": _variants(_backward_reduce_kernel),
    "_backward_dx_kernel": _variants(_backward_dx_kernel),
}
