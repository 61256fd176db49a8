"""Triton kernels of triton-syncbn, one module per pipeline stage.

Installed as ``triton_syncbn.kernels``. Nothing here talks to other ranks or touches CUDA at
import time; launchers in ``triton_syncbn.launchers`` pick blocks and grids.
"""

from .backward import _backward_dx_kernel, _backward_reduce_kernel, _run_backward_reduce_kernel
from .normalize import _normalize_kernel
from .stats import _partial_stats_kernel, _run_stats_kernel

# Triton decides when a kernel is decorated whether it runs compiled or through its CPU
# interpreter (TRITON_INTERPRET=1 set before triton is imported); record that decision, read off
# the kernel object itself, so the launchers know which devices these kernels can serve.
INTERPRETED: bool = type(_partial_stats_kernel).__name__ == "InterpretedFunction"

__all__ = [
    "INTERPRETED",
    "_backward_dx_kernel",
    "_backward_reduce_kernel",
    "_normalize_kernel",
    "_partial_stats_kernel",
    "_run_backward_reduce_kernel",
    "_run_stats_kernel",
]
