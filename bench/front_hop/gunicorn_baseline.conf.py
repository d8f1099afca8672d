"""gunicorn settings of the bare Flask baseline with BASELINE_WORKERS workers (bench/gunicorn_baseline.conf.py
has stepd's one)."""

import os

from stepd.config import from_env
from stepd.front import options

globals().update(options(from_env()))
workers = int(os.environ.get("BASELINE_WORKERS", "1"))
wsgi_app = "bench.baseline_app:create_app()"
