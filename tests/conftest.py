"""Shared fixtures for the whole suite.

Every test process uses one torch thread (the CI machine has 2 cores shared by Ray workers), and
tests that need Ray share one local instance for the session (`ray_local`): 2 CPUs, no
dashboard, bound to 127.0.0.1, started lazily by the first test that asks for it.
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
