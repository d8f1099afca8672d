"""Admission: new processes wait a little while the node cannot keep up with the work it holds.

The node serves the API and runs the engine (recording outcomes, beginning next steps) on one
core. Under a flood of `POST /processes` with quick steps, requests took all of it: the engine
advanced about 90 steps/s while the API accepted 500 processes/s, and the steps accepted then ran
for 20 s after the flood stopped. Accepting work faster than it can run only makes a backlog.

So a request that starts a process first waits (`wait`) while the node is crowded: the attempt
that has waited longest for a runner has waited QUEUE_AGE or more, and the runners are turning
quick work over (in the last measure's window they ended at least one attempt per place every
QUICK_SECONDS). Both are needed. Runners busy with slow delegates leave an old queue too, but
there waiting would not make anything run sooner, and a queue is there to hold work the runners
have no place for yet; a node with nothing queued has nothing to catch up on. A request waits
WAIT_LIMIT at most, then goes on (under overload each request answers later; none is refused),
and nothing else waits: restarts, reads and every other endpoint go straight on.

(A first version asked whether the node's CPU was busy instead of whether work turned over
quickly: the node's share of a core under that flood measured 78-93% from run to run, on both
sides of any threshold.)

The node measures every MEASURE_SECONDS (node.py runs `measure` as one of its ticks); `wait`
only reads what the last measure found.
"""

import logging
import time
from datetime import UTC, datetime

from stepd.model import now_iso

log = logging.getLogger("stepd.node")

MEASURE_SECONDS = 0.1
QUICK_SECONDS = 0.1  # an attempt a place every this long, or more often: quick work
QUEUE_AGE = 0.25  # seconds the oldest queued attempt has waited
WAIT_LIMIT = 1.0  # seconds a request waits at most
WAIT_STEP = 0.005  # how often a waiting request looks again


class Admission:
    """Whether the node is crowded now, from how fast its runners end attempts and its queue's age."""

    def __init__(self, store, turnover, clock=time.monotonic):
        self.store = store
        self._turnover = turnover  # () -> (attempts ended so far, places of the runners now)
        self._clock = clock
        self._last = (clock(), turnover()[0])
        self.crowded = False

    def measure(self):
        """Look at the attempts ended since the last measure, and at the queue's oldest attempt."""
        now, (ended, places) = self._clock(), self._turnover()
        (then, ended_then), self._last = self._last, (now, ended)
        per_second = (ended - ended_then) / max(now - then, 1e-6)
        quick = places > 0 and per_second > 0 and per_second >= places / QUICK_SECONDS
        crowded = quick and self._oldest_wait() >= QUEUE_AGE
        if crowded != self.crowded:
            log.debug("new processes %s", "wait: quick work queued for a while" if crowded else "go straight on")
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
