"""Shared fixtures: lazily started gloo clusters for the plain-torch path and the interpreter."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch

from cluster import GlooCluster

CLUSTER_WORLD_SIZE = 4
BACKEND_ENVS = {
    "torch-cpu": {"TRITON_INTERPRET": "0"},
    "interpreter": {"TRITON_INTERPRET": "1"},
}


@pytest.fixture(scope="session")
def clusters() -> Iterator[Callable[[str], GlooCluster]]:
    """``clusters(backend)`` returns a running 4-rank gloo cluster for that kernel backend."""
    running: dict[str, GlooCluster] = {}

    def get(backend: str) -> GlooCluster:
        cluster = running.get(backend)
        if cluster is None or not cluster.healthy:
            cluster = running[backend] = GlooCluster(CLUSTER_WORLD_SIZE, BACKEND_ENVS[backend])
        return cluster

    yield get
    for cluster in running.values():
        cluster.close()


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
