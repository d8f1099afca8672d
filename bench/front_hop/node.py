"""The hop's node: stepd's node (writer, dispatcher, runners) and the verbs' socket, no HTTP.
Stops on SIGTERM."""

from gevent import monkey

monkey.patch_all()

import signal  # noqa: E402 - after gevent's patch, as in gunicorn's gevent worker
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import rpc  # noqa: E402

from stepd.app import create_app, start_node, stop_background  # noqa: E402

app = create_app()
st = app.extensions["stepd"]
start_node(app, app.config["STEPD_RUNNERS"])
rpc.serve(st.store, st.registry, st.engine)
stopping = []
signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
while not stopping:
    time.sleep(0.2)
stop_background(app)
