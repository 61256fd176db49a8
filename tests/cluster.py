"""A pool of spawned worker processes joined in one real gloo process group, reused by tests.

Starting torch in a fresh process costs seconds, so a test does not spawn its own ranks: it
sends a picklable function to every worker of a running cluster and gets each rank's return
value back. Functions build smaller groups (world sizes 1..N) with ``dist.new_group`` as they
need them; ranks outside such a group take part as non-members. A cluster whose task failed or
timed out is shut down, and the next test starts a fresh one.

``env`` is applied in each worker before anything imports triton, so one cluster can run the
Triton kernels through the interpreter (``TRITON_INTERPRET=1``) and another the plain-torch path.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

# Long enough for the interpreter on 2 busy cores, short enough that a hang fails the test.
COLLECTIVE_TIMEOUT_S = 120
TASK_TIMEOUT_S = 300


def _worker_main(
    rank: int, world_size: int, port: int, backend: str, env: dict[str, str], tasks: mp.Queue, results: mp.Queue
) -> None:
    os.environ.update(env)
    try:
        import torch
        import torch.distributed as dist

        import triton_syncbn  # noqa: F401 - import errors show here, not as a hang later

        torch.set_num_threads(1)
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(
            backend,
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S),
        )
    except BaseException:  # noqa: BLE001 - reported to the test process, which fails fast
        results.put((rank, False, "worker start-up failed:\n" + traceback.format_exc()))
        return
    while True:
        task = tasks.get()
        if task is None:
            break
        function, args = task
        try:
            results.put((rank, True, function(*args)))
        except BaseException:  # noqa: BLE001 - every failure goes back to the test
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class ClusterError(RuntimeError):
    """A task failed on some rank or did not finish in time."""


class GlooCluster:
    """``world_size`` spawned processes in one gloo group; see the module docstring.

    ``backend="nccl"`` (GPU machines with ``world_size`` GPUs) gives rank r the GPU r instead.
    """

    def __init__(self, world_size: int, env: dict[str, str], backend: str = "gloo") -> None:
        self.world_size = world_size
        self.env = dict(env)
        # Imported here, in the test process: the spawned workers import this file, and must not
        # import triton before _worker_main has applied ``env``.
        from triton_syncbn.distributed import free_local_port

        context = mp.get_context("spawn")
        port = free_local_port()
        self._tasks = [context.Queue() for _ in range(world_size)]
        self._results = context.Queue()
        self._processes = [
            context.Process(
                target=_worker_main,
                args=(rank, world_size, port, backend, self.env, self._tasks[rank], self._results),
                daemon=True,
            )
            for rank in range(world_size)
        ]
        for process in self._processes:
            process.start()
        self.healthy = True

    def run(self, function: Callable[..., Any], *args: Any, timeout: float = TASK_TIMEOUT_S) -> list[Any]:
        """Run ``function(*args)`` on every rank; return the per-rank results, rank order."""
        if not self.healthy:
            raise ClusterError("this cluster was shut down after an earlier failure")
        for task_queue in self._tasks:
            task_queue.put((function, args))
        results: dict[int, Any] = {}
        failures: list[str] = []
        deadline = time.monotonic() + timeout
        while len(results) + len(failures) < self.world_size:
            try:
                rank, ok, value = self._results.get(timeout=1.0)
            except queue.Empty:
                dead = [rank for rank, process in enumerate(self._processes) if not process.is_alive()]
                if dead or time.monotonic() > deadline:
                    self.close()
                    reason = f"ranks {dead} exited" if dead else f"timed out after {timeout} s"
                    raise ClusterError(
                        f"{function.__name__}: {reason} (finished: {sorted(results)}; failures: {failures})"
                    ) from None
                continue
            if ok:
                results[rank] = value
            else:
                failures.append(f"rank {rank}:\n{value}")
        if failures:
            self.close()
            raise ClusterError(f"{function.__name__} failed:\n" + "\n".join(failures))
        return [results[rank] for rank in range(self.world_size)]

    def close(self) -> None:
        self.healthy = False
        for task_queue in self._tasks:
            try:
                task_queue.put(None)
            except (ValueError, OSError):
                pass
        for process in self._processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
                process.join(timeout=10)
