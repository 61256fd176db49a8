"""Every kernel specialization the launchers pick compiles for real GPUs (sm_80, sm_90), no GPU needed.

The checks themselves live in ``bench/codegen_check.py`` (also a command); this runs each of
its specializations as a test.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from triton_syncbn.kernels import INTERPRETED

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import codegen_check  # noqa: E402

pytestmark = [
    pytest.mark.skipif(INTERPRETED, reason="codegen needs the compiled (non-interpreted) kernels"),
    pytest.mark.slow,
]


@pytest.mark.parametrize("arch", [90, 80])
@pytest.mark.parametrize("spec", codegen_check.SPECS, ids=lambda spec: spec.name)
def test_specialization_compiles_and_vectorizes(spec: codegen_check.Spec, arch: int) -> None:
    results = codegen_check.check(spec, arch)
    assert {name for name, _ in results} >= set(codegen_check.STREAMING)
    failures = {name: problems for name, problems in results if problems}
    assert not failures, failures


def test_multi_split_specialization_launches_the_combine_kernels() -> None:
    spec = next(spec for spec in codegen_check.SPECS if spec.splits)
    names = {launch.name for launch in codegen_check.record_launches(spec)}
    assert {"_combine_stats_kernel", "_combine_grad_sums_kernel"} <= names


def test_command_exit_status() -> None:
    assert codegen_check.main(["--arch", "90"]) == 0


def test_restated_specialization_rules_match_the_jit() -> None:
    import torch
    from codegen import specialize_like_jit
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    values = [1, 32, 7, 2**40, 0.5, None, torch.empty(4, device="meta"), torch.empty(3, dtype=torch.bfloat16)]
    for value in values:
        assert specialize_like_jit(value) == native_specialize_impl(BaseBackend, value, False, True, True), value
