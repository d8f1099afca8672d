"""`stepd serve` (`make run`): stepd as one service, the HTTP front and the runners, under one command.

It checks what it can once (settings, the address to listen on, delegates, the database, the
first token), then starts the HTTP front (`python -m stepd http`: gunicorn, front.py, whose
workers only commit) and STEPD_RUNNERS runner processes (`python -m stepd runner`: they claim
queued attempts and call the delegates), and watches them:

    stepd serve                           this supervisor
    ├── python -m stepd http              the HTTP front (gunicorn's master)
    │   └── STEPD_WORKERS workers
    └── STEPD_RUNNERS × python -m stepd runner   the delegates run here, never in an HTTP worker

The children run in the supervisor's working directory, with the settings it read (STEPD_DB and
STEPD_DELEGATES_PATH already made absolute by config.from_env), so all use one database.

A runner that dies (a delegate called os._exit, a segfault, an OOM kill) is started again
within a second or two; its running steps become Interrupted by the next runner's sweep.
If the HTTP front exits, everything stops. SIGTERM or SIGINT to this process (or to its
process group) stops all cleanly: the runners give their delegates STOP_GRACE_SECONDS.
"""

import ctypes
import errno
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from stepd import config, logs
from stepd.logs import configure_logging

REFUSED = 2  # the exit code of a start refused for a bad setting, delegate or database (as cli.py's refusals)
CHECK_SECONDS = 0.1  # how often the children are looked at
RESTART_DELAYS = (0.2, 0.5, 1.0, 2.0, 4.0)  # before starting a runner again, if it keeps dying at once
STEADY_SECONDS = 10.0  # a runner that lived this long starts again after the shortest delay
STOP_SECONDS = 20.0  # how long a stop waits for the children before it kills them
PR_SET_PDEATHSIG = 1
# Set for the children of `stepd serve`: its checks have run, and what they found was said once.
CHECKED = "STEPD_PREFLIGHT_DONE"


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
        raise CannotStart(f"STEPD_DB={path} cannot be used: {exc}") from exc


def database_is_new(path):
    """No file yet, or an empty one (made, never written): only then is a first token made."""
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
        f"{settings['STEPD_WORKERS']} HTTP worker(s), {settings['STEPD_RUNNERS']} runner(s) of "
        f"{settings['STEPD_THREADS']} place(s); delegates {loaded}",
        version=VERSION,
        url=url,
        database=settings["STEPD_DB"],
        sync=settings["STEPD_SYNC"],
        workers=settings["STEPD_WORKERS"],
        runners=settings["STEPD_RUNNERS"],
        threads=settings["STEPD_THREADS"],
        delegates=by_folder,
    )


def _prctl_parent_death(signum):
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signum)


def _die_with_supervisor():
    """In a child, before exec: get SIGTERM when the supervisor dies, even by SIGKILL."""
    _prctl_parent_death(signal.SIGTERM)


def die_with_make():
    """Under `make run`, end when make ends, even by SIGKILL: a sidecar must not outlive the
    command that started it and keep holding its port. (make passes a SIGTERM on by itself.)"""
    parent = os.getppid()
    try:
        started_by_make = Path(f"/proc/{parent}/comm").read_text().strip() == "make"
    except OSError:
        return  # no /proc: not Linux, so no prctl either
    if started_by_make:
        _prctl_parent_death(signal.SIGTERM)
        if os.getppid() != parent:  # make died before the call took effect
            os.kill(os.getpid(), signal.SIGTERM)


def say(text, level=logging.INFO, logger="stepd.service", **fields):
    logs.say(text, level, logger=logger, **fields)


class Supervisor:
    """Starts the children, starts a dead runner again, replaces them on SIGHUP, stops them all."""

    def __init__(self, runners, settings_env, delegates_path=None):
        self.runner_count = runners
        self.env = settings_env  # the environment of the children: the settings as this process read them
        self.delegates_path = delegates_path  # STEPD_DELEGATES_PATH, loaded again at a reload
        self.http = None
        self.runners = {}  # slot -> Popen
        self.restart_at = {}  # slot -> when a dead runner starts again
        self.deaths = {}  # slot -> how many times in a row it died soon after starting
        self.retiring = []  # (Popen, kill-after time) of runners a reload replaced, finishing their work
        self.stopping = False
        self.reload_asked = False

    def _spawn(self, command, env):
        return subprocess.Popen([sys.executable, "-m", "stepd", command], env=env, preexec_fn=_die_with_supervisor)

    def _start_runner(self, slot):
        self.runners[slot] = self._spawn("runner", self.env)
        self.runners[slot].started = time.monotonic()

    def run(self):
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._ask_to_stop)
        signal.signal(signal.SIGHUP, self._ask_to_reload)
        self.http = self._spawn("http", self.env)
        for slot in range(self.runner_count):
            self._start_runner(slot)
        while not self.stopping:
            if self.http.poll() is not None:
                say(f"the HTTP front exited with code {self.http.returncode}; stopping the runners", logging.ERROR)
                self.stop()
                return self.http.returncode or 1
            if self.reload_asked:
                self.reload_asked = False
                self.reload()
            self._look_after_runners()
            self._look_after_retiring()
            time.sleep(CHECK_SECONDS)
        self.stop()
        return 0

    def _ask_to_stop(self, signum, frame):
        self.stopping = True

    def _ask_to_reload(self, signum, frame):
        self.reload_asked = True  # done by the loop: a signal handler only sets a flag

    def reload(self):
        """SIGHUP: load the delegate modules again. If they load, new runners take the new work,
        the old ones finish what they run (STOP_GRACE_SECONDS; then it is Interrupted) and give
        back what they had claimed but not begun, and gunicorn replaces its workers gracefully
        (its own HUP), so no request is refused. If they do not load, nothing changes.

        The settings are the environment this process was started with, which no running process
        can see change: a reload applies new delegate code, not new STEPD_* values."""
        from stepd.delegates import DelegateLoadError, load_registry

        try:
            registry = load_registry(self.delegates_path or None)
        except DelegateLoadError as exc:
            say(f"reload refused; the delegates loaded before stay in use: {exc}", logging.ERROR)
            return
        old = [proc for proc in self.runners.values() if proc is not None and proc.poll() is None]
        for slot in range(self.runner_count):
            self._start_runner(slot)
        for proc in old:
            proc.send_signal(signal.SIGTERM)  # it stops claiming now, and stops once its delegates are done
            self.retiring.append((proc, time.monotonic() + STOP_SECONDS))
        self.http.send_signal(signal.SIGHUP)
        types = ", ".join(delegate.type for delegate in registry.all())
        say(f"reloaded: delegates {types}; {len(old)} runner(s) replaced, gunicorn's workers replaced")

    def _look_after_retiring(self):
        """Runners a reload replaced: forget those that stopped; kill one that outlives its stop."""
        now, still = time.monotonic(), []
        for proc, kill_after in self.retiring:
            if proc.poll() is not None:
                continue
            if now >= kill_after:
                say(f"replaced runner {proc.pid} did not stop in {STOP_SECONDS:g} s; killing it", logging.WARNING)
                proc.kill()
            still.append((proc, kill_after))
        self.retiring = still

    def _look_after_runners(self):
        now = time.monotonic()
        for slot, proc in list(self.runners.items()):
            if proc is None:
                if now >= self.restart_at[slot]:
                    self._start_runner(slot)
                continue
            if proc.poll() is None:
                continue
            lived = now - proc.started
            self.deaths[slot] = 0 if lived >= STEADY_SECONDS else self.deaths.get(slot, 0) + 1
            delay = RESTART_DELAYS[min(self.deaths[slot], len(RESTART_DELAYS)) - 1] if self.deaths[slot] else 0.0
            news = f"runner {proc.pid} exited with code {proc.returncode}; starting another in {delay:g} s"
            say(news, logging.WARNING)
            self.runners[slot] = None
            self.restart_at[slot] = now + delay

    def stop(self):
        """SIGTERM to every child, then wait; SIGKILL what is left after STOP_SECONDS."""
        everyone = [self.http, *self.runners.values(), *(proc for proc, _ in self.retiring)]
        children = [p for p in everyone if p is not None and p.poll() is None]
        for proc in children:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_SECONDS
        for proc in children:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                say(f"process {proc.pid} did not stop in {STOP_SECONDS:g} s; killing it", logging.WARNING)
                proc.kill()
                proc.wait()


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
    die_with_make()
    supervisor = Supervisor(settings["STEPD_RUNNERS"], settings_env(settings), settings["STEPD_DELEGATES_PATH"])
    return supervisor.run()


def runner_main():
    """`stepd runner`: one runner process, until SIGTERM or SIGINT."""
    from stepd.delegates import DelegateLoadError, load_registry
    from stepd.model import Unusable
    from stepd.runner import run_until_stopped
    from stepd.wiring import make_runner, open_store

    settings = start_settings("stepd.runner")
    if settings is None:
        return REFUSED
    try:
        registry = load_registry(settings["STEPD_DELEGATES_PATH"] or None)
        store = open_store(settings)
    except (DelegateLoadError, Unusable) as exc:
        say(f"runner cannot start: {exc}", logging.ERROR, logger="stepd.runner")
        return REFUSED
    run_until_stopped(make_runner(store, registry, settings))
    return 0


def http_main():
    """`stepd http`: the HTTP front alone (serve starts it). Started by hand, it makes the same
    checks as serve first; under serve (CHECKED set) they were just made."""
    from stepd import front

    settings = start_settings("stepd.service")
    if settings is None or (not os.environ.get(CHECKED) and checked(settings) is None):
        return REFUSED
    front.serve(settings)
    return 0
