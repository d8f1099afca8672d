# stepd in a container: `stepd serve` (gunicorn, its HTTP workers and the runner processes),
# the SQLite file on a volume. Build and run:
#
#   docker build -t stepd .
#   docker run --init --stop-timeout 30 -p 127.0.0.1:8080:8080 -v stepd-data:/var/lib/stepd \
#     -e STEPD_TOKEN=your-secret stepd
#
# --init: a PID 1 that reaps orphans (a worker whose gunicorn master died); `stepd serve` handles
# SIGTERM itself, so `docker stop` stops all cleanly within --stop-timeout (it waits up to 20 s
# for its children; docker's default of 10 s would cut a stop short).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    STEPD_DB=/var/lib/stepd/stepd.db \
    STEPD_HOST=0.0.0.0 \
    STEPD_PORT=8080
# STEPD_HOST=0.0.0.0: inside the container 127.0.0.1 is the container's own loopback, which
# `docker run -p` cannot reach; what is reachable from outside is chosen by -p (publish on
# 127.0.0.1 for a sidecar, as above).

RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/stepd --shell /usr/sbin/nologin stepd \
    && mkdir -p /var/lib/stepd \
    && chown stepd:stepd /var/lib/stepd \
    && chmod 0700 /var/lib/stepd

WORKDIR /app
# The pinned dependencies first (a layer that changes only with requirements.txt), then stepd
# itself, installed as a package: the image holds the `stepd` command, not a checkout.
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt
COPY pyproject.toml README.md LICENSE ./
COPY stepd ./stepd
RUN pip install --no-cache-dir --no-deps . && rm -rf /app/stepd /app/build

USER stepd
VOLUME ["/var/lib/stepd"]
EXPOSE 8080

# The image has no curl: Python's urllib. urlopen raises on a 503, so the check fails then.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('STEPD_PORT', '8080'), timeout=2)"]

# Exec form: `stepd serve` is the process docker signals.
ENTRYPOINT ["stepd", "serve"]
