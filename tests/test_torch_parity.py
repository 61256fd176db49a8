"""Where torch's BatchNorm raises, ours raises the same error, and changes no state."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from triton_syncbn import SyncBatchNorm, sync_batch_norm


@pytest.mark.parametrize(
    ("training", "eps", "message"),
    [
        (True, 0.0, "eps must be positive during training, but got 0.0"),
        (True, -1e-3, "eps must be positive during training"),
        (False, -1e-3, "eps must be non-negative, but got -0.001"),
    ],
    ids=["train-zero", "train-negative", "eval-negative"],
)
def test_bad_eps_raises_like_torch_and_changes_nothing(training: bool, eps: float, message: str) -> None:
    x = torch.randn(4, 3, 5)
    ours, reference = SyncBatchNorm(3, eps=eps).train(training), nn.BatchNorm1d(3, eps=eps).train(training)
    with pytest.raises(ValueError, match=message):
        reference(x)
    before = {name: value.clone() for name, value in ours.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        ours(x)
    for name, value in ours.state_dict().items():
        assert torch.equal(value, before[name]), name
    with pytest.raises(ValueError, match=message):
        sync_batch_norm(x, torch.zeros(3), torch.ones(3), training=training, eps=eps)


def test_zero_eps_in_eval_is_allowed_as_in_torch() -> None:
    x = torch.randn(4, 3, 5)
    ours, reference = SyncBatchNorm(3, eps=0.0).eval(), nn.BatchNorm1d(3, eps=0.0).eval()
    with torch.no_grad():
        for module in (ours, reference):
            module.running_var.fill_(2.0)
    torch.testing.assert_close(ours(x), reference(x))
