"""The node's side of its runners: hand them attempts, record what they did, notice when one dies.

Every write of the node goes through its writer (writer.py), in groups. At the end of each group,
inside its transaction, the dispatcher claims queued attempts (due retries first) for each runner
with free places (`_claim`), and sends them once that transaction committed: an attempt reaches
a runner only when its claim is in the file. A restart's attempt is thus claimed in the restart's
own group, with no poll and no wake-up between.

A runner's outcomes are recorded in the next group, together with the start of its process's
next step, which goes back to the same runner (one transaction per group, shared by many steps).
`ctx.results` travels with each attempt.

A runner that dies closes its connection: its running attempts become Interrupted in the next
group, and what was claimed for it but never sent is queued again (`_lost`).

On PostgreSQL other nodes may take what this one queued (SPEC 12). A group that queued an attempt
tells them, in its own transaction (`_claim_and_tell`), when its claim may have left some of it:
the claim did not run (no free place, the node stops or was replaced) or filled every place it
asked for. One NOTIFY a group at most, and none when the node took all it queued (so a node alone
sends one only while its places are all taken); a group rolled back sends none. The nodes LISTEN
(node.py), and `announced` wakes this one. A retry falls due with no write to tell of it: the node
that scheduled it wakes when it is due (`wake_for_due_retries`); the poll is the backstop for any other.
"""

import heapq
import logging
import threading
import time
from dataclasses import dataclass, field

from stepd import metrics
from stepd.liveness import HOST, process_start_time
from stepd.model import FAILED, Busy, Outcome, Unavailable, Unwritable, new_id, now_iso

log = logging.getLogger("stepd.node")

REGISTER_RETRY_SECONDS = 1.0
# A group that failed (busy, a full disk, no database): its outcomes are written again after this.
RETRY_RECORD_SECONDS = 0.5
# On SQLite a runner may hold this many times its places of attempts of quick types (the runner
# says, with each outcome, whether its delegate returned within runner.QUICK_SECONDS). They run on
# its reading thread one after another, so its places (STEPD_THREADS) still bound the delegates
# running at once; what the deeper queue buys is bigger groups: with four attempts in flight a group
# recorded about three outcomes, and its COMMIT (~100 us) and fixed costs were a third of a step's.
# The engine row at 4 places: 6,286-6,827 steps/s with 4 times, 7,637-7,909 with 8, 7,860-8,272
# with 16 (interleaved, the same minutes). Once SQLite's checks cost less (migration 9), the node's
# own share of a step fell and the depth paid again: the steps alone 14,331 / 17,672 / 20,148
# steps/s with 8 / 16 / 32, the peers' 100 x 100 10,731-10,938 / 11,776-11,952 / 12,038-13,104.
# 16: at SPEC 8's 4 places an attempt waits behind at most 63 quick ones (about 0.1 s of them at
# most), and a runner that dies takes at most 16 x its places of never-called attempts with it
# (Interrupted).
# PostgreSQL's claims and next steps are single statements that cannot pick by type: places only.
QUICK_DEPTH = 16
GONE = "The runner running this step (runner {id}, process {pid}) is gone."


@dataclass(eq=False)
class Link:
    """One runner's connection, as the node sees it."""

    channel: object
    places: int
    pid: int
    id: str = field(default_factory=new_id)  # its row in `runners`; steps.runner_id of its attempts
    sent: set = field(default_factory=set)  # (step id, attempt) sent to it and not ended
    unsent: list = field(default_factory=list)  # claimed for it once it was gone: never sent, so queued again
    reserved: int = 0  # claimed in the group open now, not yet committed
    # Outcomes read and not yet taken by a write: one write waits for them at a time, and takes all
    # that came meanwhile (one member of a group, one change, however many messages they came in).
    to_record: list = field(default_factory=list)
    recording: bool = False  # a write is waiting to take `to_record`
    open: bool = True
    retired: bool = False  # told to stop (a reload replaced it): no new attempt goes to it
    closed: threading.Event = field(default_factory=threading.Event)  # its end was recorded
    row: dict = None  # its row in `runners`, once registered
    # Attempts it may hold at once, sent or reserved: its places, and on SQLite more for quick types
    # (QUICK_DEPTH). Held as slow (`slow`, their keys): those of a type not quick for it, at most
    # `places` of them; the others run one after another on its reading thread (runner.py).
    depth: int = None
    slow: set = field(default_factory=set)
    quick: dict = field(default_factory=dict)  # step type -> whether its last outcome here was quick
    skipped: bool = False  # its last claim passed over queued attempts it had no slow place for

    def __post_init__(self):
        if self.depth is None:
            self.depth = self.places

    @property
    def free(self):
        return 0 if self.retired or not self.open else self.depth - len(self.sent) - self.reserved

    @property
    def free_slow(self):
        return min(self.free, self.places - len(self.slow))

    def is_slow(self, step_type):
        return not self.quick.get(step_type)

    def hold(self, jobs):
        """Under the dispatcher's lock: `jobs` were claimed or begun for it; their places are taken."""
        self.reserved += len(jobs)
        self.slow.update(job.key for job in jobs if self.is_slow(job.type))

    def take_back(self, keys, slow):
        """Under the dispatcher's lock: attempts let go of (`keys`; `slow`, those held as slow) are
        its own again: their outcomes were not recorded."""
        self.sent.update(keys)
        self.slow.update(slow)

    def unhold(self, jobs):
        """Under the dispatcher's lock: `jobs` were reserved and are not sent; their places are free."""
        self.reserved -= len(jobs)
        self.slow.difference_update(job.key for job in jobs)

    def let_go(self, keys):
        """Under the dispatcher's lock: these attempts it was sent ended; their places are free."""
        keys = set(keys)
        self.sent.difference_update(keys)
        self.slow.difference_update(keys)


class Room:
    """What a runner has free for more attempts, as a claim or a record goes (the writer's loop
    reserves what they took after, `_will_send`): `room(step_type)` says whether one more of that
    type fits, counting those it let in before; `refused` whether it turned one down."""

    def __init__(self, link):  # under the dispatcher's lock
        self.link, self.free, self.free_slow, self.refused = link, link.free, link.free_slow, False

    def __call__(self, step_type):
        slow = self.link.is_slow(step_type)
        if self.free <= 0 or (slow and self.free_slow <= 0):
            self.refused = True
            return False
        self.free, self.free_slow = self.free - 1, self.free_slow - slow
        return True


class Dispatcher:
    """The runners connected to this node, and the attempts each has."""

    def __init__(self, store, stopping_reason, node_id=None):
        self.store = store
        self.node_id = node_id  # PostgreSQL: each runner's row names its node (None: SQLite's have no column)
        self.stopping_reason = stopping_reason  # () -> the Interrupted message when the node stops, or None
        self.links = []
        self._lock = threading.Lock()
        # Whether an attempt may wait for a claim: set by a group that queued one, by the poll,
        # by a claim that filled every place it asked for; without it a group's end claims nothing.
        self.maybe_queued = True
        self._queued_in_group = False  # the group open now queued an attempt (only the writer's loop touches it)
        self._retries_due = []  # a heap of the ISO times of retries this node scheduled (wake_for_due_retries)
        # Whether a claim looks for due retries (a look, a round trip to PostgreSQL's server, at the end
        # of every group that claims): at start, when a retry this node scheduled falls due, and after
        # every poll (another node's retry, or one scheduled before this node began: `poll`).
        self.retries_may_be_due = True
        # Attempts claimed or begun for each runner in the group open now (only the writer's loop
        # touches it): sent once that group committed, one message a runner a group.
        self._to_send = {}
        self.recorded = 0  # outcomes recorded since the node started (admission.py reads how fast)
        store.on_queued = self.note_queued
        # SQLite has one node per file: nobody to tell, and the claim alone costs nothing more.
        self._end_of_group = self._claim if node_id is None else self._claim_and_tell
        due = self._may_claim if node_id is None else self._may_claim_or_tell
        store.db.at_end_of_groups(self._end_of_group, due=due)
        store.db.at_end_of_groups(self._take_what_to_send, writes=False)  # it only takes a list

    # -- a runner arrives, and leaves ----------------------------------------------------
    def attach(self, channel):
        """Take a runner on `channel`: read its hello, register it, start reading it. The Link,
        or None if it closed before saying hello."""
        hello = channel.receive()
        if hello is None or hello[0] != "hello":
            channel.close()
            return None
        places = hello[1]["places"]
        depth = places * QUICK_DEPTH if self.node_id is None else places
        link = Link(channel, places=places, pid=hello[1]["pid"], depth=depth)
        if not self._register(link):
            channel.close()
            return None
        with self._lock:
            self.links.append(link)
        threading.Thread(target=self._read, args=(link,), name="stepd-link", daemon=True).start()
        self.wake()
        return link

    def _register(self, link):
        """Its row in `runners`: the runner's process (on this host: a runner attaches over a local
        socket), which ends when its connection does, and when this node dies (runner.py). A busy
        or full database is waited out (a node that starts then must not fail, nor its runner die
        again and again); False if the node stops meanwhile."""
        link.row = {"id": link.id, "host": HOST, "pid": link.pid, "pid_started": process_start_time(link.pid)}
        if self.node_id is not None:
            link.row["node_id"] = self.node_id
        while self.stopping_reason() is None:
            try:
                self.store.heartbeat(link.row)
                return True
            except (Busy, Unwritable) as exc:
                log.warning("runner %d cannot register yet (%s); retrying", link.pid, exc)
                time.sleep(REGISTER_RETRY_SECONDS)
        return False

    def retire(self, pids):
        """The runners of these processes take no new attempt (a reload replaces them: they finish
        what they run, and give back what they never began)."""
        with self._lock:
            for link in self.links:
                if link.pid in pids:
                    link.retired = True

    def _read(self, link):
        given_back = []
        while (messages := link.channel.receive_all()) is not None:
            outcomes = []
            for kind, payload in messages:
                if kind == "outcomes":
                    outcomes += payload
                elif kind == "unstarted":
                    given_back = payload
            if outcomes:
                self._record(link, outcomes)
        self._lost(link, given_back)

    def _lost(self, link, given_back):
        """The connection closed: queue again what the runner never began, Interrupt the rest."""
        with self._lock:
            link.open = False
        reason = self.stopping_reason() or GONE.format(id=link.id, pid=link.pid)

        def release(conn):
            for key in [*given_back, *link.unsent]:
                self.store.unclaim_key(key, link.id)
            self.note_queued()
            return self.store.interrupt_runner(link.id, reason)

        def done(interrupted, error):
            if error is not None:
                log.error("runner %s's end could not be recorded (%s); the orphan sweep will", link.id, error)
            elif interrupted:
                log.warning("runner %d is gone; %d running step(s) marked Interrupted", link.pid, len(interrupted))
            metrics.lost(link.sent, interrupted or ())
            with self._lock:
                self.links.remove(link)
            link.channel.close()
            link.closed.set()

        self.store.db.submit(release, done)

    # -- outcomes ---------------------------------------------------------------------------
    def _record(self, link, outcomes):
        """Record `outcomes` in the next group; the next steps they began go to `link` once that
        group committed, with its claims (`_take_what_to_send`). Outcomes that arrive while a
        write waits for its group join that write (one change for all).

        Their places are free within the group (the same group's claims may fill them) and taken
        by the next steps begun; if the group fails, both are undone with it."""
        with self._lock:
            link.to_record.extend(outcomes)
            if link.recording:
                return
            link.recording = True
        taken, held_slow = [], set()

        def record(conn):
            with self._lock:
                taken.extend(link.to_record)
                link.to_record, link.recording = [], False
                for outcome in taken:
                    link.quick[outcome.job.type] = outcome.quick
                held_slow.update(link.slow.intersection(outcome.job.key for outcome in taken))
                link.let_go(outcome.job.key for outcome in taken)  # places the next steps may take
                if held_slow and self.retries_may_be_due:
                    self.maybe_queued = True  # a retry passed over for want of a slow place (`_claim_for`)
                room = Room(link) if self.node_id is None else None
            try:
                begun = self.store.outcomes_job(taken, link.id, room)(conn)
            except BaseException:  # not recorded: theirs again before this group's claim
                self._take_back(link, taken, held_slow)
                raise
            if link.retired or self.stopping_reason() is not None:
                begun = self._queue_again(link, begun)
            self._will_send(link, begun)
            return begun

        def done(begun, error):
            if error is not None:
                self._will_not_send(link, begun or ())  # their group failed before its end
                self._take_back(link, taken, held_slow)  # the places they freed in it
                self._record_failed(link, taken, error)
                return
            metrics.ended(taken)  # the next steps they began go out with the group's claims
            self.recorded += len(taken)
            self._note_retries(outcome.retry_at for outcome in taken if outcome.retry_at is not None)

        self.store.db.submit(record, done)

    def _queue_again(self, link, begun):
        """The next steps that outcomes of a runner that is stopping began for it, queued again in
        the same group: it calls no more delegates, and what it has not begun would otherwise be
        Interrupted at its end rather than run by another. Returns what is left to send: nothing."""
        for job in begun:
            self.store.unclaim_key(job.key, link.id)
        if begun:
            self.note_queued()
        return []

    def _take_back(self, link, outcomes, held_slow):
        with self._lock:
            link.take_back([outcome.job.key for outcome in outcomes], held_slow)

    def _record_failed(self, link, outcomes, error):
        """A busy, full or unreachable database (PostgreSQL restarting, a connection it ended):
        write them again soon (an outcome exists only here; failing them would fail steps whose
        delegates did their work). Any other error: fail the attempts, so no step stays STARTED
        under a live runner for ever."""
        if isinstance(error, Busy | Unwritable | Unavailable):
            log.warning("could not record %d outcome(s) (%s); retrying", len(outcomes), error)
            threading.Timer(RETRY_RECORD_SECONDS, self._record, (link, outcomes)).start()
            return
        log.error("could not record %d outcome(s): %r", len(outcomes), error)
        message = f"stepd could not record this attempt's outcome: {error}"
        failed = [
            Outcome(o.job, FAILED, error={"type": "InternalError", "message": message})
            for o in outcomes
            if o.kind != FAILED or o.error.get("type") != "InternalError"
        ]
        if failed:
            self._record(link, failed)

    # -- claims -------------------------------------------------------------------------------
    def _wanting(self):
        """The runners a claim at the end of this group would be for: those with a free place, when
        an attempt may be queued (a retired runner has none). Stopping, none: its runners give back
        the rest."""
        if self.stopping_reason() is not None or not self.maybe_queued:
            return []
        with self._lock:
            return [link for link in self.links if link.open and link.free > 0 and (link.free_slow or not link.skipped)]

    def _may_claim(self):
        """Whether the end of this group has a claim to try: most groups have none (nothing queued
        since the last, or no place free), and then the writer opens no savepoint for `_claim`."""
        return bool(self._wanting())

    def _claim(self, conn):
        """At the end of a group: claim attempts for the runners' free places (sent with what the
        group's outcomes began, once it committed)."""
        wanting = self._wanting()
        if not wanting:
            return None
        self.maybe_queued = False
        try:
            claimed = self._claim_for(wanting)
        except BaseException:
            # undone with its savepoint: what it would have taken waits for the next group
            self.maybe_queued = self.retries_may_be_due = True
            raise
        for link, jobs in claimed:  # only now: a claim that failed half way is undone, and sends nothing
            self._will_send(link, jobs)
        return None

    def _claim_for(self, wanting):
        claimed = []
        for link in wanting:
            with self._lock:
                room = Room(link)
            wanted, slow_wanted = room.free, room.free_slow
            # A due retry takes a slow place (its type may be any): with none free here it is left
            # for the next runner, or for this one once a slow place frees (`_record`).
            jobs = self._claim_due_retries(link, slow_wanted) if slow_wanted else []
            for job in jobs:
                room(job.type)  # counted: it fits (at most `slow_wanted` of them)
            if len(jobs) < wanted:
                if self.node_id is None:  # quick types may take the places left beyond `slow_wanted`
                    jobs += self.store.claim_queued(link.id, wanted - len(jobs), room)
                elif len(jobs) < slow_wanted:
                    jobs += self.store.claim_queued(link.id, slow_wanted - len(jobs))
            link.skipped = room.refused  # only the writer's loop reads it
            if link.skipped:
                self.maybe_queued = True  # what it passed over waits for a slow place (any runner's)
            elif not jobs and slow_wanted:
                break  # nothing more is queued, nor due
            if len(jobs) == wanted:
                self.maybe_queued = True  # every place it asked for is filled: more may wait
            for job in jobs:
                if job.results is None:  # a first step's are known already ({})
                    job.results = self.store.earlier_results(job.step_id)
            if jobs:
                claimed.append((link, jobs))
        return claimed

    def _claim_due_retries(self, link, wanted):
        if not self.retries_may_be_due:
            return []
        # Cleared before the look: a retry falling due meanwhile (the chores, while PostgreSQL's
        # round trip lets other greenlets run) sets it again, for the next claim.
        self.retries_may_be_due = False
        jobs = self.store.claim_due_retries(link.id, wanted)
        if len(jobs) == wanted:
            self.retries_may_be_due = True  # every place it asked for is filled: more may be due
        return jobs

    def _may_claim_or_tell(self):
        """PostgreSQL's `_may_claim`: also when the group queued work, which other nodes may be told of."""
        return self._queued_in_group or self._may_claim()

    def _claim_and_tell(self, conn):
        """PostgreSQL's end of a group: the claim, then a NOTIFY to the other nodes if the group
        queued work the claim may have left (the module's docstring). One hook, not two: each hook
        is a savepoint, and this runs in every group."""
        queued, self._queued_in_group = self._queued_in_group, False
        self._claim(conn)
        if queued and self.maybe_queued:
            self.store.tell_nodes_queued(self.node_id)

    def _will_send(self, link, jobs):
        """`jobs` claimed or begun for `link` in the group open now: their places are taken."""
        if jobs:
            with self._lock:
                link.hold(jobs)
            self._to_send.setdefault(link, []).extend(jobs)

    def _will_not_send(self, link, jobs):
        """`jobs` were begun in a group that failed before its end took them: their places are free."""
        dropped = {id(job) for job in jobs}
        waiting = self._to_send.get(link, [])
        kept = [job for job in waiting if id(job) not in dropped]
        if len(kept) < len(waiting):
            self._to_send[link] = kept
            with self._lock:
                link.unhold([job for job in waiting if id(job) in dropped])

    def _take_what_to_send(self, conn):
        """Last at the end of a group: what it claimed and began, to send once it committed (or
        to let go of, its places freed, if it failed)."""
        to_send, self._to_send = self._to_send, {}
        if not to_send:
            return None

        def after(committed):
            if not committed:  # what its claims took is queued or due again
                self.maybe_queued = self.retries_may_be_due = True
            for link, jobs in to_send.items():
                with self._lock:
                    if committed:  # held as sent from here on (`_send`)
                        link.reserved -= len(jobs)
                    else:
                        link.unhold(jobs)
                if committed:
                    self._send(link, jobs)

        return after

    def _send(self, link, jobs):
        """Send committed attempts to `link` (on the writer's loop, after their group). A runner
        that is gone gets nothing, and its end (`_lost`, later on the same loop) queues them again."""
        if not jobs:
            return
        with self._lock:
            usable = link.open
            if usable:
                link.sent.update(job.key for job in jobs)
            else:  # its end is recorded after this (on the same loop): queued again there
                link.unsent.extend(job.key for job in jobs)
                link.slow.difference_update(job.key for job in jobs)
        if usable:
            metrics.sent(jobs)  # before the runner has them: its outcome may come back at once
            link.channel.send("run", jobs)

    def note_queued(self):
        """Called inside a write that queued an attempt (store.on_queued), on the writer's loop. A
        group that fails before its end leaves `_queued_in_group` set: the next group then tells the
        other nodes once for nothing, which costs each a look."""
        self.maybe_queued = True
        self._queued_in_group = True

    def announced(self):
        """Another node queued work it may not take (its NOTIFY): claim at the end of the next group,
        and have one now if a place is free. A node with none claims once a place frees, in the group
        that frees it."""
        self.maybe_queued = True
        if self.free_places():
            self.wake()

    def poll(self, claimable):
        """The node's poll, the backstop for work no group of this node queued: a retry another
        node scheduled, or one scheduled before this node began, may be due; the next claim looks,
        however full the runners are now. A group now if a place is free and `claimable()`."""
        self.retries_may_be_due = True
        if self.free_places() and claimable():
            self.wake()

    def wake(self):
        """A group now, so that its end claims what is queued (a runner came, a retry fell due)."""
        self.maybe_queued = True
        self.store.db.submit(lambda conn: None, lambda result, error: None)

    # -- retries this node scheduled ---------------------------------------------------------
    def _note_retries(self, times):
        with self._lock:
            for moment in times:
                heapq.heappush(self._retries_due, moment)

    def wake_for_due_retries(self):
        """A group now if a retry this node scheduled is due (a node chore, every tick): no write
        tells of a retry falling due, and the poll may be a second away (node.py)."""
        now, due = now_iso(), False
        with self._lock:
            while self._retries_due and self._retries_due[0] <= now:
                heapq.heappop(self._retries_due)
                due = True
        if due:
            self.retries_may_be_due = True
            self.wake()

    # -- the watch: attempts ended from outside --------------------------------------------
    def let_go_of_ended(self):
        """Attempts the database no longer has as running on their runner (fail-step, a cancel,
        an orphan sweep): tell the runner (it sets ctx.cancelled), and free their places."""
        with self._lock:
            watched = [(link, set(link.sent)) for link in self.links if link.open and link.sent]
        for link, sent in watched:
            ended = sent - self.store.running_attempts(link.id)
            if ended:
                with self._lock:
                    link.let_go(ended)
                metrics.let_go(ended)
                link.channel.send("cancel", sorted(ended))
                self.wake()  # the places are free again

    def turnover(self):
        """(outcomes recorded so far, places of the runners connected now): admission.py's measure."""
        with self._lock:
            places = sum(link.places for link in self.links if link.open)
        return self.recorded, places

    def free_places(self):
        with self._lock:
            return sum(link.free for link in self.links if link.open)

    def beat(self):
        """Keep this node's rows in `runners` fresh (read only for a node on another host). On
        PostgreSQL each is written again if it is gone: another node that took this one for dead
        (its heartbeat late, store.interrupt_dead_nodes) deleted them, and a claim of a runner
        without a row looks orphaned to every node's sweep."""
        with self._lock:
            links = [link for link in self.links if link.open and link.row is not None]
        if self.node_id is not None:
            for link in links:
                self.store.heartbeat(link.row)
        elif links:
            self.store.beat([link.id for link in links])

    def stop(self, timeout):
        """Wait until every runner's end is recorded (they were asked to stop)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            links = list(self.links)
        for link in links:
            link.closed.wait(max(0.0, deadline - time.monotonic()))
        self.store.db.not_at_end_of_groups(self._end_of_group)
        self.store.db.not_at_end_of_groups(self._take_what_to_send)
