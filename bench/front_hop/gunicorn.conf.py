"""gunicorn settings of the hop's HTTP processes: stepd's front options, HOP_WORKERS workers, each
handing its writes to the node (rpc.hand_writes_to_node) instead of being one."""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from stepd.config import from_env  # noqa: E402
from stepd.front import options  # noqa: E402

globals().update(options(from_env()))
workers = int(os.environ.get("HOP_WORKERS", "1"))
wsgi_app = "stepd.app:create_app()"


def post_worker_init(worker):
    import rpc

    rpc.hand_writes_to_node(worker.wsgi.extensions["stepd"].store)
