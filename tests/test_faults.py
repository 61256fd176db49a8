"""A rank that dies or stalls: the others get an error within the process group's timeout, and
their module state (running statistics, num_batches_tracked) is left as it was."""

from __future__ import annotations

import pytest
import torch.multiprocessing as mp

from fault_tasks import rank_main
from triton_syncbn.distributed import free_local_port

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

TIMEOUT_S = 8.0


@pytest.mark.parametrize("fault", ["dies", "stalls"])
def test_surviving_rank_gets_an_error_not_a_hang(fault: str) -> None:
    context = mp.get_context("spawn")
    results = context.Queue()
    port = free_local_port()
    processes = [
        context.Process(target=rank_main, args=(rank, port, fault, TIMEOUT_S, results), daemon=True)
        for rank in range(2)
    ]
    for process in processes:
        process.start()
    try:
        result = results.get(timeout=120)
    finally:
        for process in processes:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
    assert result["outcome"] != "no error"
    assert result["elapsed"] <= TIMEOUT_S * 2.5, result
    assert result["state_unchanged"], result
