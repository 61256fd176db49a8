"""GPU variants: compiled, autotuned Triton kernels on CUDA (skipped cleanly without a GPU).

``bench/gpu_check.sh`` runs these on a GPU machine, unchanged.
"""

from __future__ import annotations

import pytest
import torch

import triton_syncbn
from cluster import GlooCluster
from oracle import Case, check_case
from rank_tasks import run_case
from test_distributed import CASES as DISTRIBUTED_CASES
from test_module import SINGLE_PROCESS_CASES

pytestmark = pytest.mark.gpu

GPU_CASES = [
    Case(batches=(8,), tail=(16, 9, 11), device="cuda"),
    Case(batches=(8,), tail=(16, 9, 11), channels_last=True, dtype=torch.bfloat16, device="cuda"),
    Case(batches=(64,), tail=(33,), dtype=torch.float16, param_dtype=torch.float16, device="cuda"),
    Case(batches=(4,), tail=(8, 3, 17, 19), channels_last=True, device="cuda"),
    Case(batches=(3,), tail=(5, 200, 300), device="cuda"),  # several splits per channel
    Case(batches=(6,), momentum=None, steps=3, dtype=torch.float64, device="cuda"),
    Case(batches=(6,), training=False, device="cuda"),
] + [Case(**{**case.__dict__, "device": "cuda"}) for case in SINGLE_PROCESS_CASES if case.world == 1]


@pytest.mark.parametrize("case", GPU_CASES, ids=lambda case: case.id)
def test_compiled_kernels_match_oracle(case: Case) -> None:
    check_case(case, [run_case(case)])


def test_no_host_synchronization_in_training_step() -> None:
    module = triton_syncbn.SyncBatchNorm(32, momentum=None).cuda()
    x = torch.randn(16, 32, 14, 14, device="cuda", requires_grad=True)
    module(x).sum().backward()  # compile and autotune first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        module(x).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert int(module.num_batches_tracked) == 2


@pytest.mark.distributed
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs at least 2 GPUs")
def test_nccl_matches_oracle() -> None:
    world = min(torch.cuda.device_count(), 4)
    cluster = GlooCluster(world, {"TRITON_INTERPRET": "0"}, backend="nccl")
    try:
        for case in DISTRIBUTED_CASES:
            if case.world <= world:
                case = Case(**{**case.__dict__, "device": "cuda"})
                check_case(case, cluster.run(run_case, case))
    finally:
        cluster.close()
