"""A PostgreSQL 15 server of its own, for the tests (tests/helpers.py, fixture postgres_cluster) and
for `make bench-peers` (bench/peers.py): Debian's postgresql-15 binaries, `initdb` into a folder of
/tmp, `pg_ctl start` on a free port of 127.0.0.1, stopped by `pg_ctl stop` (and by a watchdog if the
process that started it dies first). One file that both import, so the two never drift apart.

It imports nothing of stepd's, and psycopg only in `admin()` (the driver of make bench-peers and the
tests have it; bench/run.py's venv need not).
"""

import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

POSTGRES_BIN = Path("/usr/lib/postgresql/15/bin")  # Debian's postgresql-15 (.ci/run installs it)
# Every cluster: TCP on loopback only, no Unix socket (no shared folder to write into). Durability is
# PostgreSQL's own default (fsync on, synchronous_commit on, full_page_writes on): what a benchmark
# measures; the tests add THROWAWAY_SETTINGS.
LOOPBACK_SETTINGS = """
listen_addresses = '127.0.0.1'
unix_socket_directories = ''
"""
# For a test cluster: nothing is synced to disk (a crash of the machine loses a test cluster,
# nothing else), room for many test connections, little shared memory.
THROWAWAY_SETTINGS = """
fsync = off
synchronous_commit = off
full_page_writes = off
max_connections = 200
shared_buffers = 32MB
"""


def postgres_missing():
    """Why this machine cannot run a cluster of its own, or None when it can."""
    if not (POSTGRES_BIN / "initdb").exists():
        return f"{POSTGRES_BIN}/initdb is not installed: sudo apt-get install -y postgresql-15 (.ci/run installs it)"
    if os.geteuid() == 0:
        import pwd

        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no `postgres` user to run PostgreSQL as"
    return None


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PostgresCluster:
    """One PostgreSQL 15 cluster: `initdb` into a folder of /tmp, `pg_ctl start` on a free port of
    127.0.0.1, password authentication (scram) for its one superuser `stepd`. PostgreSQL refuses to
    run as root, so under root every server command runs as the `postgres` user (`runuser`), in a
    folder that user owns; otherwise as this user. `stop()` stops it with pg_ctl and removes the
    folder; a watchdog process does both if the process that started it dies first.

    `settings` is appended to postgresql.conf: LOOPBACK_SETTINGS keeps PostgreSQL's own durability;
    the tests pass LOOPBACK_SETTINGS + THROWAWAY_SETTINGS."""

    def __init__(self, settings=LOOPBACK_SETTINGS, prefix="stepd-pg-"):
        self.settings = settings
        self.folder = Path(tempfile.mkdtemp(prefix=prefix))
        self.data = self.folder / "data"
        self.log = self.folder / "server.log"
        self.password = secrets.token_urlsafe(18)
        self.port = None
        self.watchdog = None
        self.databases = 0
        self.as_owner = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def _run(self, *args, timeout=60):
        done = subprocess.run([*self.as_owner, *map(str, args)], capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(map(str, args))} failed ({done.returncode}): {done.stdout}{done.stderr}")
        return done

    def start(self):
        started = time.monotonic()
        self._initdb()
        for tries_left in reversed(range(3)):  # a port found free may be taken before the server binds it
            self.port = free_port()
            try:
                options = f"-p {self.port}"
                self._run(POSTGRES_BIN / "pg_ctl", "-D", self.data, "-l", self.log, "-o", options, "-w", "start")
                break
            except RuntimeError:
                if tries_left == 0 or "could not bind" not in self.log.read_text(errors="replace"):
                    raise RuntimeError(f"PostgreSQL did not start:\n{self.log.read_text(errors='replace')}") from None
        self._start_watchdog()
        self.started_in = time.monotonic() - started
        return self

    def _initdb(self):
        """The data folder, owned by whoever runs the server, with this cluster's settings; the
        password reaches initdb through a file (never on a command line), removed right after."""
        if self.as_owner:
            import pwd

            owner = pwd.getpwnam("postgres")
            os.chown(self.folder, owner.pw_uid, owner.pw_gid)
        password_file = self.folder / "password"
        password_file.write_text(self.password + "\n")
        if self.as_owner:
            os.chown(password_file, owner.pw_uid, owner.pw_gid)
        self._run(
            POSTGRES_BIN / "initdb", "-D", self.data, "-U", "stepd", "--auth=scram-sha-256",
            f"--pwfile={password_file}", "--encoding=UTF8", "--locale=C", "--no-sync", "--no-instructions",
        )  # fmt: skip
        password_file.unlink()
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(self.settings)

    def _start_watchdog(self):
        """A shell of its own session that stops the server and removes the folder once this
        process is gone, however it went (SIGKILL included)."""
        stop = " ".join([*self.as_owner, str(POSTGRES_BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"])
        self.watchdog = subprocess.Popen(
            ["sh", "-c", f"while kill -0 {os.getpid()} 2>/dev/null; do sleep 1; done; {stop}; rm -rf {self.folder}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip

    def url(self, database="postgres"):
        return f"postgresql://stepd:{self.password}@127.0.0.1:{self.port}/{database}"

    def admin(self):
        """A connection to the cluster's `postgres` database, in autocommit (CREATE DATABASE needs it)."""
        import psycopg

        return psycopg.connect(self.url(), autocommit=True)

    def new_database(self, prefix="test"):
        """A fresh, empty database of this cluster: its URL."""
        self.databases += 1
        name = f"{prefix}_{self.databases}"
        with self.admin() as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def drop_database(self, url):
        """Drop it, ending any connection left open to it."""
        with self.admin() as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {url.rsplit('/', 1)[1]} WITH (FORCE)")

    def server_pid(self):
        """The postmaster's pid (the first line of postmaster.pid), or None when it is not running."""
        try:
            return int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None

    def stop(self):
        try:
            if (self.data / "postmaster.pid").exists():
                self._run(POSTGRES_BIN / "pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop")
        finally:
            if self.watchdog is not None:
                self.watchdog.kill()
                self.watchdog.wait()
            shutil.rmtree(self.folder, ignore_errors=True)


def start_or_say_why(prefix):
    """(a started cluster of PostgreSQL's default durability, None), or (None, why not) where
    PostgreSQL is missing or does not start: a benchmark then leaves its PostgreSQL rows out, saying
    why, and runs the rest (make bench, make bench-peers)."""
    missing = postgres_missing()
    if missing:
        return None, f"PostgreSQL rows skipped: {missing}"
    cluster = PostgresCluster(prefix=prefix)
    try:
        return cluster.start(), None
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        cluster.stop()
        return None, f"PostgreSQL rows skipped: it did not start ({str(exc).splitlines()[0]})"
