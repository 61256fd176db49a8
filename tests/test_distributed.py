"""Multi-process SyncBatchNorm against the float64 oracle on the concatenated global batch."""

from __future__ import annotations

import pytest
import torch

from oracle import Case, check_case
from rank_tasks import run_case

pytestmark = pytest.mark.distributed

CASES = [
    Case(batches=(4,)),  # a group of one rank: local statistics, same kernels
    Case(batches=(3, 5)),  # uneven batches weight correctly
    Case(batches=(2, 0, 5), tail=(5, 3, 4), channels_last=True),  # an empty rank takes part
    Case(batches=(1, 2, 3, 1), tail=(6,)),  # 2-D input (BatchNorm1d)
    Case(batches=(2, 3, 1, 4), tail=(4, 7)),  # 3-D input
    Case(batches=(2, 1, 2, 0), tail=(3, 2, 3, 4), channels_last=True),  # 5-D channels_last_3d
    Case(batches=(2, 3), tail=(3, 2, 3, 4)),  # 5-D contiguous
    Case(batches=(1, 1), tail=(3,)),  # one value per channel per rank: fine globally
    Case(batches=(0, 0), tail=(3, 4, 4)),  # every rank empty: running statistics unchanged
    Case(batches=(3, 2, 4), dtype=torch.float64),
    Case(batches=(3, 2, 4), dtype=torch.float16, channels_last=True),
    Case(batches=(3, 2, 4), dtype=torch.bfloat16),
    Case(batches=(3, 2), dtype=torch.float16, param_dtype=torch.float16),  # model.half()
    Case(batches=(3, 2), dtype=torch.bfloat16, param_dtype=torch.bfloat16, channels_last=True),
    Case(batches=(3, 2, 4), momentum=None, steps=3),  # cumulative moving average
    Case(batches=(3, 2), affine=False),
    Case(batches=(3, 2), bias=False),
    Case(batches=(3, 2, 1), track_running_stats=False),
    Case(batches=(3, 2), training=False),  # eval: running statistics, no collective
]


@pytest.mark.parametrize("backend", ["torch-cpu", "interpreter"])
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_matches_global_batch_norm(clusters, case: Case, backend: str) -> None:
    check_case(case, clusters(backend).run(run_case, case))
