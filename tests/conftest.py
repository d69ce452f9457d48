"""Shared fixtures for the whole suite.

Every test process uses one torch thread (the CI machine has 2 cores shared by Ray workers), and
tests that need Ray share one local instance for the session (`ray_local`): 2 CPUs, no
dashboard, bound to 127.0.0.1, started lazily by the first test that asks for it. Slow tests
(marked, or using a server fixture) form one xdist group, so a parallel run keeps them serial.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest_plugins = ["tests.postgres_fixture"]

os.environ.setdefault("OMP_NUM_THREADS", "1")
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


# Fixtures that start a server or a cluster: every test using one is slow, marked or not.
SLOW_FIXTURES = ("ray_local", "postgres_url", "postgres_server", "loopback_cluster")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(name in getattr(item, "fixturenames", ()) for name in SLOW_FIXTURES):
            item.add_marker(pytest.mark.slow)
        if item.get_closest_marker("slow") is not None:
            # Under pytest-xdist (`make test` runs `-n 2 --dist loadgroup`), every slow test runs
            # on one worker, one after another, as in a plain run: they share the session's Ray
            # instance and PostgreSQL server, and each sizes its Ray cluster to the 2 cores. The
            # other worker takes the tests that start no server.
            item.add_marker(pytest.mark.xdist_group("serial"))
