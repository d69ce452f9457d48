"""Starting/joining Ray: loopback only, token authentication on, shared run folders checked."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

from launch import ray_env
from launch.ray_env import (
    _probe_marker,
    ensure_token_auth,
    is_cloud_uri,
    is_loopback_address,
    resolve_address,
)
from spvit.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------ no Ray needed
@pytest.mark.parametrize("address, loopback", [
    (None, True), ("", True), ("local", True), ("127.0.0.1:6379", True), ("localhost:6379", True),
    ("ray://127.0.0.1:10001", True), ("10.0.0.10:6379", False), ("head.example:6379", False),
])
def test_is_loopback_address(address, loopback):
    assert is_loopback_address(address) is loopback


@pytest.mark.parametrize("path, cloud", [
    ("s3://bucket/run", True), ("gs://bucket/run", True), ("abfss://c@a.dfs/run", True),
    ("file:///mnt/spvit/run", False), ("/mnt/spvit/run", False), ("runs/digits", False),
])
def test_is_cloud_uri(path, cloud):
    assert is_cloud_uri(path) is cloud


def test_resolve_address_prefers_the_argument_then_ray_address(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.10:6379")
    assert resolve_address(None) == "10.0.0.10:6379"
    assert resolve_address("10.0.0.11:6379") == "10.0.0.11:6379"
    monkeypatch.delenv("RAY_ADDRESS")
    assert resolve_address(None) is None and resolve_address("local") is None


@pytest.fixture
def auth_env(monkeypatch, tmp_path):
    """No token anywhere, no mode set: HOME is an empty folder."""
    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def test_joining_turns_token_auth_on_and_needs_the_token(auth_env, monkeypatch):
    with pytest.raises(ConfigError, match="ray get-auth-token"):
        ensure_token_auth(joining=True)
    assert os.environ["RAY_AUTH_MODE"] == "token"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "0123456789abcdef")
    ensure_token_auth(joining=True)  # token in the environment: fine
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    (auth_env / ".ray").mkdir()
    (auth_env / ".ray" / "auth_token").write_text("0123456789abcdef")
    ensure_token_auth(joining=True)  # the default token file: fine


def test_a_local_instance_is_left_to_rays_default_token_mode(auth_env):
    ensure_token_auth(joining=False)
    assert "RAY_AUTH_MODE" not in os.environ  # ray.init turns token mode on and creates a token


def test_turning_auth_off_explicitly_warns(auth_env, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ensure_token_auth(joining=True)
    assert any("token authentication is off" in str(w.message) for w in caught)
    assert os.environ["RAY_AUTH_MODE"] == "disabled"


def _in_fresh_home(tmp_path: Path, code: str, **env: str) -> subprocess.CompletedProcess:
    """Run `code` in a new interpreter whose HOME is an empty folder and which has no token
    variables (Ray's token loader caches what it read, so a process with a live Ray instance,
    as this test worker may be, must not change HOME under it)."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    clean = {k: v for k, v in os.environ.items()
             if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS")}
    import tempfile

    # Ray's socket paths must stay under 108 bytes: a short folder of its own
    ray_tmp = tempfile.mkdtemp(prefix="rt-", dir="/tmp")
    clean.update(HOME=str(home), RAY_TMPDIR=ray_tmp, PYTHONPATH=str(REPO), **env)
    try:
        return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=clean,
                              cwd=REPO, capture_output=True, text=True, timeout=240)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_a_local_token_is_created_once_and_kept(tmp_path):
    done = _in_fresh_home(tmp_path, """
        import os, stat
        from pathlib import Path
        from launch.ray_env import ensure_local_token
        path = ensure_local_token()
        assert path == Path.home() / ".ray" / "auth_token", path
        token = path.read_text()
        assert len(token) >= 32 and stat.S_IMODE(path.stat().st_mode) == 0o600
        assert ensure_local_token() is None and path.read_text() == token  # kept
        path.unlink()
        os.environ["RAY_AUTH_TOKEN"] = "0123456789abcdef"
        assert ensure_local_token() is None and not path.exists()  # the variable is the token
        print("ok")
    """)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


@pytest.mark.slow
def test_a_loopback_cluster_starts_on_a_machine_without_a_token(tmp_path):
    """A fresh machine has no ~/.ray/auth_token; `ray.cluster_utils.Cluster` does not create
    one, and its GCS exits without it. `LoopbackCluster` creates it as ray.init would."""
    done = _in_fresh_home(tmp_path, """
        import os
        from pathlib import Path
        from launch.cluster_check import LoopbackCluster
        with LoopbackCluster(head_cpus=1) as cluster:
            assert cluster.address and os.environ["RAY_AUTH_MODE"] == "token"
            assert (Path.home() / ".ray" / "auth_token").is_file()
        print("ok")
    """)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


def test_probe_tells_a_shared_file_from_a_lookalike(tmp_path):
    marker = tmp_path / "marker"
    assert _probe_marker(str(marker), "t0k3n")[1:] == (False, "no such file")
    marker.write_text("other\n")
    assert _probe_marker(str(marker), "t0k3n")[1:] == (False, "a different file of the same name")
    marker.write_text("t0k3n\n")
    assert _probe_marker(str(marker), "t0k3n")[1:] == (True, "")


def test_cloud_uris_pass_the_shared_storage_check_without_ray():
    ray_env.check_shared_storage("s3://bucket/runs/digits")  # no Ray call is made


# ------------------------------------------------------------------------------ real Ray
def _python(code: str, *, env: dict | None = None, timeout: float = 180
            ) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


_LISTENERS = """
    import psutil
    def listeners():
        me = psutil.Process()
        found = set()
        for proc in [me, *me.children(recursive=True)]:
            try:
                conns = proc.net_connections(kind="inet")
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            found |= {(c.laddr.ip.removeprefix("::ffff:"), c.laddr.port) for c in conns
                      if c.status == psutil.CONN_LISTEN}
        return sorted(found)
"""


@pytest.mark.slow
def test_local_instance_binds_loopback_only_with_token_auth():
    code = _LISTENERS + """
    import json, ray  # imported before init_ray, as a caller would
    from launch.ray_env import init_ray
    from ray._raylet import AuthenticationMode, get_authentication_mode
    init_ray(num_cpus=1)
    node = ray.nodes()[0]
    out = {"ip": node["NodeManagerAddress"], "listen": listeners(),
           "token": get_authentication_mode() == AuthenticationMode.TOKEN}
    ray.shutdown()
    print(json.dumps(out))
    """
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["token"] is True
    assert out["ip"] == "127.0.0.1"
    assert out["listen"], "Ray opened no listening socket at all?"
    assert {ip for ip, _ in out["listen"]} == {"127.0.0.1"}, out["listen"]


# A driver process that joins the cluster and checks run folders; prints one JSON line.
_DRIVER = """
    import json, ray
    from launch.ray_env import check_shared_storage, init_ray
    from spvit.errors import ConfigError
    init_ray({address!r}, num_cpus=4)
    verdicts = {{"nodes": len([n for n in ray.nodes() if n["Alive"]])}}
    for path in {paths!r}:
        try:
            check_shared_storage(path)
            verdicts[path] = "shared"
        except ConfigError as e:
            verdicts[path] = str(e)
    print(json.dumps(verdicts))
"""


def _drive(address: str, *paths: Path | str, **env) -> dict:
    """Run a driver process; its verdict per path, or {"crash": stderr} if it died."""
    proc = _python(_DRIVER.format(address=address, paths=[str(p) for p in paths]), env=env)
    if proc.returncode != 0:
        return {"crash": proc.stderr[-3000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _can_unshare() -> bool:
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return False
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    return probe.returncode == 0


@pytest.fixture(scope="module")
def two_node_cluster():
    from launch.cluster_check import LoopbackCluster

    with LoopbackCluster(head_cpus=1) as cluster:
        cluster.add_node(num_cpus=1)
        yield cluster


@pytest.mark.slow
def test_shared_run_folder_on_a_multi_node_cluster(two_node_cluster, tmp_path):
    cluster = two_node_cluster
    assert cluster.alive_node_count() == 2
    run = tmp_path / "run"
    run.mkdir()
    seen = _drive(cluster.address, run)
    assert seen == {"nodes": 2, str(run): "shared"}
    assert not (run / ray_env.MARKER_DIR).exists()  # the marker is cleaned up

    # a driver without the cluster's token is turned away (token authentication is on)
    denied = _drive(cluster.address, run, RAY_AUTH_TOKEN="f" * 32,
                    RAY_NUM_REDIS_GET_RETRIES="2")  # give up after 2 s, not Ray's 20
    assert "cannot join the Ray cluster" in denied.get("crash", ""), denied

    if not _can_unshare():
        pytest.skip("a node with a private run folder needs root and `unshare -m`")
    blind = cluster.add_node(num_cpus=1, hide_paths=[run])
    try:
        assert cluster.alive_node_count() == 3
        verdicts = _drive(cluster.address, run, "s3://bucket/run")
        assert verdicts["nodes"] == 3
        refused = verdicts[str(run)]
        assert "is not shared by the cluster" in refused and "no such file" in refused
        assert blind[:8] in refused  # names the node that cannot see it, and only that one
        assert refused.count("[node ") == 1
        assert verdicts["s3://bucket/run"] == "shared"  # cloud URIs pass
        check = subprocess.run(
            [sys.executable, "-m", "launch.cluster_check", "--address", cluster.address,
             "--out", str(run)], cwd=REPO, capture_output=True, text=True, timeout=180,
            env={**os.environ, "PYTHONPATH": str(REPO)})
        assert check.returncode == 2 and "is not shared" in check.stderr, check.stderr[-2000:]
        assert "3 alive node(s)" in check.stdout and "token authentication: on" in check.stdout
    finally:
        cluster.remove_node(blind)
    assert cluster.alive_node_count() == 2



_AUTH_DRIVER = """
    import json
    from launch import ray_env
    from spvit.errors import ConfigError
    ray_env.init_ray({address!r})  # joining runs check_auth_mode: the modes agree here
    ray_env.auth_mode = lambda: "disabled"  # a driver in the other mode
    try:
        ray_env.check_auth_mode(timeout_s=120)
        print(json.dumps({{"error": None}}))
    except ConfigError as e:
        print(json.dumps({{"error": str(e)}}))
"""


@pytest.mark.slow
def test_auth_mode_probe_reads_each_nodes_mode(two_node_cluster):
    proc = _python(_AUTH_DRIVER.format(address=two_node_cluster.address))
    assert proc.returncode == 0, proc.stderr[-3000:]
    error = json.loads(proc.stdout.strip().splitlines()[-1])["error"]
    assert error and "this driver runs with RAY_AUTH_MODE=disabled, but node(s)" in error
    assert error.count("127.0.0.1") == 2 and "run with token" in error  # both nodes answered
