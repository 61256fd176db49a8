"""Tune the elementwise kernels (normalize, input gradient) for a set of shapes; write a table.

    python bench/autotune.py [--shapes S4 S6] [--dtype fp32 bf16] [--layouts contiguous channels_last]
                             [--activation identity relu] [--out tuning.json] [--budget-ms 25]

For every shape, dtype, layout and activation, and for both kernels, it times each candidate
configuration (elements per thread x warps x steps per program; see ``triton_syncbn/tuning.py``)
replayed in a CUDA graph (``triton.testing.do_bench_cudagraph``: device time, not the host's cost
of a launch), after checking that it writes exactly the bits of
the heuristic configuration (it must: these kernels reduce nothing), and keeps the fastest where
it beats the heuristic by more than ``--min-gain``. Reductions are never tuned. Then, in training:

    import triton_syncbn.tuning
    triton_syncbn.tuning.use("tuning.json")

Keys are bucketed by powers of two of N, C and S, so a table tuned on a batch of 32 serves 17-32.
CUDA only: the interpreter cannot time kernels. Progress goes to stdout, one line per kernel.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import itertools
import sys
from collections.abc import Callable
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from shapes import GPU_SHAPES, select  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
THREAD_ELEMENTS = (4, 8, 16, 32)
NUM_WARPS = (2, 4, 8)
STEPS = (4, 16, 64)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--shapes", nargs="+", help="PERF.md shape ids (default: all)")
    parser.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--layouts", nargs="+", choices=["contiguous", "channels_last"], default=None)
    parser.add_argument("--activation", nargs="+", choices=["identity", "relu", "leaky_relu", "silu"],
                        default=["identity"], help="fused activations to tune for (each is its own key)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("tuning.json"))
    parser.add_argument("--budget-ms", type=float, default=25.0, help="do_bench time per candidate")
    parser.add_argument("--min-gain", type=float, default=0.03, help="keep a configuration only if this much faster")
    parser.add_argument("--quick", action="store_true", help="6 candidates (8-32 elements per thread, 4 or 8 warps)")
    return parser.parse_args(argv)


def candidates(quick: bool = False) -> list[tuple[int, int, int]]:
    """(elements per thread, warps, steps per program) to try: 36, or 6 with ``quick``."""
    if quick:
        return list(itertools.product((8, 16, 32), (4, 8), (16,)))
    return list(itertools.product(THREAD_ELEMENTS, NUM_WARPS, STEPS))


class _KeyRecorder:
    """A table that remembers the key it is asked for and answers nothing (the heuristic runs)."""

    def __init__(self) -> None:
        self.keys: list[object] = []

    def lookup(self, key: object) -> None:
        self.keys.append(key)
        return None


def kernel_calls(
    shape: tuple[int, ...], dtype: torch.dtype, layout: str, activation: str
) -> dict[str, Callable[[object], torch.Tensor]]:
    """``{kernel: run(dispatch) -> output}`` for normalize and backward_dx on one prepared case,
    as a training step launches them (batch statistics, momentum 0.1)."""
    from triton_syncbn import launchers
    from triton_syncbn.contract import Epilogue, RunningStats, SavedStatistics
    from triton_syncbn.kernels.activation import ACTIVATION_CODES
    from triton_syncbn.layout import channel_view, empty_output_like

    device = torch.device("cuda")
    x = torch.randn(shape, device=device, dtype=dtype)
    dy = torch.randn(shape, device=device, dtype=dtype)
    if layout == "channels_last":
        memory_format = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        x, dy = x.contiguous(memory_format=memory_format), dy.contiguous(memory_format=memory_format)
    channels = shape[1]
    weight = torch.rand(channels, device=device) + 0.5
    bias = torch.randn(channels, device=device)
    running = RunningStats(torch.zeros(channels, device=device), torch.ones(channels, device=device),
                           torch.zeros((), dtype=torch.int64, device=device), 0.1)  # fmt: skip
    epilogue = Epilogue(None, ACTIVATION_CODES[activation], 0.01)
    x_view, dy_view = channel_view(x), channel_view(dy)
    stats = launchers.partial_stats(x_view)
    y, y_view = empty_output_like(x)
    mean, invstd = launchers.normalize(x_view, y_view, weight, bias, stats, running, 1e-5, epilogue)
    saved = SavedStatistics(mean, invstd, stats[0])
    sums, _, _ = launchers.backward_reduce(dy_view, x_view, weight, bias, saved, epilogue, None, None)
    dx, dx_view = empty_output_like(x)

    def normalize(dispatch: object) -> torch.Tensor:
        launchers.normalize(x_view, y_view, weight, bias, stats, running, 1e-5, epilogue, dispatch=dispatch)
        return y

    def backward_dx(dispatch: object) -> torch.Tensor:
        launchers.backward_dx(dy_view, x_view, dx_view, weight, bias, saved, sums, epilogue, dispatch=dispatch)
        return dx

    return {"normalize": normalize, "backward_dx": backward_dx}


def _device_us(function: Callable[[], object], budget_ms: float) -> float:
    """Median device time of ``function`` in microseconds, replayed from a CUDA graph."""
    import triton.testing

    function()  # compile outside the capture
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(function, rep=int(budget_ms), return_mode="median") * 1e3


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("autotune.py needs a CUDA device: it times the compiled kernels (the interpreter cannot)")
    import triton

    from triton_syncbn import launchers, tuning

    cases = [
        (shape, dtype, layout, activation)
        for shape in select(GPU_SHAPES, args.shapes)
        for dtype in args.dtype
        for layout in args.layouts or ["contiguous", "channels_last"]
        if layout == "contiguous" or shape.has_channels_last
        for activation in args.activation
    ]
    table = tuning.TuningTable(meta={
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    })  # fmt: skip
    configs = candidates(args.quick)
    print(f"{torch.cuda.get_device_name()}: {len(cases)} cases x 2 kernels x {len(configs)} configurations", flush=True)
    for index, (shape, dtype_name, layout, activation) in enumerate(cases, 1):
        calls = kernel_calls(shape.dims, DTYPES[dtype_name], layout, activation)
        for kernel, run in calls.items():
            recorder = _KeyRecorder()
            reference = run(launchers.Dispatch(tuning=recorder)).clone()
            key = recorder.keys[0]
            default_us = _device_us(functools.partial(run, launchers.Dispatch()), args.budget_ms)
            best, best_us = None, default_us
            for thread_elements, num_warps, steps in configs:
                config = tuning.ElementwiseConfig(thread_elements, num_warps, steps)
                dispatch = launchers.Dispatch(tuning=tuning.UniformTable(config))
                output = run(dispatch)
                if not torch.equal(output.contiguous().view(torch.uint8), reference.contiguous().view(torch.uint8)):
                    raise SystemExit(f"{kernel} {config} wrote other bits than the heuristic on {shape.id}: a bug")
                measured = _device_us(functools.partial(run, dispatch), args.budget_ms)
                if measured < best_us:
                    best, best_us = config, measured
            kept = best is not None and best_us < default_us * (1.0 - args.min_gain)
            if kept:
                table.entries[key] = best
            choice = f"{best} {best_us:.1f} us ({best_us / default_us:.2f}x)" if kept else "heuristic kept"
            print(f"[{index}/{len(cases)}] {shape.id} {dtype_name} {layout} {activation} {kernel}: "
                  f"heuristic {default_us:.1f} us; {choice}", flush=True)  # fmt: skip
        del calls
        table.save(args.out)  # after every case: a stopped run keeps what it tuned
    print(f"wrote {args.out}: {len(table.entries)} tuned keys")
    return 0


if __name__ == "__main__":
    sys.exit(main())
