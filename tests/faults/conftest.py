"""Fixtures of the fault tests: a local three-node RabbitMQ cluster, beside the system node."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from partnerbus.testing.cluster import ClusterError, LocalCluster


def build_cluster(**kwargs: object) -> LocalCluster:
    """A `LocalCluster` (not started); fails in CI and skips elsewhere when it cannot exist."""
    try:
        return LocalCluster(**kwargs)  # type: ignore[arg-type]
    except ClusterError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"cannot build the local cluster: {exc}")
        pytest.skip(f"cannot build the local cluster: {exc}")


@pytest.fixture(scope="session")
def cluster() -> Iterator[LocalCluster]:
    """Three clustered nodes (pbc1-3 on 5681-5683), stopped and removed after the session
    (kept, with the nodes' logs, under `PARTNERBUS_CLUSTER_DIR` when that is set)."""
    base = os.environ.get("PARTNERBUS_CLUSTER_DIR")
    with build_cluster(base_dir=base) if base else build_cluster() as c:
        print(f"\nlocal cluster started in {c.startup_seconds:.1f}s")
        yield c
