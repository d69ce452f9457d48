"""Pre-flight checks of a Ray cluster for a search, and a multi-node cluster on one machine.

`spvit-nas cluster-check --address auto --out RUN_DIR [--storage URL]` joins the cluster
the way `spvit-nas search` does and reports what a search depends on: the alive nodes and their
CPUs/GPUs, that token authentication is on, that every node sees the run folder (checkpoints
written on one node must be readable on the node a trial is moved to), and that the study
storage opens. It exits 0 when all holds and 2 with the first problem otherwise.

`LoopbackCluster` starts a head and worker nodes as separate raylets on 127.0.0.1 of this
machine (Ray's `cluster_utils.Cluster`), to try a multi-node run, and to test node loss, without
a real cluster. A node can be started in its own mount namespace with a private, empty folder
over given paths (`hide_paths`), which is how a node-local run folder looks to the cluster; that
needs root and `unshare`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from launch.ray_env import (
    LOOPBACK_ENV,
    check_shared_storage,
    ensure_local_token,
    init_ray,
    refresh_ray_config,
)
from spvit.errors import ConfigError

NODE_OBJECT_STORE_BYTES = 150 * 1024 * 1024

_ISOLATED_NODE = textwrap.dedent("""
    import json, signal, sys
    import ray._private.node, ray._private.parameter
    args = json.loads(sys.argv[1])
    params = ray._private.parameter.RayParams(
        gcs_address=args["gcs_address"], num_cpus=args["num_cpus"], num_gpus=0,
        resources=args["resources"], node_ip_address="127.0.0.1",
        object_store_memory=args["object_store_memory"], min_worker_port=0, max_worker_port=0,
        include_log_monitor=False, node_manager_port=0)
    params.dashboard_agent_listen_port = None
    node = ray._private.node.Node(params, head=False, shutdown_at_exit=True, spawn_reaper=True)
    def stop(*_):
        node.kill_all_processes(check_alive=False, allow_graceful=True, wait=True)
        sys.exit(0)
    signal.signal(signal.SIGTERM, stop)
    print(node.node_id, flush=True)
    while True:
        signal.pause()
""")


class LoopbackCluster:
    """A Ray cluster of several nodes on 127.0.0.1, token authentication on.

    Use as a context manager; `address` is what a driver passes as `--address`. While it runs,
    this process's environment holds `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` and
    `RAY_AUTH_MODE=token`, inherited by every Ray process it starts and every driver started
    from it; `shutdown` restores the environment.
    """

    def __init__(self, *, head_cpus: int = 1, head_resources: dict[str, float] | None = None
                 ) -> None:
        self.head_cpus = head_cpus
        self.head_resources = dict(head_resources or {})
        self._cluster = None
        self._isolated: dict[str, subprocess.Popen] = {}

    def __enter__(self) -> LoopbackCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def start(self) -> None:
        from ray.cluster_utils import Cluster

        env = {**LOOPBACK_ENV, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token")}
        self._saved_env = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        refresh_ray_config()
        if env["RAY_AUTH_MODE"].lower() == "token":
            ensure_local_token()  # ray.init would create it; Cluster does not
        self._cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": self.head_cpus, "resources": self.head_resources,
            "include_dashboard": False, "node_ip_address": "127.0.0.1",
        })

    @property
    def address(self) -> str:
        return self._cluster.address

    def add_node(self, *, num_cpus: int = 1, resources: dict[str, float] | None = None,
                 hide_paths: list[str | os.PathLike] = ()) -> Any:
        """Start a worker node; returns a handle for `remove_node`.

        With `hide_paths` the node runs in its own mount namespace where each path is an empty
        private folder (the node cannot see what others write there).
        """
        if not hide_paths:
            return self._cluster.add_node(num_cpus=num_cpus, resources=dict(resources or {}),
                                          node_ip_address="127.0.0.1")
        mounts = " && ".join(f"mount -t tmpfs tmpfs {_quote(p)}" for p in hide_paths)
        args = json.dumps({"gcs_address": self.address, "num_cpus": num_cpus,
                           "resources": dict(resources or {}),
                           "object_store_memory": NODE_OBJECT_STORE_BYTES})
        proc = subprocess.Popen(
            ["unshare", "-m", "sh", "-c", f'{mounts} && exec "$0" -c "$1" "$2"',
             sys.executable, _ISOLATED_NODE, args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        node_id = proc.stdout.readline().strip()
        if not node_id:
            proc.wait(timeout=30)
            raise RuntimeError(f"isolated node did not start: {proc.stderr.read()[-2000:]}")
        self._isolated[node_id] = proc
        return node_id

    def remove_node(self, node: Any) -> None:
        """Kill a worker node's processes, as if its machine went away."""
        if isinstance(node, str):
            proc = self._isolated.pop(node)
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
        else:
            self._cluster.remove_node(node, allow_graceful=False)

    def worker_nodes(self) -> list[Any]:
        return [*self._cluster.worker_nodes, *self._isolated]

    def alive_node_count(self) -> int:
        return sum(1 for n in self._cluster.global_state.node_table() if n["Alive"])

    def shutdown(self) -> None:
        for node_id in list(self._isolated):
            try:
                self.remove_node(node_id)
            except subprocess.TimeoutExpired:
                os.killpg(self._isolated.pop(node_id).pid, signal.SIGKILL)
        if self._cluster is not None:
            self._cluster.shutdown()
            self._cluster = None
        for key, value in getattr(self, "_saved_env", {}).items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._saved_env = {}
        refresh_ray_config()


def _quote(path: str | os.PathLike) -> str:
    import shlex

    return shlex.quote(str(path))


# ----------------------------------------------------------------------------- pre-flight
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default=None,
                        help="Ray cluster to check: HOST:PORT or auto (default: RAY_ADDRESS)")
    parser.add_argument("--out", required=True, type=Path,
                        help="the run folder the search will use (must be seen by every node)")
    parser.add_argument("--storage", default=None,
                        help="the study storage URL the search will use (default: journal file)")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds to wait for each node's answer")


def run(args: argparse.Namespace) -> int:
    import ray

    from nas.storage import make_storage, storage_url

    init_ray(args.address)
    from ray._raylet import AuthenticationMode, get_authentication_mode

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    print(f"cluster: {len(nodes)} alive node(s)")
    for n in nodes:
        res = n.get("Resources", {})
        extra = {k: v for k, v in res.items() if k not in ("CPU", "GPU", "memory",
                                                            "object_store_memory")
                 and not k.startswith("node:")}
        print(f"  {n['NodeManagerAddress']:<16} CPU {res.get('CPU', 0):g}  GPU"
              f" {res.get('GPU', 0):g}  {extra or ''}")
    token = get_authentication_mode() == AuthenticationMode.TOKEN
    print(f"token authentication: {'on' if token else 'OFF'}")
    if not token:
        raise ConfigError("Ray token authentication is off (RAY_AUTH_MODE). Unset RAY_AUTH_MODE"
                          " or set it to token, and start the cluster with a token.")
    args.out.mkdir(parents=True, exist_ok=True)
    check_shared_storage(args.out, timeout_s=args.timeout)
    print(f"run folder {args.out.resolve()}: seen by every node")
    make_storage(args.storage, args.out)
    print(f"study storage {storage_url(args.storage, args.out)}: opens")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.cluster_check",
                                     description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except ConfigError as e:
        print(f"cluster check: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
