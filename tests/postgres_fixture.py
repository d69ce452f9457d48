"""A private PostgreSQL server for tests: started once per session on 127.0.0.1, stopped at the end.

A pytest plugin module (register it with `pytest_plugins = ["tests.postgres_fixture"]` in the
top-level conftest, or import the fixtures into a test module). `postgres_server` initialises a
throw-away cluster in a temporary folder (password auth over TCP, random password, a free port on
loopback only, the Unix socket inside the data folder) and yields a `PostgresServer`;
`postgres_url` yields a fresh, empty database of it per test.

The server binaries come from the Debian package (`scripts/postgres.sh install`). PostgreSQL
refuses to run as root, so as root the cluster is owned by and run as the `postgres` user
(`runuser`). When the binaries are missing the fixtures skip, or fail when `CI=true`.
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

PG_USER = "spvit"
SERVICE_USER = "postgres"


def find_pg_bin() -> Path | None:
    """The folder holding `initdb` and `pg_ctl`: $SPVIT_PG_BIN, PATH, or the newest Debian
    `/usr/lib/postgresql/<version>/bin`."""
    override = os.environ.get("SPVIT_PG_BIN")
    candidates = [Path(override)] if override else []
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(os.path.realpath(on_path)).parent)
    versions = glob.glob("/usr/lib/postgresql/*/bin")
    versions.sort(key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0)
    candidates += [Path(p) for p in reversed(versions)]
    for folder in candidates:
        if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
            return folder
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """A throw-away PostgreSQL cluster listening on 127.0.0.1 only."""

    def __init__(self, bin_dir: Path, *, root: Path | None = None) -> None:
        self.bin_dir = Path(bin_dir)
        self.root = Path(root or tempfile.mkdtemp(prefix="spvit-pg-"))
        self.data_dir = self.root / "data"
        self.password = secrets.token_hex(12)
        self.port = 0
        self._as_service_user = os.geteuid() == 0

    # --------------------------------------------------------------------- process control
    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        cmd = [str(self.bin_dir / args[0]), *args[1:]]
        if self._as_service_user:
            cmd = ["runuser", "-u", SERVICE_USER, "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False,
                              env={**os.environ, "LC_ALL": "C.UTF-8"})

    def _check(self, proc: subprocess.CompletedProcess, what: str) -> None:
        if proc.returncode != 0:
            raise RuntimeError(f"{what} failed (exit {proc.returncode}): "
                               f"{(proc.stderr or proc.stdout).strip()[-2000:]}")

    def start(self) -> PostgresServer:
        self.root.mkdir(parents=True, exist_ok=True)
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self._as_service_user:
            shutil.chown(self.root, user=SERVICE_USER)
            shutil.chown(pwfile, user=SERVICE_USER)
        os.chmod(self.root, 0o700)
        self._check(self._run("initdb", "-D", str(self.data_dir), "-U", PG_USER,
                              f"--pwfile={pwfile}", "--auth-host=scram-sha-256",
                              "--auth-local=peer", "--encoding=UTF8", "--no-sync"), "initdb")
        pwfile.unlink()
        last = ""
        for _ in range(5):  # a free port can be taken between probing and binding: retry
            self.port = free_port()
            options = (f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.data_dir}"
                       " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
                       " -c max_connections=200")
            proc = self._run("pg_ctl", "-D", str(self.data_dir), "-l",
                             str(self.root / "server.log"), "-o", options, "-w", "-t", "60",
                             "start")
            if proc.returncode == 0:
                return self
            last = (self.root / "server.log").read_text(errors="replace")[-2000:] \
                if (self.root / "server.log").exists() else proc.stderr
        raise RuntimeError(f"pg_ctl start failed 5 times; last log: {last}")

    def stop(self) -> None:
        if self.data_dir.exists():
            self._run("pg_ctl", "-D", str(self.data_dir), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)

    # --------------------------------------------------------------------- databases
    def url(self, database: str = "postgres", *, password: bool = True) -> str:
        secret = f":{self.password}" if password else ""
        return f"postgresql://{PG_USER}{secret}@127.0.0.1:{self.port}/{database}"

    def connect(self, database: str = "postgres"):
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user=PG_USER,
                                password=self.password, dbname=database, connect_timeout=10)
        conn.autocommit = True
        return conn

    def create_database(self, name: str | None = None) -> str:
        """Create an empty database and return its URL."""
        name = name or f"t_{uuid.uuid4().hex[:12]}"
        conn = self.connect()
        try:
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()
        return self.url(name)


def _missing(message: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def postgres_server():
    """A private PostgreSQL server on 127.0.0.1 for the whole session."""
    bin_dir = find_pg_bin()
    if bin_dir is None:
        _missing("PostgreSQL server binaries (initdb, pg_ctl) not found;"
                 " run `scripts/postgres.sh install` (or set SPVIT_PG_BIN).")
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        _missing("running as root needs `runuser` to start PostgreSQL as the postgres user.")
    server = PostgresServer(bin_dir)
    started = time.monotonic()
    try:
        server.start()
    except BaseException:
        server.stop()
        raise
    server.start_s = time.monotonic() - started
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """URL (with password) of a fresh, empty database on the session's server."""
    return postgres_server.create_database()
