"""The wheel ships the kernels as ``triton_syncbn.kernels`` and nothing as a top-level ``kernels``."""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_layout(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("triton_syncbn-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    kernel_files = {path.name for path in (ROOT / "kernels").glob("*.py")}
    assert {f"triton_syncbn/kernels/{name}" for name in kernel_files} <= set(names)
    assert not any(name.startswith(("kernels/", "tests/", "bench/")) for name in names), names


def test_kernels_never_import_torch_distributed() -> None:
    for path in (ROOT / "kernels").glob("*.py"):
        tree = ast.parse(path.read_text())
        imported = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
        imported += [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
        assert not any(name.startswith("torch.distributed") for name in imported), path.name


# Every torch.cuda entry point that would query or initialize a device raises inside the child
# process: importing the package (and every module of it) must call none of them. (On a CPU-only
# machine torch.cuda.is_initialized() is always False, so asking it proves nothing.)
_NO_CUDA_IMPORT = """
import importlib, pkgutil, torch

def refuse(*args, **kwargs):
    raise AssertionError("CUDA touched at import time")

for name in ("_lazy_init", "init", "is_available", "device_count", "current_device", "get_device_properties",
             "get_device_capability", "get_device_name", "synchronize", "set_device", "current_stream"):
    setattr(torch.cuda, name, refuse)
import triton_syncbn
for module in pkgutil.walk_packages(triton_syncbn.__path__, "triton_syncbn."):
    importlib.import_module(module.name)
print("ok")
"""


def test_import_touches_no_cuda() -> None:
    """Importing every module of the package calls no torch.cuda device query."""
    result = subprocess.run([sys.executable, "-c", _NO_CUDA_IMPORT], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_the_no_cuda_probe_can_fail() -> None:
    """The probe above does catch a module that queries CUDA when imported."""
    probe = _NO_CUDA_IMPORT.replace("import triton_syncbn\n", "import triton_syncbn\ntorch.cuda.is_available()\n", 1)
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode != 0 and "CUDA touched at import time" in result.stderr
