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
import codegen  # noqa: E402
import codegen_check  # noqa: E402

pytestmark = [
    pytest.mark.skipif(INTERPRETED, reason="codegen needs the compiled (non-interpreted) kernels"),
    pytest.mark.slow,
]


@pytest.mark.parametrize("arch", [90, 80])
@pytest.mark.parametrize("spec", codegen_check.SPECS, ids=lambda spec: spec.name)
def test_specialization_compiles_and_vectorizes(spec: codegen_check.Spec, arch: int) -> None:
    results = codegen_check.check(spec, arch)
    roles = {codegen_check.STREAMING.get(name) for name, _ in results}
    assert roles >= {"statistics", "normalize", "gradient sums", "input gradient"}
    failures = {name: problems for name, problems in results if problems}
    assert not failures, failures


def test_split_reductions_merge_in_kernel() -> None:
    """A forced 8-way split and the launchers' own channels_last split (two merge levels) launch
    two kernels per direction, and their merges carry the ordering the GPU needs."""
    for spec in (next(spec for spec in codegen_check.SPECS if spec.splits), codegen_check.SPECS[1]):
        launches = codegen_check.record_launches(spec)
        assert [launch.name for launch in launches] == list(codegen.PER_CHANNEL_KERNELS), spec.name
        reductions = [launch for launch in launches if "GROUP_SPLITS" in launch.kwargs]
        values = dict(zip(reductions[0].kernel.arg_names, reductions[0].args, strict=False))
        assert values["num_splits"] > 1, spec.name
        for launch in reductions:
            ptx = codegen_check.compile_launch(launch, 90).asm["ptx"]
            assert codegen_check.merge_ordering_failures(launch, ptx) == []
    unfenced = "st.global.b64 [x]; atom.global.gpu.acq_rel.add.u32"  # no barrier between store and ticket
    assert codegen_check.merge_ordering_failures(reductions[0], unfenced) != []


def test_ptx_checks() -> None:
    """Local memory and oversized PTX (slow to compile on Triton 3.6) fail; a small kernel passes."""
    assert codegen_check.ptx_failures("ld.global.v4.b32 {%r1, %r2, %r3, %r4}, [%rd1];\n" * 10) == []
    assert codegen_check.ptx_failures(".local .align 8 .b8 __local_depot0[8];\n") != []
    assert codegen_check.ptx_failures("add.s32 %r1, %r2, %r3;\n" * (codegen_check.MAX_PTX_LINES + 1)) != []


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
