"""A local `spvit-nas train` and a local search listen on no interface beyond 127.0.0.1: the
sockets of the whole process tree (driver, Ray's processes, trial workers) are sampled while
they run."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.tiny_space import small_space, write_space

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def is_loopback(ip: str) -> bool:
    """127.0.0.0/8, ::1 and IPv4-mapped loopback (`::ffff:127.0.0.1`, a dual-stack socket)."""
    address = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback

SPACE = small_space(dimensions={"depth": [1], "embed_dim": [16], "heads": [1], "prior": ["none"]},
                    constraints=None, training={"epochs": 1},
                    search={"trials": 1, "max_consecutive_failures": 1})


def _listening(root: psutil.Process) -> set[tuple[str, int, str]]:
    found = set()
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return found
    for proc in procs:
        try:
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    found.add((conn.laddr.ip, conn.laddr.port, proc.name()))
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def _run_and_watch(argv: list[str], timeout_s: float = 600.0):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "launch.cli", *argv], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    root = psutil.Process(proc.pid)
    seen: set[tuple[str, int, str]] = set()
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None and time.monotonic() < deadline:
        seen |= _listening(root)
        time.sleep(0.2)
    if proc.poll() is None:
        proc.kill()
    output = proc.communicate()[0]
    return proc.returncode, output, seen


def test_train_listens_on_loopback_only(tmp_path):
    code, output, seen = _run_and_watch(["train", "--arch", "spvit_test", "--out",
                                         str(tmp_path / "train"), "--epochs", "1"])
    assert code == 0, output
    beyond = {s for s in seen if not is_loopback(s[0])}
    assert not beyond, beyond


def test_local_search_listens_on_loopback_only(tmp_path):
    space = write_space(tmp_path / "tiny.yaml", SPACE)
    code, output, seen = _run_and_watch(["search", "--space", str(space), "--out",
                                         str(tmp_path / "run"), "--num-cpus", "1",
                                         "--no-export"])
    assert code == 0, output
    assert seen, "no listening socket seen: the sampling did not observe Ray"
    beyond = {s for s in seen if not is_loopback(s[0])}
    assert not beyond, beyond
