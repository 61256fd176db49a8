"""GPU variants: compiled Triton kernels on CUDA (skipped cleanly without a GPU).

``bench/gpu_check.sh`` runs these on a GPU machine, unchanged.
"""

from __future__ import annotations

import pytest
import torch

import triton_syncbn
from cluster import GlooCluster
from oracle import Case, check_case, unsupported_here
from rank_tasks import run_case
from test_distributed import CASES as DISTRIBUTED_CASES
from test_module import SINGLE_PROCESS_CASES

pytestmark = pytest.mark.gpu

GPU_CASES = [
    Case(batches=(8,), tail=(16, 9, 11), device="cuda"),
    Case(batches=(8,), tail=(16, 9, 11), channels_last=True, dtype=torch.bfloat16, device="cuda"),
    Case(batches=(64,), tail=(33,), dtype=torch.float16, param_dtype=torch.float16, device="cuda"),
    Case(batches=(4,), tail=(8, 3, 17, 19), channels_last=True, device="cuda"),
    Case(batches=(3,), tail=(5, 200, 300), device="cuda"),  # several splits per channel
    Case(batches=(6,), momentum=None, steps=3, dtype=torch.float64, device="cuda"),
    Case(batches=(6,), training=False, device="cuda"),
    # the fused epilogues (activation, residual add) in one process
    Case(batches=(7,), activation="relu", device="cuda"),
    Case(
        batches=(5,),
        tail=(4, 3, 5),
        channels_last=True,
        activation="leaky_relu",
        negative_slope=0.2,
        residual="contiguous",
        device="cuda",
    ),
    Case(batches=(5,), dtype=torch.bfloat16, activation="silu", residual="same", device="cuda"),
    Case(batches=(5,), residual="same", device="cuda"),
    Case(batches=(5,), training=False, activation="relu", residual="same", device="cuda"),
    Case(batches=(5,), affine=False, activation="silu", residual="contiguous", device="cuda"),
    Case(
        batches=(5,),
        tail=(5,),
        dtype=torch.float64,
        activation="leaky_relu",
        residual="same",
        momentum=None,
        device="cuda",
    ),
    Case(batches=(6,), track_running_stats=False, device="cuda"),
    # S odd, contiguous: channel runs (S = 49; fp32 runs of 4, bf16 of 8 channels) and edges mode
    # (S = 169 fp32, 361 bf16: aligned interiors, their misaligned edges after the loop)
    Case(batches=(6,), tail=(8, 7, 7), device="cuda"),
    Case(batches=(6,), tail=(16, 7, 7), dtype=torch.bfloat16, activation="relu", residual="same", device="cuda"),
    Case(batches=(3,), tail=(4, 13, 13), device="cuda"),
    Case(batches=(2,), tail=(8, 19, 19), dtype=torch.bfloat16, activation="silu", residual="same", device="cuda"),
    # 16-bit channels_last with 64+ channels: the gradient sums' and statistics' folded accumulators
    # (launchers._folds_within_threads; 64-row steps need rows enough for the GPU's grid)
    Case(
        batches=(32,),
        tail=(128, 28, 28),
        channels_last=True,
        dtype=torch.bfloat16,
        activation="relu",
        residual="same",
        device="cuda",
    ),
    # 16-bit statistics with N whole and S not (kernels/stats.py, TAIL_LOOP): splits of whole
    # columns without selects and splits of a partial last column, S = 784; edges mode with rows of
    # 9400 interior positions, steps of 2048 on 2 warps (S9's channels, fewer of them)
    Case(batches=(32,), tail=(64, 28, 28), dtype=torch.bfloat16, device="cuda"),
    Case(batches=(2,), tail=(128, 97, 97), dtype=torch.bfloat16, activation="relu", residual="same", device="cuda"),
] + [Case(**{**case.__dict__, "device": "cuda"}) for case in SINGLE_PROCESS_CASES if case.world == 1]


@pytest.mark.parametrize("case", GPU_CASES, ids=lambda case: case.id)
def test_compiled_kernels_match_oracle(case: Case) -> None:
    if unsupported_here(case):
        pytest.skip(unsupported_here(case))
    check_case(case, [run_case(case)])


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_in_kernel_split_merges_are_ordered_and_reproducible(channels_last: bool) -> None:
    """The launchers' own splits on this GPU (channels_last: two merge levels), so many programs
    race for each merge ticket: 20 training steps are bitwise equal, match float64 BatchNorm, and
    leave the layer's tickets zero. A missing fence would show as a stale partial in some step."""
    from triton_syncbn import launchers
    from triton_syncbn.layout import channel_view

    torch.manual_seed(0)
    x = torch.randn(32, 256, 28, 28, device="cuda") * 2 + 3
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    dy = torch.randn_like(x)
    view = launchers.collapse(channel_view(x))
    tiling = launchers.choose_tiling(view, launchers._target_programs(x.device))
    groups = launchers.merge_plan(tiling.block_c, tiling.splits).groups
    assert tiling.splits > 1 and (groups > 1 or not channels_last), tiling
    module = triton_syncbn.SyncBatchNorm(256, momentum=1.0).cuda()
    steps = []
    for _ in range(20):
        source = x.detach().requires_grad_(True)
        module.weight.grad = module.bias.grad = None
        output = module(source)
        output.backward(dy)
        steps.append((output, source.grad, module.weight.grad, module.bias.grad, module.running_var.clone()))
    assert int(module.__dict__["_merge_tickets_by_device"][1].abs().sum()) == 0
    for later in steps[1:]:
        assert all(torch.equal(a, b) for a, b in zip(steps[0], later, strict=True))
    reference = x.double().detach().requires_grad_(True)
    weight = torch.ones(256, dtype=torch.float64, device="cuda", requires_grad=True)
    bias = torch.zeros(256, dtype=torch.float64, device="cuda", requires_grad=True)
    running_var = torch.ones(256, dtype=torch.float64, device="cuda")
    expected = torch.nn.functional.batch_norm(
        reference, torch.zeros_like(running_var), running_var, weight, bias, training=True, momentum=1.0
    )
    expected.backward(dy.double())
    got = steps[0]
    for actual, wanted in zip(got, (expected, reference.grad, weight.grad, bias.grad, running_var), strict=True):
        torch.testing.assert_close(actual.double(), wanted, rtol=1e-4, atol=1e-4)


def test_no_host_synchronization_in_training_step() -> None:
    module = triton_syncbn.SyncBatchNorm(32, momentum=None).cuda()
    x = torch.randn(16, 32, 14, 14, device="cuda", requires_grad=True)
    module(x).sum().backward()  # compile first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        module(x).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert int(module.num_batches_tracked) == 2


@pytest.mark.distributed
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs at least 2 GPUs")
def test_nccl_matches_oracle() -> None:
    world = min(torch.cuda.device_count(), 4)
    cluster = GlooCluster(world, {"TRITON_INTERPRET": "0"}, backend="nccl")
    try:
        for case in DISTRIBUTED_CASES:
            if case.world <= world:
                case = Case(**{**case.__dict__, "device": "cuda"})
                check_case(case, cluster.run(run_case, case))
    finally:
        cluster.close()


@pytest.mark.distributed
def test_gloo_ranks_sharing_one_gpu_match_oracle() -> None:
    """Compiled kernels meeting real collectives on a one-GPU machine: 4 gloo ranks (gloo takes
    CUDA tensors; NCCL refuses two ranks on one device) all on cuda:0, every distributed case."""
    failures = []
    cluster = GlooCluster(4, {"TRITON_INTERPRET": "0"})
    try:
        for case in DISTRIBUTED_CASES:
            if unsupported_here(case):
                continue  # the CPU runs of test_distributed cover it on a torch that has it
            case = Case(**{**case.__dict__, "device": "cuda"})
            try:  # every case runs; the failure lists them all (a GPU lease is short)
                check_case(case, cluster.run(run_case, case))
            except AssertionError as error:
                failures.append(f"{case.id}: {str(error)[:600]}")
    finally:
        cluster.close()
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("batch", [16, 0], ids=["batch16", "empty"])
def test_cuda_graph_captures_a_training_step(batch: int) -> None:
    """Forward + backward (momentum=None, fused relu) captured once, replayed, equal to eager."""
    torch.manual_seed(0)
    captured = triton_syncbn.SyncBatchNorm(32, momentum=None, activation="relu").cuda()
    eager = triton_syncbn.SyncBatchNorm(32, momentum=None, activation="relu").cuda()
    static_x = torch.randn(batch, 32, 8, 8, device="cuda", requires_grad=True)
    static_grad = torch.randn(batch, 32, 8, 8, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (compile) outside the capture
        for _ in range(2):
            captured(static_x).backward(static_grad)
    torch.cuda.current_stream().wait_stream(side)
    for _ in range(2):
        eager(static_x).backward(static_grad)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = captured(static_x)
        static_y.backward(static_grad)
    for _ in range(3):
        new_x = torch.randn(batch, 32, 8, 8, device="cuda")
        static_x.data.copy_(new_x)
        graph.replay()
        x = new_x.clone().requires_grad_(True)
        expected = eager(x)
        expected.backward(static_grad)
        torch.testing.assert_close(static_y, expected)
    torch.testing.assert_close(captured.running_mean, eager.running_mean)
    torch.testing.assert_close(captured.running_var, eager.running_var)
    assert int(captured.num_batches_tracked) == int(eager.num_batches_tracked)


def test_compiled_model_on_cuda_matches_eager() -> None:
    """torch.compile(fullgraph=True) on CUDA: the custom ops around the compiled Triton kernels."""
    import copy

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(), torch.nn.Conv2d(16, 8, 3)
    )
    eager = triton_syncbn.convert_sync_batchnorm(model, fuse_activation=True).cuda()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True)
    for _ in range(2):
        x = torch.randn(8, 3, 12, 12, device="cuda").to(memory_format=torch.channels_last)
        expected, actual = eager(x), compiled(x)
        torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)
        expected.square().sum().backward()
        actual.square().sum().backward()
    for p, q in zip(eager.parameters(), compiled_model.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-3, rtol=1e-3)
    for p, q in zip(eager.buffers(), compiled_model.buffers(), strict=True):
        torch.testing.assert_close(q, p, atol=1e-5, rtol=1e-5)


def test_more_than_2_31_elements() -> None:
    """Offsets past 2**31 (int64 indexing): the tail of a 3.2e9-element tensor is normalized right."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 2**29 + 13, device="cuda", dtype=torch.bfloat16)
    assert x.numel() > 2**31
    module = triton_syncbn.SyncBatchNorm(3).cuda()
    with torch.no_grad():
        module.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
        module.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    x.requires_grad_(True)
    y = module(x)
    var, mean = torch.var_mean(x.detach().float(), dim=(0, 2), correction=0)
    tail = x.detach()[1, :, -4096:].float()
    expected = (tail - mean[:, None]) / torch.sqrt(var[:, None] + module.eps) * module.weight[:, None]
    expected = expected + module.bias[:, None]
    torch.testing.assert_close(y.detach()[1, :, -4096:].float(), expected, atol=3e-2, rtol=3e-2)
    y.backward(torch.ones_like(y))  # a constant output grad: the input grad is ~0 everywhere
    assert x.grad[1, :, -4096:].float().abs().max() < 1e-2
    torch.testing.assert_close(module.running_mean, 0.1 * mean, atol=1e-3, rtol=1e-3)
