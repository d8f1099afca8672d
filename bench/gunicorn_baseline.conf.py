"""gunicorn settings for the baseline app: stepd's own (stepd.front.options: workers, worker class,
logging and its logger class, from the same STEPD_* variables), with the baseline app instead of
stepd and without stepd's start-up checks."""

from stepd.config import from_env
from stepd.front import options

globals().update(options(from_env()))
wsgi_app = "bench.baseline_app:create_app()"
