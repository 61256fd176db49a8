"""Worker entry points for the fault tests: a rank that dies or stalls, and one that must not hang."""

from __future__ import annotations

import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def rank_main(rank: int, port: int, fault: str, timeout_s: float, results: mp.Queue) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=timedelta(seconds=timeout_s)
    )
    import triton_syncbn

    module = triton_syncbn.SyncBatchNorm(4)
    module(torch.randn(3, 4, 5))  # one healthy synchronized step first
    if rank == 1:
        if fault == "dies":
            os._exit(1)  # no clean-up, like a crashed process
        time.sleep(timeout_s * 3)  # "stalls": never joins the next collective
        os._exit(0)
    before = {name: value.clone() for name, value in module.state_dict().items()}
    start = time.monotonic()
    try:
        module(torch.randn(3, 4, 5))
        outcome = "no error"
    except Exception as error:  # noqa: BLE001 - reported to the test
        outcome = f"{type(error).__name__}: {error}"
    elapsed = time.monotonic() - start
    unchanged = all(torch.equal(before[name], value) for name, value in module.state_dict().items())
    results.put({"outcome": outcome, "elapsed": elapsed, "state_unchanged": unchanged})
    results.close()
    results.join_thread()  # flush before the hard exit below
    os._exit(0)  # the process group cannot be torn down cleanly with a dead peer
