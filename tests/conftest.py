"""Shared fixtures for the whole suite.

Every test process uses one torch thread (the CI machine has 2 cores shared by Ray workers), and
tests that need Ray share one local instance for the session (`ray_local`): 2 CPUs, no
dashboard, bound to 127.0.0.1, started lazily by the first test that asks for it (one per xdist
worker). Slow tests (marked, or using a server fixture) form two xdist groups, each kept in
order on one worker. Tests that start a multi-node cluster are also marked `cluster`: `make test`
leaves them out, `make test-all` (CI) runs them.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest_plugins = ["tests.postgres_fixture"]

os.environ.setdefault("OMP_NUM_THREADS", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # One Ray temp folder per xdist worker (sessions, sockets, logs), inherited by the drivers
    # and nodes its tests start, so the two workers' Ray instances never meet; under a
    # RAY_TMPDIR the user set, each worker gets its own folder inside it.
    _base = os.environ.get("RAY_TMPDIR") or "/tmp"
    os.environ["RAY_TMPDIR"] = os.path.join(_base, f"ray-{os.environ['PYTEST_XDIST_WORKER']}")
    os.makedirs(os.environ["RAY_TMPDIR"], exist_ok=True)
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray instance (`launch.ray_env.init_ray(num_cpus=2)`), shut down after the session."""
    import ray

    from launch.ray_env import init_ray

    started = not ray.is_initialized()
    context = init_ray(num_cpus=2)
    yield context
    if started:
        ray.shutdown()


# Slow tests of these modules start search drivers or multi-node clusters: one xdist group.
CLUSTER_MODULES = ("test_cluster.py", "test_ray_env.py", "test_loopback.py", "test_search.py")

# Fixtures that start a server or a cluster: every test using one is slow, marked or not.
SLOW_FIXTURES = ("ray_local", "postgres_url", "postgres_server", "loopback_cluster",
                 "two_node_cluster")

# Fixtures that start a multi-node Ray cluster on loopback (minutes per test): marked `cluster`,
# left out of `make test` and run by `make test-all` (what CI runs).
CLUSTER_FIXTURES = ("loopback_cluster", "two_node_cluster")


def pytest_collection_modifyitems(config, items):
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        if any(name in fixtures for name in CLUSTER_FIXTURES):
            item.add_marker(pytest.mark.cluster)
        if any(name in fixtures for name in SLOW_FIXTURES):
            item.add_marker(pytest.mark.slow)
        if item.get_closest_marker("slow") is not None:
            # Under pytest-xdist (`make test` runs `-n 2 --dist loadgroup`) the slow tests form
            # two groups, each run by one worker in collection order, as in a plain run: the
            # search drivers and clusters of CLUSTER_MODULES, and the rest (trials, storage,
            # timm, supernet). Each worker has its own session Ray instance, PostgreSQL server
            # and Ray temp folder (below); tests that start no server fill in on both.
            module = item.path.name if hasattr(item, "path") else ""
            group = "clusters" if module in CLUSTER_MODULES else "trials"
            item.add_marker(pytest.mark.xdist_group(group))
