"""gunicorn settings for the baseline app: those of ../gunicorn.conf.py (workers, worker class,
threads, logging and its logger class), read from that file, with the baseline app instead of stepd and without
stepd's hooks (migration, runner)."""

import runpy
from pathlib import Path

_stepd = runpy.run_path(str(Path(__file__).resolve().parent.parent / "gunicorn.conf.py"))

wsgi_app = "bench.baseline_app:create_app()"
for _name in (
    "bind",
    "workers",
    "worker_class",
    "threads",
    "graceful_timeout",
    "control_socket_disable",
    "loglevel",
    "accesslog",
    "access_log_format",
    "logger_class",  # stepd's access and error lines (logs.GunicornLogger): the same cost per request
):
    globals()[_name] = _stepd[_name]
