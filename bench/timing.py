"""Timing: median and p20/p80 of a callable, and the copy bandwidth of this device.

GPU: ``triton.testing.do_bench`` (CUDA events, warm-up, L2 flushed between runs). CPU: wall
clock over repeated calls; the providers of one case are timed interleaved (one call of each in
turn), so that load from other processes on a shared machine falls on all of them alike and
their ratio stays meaningful. Times are in microseconds.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Timing:
    median_us: float
    p20_us: float
    p80_us: float


def time_callable(
    function: Callable[[], object], device: torch.device, budget_ms: float = 200.0, repeats: int | None = None
) -> Timing:
    """Time ``function`` after a warm-up: about ``budget_ms`` of repetitions, or exactly
    ``repeats`` of them (needed with several ranks, whose calls must pair up collective by
    collective, so every rank must make the same number of calls)."""
    if repeats is None and device.type == "cuda":
        import triton.testing

        median, p20, p80 = triton.testing.do_bench(function, warmup=25, rep=int(budget_ms), quantiles=[0.5, 0.2, 0.8])
        return Timing(median * 1e3, p20 * 1e3, p80 * 1e3)
    for _ in range(3):  # warm-up: compilation, allocator
        function()
    samples: list[float] = []
    deadline = time.perf_counter() + budget_ms / 1e3
    while len(samples) < (repeats or 5) or (repeats is None and time.perf_counter() < deadline and len(samples) < 200):
        samples.append(_time_once(function, device))
    return _summarize(samples)


def time_interleaved(
    functions: dict[str, Callable[[], object]],
    device: torch.device,
    budget_ms: float = 200.0,
    repeats: int | None = None,
) -> dict[str, Timing]:
    """Time several callables of one case: on CPU one call of each in turn (after a warm-up),
    about ``budget_ms`` per callable or exactly ``repeats`` rounds (several ranks: every rank
    must make the same calls); on a GPU each on its own (``time_callable``)."""
    if device.type == "cuda":
        return {name: time_callable(function, device, budget_ms, repeats) for name, function in functions.items()}
    for function in functions.values():
        for _ in range(3):  # warm-up: allocator, first-call caches
            function()
    samples: dict[str, list[float]] = {name: [] for name in functions}
    deadline = time.perf_counter() + budget_ms * len(functions) / 1e3
    rounds = 0
    while rounds < (repeats or 5) or (repeats is None and time.perf_counter() < deadline and rounds < 200):
        for name, function in functions.items():
            samples[name].append(_time_once(function, device))
        rounds += 1
    return {name: _summarize(values) for name, values in samples.items()}


def _summarize(samples: list[float]) -> Timing:
    deciles = statistics.quantiles(samples, n=10) if len(samples) > 1 else samples * 9
    return Timing(statistics.median(samples), deciles[1], deciles[7])


def _time_once(function: Callable[[], object], device: torch.device) -> float:
    """One call's time in microseconds (CUDA events on a GPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        function()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e3
    start_time = time.perf_counter()
    function()
    return (time.perf_counter() - start_time) * 1e6


def copy_bandwidth_gbps(device: torch.device) -> float:
    """Bytes read + written per second by a large device-to-device copy, in GB/s."""
    size = (1 << 30) if device.type == "cuda" else (1 << 27)
    source = torch.empty(size, dtype=torch.uint8, device=device)
    source.fill_(1)
    destination = torch.empty_like(source)
    timing = time_callable(lambda: destination.copy_(source), device)
    return 2 * size / (timing.median_us * 1e-6) / 1e9
