"""The wiring, written once: how the settings become an open store, and a node with its chores.

`stepd serve`, the other commands, the app factory and the tests all call these, so "open the
database" and "make a node" mean the same thing everywhere.
"""

import contextlib
import functools
import logging

from stepd.config import is_postgres
from stepd.db import Database
from stepd.liveness import runner_is_alive
from stepd.model import Unwritable
from stepd.node import Chore, Node
from stepd.retention import Retention
from stepd.store import Store

CHECKPOINT_SECONDS = 1.0  # the log is copied back into the file off every request's path
ORPHAN_SECONDS = 1.0  # a node that died has its running steps Interrupted within about this of the next start
HOUSEKEEPING_SECONDS = 30.0  # twice a minute: a process due for retention is deleted within a minute

log = logging.getLogger("stepd.node")


def open_store(settings, prepare=True):
    """The store of STEPD_DB, a file or a PostgreSQL URL: made and migrated first when `prepare`
    (raises model.Unusable, with one line saying why, when it cannot be used)."""
    if is_postgres(settings["STEPD_DB"]):
        from stepd.postgres import PostgresDatabase  # psycopg: for PostgreSQL only

        database = PostgresDatabase(settings["STEPD_DB"])
    else:
        database = Database(settings["STEPD_DB"], settings["STEPD_SYNC"])
    if prepare:
        database.prepare()
    return Store(database)


def chores(store, settings):
    """A node's chores, each on its own period: copy the log into the file, interrupt the running
    steps of runners whose node is gone, forget old Idempotency-Key answers and, with
    STEPD_RETENTION_DAYS, delete processes finished longer ago (on a thread of its own)."""
    jobs = [
        Chore("checkpoint", CHECKPOINT_SECONDS, functools.partial(checkpoint, store)),
        Chore("orphan sweep", ORPHAN_SECONDS, functools.partial(sweep_orphans, store)),
        Chore("answer housekeeping", HOUSEKEEPING_SECONDS, store.forget_answers),
    ]
    if settings["STEPD_RETENTION_DAYS"]:
        jobs.append(Chore("retention", HOUSEKEEPING_SECONDS, Retention(store, settings["STEPD_RETENTION_DAYS"])))
    return jobs


def checkpoint(store):
    """Here, not inside a request that happens to commit; a full disk: the next one tries again."""
    with contextlib.suppress(Unwritable):
        store.checkpoint()


def sweep_orphans(store):
    orphans = store.interrupt_orphans(runner_is_alive)
    if orphans:
        log.warning("marked %d step(s) of vanished runners Interrupted", len(orphans))


def make_node(store, registry, settings):
    """A node (not started) with its chores."""
    return Node(store, registry, settings, chores=chores(store, settings))
