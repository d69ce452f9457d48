"""Starting or joining Ray the way this project needs it.

One place decides how the driver meets Ray: a local instance bound to loopback (the default), or
an existing cluster given by `--address` / `RAY_ADDRESS`. Token authentication stays on (Ray's
default); nothing binds beyond loopback unless the user passes an address.

Why the environment variable: by default Ray binds to the machine's interface address, and a
driver given `127.0.0.1:PORT` rewrites it to that address (and hangs when the cluster listens on
loopback). `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` in every Ray process of a local cluster (the
driver included, and inherited by the raylets it starts) keeps Ray on 127.0.0.1 throughout.
"""

from __future__ import annotations

import os
from typing import Any

LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def is_loopback_address(address: str | None) -> bool:
    """True for `None`/`local` (a new local instance) and for 127.x / localhost addresses."""
    if address in (None, "", "local"):
        return True
    host = address.split("://")[-1].rsplit(":", 1)[0]
    return host.startswith("127.") or host in ("localhost", "[::1]", "::1")


def use_loopback() -> None:
    """Make this process (and the Ray processes it starts) use 127.0.0.1."""
    os.environ.update(LOOPBACK_ENV)


def init_ray(address: str | None = None, *, num_cpus: int | None = None,
             num_gpus: int | None = None, **kwargs: Any):
    """Start a local Ray instance on loopback, or join the cluster at `address`.

    `address` None/"local" starts a local instance sized by `num_cpus`/`num_gpus` (defaults: the
    machine). `auto` or `HOST:PORT` joins an existing cluster; `RAY_ADDRESS` in the environment is
    honoured when `address` is None. Idempotent: returns the existing context if Ray is up.
    """
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context()
    address = address or os.environ.get("RAY_ADDRESS") or None
    if is_loopback_address(address):
        use_loopback()
    kwargs.setdefault("include_dashboard", False)
    kwargs.setdefault("log_to_driver", True)
    if address in (None, "", "local"):
        return ray.init(num_cpus=num_cpus, num_gpus=num_gpus, **kwargs)
    return ray.init(address=address, **kwargs)
