"""Starting or joining Ray the way this project needs it, and checking that a cluster can run it.

One place decides how the driver meets Ray: a local instance bound to loopback (the default), or
an existing cluster given by `--address` / `RAY_ADDRESS` (`auto` finds the cluster of the machine
the driver runs on, as under `ray job submit`). A local instance is always a new one of this
driver's own (`ray.init(address="local")`), even when another Ray instance runs on the machine:
without being told to, a driver never joins a cluster it happens to find. Token authentication
stays on: a local instance gets Ray's default (token mode, token in ~/.ray/auth_token, created
if missing) and a driver that joins a cluster runs in token mode too, with the cluster's token
from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token. Nothing binds beyond loopback
unless the user passes an address (and then the cluster, not this module, chose its
interfaces).

Why the environment variable: by default (Linux) a new Ray node registers the machine's
interface address and its servers listen on all interfaces, and a driver given `127.0.0.1:PORT`
rewrites it to that address (and hangs when the cluster listens on loopback).
`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` in every Ray process of a local cluster (the driver
included, and inherited by the raylets it starts) keeps Ray on 127.0.0.1 throughout; measured:
without it a local `ray.init` listened on `::` (every interface), with it on 127.0.0.1 only.

A run's folder (Ray Train's `RunConfig.storage_path`, where trials keep their checkpoints) must be
one that every node sees once the cluster has more than one machine: a trial restarted on another
node resumes from the checkpoint its first node wrote. `check_shared_storage` proves it by writing
a marker file from the driver and reading it back from a task pinned to every other alive node;
cloud URIs (s3://, gs://, ...) are shared by construction and pass.
"""

from __future__ import annotations

import os
import secrets
import socket
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spvit.errors import ConfigError

LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
AUTH_MODE_ENV = "RAY_AUTH_MODE"
MARKER_DIR = ".shared-check"


def is_loopback_address(address: str | None) -> bool:
    """True for `None`/`local` (a new local instance) and for 127.x / localhost addresses."""
    if address in (None, "", "local"):
        return True
    host = address.split("://")[-1].rsplit(":", 1)[0]
    return host.startswith("127.") or host in ("localhost", "[::1]", "::1")


def use_loopback() -> None:
    """Make this process (and the Ray processes it starts) use 127.0.0.1.

    Ray reads the variable once, when `ray` is first imported; a process that imported Ray
    before gets the constant itself set as well, or its node would bind to all interfaces."""
    os.environ.update(LOOPBACK_ENV)
    import sys

    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = False


def resolve_address(address: str | None) -> str | None:
    """The cluster address a driver will join: `address`, else RAY_ADDRESS; `auto` is looked up
    (RAY_ADDRESS, then the cluster last started on this machine). None/`local`: a new instance."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address in (None, "local"):
        return None
    if address == "auto":
        from ray._private.services import get_ray_address_from_environment

        found = get_ray_address_from_environment("auto", None)
        if found in (None, "auto"):
            raise ConfigError("--address auto found no Ray cluster on this machine. Start one"
                              " (`ray start --head` or `ray up`), pass --address HOST:PORT,"
                              " or drop --address to start a local instance.")
        address = found
    return address


def _token_available() -> bool:
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        return Path(path).expanduser().is_file()
    return (Path.home() / ".ray" / "auth_token").is_file()


def ensure_local_token() -> Path | None:
    """The token a new local cluster in token mode needs, created if none is available.

    `ray.init` creates ~/.ray/auth_token for the local instance it starts; a cluster started
    another way (`ray.cluster_utils.Cluster`, as `launch.cluster_check.LoopbackCluster` does)
    does not, and its GCS then exits for want of a token. This writes one the way Ray does (a
    random token, in ~/.ray/auth_token, readable by the owner only; an existing token, file or
    variable, is kept) and returns the path it wrote, or None.
    """
    if _token_available():
        return None
    from ray._private.authentication.authentication_token_generator import (
        generate_new_authentication_token,
    )

    path = Path.home() / ".ray" / "auth_token"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".auth_token.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(generate_new_authentication_token())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    raylet = sys.modules.get("ray._raylet")
    if raylet is not None:  # the token loader caches "no token"
        raylet.AuthenticationTokenLoader.instance().reset_cache()
    return path


def ensure_token_auth(*, joining: bool) -> None:
    """Keep Ray's token authentication on for this process and the Ray processes it starts.

    An explicit `RAY_AUTH_MODE` is respected (with a warning when it turns authentication off).
    A driver that joins a cluster gets `RAY_AUTH_MODE=token` (Ray itself only turns it on for a
    cluster it found on its own) and must have the cluster's token.
    """
    mode = os.environ.get(AUTH_MODE_ENV)
    if mode is not None and mode.lower() != "token":
        warnings.warn(f"{AUTH_MODE_ENV}={mode}: Ray token authentication is off, so anyone who"
                      " reaches the cluster's ports can run code on it. Unset it to keep it on.",
                      RuntimeWarning, stacklevel=3)
        return
    if not joining:
        return  # ray.init turns token mode on for a new local instance and creates the token
    os.environ[AUTH_MODE_ENV] = "token"
    refresh_ray_config()
    if not _token_available():
        raise ConfigError("joining a Ray cluster needs its authentication token, but none was"
                          " found (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)."
                          " Run `ray get-auth-token` on the head node and export"
                          " RAY_AUTH_TOKEN=<token>, or copy the head's ~/.ray/auth_token here.")


def refresh_ray_config() -> None:
    """Make an already imported Ray re-read RAY_AUTH_MODE (as Ray does when it enables tokens)."""
    import sys

    raylet = sys.modules.get("ray._raylet")
    if raylet is not None:
        raylet.Config.initialize("")


def local_init_kwargs(*, num_cpus: int | None = None, num_gpus: int | None = None,
                      **kwargs: Any) -> dict[str, Any]:
    """The `ray.init` arguments of a new local instance: `address="local"` makes Ray start one
    even when another instance runs on this machine (Ray's own default, `address=None`, would
    join that one)."""
    return {**kwargs, "address": "local", "num_cpus": num_cpus, "num_gpus": num_gpus}


def init_ray(address: str | None = None, *, num_cpus: int | None = None,
             num_gpus: int | None = None, storage_path: str | os.PathLike | None = None,
             **kwargs: Any):
    """Start a local Ray instance on loopback, or join the cluster at `address`.

    `address` None/"local" starts a local instance sized by `num_cpus`/`num_gpus` (defaults: the
    machine). `auto` or `HOST:PORT` joins an existing cluster; `RAY_ADDRESS` in the environment is
    honoured when `address` is None. Idempotent: returns the existing context if Ray is up.
    With `storage_path` (the run folder given to Ray Train) the cluster is checked to see it from
    every alive node (`check_shared_storage`); a `ConfigError` says which nodes do not.
    """
    import ray

    if not ray.is_initialized():
        target = resolve_address(address)
        if is_loopback_address(target):
            use_loopback()
        ensure_token_auth(joining=target is not None)
        kwargs.setdefault("include_dashboard", False)
        kwargs.setdefault("log_to_driver", True)
        if target is None:
            # `local`, never None: `ray.init()` without an address joins the Ray instance
            # last started on this machine (someone else's, say) instead of starting one.
            ray.init(**local_init_kwargs(num_cpus=num_cpus, num_gpus=num_gpus, **kwargs))
        else:  # num_cpus/num_gpus size a new instance only; a cluster has its nodes' resources
            try:
                ray.init(address=target, **kwargs)
            except ConnectionError as e:
                raise ConfigError(f"cannot join the Ray cluster at {target}: {_first_line(e)}."
                                  " Check the address (`ray status` on the head prints it), that"
                                  " the head's port 6379 is reachable, and the auth token.") \
                    from None
            try:
                check_auth_mode()
            except ConfigError:
                ray.shutdown()
                raise
    if storage_path is not None:
        check_shared_storage(storage_path)
    return ray.get_runtime_context()


def auth_mode() -> str:
    """This process's Ray authentication mode: `token` or `disabled`."""
    from ray._raylet import AuthenticationMode, get_authentication_mode

    return "token" if get_authentication_mode() == AuthenticationMode.TOKEN else "disabled"


def _node_auth_mode() -> tuple[str, str]:
    return socket.gethostname(), auth_mode()


def auth_mismatch(driver: str, answers: list[tuple[str, str | None, str]]) -> str | None:
    """The one-line complaint about nodes whose authentication mode differs from the driver's.

    `answers`: (node address, its worker's mode or None if it did not answer, detail).
    """
    other = [(address, mode) for address, mode, _ in answers if mode is not None
             and mode != driver]
    silent = [(address, detail) for address, mode, detail in answers if mode is None]
    if other:
        where = ", ".join(address for address, _ in other)
        mode = other[0][1]
        if driver == "token":
            fix = ("Restart those nodes with RAY_AUTH_MODE=token and the cluster's token"
                   " (RAY_AUTH_TOKEN or ~/.ray/auth_token), or, on a trusted network only, run"
                   " this driver with RAY_AUTH_MODE=disabled.")
        else:
            fix = ("Unset RAY_AUTH_MODE=disabled for this driver and give it the cluster's"
                   " token (RAY_AUTH_TOKEN or ~/.ray/auth_token).")
        return (f"Ray authentication modes differ: this driver runs with RAY_AUTH_MODE={driver},"
                f" but node(s) {where} run with {mode}, so trials there would be cancelled"
                f" before they start. {fix}")
    if silent:
        where = ", ".join(f"{address} ({detail})" for address, detail in silent)
        return (f"node(s) {where} did not run a probe task, so trials there would never start;"
                f" a common cause is an authentication mismatch (this driver runs with"
                f" RAY_AUTH_MODE={driver}). Start every node with the same RAY_AUTH_MODE and"
                " token as the driver, or check `ray status` for dead nodes.")
    return None


def check_auth_mode(*, timeout_s: float = 60.0) -> None:
    """Refuse a cluster whose nodes run another authentication mode than this driver.

    One task per alive node (no CPU reserved) reports its worker's mode. In a mismatch the
    cluster accepts the driver but cancels its actors before they run ("The actor never ran"),
    which would otherwise only show as every trial failing."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(num_cpus=0, max_retries=0)(_node_auth_mode)
    pending = {}
    for node in alive_nodes():
        strategy = NodeAffinitySchedulingStrategy(node_id=node["NodeID"], soft=False)
        pending[probe.options(scheduling_strategy=strategy).remote()] = node
    ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=timeout_s)
    answers: list[tuple[str, str | None, str]] = []
    slow: list[str] = []
    for ref, node in pending.items():
        address = node.get("NodeManagerAddress", "?")
        if ref not in ready:
            # A busy node can take longer than `timeout_s` to start a worker: that is no
            # evidence of a mismatch, so it is said and the search goes on (a real mismatch
            # still shows as "The actor never ran" in the trials' failure reasons).
            ray.cancel(ref, force=True)
            slow.append(address)
            continue
        try:
            _, mode = ray.get(ref)
        except Exception as e:  # the task was refused or its worker never started
            answers.append((address, None, _first_line(e)))
            continue
        answers.append((address, mode, ""))
    problem = auth_mismatch(auth_mode(), answers)
    if problem:
        raise ConfigError(problem)
    if slow:
        print(f"note: node(s) {', '.join(slow)} did not answer the authentication-mode probe"
              f" within {timeout_s:.0f}s (busy?); their mode is unchecked.", file=sys.stderr,
              flush=True)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ----------------------------------------------------------------------------- cluster facts
@dataclass(frozen=True)
class NodeView:
    """What one node saw of the driver's marker file."""

    node_id: str
    address: str
    hostname: str
    sees_marker: bool
    detail: str = ""


def alive_nodes() -> list[dict[str, Any]]:
    """`ray.nodes()` entries of the alive nodes."""
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def is_cloud_uri(path: str | os.PathLike) -> bool:
    """True for a URI such as s3://bucket/run or gs://bucket/run (any scheme but file://)."""
    text = str(path)
    scheme, sep, _ = text.partition("://")
    return bool(sep) and scheme.lower() != "file" and scheme.isidentifier()


def _local_path(path: str | os.PathLike) -> Path:
    text = str(path)
    if text.startswith("file://"):
        text = text[len("file://"):]
    return Path(text).expanduser().absolute()


def _probe_marker(path: str, token: str) -> tuple[str, bool, str]:
    try:
        with open(path, encoding="utf-8") as f:
            content = f.read().strip()
    except FileNotFoundError:
        return socket.gethostname(), False, "no such file"
    except OSError as e:
        return socket.gethostname(), False, f"{type(e).__name__}: {e}"
    if content != token:
        return socket.gethostname(), False, "a different file of the same name"
    return socket.gethostname(), True, ""


def probe_nodes(storage_path: str | os.PathLike, *,
                timeout_s: float = 120.0) -> list[NodeView]:
    """Write a marker in `storage_path` and ask every alive node whether it reads the same file
    there (one task per node, pinned by `NodeAffinitySchedulingStrategy`, no CPU reserved so busy
    nodes answer too). The driver's own node is asked as well: several raylets can share a
    host but not a file system view (containers, mount namespaces)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from spvit.io import atomic_write_text

    root = _local_path(storage_path)
    token = secrets.token_hex(16)
    marker = root / MARKER_DIR / f"{socket.gethostname()}-{os.getpid()}-{token[:8]}"
    atomic_write_text(marker, token + "\n")
    probe = ray.remote(num_cpus=0, max_retries=0)(_probe_marker)
    try:
        pending = {}
        for node in alive_nodes():
            strategy = NodeAffinitySchedulingStrategy(node_id=node["NodeID"], soft=False)
            ref = probe.options(scheduling_strategy=strategy).remote(str(marker), token)
            pending[ref] = node
        views = []
        ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=timeout_s)
        for ref, node in pending.items():
            address = node.get("NodeManagerAddress", "?")
            if ref not in ready:
                ray.cancel(ref, force=True)
                views.append(NodeView(node["NodeID"], address, "?", False,
                                      f"no answer within {timeout_s:.0f}s"))
                continue
            try:
                hostname, sees, detail = ray.get(ref)
            except Exception as e:  # the node died or refused the task
                hostname, sees, detail = "?", False, _first_line(e)
            views.append(NodeView(node["NodeID"], address, hostname, sees, detail))
        return views
    finally:
        marker.unlink(missing_ok=True)
        try:
            marker.parent.rmdir()
        except OSError:
            pass  # another driver's marker is still there


def check_shared_storage(storage_path: str | os.PathLike, *, timeout_s: float = 120.0) -> None:
    """Refuse a run folder that some node of a multi-node cluster cannot see.

    Cloud URIs pass without a check, and so does a cluster whose only node is the driver's.
    Nodes that join later are not checked: give every node of the cluster the same mounts (the
    cluster files in launch/cluster/ do).
    Raises `ConfigError` naming the nodes that do not see the driver's marker file.
    """
    if is_cloud_uri(storage_path):
        return
    import ray

    nodes = alive_nodes()
    if len(nodes) == 1 and nodes[0]["NodeID"] == ray.get_runtime_context().get_node_id():
        return  # one machine, the driver's own: nothing to share
    blind = [v for v in probe_nodes(storage_path, timeout_s=timeout_s) if not v.sees_marker]
    if blind:
        where = ", ".join(f"{v.address} [node {v.node_id[:8]}, {v.hostname}: {v.detail}]"
                          for v in blind)
        raise ConfigError(
            f"the run folder {_local_path(storage_path)} is not shared by the cluster: node(s)"
            f" {where} do not see the file the driver wrote there, so a trial moved to another"
            " node could not resume from its checkpoint. Put --out on a file system every node"
            " mounts at the same path (NFS, EFS, Filestore) or use a cloud URI such as"
            " s3://bucket/run."
        )
