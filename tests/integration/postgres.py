"""A throwaway PostgreSQL cluster for tests: `initdb` + `pg_ctl` in a temp dir, on 127.0.0.1.

`PostgresCluster.create()` makes a cluster with a password-protected superuser (scram-sha-256 on
TCP, so a URL without the right password is refused and redaction is tested for real), starts it
on a free loopback port and can stop and start it again mid-test (a database that goes away).
PostgreSQL refuses to run as root: as root, every server command runs as the package's `postgres`
user via `runuser`. `cluster.create_database()` gives each test a fresh database and its URL.
The fixtures that use this live in `tests/integration/conftest.py`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from tests.integration.processes import free_port

USER = "opsloop"
# Sent in every URL so that redaction is checked against a real secret; never printed by a test.
PASSWORD = "s3cret-pg-pass"
DRIVER = "postgresql+psycopg"  # psycopg 3, the `postgres` extra
SERVER_USER = "postgres"  # the Debian package's unprivileged account, used when running as root
START_TIMEOUT_S = 60


def find_bin_dir() -> Path | None:
    """The newest installed PostgreSQL's server binaries (Debian: /usr/lib/postgresql/N/bin)."""
    candidates = []
    for initdb in Path("/usr/lib/postgresql").glob("*/bin/initdb"):
        with contextlib.suppress(ValueError):
            candidates.append((int(initdb.parent.parent.name), initdb.parent))
    if candidates:
        return max(candidates)[1]
    found = shutil.which("initdb")
    return Path(found).parent if found and shutil.which("pg_ctl") else None


def missing_reason() -> str | None:
    """Why PostgreSQL tests cannot run here (one line), or None when they can."""
    if find_bin_dir() is None:
        return "PostgreSQL's initdb/pg_ctl not found: apt-get install postgresql (.ci/run does)"
    if os.geteuid() == 0:
        try:
            import pwd

            pwd.getpwnam(SERVER_USER)
        except KeyError:
            return f"running as root without a '{SERVER_USER}' user to run PostgreSQL as"
    if importlib.util.find_spec("psycopg") is None:
        return "psycopg is not installed: install the 'postgres' extra (make install does)"
    return None


@dataclass
class PostgresCluster:
    """One PostgreSQL server owning `root`; stop it with `destroy()` (by pg_ctl, then its PID)."""

    bin_dir: Path
    root: Path
    port: int
    databases: list[str] = field(default_factory=list)

    @classmethod
    def create(cls) -> PostgresCluster:
        """initdb a new cluster in a fresh temp dir and start it on a free loopback port.

        The directory is made with `tempfile`, not pytest's tmp_path: the `postgres` user must
        be able to reach it, and pytest's base temp dir is private to the user running pytest.
        """
        bin_dir = find_bin_dir()
        if bin_dir is None:
            raise RuntimeError(missing_reason())
        root = Path(tempfile.mkdtemp(prefix="opsloop-pg-"))
        cluster = cls(bin_dir, root, free_port())
        try:
            cluster._initdb()
            cluster.start()
        except BaseException:
            cluster.destroy()
            raise
        return cluster

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def log_path(self) -> Path:
        return self.root / "server.log"

    def url(self, database: str = "postgres", *, password: str | None = PASSWORD) -> str:
        """A SQLAlchemy URL of `database` (psycopg 3 driver), with the password by default."""
        secret = f":{password}" if password is not None else ""
        return f"{DRIVER}://{USER}{secret}@127.0.0.1:{self.port}/{database}"

    def dsn(self, database: str = "postgres") -> str:
        """A libpq URL of `database`, for psycopg itself (no SQLAlchemy driver suffix)."""
        return self.url(database).replace(f"{DRIVER}://", "postgresql://", 1)

    def _run(self, *args: str, timeout: float = START_TIMEOUT_S) -> str:
        """A server command, as the unprivileged `postgres` user when this process is root."""
        command = [str(self.bin_dir / args[0]), *args[1:]]
        if os.geteuid() == 0:
            command = ["runuser", "-u", SERVER_USER, "--", *command]
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, check=False, cwd=self.root
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"{' '.join(args[:1])} exited {done.returncode}:\n{done.stdout}\n{done.stderr}\n"
                f"{self.log()}"
            )
        return done.stdout

    def _initdb(self) -> None:
        pwfile = self.root / "pwfile"
        pwfile.write_text(PASSWORD + "\n")
        if os.geteuid() == 0:
            shutil.chown(self.root, user=SERVER_USER)
            shutil.chown(pwfile, user=SERVER_USER)
        self._run(
            "initdb",
            "-D",
            str(self.data_dir),
            "-U",
            USER,
            f"--pwfile={pwfile}",
            "--auth-local=trust",  # the Unix socket in `root` only: the tests' admin path
            "--auth-host=scram-sha-256",  # every TCP connection needs the password
            "--no-sync",  # a throwaway cluster: durability across power loss is not the point
            "-E",
            "UTF8",
        )
        pwfile.unlink()

    def start(self) -> None:
        """Start (or restart after `stop()`) the server and wait until it accepts connections."""
        # fsync off: the cluster dies with the test run; its speed matters, not crash safety.
        options = f"-p {self.port} -k {self.root} -h 127.0.0.1 -c fsync=off -c max_connections=200"
        self._run(
            "pg_ctl", "-D", str(self.data_dir), "-o", options, "-l", str(self.log_path), "-w",
            "-t", str(START_TIMEOUT_S), "start",
        )  # fmt: skip
        self.wait_ready()

    def wait_ready(self) -> None:
        import psycopg

        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                with psycopg.connect(self.dsn(), connect_timeout=2):
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stop(self) -> None:
        """A fast shutdown: connections are cut, as when the database goes away for real."""
        self._run("pg_ctl", "-D", str(self.data_dir), "-m", "fast", "-w", "stop")

    def running(self) -> bool:
        return (self.data_dir / "postmaster.pid").is_file()

    def create_database(self, prefix: str = "test") -> str:
        """A new, empty database; returns its URL (with the password)."""
        import psycopg

        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.dsn(), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        self.databases.append(name)
        return self.url(name)

    def drop_database(self, url: str) -> None:
        """Drop a database made by `create_database`, cutting any connection still open."""
        import psycopg

        name = url.rsplit("/", 1)[1]
        with psycopg.connect(self.dsn(), autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if name in self.databases:
            self.databases.remove(name)

    def destroy(self) -> None:
        """Stop the server (if it runs) and remove its directory."""
        try:
            if self.running():
                self.stop()
        except (RuntimeError, subprocess.TimeoutExpired):
            self._kill_postmaster()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def _kill_postmaster(self) -> None:
        # pg_ctl failed: end the server by the PID it recorded (only this cluster's postmaster).
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int((self.data_dir / "postmaster.pid").read_text().splitlines()[0])
            os.kill(pid, 9)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
