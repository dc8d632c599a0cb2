"""Run a real, throwaway PostgreSQL server for tests and the bench (``python -m bench.ingest``).

The Debian ``postgresql`` package ships the server binaries in ``/usr/lib/postgresql/<major>/bin``
(``make test`` installs it when missing); the cluster it creates is not used. Each
:class:`PostgresServer` gets its own data directory, TCP port on 127.0.0.1 and unix-socket
directory, all under one temporary directory.

PostgreSQL refuses to run as root, and tests here run as root in CI: the server then runs as the
``postgres`` OS user (``runuser``), and its directory is created outside pytest's root-only tmp
tree and handed to that user.

    with PostgresServer() as pg:
        url = pg.create_database("t1")   # postgresql://postgres@127.0.0.1:PORT/t1
        ...
        pg.kill()                        # pg_ctl stop -m immediate (a crash, for fault tests)
        pg.start()                       # same data, same port

It needs no test framework (psycopg is in the ``bench`` extra); ``tests/support/postgres.py``
re-exports it for the fixtures.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import psycopg

from sidecar.devtools.ports import free_port, port_accepts

__all__ = ["PostgresServer", "find_bin_dir", "postgres_available"]

# Durability against power loss is not what tests measure: skip fsync so initdb and CREATE
# DATABASE take milliseconds. A killed server (pg_ctl -m immediate) still recovers every commit
# from its WAL in the page cache; synchronous_commit stays on, or the last commits would be lost.
_SERVER_SETTINGS = {
    "fsync": "off",
    "full_page_writes": "off",
    "max_connections": "200",
    "shared_buffers": "32MB",
    "log_min_messages": "warning",
}


def find_bin_dir() -> Path | None:
    """The newest ``/usr/lib/postgresql/*/bin`` that has ``pg_ctl``, or None."""
    found = sorted(
        (Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin") if Path(p, "pg_ctl").exists()),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    if found:
        return found[-1]
    pg_ctl = shutil.which("pg_ctl")
    return Path(pg_ctl).parent if pg_ctl else None


def postgres_available() -> bool:
    """Whether a PostgreSQL server can be started here."""
    return find_bin_dir() is not None


def _run_as() -> list[str]:
    """The prefix that runs a command as the ``postgres`` user when we are root."""
    if os.geteuid() != 0:
        return []
    return ["runuser", "-u", "postgres", "--"]


class PostgresServer:
    """One PostgreSQL server process on 127.0.0.1; a context manager that stops it and deletes
    its files."""

    def __init__(self, port: int = 0) -> None:
        bin_dir = find_bin_dir()
        if bin_dir is None:
            raise RuntimeError("PostgreSQL is not installed (apt-get install postgresql)")
        self.bin_dir = bin_dir
        # Outside pytest's tmp tree: its parents are root-only, and the server runs as postgres.
        self.base = Path(tempfile.mkdtemp(prefix="spauth-pg-"))
        self.data_dir = self.base / "data"
        self.socket_dir = self.base / "sock"
        self.log_file = self.base / "server.log"
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self._initdb()

    # -- lifecycle ----------------------------------------------------------------------------

    def _initdb(self) -> None:
        self.socket_dir.mkdir()
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            for path in (self.base, self.socket_dir):
                os.chown(path, user.pw_uid, user.pw_gid)
        self._run(
            "initdb",
            "-D",
            str(self.data_dir),
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
            "-E",
            "UTF8",
            "--locale=C",
        )
        lines = [f"{k} = '{v}'" for k, v in _SERVER_SETTINGS.items()]
        with open(self.data_dir / "postgresql.conf", "a") as conf:
            conf.write("\n".join(lines) + "\n")

    def start(self, timeout: float = 30.0) -> None:
        """Start the server (again) and wait until it accepts connections."""
        options = (
            f"-c listen_addresses={self.host} -c port={self.port} "
            f"-c unix_socket_directories={self.socket_dir}"
        )
        self._run(
            "pg_ctl",
            "start",
            "-D",
            str(self.data_dir),
            "-l",
            str(self.log_file),
            "-o",
            options,
            "-w",
            "-t",
            str(int(timeout)),
        )
        deadline = time.monotonic() + timeout
        while not port_accepts(self.host, self.port):
            if time.monotonic() > deadline:
                raise TimeoutError(f"PostgreSQL did not listen on {self.port}: {self.log_tail()}")
            time.sleep(0.02)

    def kill(self) -> None:
        """Stop at once, like a crash: no checkpoint, clients cut off (``-m immediate``)."""
        self._run("pg_ctl", "stop", "-D", str(self.data_dir), "-m", "immediate", "-w", check=False)

    def running(self) -> bool:
        return port_accepts(self.host, self.port)

    def close(self) -> None:
        """Stop the server and delete its files."""
        if self.data_dir.exists():
            self.kill()
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- databases ----------------------------------------------------------------------------

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@{self.host}:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """Create an empty database and return its URL."""
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, name: str) -> None:
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    # -- helpers ------------------------------------------------------------------------------

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def _run(self, tool: str, *args: str, check: bool = True) -> None:
        cmd = [*_run_as(), str(self.bin_dir / tool), *args]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=self.base, check=False)
        if check and done.returncode != 0:
            raise RuntimeError(
                f"{tool} failed ({done.returncode}): {done.stderr.strip()}\n{self.log_tail()}"
            )
