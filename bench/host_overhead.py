"""Host-side cost per call: how long the CPU takes to issue one forward / backward, ours and torch's.

    python bench/host_overhead.py [--shape 2 16 4 4] [--calls 300] [--profile] [--device cuda]
    python bench/host_overhead.py --record-launches   # CPU: our Triton path's host work alone

On a GPU a layer whose host work outlasts its kernels leaves the GPU idle: the benchmark then
measures the host, not the kernels. With a tiny input (kernels of a few microseconds) the time
per call of a loop of calls, synchronized once at the end, is the host's issue cost. Reports it
for our module (training forward; forward + backward), torch's ``F.batch_norm`` on the same input
and, on CUDA, an empty Triton kernel's launch; ``--profile`` adds the cProfile functions of ours
by own time. Works on the CPU too (the plain-torch path's overhead, issue 13).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F


def per_call_us(function: Callable[[], object], calls: int, device: torch.device) -> float:
    """Median over 5 rounds of the time per call of ``calls`` back-to-back calls."""
    for _ in range(10):
        function()
    rounds = []
    for _ in range(5):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            function()
        if device.type == "cuda":
            torch.cuda.synchronize()
        rounds.append((time.perf_counter() - start) / calls * 1e6)
    return sorted(rounds)[2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--shape", type=int, nargs="+", default=[2, 16, 4, 4])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--profile", action="store_true", help="cProfile ours (forward + backward)")
    parser.add_argument(
        "--record-launches", action="store_true",
        help="CPU: time our Triton path's host work with the kernel launches recorded, not run "
        "(Triton's interpreter mode, an H200's program target); Triton's own launch cost excluded",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.record_launches:
        if "triton" in sys.modules:
            parser.error("--record-launches must set TRITON_INTERPRET before triton is imported")
        os.environ["TRITON_INTERPRET"] = "1"
        args.device = "cpu"
    import triton_syncbn

    recorded = record_launches() if args.record_launches else None

    device = torch.device(args.device)
    torch.manual_seed(0)
    channels = args.shape[1]
    module = triton_syncbn.SyncBatchNorm(channels, device=device)
    x = torch.randn(args.shape, device=device, requires_grad=True)
    grad = torch.randn_like(x)
    weight = torch.ones(channels, device=device, requires_grad=True)
    bias = torch.zeros(channels, device=device, requires_grad=True)
    mean, var = torch.zeros(channels, device=device), torch.ones(channels, device=device)

    def ours_forward() -> None:
        with torch.no_grad():
            module(x)

    def ours_step() -> None:
        torch.autograd.grad(module(x), (x, module.weight, module.bias), grad)

    def torch_forward() -> None:
        with torch.no_grad():
            F.batch_norm(x, mean, var, weight, bias, True, 0.1, 1e-5)

    def torch_step() -> None:
        torch.autograd.grad(F.batch_norm(x, mean, var, weight, bias, True, 0.1, 1e-5), (x, weight, bias), grad)

    cases = {
        "ours forward": ours_forward,
        "torch forward": torch_forward,
        "ours forward+backward": ours_step,
        "torch forward+backward": torch_step,
    }
    if device.type == "cuda":
        cases["empty triton kernel launch"] = empty_triton_launch(device)
    print(f"{args.device}, input {tuple(args.shape)}, {args.calls} calls per round, torch {torch.__version__}")
    for name, function in cases.items():
        print(f"{name:28} {per_call_us(function, args.calls, device):8.1f} us per call", flush=True)
    if recorded is not None:
        recorded.clear()
        ours_step()
        print("launches per step: " + ", ".join(recorded) + " (recorded, not run)")
    if args.profile:
        profile_step(ours_step, args.calls, backward_on_its_own_thread=device.type == "cuda")
    return 0


def profile_step(step: Callable[[], None], calls: int, backward_on_its_own_thread: bool) -> None:
    """cProfile ``calls`` training steps on this thread and, where autograd runs backward on a
    thread of its own (CUDA: a device thread of the engine, which a profiler started here does
    not see), our backward stage there too, with the wall time that stage takes per call."""
    from triton_syncbn import function, stages

    backward_profile = cProfile.Profile()
    backward_seconds = [0.0]
    original = stages.backward

    def profiled_backward(*args: object, **kwargs: object) -> object:
        start = time.perf_counter()
        backward_profile.enable()  # cProfile hooks the thread that calls enable()
        try:
            return original(*args, **kwargs)
        finally:
            backward_profile.disable()
            backward_seconds[0] += time.perf_counter() - start

    forward_profile = cProfile.Profile()
    if backward_on_its_own_thread:
        function.stages.backward = profiled_backward
    try:
        forward_profile.enable()
        for _ in range(calls):
            step()
        forward_profile.disable()
    finally:
        function.stages.backward = original
    profiles = [("the calling thread", forward_profile)]
    if backward_on_its_own_thread:
        profiles.append(("our backward stage, on autograd's thread", backward_profile))
    for title, profile in profiles:
        text = io.StringIO()
        pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(25)
        print(f"cProfile of {calls} forward+backward calls of ours, {title}, by own time:")
        print(text.getvalue())
    if backward_on_its_own_thread:
        print(f"our backward stage: {backward_seconds[0] / calls * 1e6:.1f} us per call (profiled)")


def record_launches() -> list[str]:
    """Make the launchers' default dispatch record launches instead of running them, aiming at
    an H200's programs: the host path is then everything but Triton's launcher. (The default
    dispatch is a frozen module-level value the launchers' defaults are bound to; this tool
    alone rewrites it, for the rest of its process.) Returns the list the kernel names go to."""
    from triton_syncbn import launchers

    recorded: list[str] = []
    dispatch = launchers._DEFAULT_DISPATCH
    object.__setattr__(dispatch, "launch", lambda kernel, grid, args, kwargs: recorded.append(kernel.fn.__name__))
    object.__setattr__(dispatch, "programs", launchers.PROGRAMS_PER_SM * 132)
    return recorded


def empty_triton_launch(device: torch.device) -> Callable[[], None]:
    """One launch of a Triton kernel that stores a scalar: Triton's own host cost."""
    import triton
    import triton.language as tl

    @triton.jit
    def _store_one(pointer, value, BLOCK: tl.constexpr):
        tl.store(pointer + tl.arange(0, BLOCK), value)

    target = torch.empty(16, device=device)
    return lambda: _store_one[(1,)](target, 1.0, BLOCK=16)


if __name__ == "__main__":
    sys.exit(main())
