"""`stepd serve` (`make run`): stepd as one service, the node, its runners and the HTTP front, under one command.

It checks what it can once (settings, the address to listen on, delegates, the database, the
first token), then starts the node (`python -m stepd node`, node_process.py: the one process that
writes the database; it starts STEPD_RUNNERS runner processes, which call the delegates) and,
once the node takes connections, the HTTP front (`python -m stepd http`: gunicorn, front.py),
whose worker serves the API and hands every write to the node (handoff.py):

    stepd serve                           this supervisor
    ├── python -m stepd node              the one writer, the dispatcher, the chores (node.py)
    │   └── STEPD_RUNNERS × python -m stepd runner   the delegates run here, and only here
    └── python -m stepd http              the HTTP front (gunicorn's master)
        └── its worker                    HTTP on gevent: reads, checks, renders; writes via the node

The children run in the supervisor's working directory, with the settings it read (STEPD_DB and
STEPD_DELEGATES_PATH already made absolute by config.from_env), so all use one database, and with
the service's folder (`service_folder`: the metrics' files) and the node's socket (NODE_SOCKET).

The node starts a runner again within a second or two when it dies (a delegate called os._exit, a
segfault, an OOM kill); its running steps become Interrupted as soon as the node reads the end of
its connection. This process starts the node again when it dies. If the HTTP front exits,
everything stops. SIGTERM or SIGINT to this process (or to its process group) stops all
cleanly: the runners give their delegates STOP_GRACE_SECONDS. SIGHUP reloads the delegates.
"""

import contextlib
import errno
import logging
import os
import secrets
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
RELOAD_SECONDS = 10.0  # how long a reload waits for gunicorn to fork the new HTTP worker
NODE_RESTART_DELAYS = (0.0, 0.5, 1.0, 2.0, 4.0)  # before starting the node again, for each death in a row
STEADY_SECONDS = 10.0  # a node that lived this long starts again at once
# Set for the children of `stepd serve`: its checks have run, and what they found was said once.
CHECKED = "STEPD_PREFLIGHT_DONE"
PROMETHEUS_FOLDER = "PROMETHEUS_MULTIPROC_DIR"  # prometheus-client's variable for its multiprocess files
METRICS_FOLDER_PREFIX = "stepd-metrics-"  # the service's folder: then its pid, a dash, random letters
# The name of the abstract Unix socket where the node takes the HTTP front's writes, set by serve for
# both: random, and the node answers only processes of its own user (handoff.Counter).
NODE_SOCKET = "STEPD_NODE_SOCKET"


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
        f"the node and {settings['STEPD_RUNNERS']} runner(s) of "
        f"{settings['STEPD_THREADS']} place(s), 1 HTTP process; delegates {loaded}",
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
    """Starts the node and then the HTTP front, checks the delegates before a reload, stops it all."""

    def __init__(self, settings_env, delegates_path=None):
        self.env = settings_env  # the environment of the children: the settings as this process read them
        self.delegates_path = delegates_path  # STEPD_DELEGATES_PATH, loaded again at a reload
        self.node = None
        self.http = None
        self.stopping = False
        self.reload_asked = False

    def run(self):
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._ask_to_stop)
        signal.signal(signal.SIGHUP, self._ask_to_reload)
        with service_folder() as folder:
            env = {
                **self.env,
                PROMETHEUS_FOLDER: folder,
                NODE_SOCKET: f"stepd-{os.getpid()}-{secrets.token_hex(8)}-front",
            }
            self.env = env
            self.node = _start_child("node", env)
            if not self._wait_for_the_node(env[NODE_SOCKET]):
                self.stop()
                return self.node.returncode or 1
            self.http = _start_child("http", env)
            code = self._watch()
            self.stop()
        return code

    def _watch(self):
        """Until a stop is asked (0), or the HTTP front exits (its code, or 1). A node that dies (a
        crash, an OOM kill) is started again, as the runners are: its runners die with it, and the
        new node's orphan sweep Interrupts what they ran; meanwhile writes answer 503."""
        deaths, started = 0, time.monotonic()
        while not self.stopping:
            if self.http.poll() is not None:
                say(f"the HTTP front exited with code {self.http.returncode}; stopping", logging.ERROR)
                return self.http.returncode or 1
            if self.node.poll() is not None:
                deaths = 0 if time.monotonic() - started >= STEADY_SECONDS else deaths + 1
                delay = NODE_RESTART_DELAYS[min(deaths, len(NODE_RESTART_DELAYS) - 1)]
                say(f"the node exited with code {self.node.returncode}; starting another in {delay:g} s", logging.ERROR)
                time.sleep(delay)
                self.node, started = _start_child("node", self.env), time.monotonic()
            if self.reload_asked:
                self.reload_asked = False
                self.reload()
            time.sleep(CHECK_SECONDS)
        return 0

    def _wait_for_the_node(self, name):
        """Until the node takes connections at `name` (True), or exits, or a stop is asked."""
        while not self.stopping and self.node.poll() is None:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                try:
                    probe.connect(abstract(name))
                    return True
                except OSError:
                    time.sleep(0.02)
        if self.node.poll() is not None:
            say(f"the node exited with code {self.node.returncode} as it started", logging.ERROR)
        return False

    def _ask_to_stop(self, signum, frame):
        self.stopping = True

    def _ask_to_reload(self, signum, frame):
        self.reload_asked = True  # done by the loop: a signal handler only sets a flag

    def reload(self):
        """SIGHUP: load the delegate modules again. If they load, the node loads them too and replaces
        its runners (the new ones take the new work; the old ones finish what they run, within
        STOP_GRACE_SECONDS, then it is Interrupted, and give back what they never began), and gunicorn
        replaces its HTTP worker gracefully (its own HUP). If they do not load, nothing changes.

        The settings are the environment this process was started with, which no running process
        can see change: a reload applies new delegate code, not new STEPD_* values."""
        from stepd.delegates import DelegateLoadError, load_registry

        try:
            registry = load_registry(self.delegates_path or None)
        except DelegateLoadError as exc:
            say(f"reload refused; the delegates loaded before stay in use: {exc}", logging.ERROR)
            return
        before = _children(self.http.pid)
        self.node.send_signal(signal.SIGHUP)
        self.http.send_signal(signal.SIGHUP)
        self._wait_for_a_new_worker(before)
        types = ", ".join(delegate.type for delegate in registry.all())
        say(f"reloaded: delegates {types}; the runners and the HTTP worker replaced")

    def _wait_for_a_new_worker(self, before):
        """Until gunicorn has forked the new worker (and so told the old one to go: it does both at
        once), so that what this process says next is true; at most RELOAD_SECONDS."""
        deadline = time.monotonic() + RELOAD_SECONDS
        while time.monotonic() < deadline and self.http.poll() is None:
            if _children(self.http.pid) - before:
                time.sleep(CHECK_SECONDS)  # the old worker's SIGTERM follows its successor's fork
                return
            time.sleep(0.01)

    def stop(self):
        """SIGTERM to the HTTP front and the node at once (the front answers what it has, handing
        its last writes to the node, while the runners finish), then wait; SIGKILL what is still
        there after STOP_SECONDS."""
        children = [child for child in (self.http, self.node) if child is not None and child.poll() is None]
        for child in children:
            child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_SECONDS
        for child in children:
            try:
                child.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                say(f"process {child.pid} did not stop in {STOP_SECONDS:g} s; killing it", logging.WARNING)
                child.kill()
                child.wait()


def abstract(name):
    """The address of the abstract Unix socket `name` (no file: no path length, nothing left by a crash)."""
    return "\0" + name


def _start_child(command, env):
    """`python -m stepd <command>` with `env`, ended with this process. Each has a process group of
    its own: a SIGHUP to this service's group (a closing terminal) must reach neither gunicorn's
    master nor the node, which would reload whatever this process decides; this process passes on
    what it means to (a HUP once the delegates load, the stop)."""
    return subprocess.Popen(
        [sys.executable, "-m", "stepd", command], env=env, preexec_fn=die_with_parent, process_group=0
    )


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
            f"STEPD_WORKERS={os.environ['STEPD_WORKERS']} no longer applies and is ignored: one HTTP process serves "
            "the API on gevent and hands its writes to the node, the one process that writes the database; "
            "STEPD_RUNNERS sets the processes that run delegates",
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
    """`stepd http`: the HTTP front (serve starts it, after the node), handing its writes to the node
    at NODE_SOCKET."""
    settings = start_settings("stepd.service")
    if settings is None:
        return REFUSED
    if not os.environ.get(NODE_SOCKET):
        say("stepd http is the HTTP front of stepd serve, which starts it: run stepd serve", logging.ERROR)
        return REFUSED
    from stepd import front  # after the metrics folder is in the environment: prometheus-client reads it on import

    front.serve(settings, abstract(os.environ[NODE_SOCKET]))
    return 0


def node_main():
    """`stepd node`: the node (serve starts it), until SIGTERM: the writer, the dispatcher, its runners,
    the chores, and the socket at NODE_SOCKET where the HTTP front hands it its writes. On gevent:
    each write handed over, each runner's connection is a greenlet, and none waits for another."""
    from gevent import monkey

    monkey.patch_all()
    settings = start_settings("stepd.node")
    if settings is None or not os.environ.get(NODE_SOCKET):
        return REFUSED
    from stepd.node_process import run_node  # after the patch: its modules' threads are greenlets

    return run_node(settings, abstract(os.environ[NODE_SOCKET]))


def remove_folders_of_gone_services(root):
    """Delete the folders under `root` whose service (the pid in the name) is gone."""
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
def service_folder():
    """The folder of this run of the service, readable by this user only: prometheus-client's files
    (metrics.py), where the node and
    each HTTP worker (a reload replaces it) write their values and a scrape sums them all. Deleted at
    the stop: a restart of the service starts those series from zero. A service that was killed
    (SIGKILL) cannot delete its own: the next one to start deletes those whose service is gone."""
    remove_folders_of_gone_services(Path(tempfile.gettempdir()))
    folder = tempfile.mkdtemp(prefix=f"{METRICS_FOLDER_PREFIX}{os.getpid()}-")  # mode 0700
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
