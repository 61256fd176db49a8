"""torchrun launches the example unchanged; checkpoints move between torch's BatchNorms and ours."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import triton_syncbn

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.distributed
@pytest.mark.slow
def test_torchrun_two_cpu_processes() -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += [str(ROOT / "examples" / "ddp_train.py"), "--steps", "3"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 rank(s), backend gloo" in result.stdout
    assert "OK: running statistics are bitwise identical on every rank" in result.stdout


def conv_net(norm: type[nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), norm(6), nn.ReLU(), nn.Conv2d(6, 4, 3), norm(4), nn.Flatten(), nn.Linear(64, 2)
    ).double()


def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: range) -> list[float]:
    losses = []
    for step in steps:
        generator = torch.Generator().manual_seed(step)
        inputs = torch.randn(5, 3, 6, 6, generator=generator, dtype=torch.float64) * 2 + 1
        loss = model(inputs).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("norm", [nn.BatchNorm2d, nn.SyncBatchNorm], ids=["BatchNorm2d", "torch-SyncBatchNorm"])
def test_checkpoint_round_trip_resumes_identically(tmp_path: Path, norm: type[nn.Module]) -> None:
    """Train 2 steps with torch's layer, checkpoint, resume 2 steps with ours (and back)."""
    reference = conv_net(nn.BatchNorm2d)  # torch.nn.SyncBatchNorm itself only trains on GPUs
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    train(reference, reference_optimizer, range(2))
    source = conv_net(norm)
    source.load_state_dict(reference.state_dict())
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": source.state_dict(), "optimizer": reference_optimizer.state_dict()}, path)

    checkpoint = torch.load(path)
    ours = triton_syncbn.convert_sync_batchnorm(conv_net(nn.BatchNorm2d))
    ours.load_state_dict(checkpoint["model"])
    ours_optimizer = torch.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9)
    ours_optimizer.load_state_dict(checkpoint["optimizer"])
    resumed = train(ours, ours_optimizer, range(2, 4))
    expected = train(reference, reference_optimizer, range(2, 4))
    assert resumed == pytest.approx(expected, rel=1e-12, abs=1e-12)

    back = conv_net(norm)
    back.load_state_dict(ours.state_dict())
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(back.state_dict()[name], value, rtol=1e-12, atol=1e-12, msg=name)
