"""The contract between the layers: both kernel backends implement ``contract.KernelBackend``,
and the flat argument lists round-trip through the contract objects by name."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import torch

from triton_syncbn import launchers, torch_path
from triton_syncbn.contract import (
    BACKWARD_FIELDS,
    FORWARD_FIELDS,
    BackwardCall,
    Epilogue,
    ForwardCall,
    Gradients,
    KernelBackend,
    RunningStats,
    SavedStatistics,
)

STAGES = ("partial_stats", "normalize", "backward_reduce", "backward_dx", "derivative_from_output")


def _protocol_parameters(stage: str) -> list[inspect.Parameter]:
    return list(inspect.signature(getattr(KernelBackend, stage)).parameters.values())[1:]  # without self


@pytest.mark.parametrize("backend", [launchers, torch_path], ids=["launchers", "torch_path"])
@pytest.mark.parametrize("stage", STAGES)
def test_backend_implements_the_protocol(backend: object, stage: str) -> None:
    """Same parameters, names, kinds and defaults, in order; extras only keyword-only with defaults."""
    assert isinstance(backend, KernelBackend)
    expected = _protocol_parameters(stage)
    actual = list(inspect.signature(getattr(backend, stage)).parameters.values())
    shared = [(p.name, p.kind, p.default) for p in actual[: len(expected)]]
    assert shared == [(p.name, p.kind, p.default) for p in expected]
    for extra in actual[len(expected) :]:
        assert extra.kind is inspect.Parameter.KEYWORD_ONLY and extra.default is not inspect.Parameter.empty, extra


def test_forward_call_round_trips_by_name() -> None:
    x, residual = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    weight, bias, mean, var, counter = torch.ones(3), torch.zeros(3), torch.zeros(3), torch.ones(3), torch.tensor(0)
    call = ForwardCall(x, weight, bias, RunningStats(mean, var, counter, None), Epilogue(residual, 2, 0.3), 1e-3,
                       True, "group", check_finite=True)  # fmt: skip
    flat = call.flat()
    assert len(flat) == len(FORWARD_FIELDS)
    named = dict(zip(FORWARD_FIELDS, flat, strict=True))
    assert named["residual"] is residual and named["num_batches_tracked"] is counter and named["momentum"] is None
    assert named["activation"] == 2 and named["group_name"] == "group" and named["check_finite"] is True
    assert ForwardCall.from_flat(*flat) == call
    assert ForwardCall.from_flat(*ForwardCall(x, None, None, None, Epilogue(), 1e-5, False, "").flat()).running is None


def test_backward_call_round_trips_by_name() -> None:
    x = torch.randn(2, 3, 4)
    saved = SavedStatistics(torch.zeros(3), torch.ones(3), torch.full((3,), 8.0))
    call = BackwardCall(torch.randn_like(x), x, None, torch.zeros(3), saved, Epilogue(None, 3, 0.0), "",
                        Gradients(True, False, False, True))  # fmt: skip
    flat = call.flat()
    assert len(flat) == len(BACKWARD_FIELDS)
    assert dict(zip(BACKWARD_FIELDS, flat, strict=True))["needs"] == [True, False, False, True]
    assert BackwardCall.from_flat(*flat) == call


# Top to bottom; a module may import the ones below it and the shared ones (docs/architecture.md).
LAYERS = ["convert", "module", "functional", "function", "ops", "composite", "stages", "backend", "launchers",
          "torch_path"]  # fmt: skip
SHARED = {"contract": set(), "distributed": set(), "layout": set(), "tuning": set()}
# The one upward edge, resolved at call time: the classmethod alias of ``convert_sync_batchnorm``
# that torch's SyncBatchNorm API has (``SyncBatchNorm.convert_sync_batchnorm``).
ALLOWED_UPWARD = {("module", "convert")}


def _package_imports(path: Path) -> set[str]:
    """The ``triton_syncbn`` modules ``path`` imports (relative or absolute, any depth)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level == 1:
                names.add(module.split(".")[0] if module else "")
                names.update(alias.name for alias in node.names if not module)
            elif module.startswith("triton_syncbn."):
                names.add(module.split(".")[1])
            elif module == "triton_syncbn":
                names.update(alias.name for alias in node.names)
    return names - {""}


def test_imports_point_down_the_layers() -> None:
    root = Path(__file__).resolve().parents[1] / "triton_syncbn"
    order = {name: index for index, name in enumerate(LAYERS)}
    for path in root.glob("*.py"):
        name = path.stem
        if name == "__init__":
            continue
        for imported in _package_imports(path):
            if imported == "kernels" or (name, imported) in ALLOWED_UPWARD:
                continue
            if name in SHARED:
                assert imported in SHARED[name], f"{name} (shared) imports {imported}"
            elif imported not in SHARED:
                assert name in order and imported in order, f"{name} imports {imported}: not in LAYERS"
                assert order[imported] > order[name], f"{name} imports {imported}, a layer above it"
