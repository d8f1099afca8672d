"""Admission: new processes wait a little while the node cannot keep up with the work it holds.

The node serves the API and runs the engine (recording outcomes, beginning next steps) on one
core. Under a flood of `POST /processes` with quick steps, requests took all of it: the engine
advanced about 90 steps/s while the API accepted 500 processes/s, and the steps accepted then ran
for 20 s after the flood stopped. Accepting work faster than it can run only makes a backlog.

So a request that starts a process first waits (`wait`) while the node is crowded: its CPU was
busy (at least CPU_BUSY of the last measure's window) and the attempt that has waited longest for a
runner has waited QUEUE_AGE or more. Both are needed: a node whose runners are busy with slow
delegates has an old queue but an idle CPU, and waiting would not make anything run sooner; a
node busy with requests alone has no queue to catch up on. A request waits WAIT_LIMIT at most,
then goes on (under overload each request answers later; none is refused), and nothing else
waits: restarts, reads and every other endpoint go straight on.

The node measures every MEASURE_SECONDS (node.py runs `measure` as one of its ticks); `wait`
only reads what the last measure found.
"""

import logging
import time
from datetime import UTC, datetime

from stepd.model import now_iso

log = logging.getLogger("stepd.node")

MEASURE_SECONDS = 0.1
CPU_BUSY = 0.85  # of one core: the node runs on one (gevent), plus SQLite's checkpoints on a thread
QUEUE_AGE = 0.25  # seconds the oldest queued attempt has waited
WAIT_LIMIT = 1.0  # seconds a request waits at most
WAIT_STEP = 0.005  # how often a waiting request looks again


class Admission:
    """Whether the node is crowded now, measured from its CPU time and its queue."""

    def __init__(self, store, clock=time.monotonic, cpu=time.process_time):
        self.store = store
        self._clock, self._cpu = clock, cpu
        self._last = (clock(), cpu())
        self.crowded = False

    def measure(self):
        """Look at the CPU used since the last measure and at the queue's oldest attempt."""
        now, used = self._clock(), self._cpu()
        (then, used_then), self._last = self._last, (now, used)
        busy = (used - used_then) / max(now - then, 1e-6) >= CPU_BUSY
        crowded = busy and self._oldest_wait() >= QUEUE_AGE
        if crowded != self.crowded:
            log.debug("new processes %s", "wait: the node is busy and its queue old" if crowded else "go straight on")
        self.crowded = crowded

    def _oldest_wait(self):
        oldest = self.store.oldest_queued_at(now_iso())
        if oldest is None:
            return 0.0
        return (datetime.now(UTC) - datetime.fromisoformat(oldest)).total_seconds()

    def wait(self):
        """Return once the node is not crowded, or after WAIT_LIMIT; the seconds waited."""
        started = self._clock()
        while self.crowded and self._clock() - started < WAIT_LIMIT:
            time.sleep(WAIT_STEP)
        return self._clock() - started
