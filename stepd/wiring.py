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
from stepd.model import Unwritable, new_id
from stepd.node import Chore, Node
from stepd.retention import Retention
from stepd.store import Store

# How often the checkpoint chore runs. SQLite: the log is copied back into the file off every
# request's path (db.Database.checkpoint). Every 0.25 s rather than every second: each copy is
# smaller (7-15 ms rather than 15-55, on a thread beside the writes), and so is what the log's
# restart then holds the writes for (2.4-5.8 ms rather than 4-14). Restarts at 500/s offered,
# p99: 5.0-9.3 ms in eight runs, against 6.3-23.7 ms copying once a second. PostgreSQL: the tallies'
# log of changes is folded (postgres.py), once a second on every node.
CHECKPOINT_SECONDS = {"sqlite": 0.25, "postgresql": 1.0}
ORPHAN_SECONDS = 1.0  # a node that died has its running steps Interrupted within about this of the next start
# PostgreSQL: a node whose heartbeat (every node.HEARTBEAT_SECONDS) is older than this is dead. With the
# sweep every ORPHAN_SECONDS, its running steps are Interrupted within about 7 s (SPEC 12 says 10).
NODE_STALE_SECONDS = 5.0
HOUSEKEEPING_SECONDS = 30.0  # twice a minute: a process due for retention is deleted within a minute

log = logging.getLogger("stepd.node")


def open_store(settings, prepare=True):
    """The store of STEPD_DB, a file or a PostgreSQL URL: made and migrated first when `prepare`
    (raises model.Unusable, with one line saying why, when it cannot be used). On PostgreSQL,
    settings["READ_CONNECTIONS"] (not a STEPD_ setting: the node's process sets it) bounds its reads."""
    if is_postgres(settings["STEPD_DB"]):
        from stepd.postgres import READ_CONNECTIONS, PostgresDatabase  # psycopg: for PostgreSQL only

        database = PostgresDatabase(settings["STEPD_DB"], settings.get("READ_CONNECTIONS", READ_CONNECTIONS))
    else:
        database = Database(settings["STEPD_DB"], settings["STEPD_SYNC"])
    if prepare:
        database.prepare()
    return Store(database)


def chores(store, settings, node_id=None):
    """A node's chores, each on its own period: copy the log into the file, interrupt the running
    steps of runners whose node is gone, forget old Idempotency-Key answers and, with
    STEPD_RETENTION_DAYS, delete processes finished longer ago (on a thread of its own). On
    PostgreSQL the sweep judges by pid only the runners of node `node_id` (this one): another
    node's are judged by that node's heartbeat (sweep_dead_nodes)."""
    on_postgres = store.db.dialect == "postgresql"
    jobs = [
        Chore("checkpoint", CHECKPOINT_SECONDS[store.db.dialect], functools.partial(checkpoint, store)),
        Chore("orphan sweep", ORPHAN_SECONDS, functools.partial(sweep_orphans, store, on_postgres and node_id)),
        Chore("answer housekeeping", HOUSEKEEPING_SECONDS, store.forget_answers),
    ]
    if on_postgres:
        jobs.append(Chore("dead nodes", ORPHAN_SECONDS, functools.partial(sweep_dead_nodes, store)))
    if settings["STEPD_RETENTION_DAYS"]:
        jobs.append(Chore("retention", HOUSEKEEPING_SECONDS, Retention(store, settings["STEPD_RETENTION_DAYS"])))
    return jobs


def checkpoint(store):
    """Here, not inside a request that happens to commit; a full disk: the next one tries again."""
    with contextlib.suppress(Unwritable):
        store.checkpoint()


def sweep_orphans(store, node_id=None):
    judge = runner_is_alive if not node_id else functools.partial(_alive_or_another_nodes, node_id)
    orphans = store.interrupt_orphans(judge)
    if orphans:
        log.warning("marked %d step(s) of vanished runners Interrupted", len(orphans))


def _alive_or_another_nodes(node_id, row):
    """A runner of another node counts as alive here: its process may be on another host, and its
    node's heartbeat says whether it is gone (sweep_dead_nodes). One of this node's (or of no node:
    registered before nodes had rows) is judged by its process."""
    return row["node_id"] not in (None, node_id) or runner_is_alive(row)


def sweep_dead_nodes(store):
    interrupted = store.interrupt_dead_nodes(NODE_STALE_SECONDS)
    if interrupted:
        log.warning("marked %d step(s) of nodes that stopped beating Interrupted", len(interrupted))


def make_node(store, registry, settings):
    """A node (not started) with its chores."""
    node_id = new_id()
    return Node(store, registry, settings, chores=chores(store, settings, node_id), node_id=node_id)
