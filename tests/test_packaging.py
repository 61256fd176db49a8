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


def test_import_initializes_no_cuda() -> None:
    """Importing the package initializes no CUDA context."""
    code = "import torch, triton_syncbn; assert not torch.cuda.is_initialized(); print('ok')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "ok"
