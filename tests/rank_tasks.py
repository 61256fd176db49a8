"""Functions the tests run on every rank of a ``GlooCluster`` (or in-process, as one rank).

Each builds what it needs from a ``Case`` and returns small CPU tensors for the test process to
check against the oracle. Ranks outside the case's group return None.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

import triton_syncbn
from oracle import Case, global_batch, initial_state, memory_format_of, rank_rows

# Process groups built so far in this worker, by member ranks. new_group must be called by all
# ranks in the same order; every task runs on every rank, so they do.
_GROUPS: dict[tuple[int, ...], dist.ProcessGroup] = {}


def subgroup(world: int) -> dist.ProcessGroup | None:
    """The group of ranks ``0..world-1`` (None when torch.distributed is not initialized)."""
    if not dist.is_initialized():
        if world != 1:
            raise RuntimeError(f"a world of {world} ranks needs an initialized process group")
        return None
    ranks = tuple(range(world))
    if ranks not in _GROUPS:
        _GROUPS[ranks] = dist.new_group(list(ranks))
    return _GROUPS[ranks]


def current_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def build_module(case: Case, group: dist.ProcessGroup | None) -> triton_syncbn.SyncBatchNorm:
    module = triton_syncbn.SyncBatchNorm(
        case.channels,
        eps=case.eps,
        momentum=case.momentum,
        affine=case.affine,
        track_running_stats=case.track_running_stats,
        process_group=group,
        dtype=case.param_dtype,
        bias=case.bias,
    )
    with torch.no_grad():
        for name, value in initial_state(case).items():
            target = getattr(module, name)
            if target is not None:
                target.copy_(value)
    return module.train(case.training)


def run_case(case: Case) -> dict[str, object] | None:
    """Train/eval ``case.steps`` steps of one SyncBatchNorm on this rank's rows of the data."""
    group = subgroup(case.world)
    rank = current_rank()
    if rank >= case.world:
        return None
    module = build_module(case, group)
    memory_format = memory_format_of(case)
    result: dict[str, list] = {"outputs": [], "input_grads": [], "weight_grads": [], "bias_grads": []}
    layouts_kept = True
    for step in range(case.steps):
        x_global, dy_global = global_batch(case, step)
        rows = rank_rows(case, rank)
        x = x_global[rows].to(case.dtype).contiguous(memory_format=memory_format).requires_grad_(True)
        dy = dy_global[rows].to(case.dtype).contiguous(memory_format=memory_format)
        module.zero_grad(set_to_none=True)
        y = module(x)
        y.backward(dy)
        layouts_kept &= y.dtype == case.dtype and y.is_contiguous(memory_format=memory_format)
        layouts_kept &= x.grad.dtype == case.dtype and x.grad.is_contiguous(memory_format=memory_format)
        result["outputs"].append(y.detach().clone())
        result["input_grads"].append(x.grad.clone())
        result["weight_grads"].append(None if module.weight is None else module.weight.grad.clone())
        result["bias_grads"].append(None if module.bias is None else module.bias.grad.clone())
    result["layouts_kept"] = layouts_kept
    result["running_mean"] = None if module.running_mean is None else module.running_mean.clone()
    result["running_var"] = None if module.running_var is None else module.running_var.clone()
    tracked = module.num_batches_tracked
    result["num_batches_tracked"] = None if tracked is None else int(tracked)
    result["param_dtypes"] = {name: p.dtype for name, p in module.named_parameters()}
    return result
