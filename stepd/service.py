"""`stepd serve` (`make run`): stepd as one service, the HTTP front and the runners, under one command.

It checks what it can once (settings, the address to listen on, delegates, the database, the
first token), then starts the HTTP front (`python -m stepd http`: gunicorn, front.py), whose one worker is the
node: it serves the API, writes the database, and starts STEPD_RUNNERS runner processes
(`python -m stepd runner`), which call the delegates:

    stepd serve                           this supervisor
    └── python -m stepd http              the HTTP front (gunicorn's master)
        └── its worker: the node          HTTP on gevent, the one writer, the dispatcher (node.py)
            └── STEPD_RUNNERS × python -m stepd runner   the delegates run here, and only here

The children run in the supervisor's working directory, with the settings it read (STEPD_DB and
STEPD_DELEGATES_PATH already made absolute by config.from_env), so all use one database.

The node (the front's worker) starts the runners, and starts one again within a second or two
when it dies (a delegate called os._exit, a segfault, an OOM kill); its running steps become
Interrupted as soon as the node reads the end of its connection. If the HTTP front exits,
everything stops. SIGTERM or SIGINT to this process (or to its process group) stops all
cleanly: the runners give their delegates STOP_GRACE_SECONDS.
"""

import contextlib
import errno
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from stepd import config, logs
from stepd.liveness import die_with_parent, freeze_startup_objects
from stepd.logs import configure_logging

REFUSED = 2  # the exit code of a start refused for a bad setting, delegate or database (as cli.py's refusals)
CHECK_SECONDS = 0.1  # how often the children are looked at
STOP_SECONDS = 20.0  # how long a stop waits for the children before it kills them
RELOAD_SECONDS = 10.0  # how long a reload waits for gunicorn to fork the new node
# Set for the children of `stepd serve`: its checks have run, and what they found was said once.
CHECKED = "STEPD_PREFLIGHT_DONE"
PROMETHEUS_FOLDER = "PROMETHEUS_MULTIPROC_DIR"  # prometheus-client's variable for its multiprocess files
METRICS_FOLDER_PREFIX = "stepd-metrics-"  # then the HTTP front's pid, a dash, random letters


class CannotStart(Exception):
    """A setting, a delegate module or the database stops the start; the message is one line."""


def preflight(settings):
    """Fail fast, once: the address taken, a bad delegate, an unusable database. Migrates the file,
    and makes the first token (and prints it) on the first start of a new database. Returns the
    delegates' registry."""
    from stepd.delegates import DelegateLoadError, load_registry

    check_address(settings["STEPD_HOST"], settings["STEPD_PORT"])
    try:
        registry = load_registry(settings["STEPD_DELEGATES_PATH"] or None)
    except DelegateLoadError as exc:
        raise CannotStart(str(exc)) from exc
    prepare_database(settings)
    return registry


def check_address(host, port):
    """The address to listen on must be free: gunicorn would try five times, a second apart, and
    then say only "Can't connect to (...)", which names no setting."""
    where = f"{host}:{port}"
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise CannotStart(f"STEPD_HOST={host} is not an address to listen on: {exc}") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gunicorn binds
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise CannotStart(f"{where} is in use (another stepd?): set STEPD_PORT to a free port") from None
            raise CannotStart(f"cannot listen on {where}: {exc.strerror}; check STEPD_HOST and STEPD_PORT") from None


def prepare_database(settings):
    """Migrate the file (made if need be) and, for a new one, make the first token."""
    from stepd.model import Busy, Unusable, Unwritable
    from stepd.tokens import ensure_first_token
    from stepd.wiring import open_store

    path = settings["STEPD_DB"]
    try:
        new_database = database_is_new(path)
        store = open_store(settings)
        ensure_first_token(store, settings["STEPD_TOKEN"], new_database)
        store.db.close()  # no open SQLite connection may cross a fork
    except (OSError, Unusable, Busy, Unwritable) as exc:
        raise CannotStart(f"STEPD_DB={config.shown_database(path)} cannot be used: {exc}") from exc


def database_is_new(path):
    """No file yet, or an empty one (made, never written): only then is a first token made. A
    PostgreSQL database is new before its first migration (stepd's schema version 0)."""
    if config.is_postgres(path):
        from stepd.postgres import PostgresDatabase  # psycopg: for PostgreSQL only

        return PostgresDatabase(path).schema_version() == 0
    try:
        return Path(path).stat().st_size == 0
    except FileNotFoundError:
        return True


def announce(settings, registry):
    """The start-up line: what this service is and runs, said once before it starts serving."""
    from stepd.model import VERSION

    by_folder = {}  # the folder a delegate was loaded from -> its step types
    for delegate in registry.all():
        by_folder.setdefault(str(Path(delegate.source).parent), []).append(delegate.type)
    url = f"http://{settings['STEPD_HOST']}:{settings['STEPD_PORT']}"
    loaded = "; ".join(f"{', '.join(types)} from {folder}" for folder, types in by_folder.items())
    say(
        f"version {VERSION}, serving {url}: database {settings['STEPD_DB']} (sync {settings['STEPD_SYNC']}), "
        f"1 HTTP process (the node), {settings['STEPD_RUNNERS']} runner(s) of "
        f"{settings['STEPD_THREADS']} place(s); delegates {loaded}",
        version=VERSION,
        url=url,
        database=settings["STEPD_DB"],
        sync=settings["STEPD_SYNC"],
        workers=1,
        runners=settings["STEPD_RUNNERS"],
        threads=settings["STEPD_THREADS"],
        delegates=by_folder,
    )


def die_with_make():
    """Under `make run`, end when make ends, even by SIGKILL: a sidecar must not outlive the
    command that started it and keep holding its port. (make passes a SIGTERM on by itself.)"""
    parent = os.getppid()
    try:
        started_by_make = Path(f"/proc/{parent}/comm").read_text().strip() == "make"
    except OSError:
        return  # no /proc: not Linux, so no prctl either
    if started_by_make:
        die_with_parent()
        if os.getppid() != parent:  # make died before the call took effect
            os.kill(os.getpid(), signal.SIGTERM)


def say(text, level=logging.INFO, logger="stepd.service", **fields):
    logs.say(text, level, logger=logger, **fields)


class Supervisor:
    """Starts the HTTP front (whose worker is the node, and starts the runners), checks the
    delegates before a reload, stops it all."""

    def __init__(self, settings_env, delegates_path=None):
        self.env = settings_env  # the environment of the children: the settings as this process read them
        self.delegates_path = delegates_path  # STEPD_DELEGATES_PATH, loaded again at a reload
        self.http = None
        self.stopping = False
        self.reload_asked = False

    def run(self):
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._ask_to_stop)
        signal.signal(signal.SIGHUP, self._ask_to_reload)
        # Its own process group: a SIGHUP to this service's group (a closing terminal) must not
        # reach gunicorn's master, which would replace the node whatever this process decides
        # (reload); this process passes on what it means to (a HUP after the delegates load, the stop).
        self.http = subprocess.Popen(
            [sys.executable, "-m", "stepd", "http"], env=self.env, preexec_fn=die_with_parent, process_group=0
        )
        while not self.stopping:
            if self.http.poll() is not None:
                say(f"the HTTP front exited with code {self.http.returncode}", logging.ERROR)
                return self.http.returncode or 1
            if self.reload_asked:
                self.reload_asked = False
                self.reload()
            time.sleep(CHECK_SECONDS)
        self.stop()
        return 0

    def _ask_to_stop(self, signum, frame):
        self.stopping = True

    def _ask_to_reload(self, signum, frame):
        self.reload_asked = True  # done by the loop: a signal handler only sets a flag

    def reload(self):
        """SIGHUP: load the delegate modules again. If they load, gunicorn replaces its worker
        gracefully (its own HUP): the new node starts new runners on the new delegates and takes
        the new requests; the old one answers what it has, its runners finish what they run
        (STOP_GRACE_SECONDS; then it is Interrupted) and give back what they never began. If
        they do not load, nothing changes.

        The settings are the environment this process was started with, which no running process
        can see change: a reload applies new delegate code, not new STEPD_* values."""
        from stepd.delegates import DelegateLoadError, load_registry

        try:
            registry = load_registry(self.delegates_path or None)
        except DelegateLoadError as exc:
            say(f"reload refused; the delegates loaded before stay in use: {exc}", logging.ERROR)
            return
        before = _children(self.http.pid)
        self.http.send_signal(signal.SIGHUP)
        self._wait_for_a_new_node(before)
        types = ", ".join(delegate.type for delegate in registry.all())
        say(f"reloaded: delegates {types}; the node and its runners replaced")

    def _wait_for_a_new_node(self, before):
        """Until gunicorn has forked the new worker (and so told the old one to go: it does both at
        once), so that what this process says next is true; at most RELOAD_SECONDS."""
        deadline = time.monotonic() + RELOAD_SECONDS
        while time.monotonic() < deadline and self.http.poll() is None:
            if _children(self.http.pid) - before:
                time.sleep(CHECK_SECONDS)  # the old worker's SIGTERM follows its successor's fork
                return
            time.sleep(0.01)

    def stop(self):
        """SIGTERM to the front, then wait; SIGKILL it if it is still there after STOP_SECONDS."""
        if self.http.poll() is not None:
            return
        self.http.send_signal(signal.SIGTERM)
        try:
            self.http.wait(timeout=STOP_SECONDS)
        except subprocess.TimeoutExpired:
            say(f"process {self.http.pid} did not stop in {STOP_SECONDS:g} s; killing it", logging.WARNING)
            self.http.kill()
            self.http.wait()


def _children(pid):
    """The pids of a process's children (Linux's /proc; an empty set elsewhere)."""
    try:
        return {int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}
    except OSError:
        return set()


def settings_env(settings):
    """The environment for the children: this one, with STEPD_DB and STEPD_DELEGATES_PATH as this
    process resolved them (a relative path is resolved once, here), and CHECKED: the front need not
    make the start's checks again, and what they found was said."""
    resolved = {key: str(settings[key]) for key in ("STEPD_DB", "STEPD_DELEGATES_PATH") if settings[key]}
    return {**os.environ, **resolved, CHECKED: "1"}


def start_settings(logger):
    """The settings, with logging set up in their format; None (said in one line) if one is bad.
    A child of `stepd serve` leaves the notices its parent gave (a deprecated import) unsaid."""
    if os.environ.get(CHECKED):
        from stepd.delegates import LegacyImport

        LegacyImport.said_by_another = True
    configure_logging("INFO", config.log_format())  # even a bad setting is said in the chosen format
    try:
        settings = config.from_env()
    except config.ConfigError as exc:
        say(f"cannot start: {exc}", logging.ERROR, logger)
        return None
    configure_logging(settings["STEPD_LOG_LEVEL"], settings["STEPD_LOG_FORMAT"])
    return settings


def checked(settings):
    """The delegates' registry once preflight passed; None once it said why the start is refused."""
    try:
        return preflight(settings)
    except CannotStart as exc:
        say(f"cannot start: {exc}", logging.ERROR)
        return None


def main():
    """`stepd serve`: check, announce, then supervise the front and the runners until a signal."""
    settings = start_settings("stepd.service")
    registry = checked(settings) if settings is not None else None
    if registry is None:
        return REFUSED
    announce(settings, registry)
    if os.environ.get("STEPD_WORKERS"):
        say(
            f"STEPD_WORKERS={os.environ['STEPD_WORKERS']} no longer applies and is ignored: one process, the node, "
            "serves HTTP on gevent and writes the database; STEPD_RUNNERS sets the processes that run delegates",
            logging.WARNING,
        )
    die_with_make()
    supervisor = Supervisor(settings_env(settings), settings["STEPD_DELEGATES_PATH"])
    return supervisor.run()


def runner_main():
    """`stepd runner`: one runner process, until SIGTERM or SIGINT, or until its node is gone.
    Started by a node, it has its end of a socketpair (RUNNER_FD); started by hand, it attaches
    to the node serving STEPD_DB on this machine. It never opens the database."""
    import socket

    from stepd.channel import Channel, node_address
    from stepd.delegates import DelegateLoadError, load_registry
    from stepd.node import RUNNER_FD
    from stepd.runner import Runner, run_until_stopped

    settings = start_settings("stepd.runner")
    if settings is None:
        return REFUSED
    try:
        registry = load_registry(settings["STEPD_DELEGATES_PATH"] or None)
    except DelegateLoadError as exc:
        say(f"runner cannot start: {exc}", logging.ERROR, logger="stepd.runner")
        return REFUSED
    if os.environ.get(RUNNER_FD):
        sock = socket.socket(fileno=int(os.environ.pop(RUNNER_FD)))
        sock.setblocking(True)  # the node's end was made by gevent, which makes its sockets non-blocking
    else:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(node_address(settings["STEPD_DB"]))
        except OSError:
            sock.close()
            say(
                f"runner cannot start: no stepd serves {settings['STEPD_DB']} on this machine",
                logging.ERROR,
                "stepd.runner",
            )
            return REFUSED
    runner = Runner(registry, settings["STEPD_THREADS"], settings["STEPD_STEP_TIMEOUT"])
    freeze_startup_objects()
    if run_until_stopped(runner, Channel(sock)):
        say("the node closed the connection; this runner stops", logging.WARNING, "stepd.runner")
        return 1
    return 0


def http_main():
    """`stepd http`: the HTTP front alone (serve starts it). Started by hand, it makes the same
    checks as serve first; under serve (CHECKED set) they were just made."""
    settings = start_settings("stepd.service")
    if settings is None or (not os.environ.get(CHECKED) and checked(settings) is None):
        return REFUSED
    with metrics_folder():
        from stepd import front  # after the folder is in the environment: prometheus-client reads it on import

        front.serve(settings)
    return 0


def remove_folders_of_gone_fronts(root):
    """Delete the metrics folders under `root` whose HTTP front (the pid in the name) is gone."""
    for folder in root.glob(f"{METRICS_FOLDER_PREFIX}*-*"):
        pid = folder.name[len(METRICS_FOLDER_PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and not _process_exists(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)  # another user's stays: not ours to delete


def _process_exists(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextlib.contextmanager
def metrics_folder():
    """A folder for the node's metrics (metrics.py) that outlives each node: gunicorn's master makes
    it before anything imports prometheus-client, so its workers (each a node; a reload replaces
    it) write their values there as files, and a scrape sums them all. Deleted when the master
    stops: a restart of the service starts those series from zero. A master that was killed
    (SIGKILL) cannot delete its own: the next one to start deletes those whose master is gone."""
    remove_folders_of_gone_fronts(Path(tempfile.gettempdir()))
    master = os.getpid()
    folder = tempfile.mkdtemp(prefix=f"{METRICS_FOLDER_PREFIX}{master}-")
    os.environ[PROMETHEUS_FOLDER] = folder
    try:
        yield folder
    finally:
        # The workers are forked inside this block, and one that exits (a reload replaces it)
        # unwinds through it too: only the master deletes the folder, at its own end.
        if os.getpid() == master:
            os.environ.pop(PROMETHEUS_FOLDER, None)
            shutil.rmtree(folder, ignore_errors=True)
