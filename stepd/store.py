"""Every read and every state change of processes, steps, attempts, runners, answers and tokens.

`Store(db)` speaks SQL to a `db.Database` and dicts with the domain's names to its callers.
Each change is one write transaction whose UPDATE is a compare-and-set on the step's status
(a named condition below) and attempt number, so concurrent requests and processes sharing
the file can never both win. Beginning or ending an attempt is always the same three moves
(`Change`): the step's compare-and-set, its row in `attempts`, and its process's status.

The SQL is written once, as sqlite3 takes it; on PostgreSQL (postgres.PostgresDatabase) the
database respells it (its marks, SQLite's planner hints). The few statements that must differ are
kept side by side here, and `db.dialect` chooses (SQLITE or POSTGRES): PostgreSQL's writers of
several nodes run at once, where SQLite's take turns, so its claims skip the rows another holds,
and a change that reads before it writes locks what it reads first.
"""

import collections
import functools
import os
import re
import time

from stepd import metrics
from stepd.model import (
    COMPLETED,
    FAILED,
    FINISHED_PROCESS_STATUSES,
    MAX_PARAMS,
    SKIPPED,
    Conflict,
    Job,
    Outcome,
    PreconditionFailed,
    current_request_id,
    new_id,
    now_iso,
    params_from_json,
    params_to_json,
)

ANSWER_KEPT_SECONDS = 24 * 3600  # how long the answer to a request with an Idempotency-Key counts
SQLITE, POSTGRES = "sqlite", "postgresql"  # the values of db.dialect

# -- what a step's row says about it (each condition is spelt here only) ----------------------
# A runner is calling, or about to call, its delegate: the attempt a delegate's outcome may end,
# and the steps an orphan sweep may interrupt. The partial index steps_running holds just these.
EXECUTING = "status = 'STARTED' AND deferred = 0 AND next_retry_at IS NULL"
STARTED_ANYHOW = "status = 'STARTED'"  # executing, deferred, or waiting for a retry
WAITING_FOR_RETRY = "status = 'STARTED' AND next_retry_at IS NOT NULL"
QUEUED = f"{EXECUTING} AND runner_id IS NULL"  # committed, and no runner has claimed it yet
IS_FAILED = "status = 'FAILED'"
IS_PENDING = "status = 'PENDING'"
NOT_DONE = "status IN ('PENDING', 'STARTED', 'FAILED')"  # the steps a cancel of their process cancels
# ... and on a process: what may be cancelled, and what retention may delete (once old enough).
PROCESS_CANCELLABLE = "status IN ('RUNNING', 'FAILED')"
PROCESS_FINISHED = "status IN ('COMPLETED', 'CANCELLED')"

# What every new attempt sets; each kind of beginning adds its own.
BEGIN_ATTEMPT = "status = 'STARTED', attempts = attempts + 1, runner_id = :runner_id, started_at = :now"
AFTER_RESTART = (
    "params = :params, error_type = NULL, error_message = NULL, result = NULL, deferred = 0,"
    " finished_at = NULL, next_retry_at = NULL, retries_used = 0"
)
AFTER_RETRY = "retries_used = retries_used + 1, next_retry_at = NULL, error_type = NULL, error_message = NULL"
# What every ended attempt sets on its step; each kind of ending adds its own.
END_ATTEMPT = "error_type = :error_type, error_message = :error_message"
OUTCOME = "status = :status, result = :result, finished_at = :now"


@functools.lru_cache(maxsize=64)  # a few constant conditions, marked on every compare-and-set
def unindexed(condition):
    """`condition` on a row found by its id, marked as a check, not a way to the row (`+column`): on
    PostgreSQL (postgres.SQLITE_SPELLINGS) a planner whose statistics lag a burst of work would
    otherwise walk a status or partial index (every queued step) instead of the id's one row."""
    return _CHECKED_COLUMNS.sub(r"+\1", condition)


_CHECKED_COLUMNS = re.compile(r"(?<![\w.+:])((?:\w+\.)?(?:status|deferred|next_retry_at|runner_id))\b(?!')")

# Who cancelled or skipped a step or process, when and why.
INTERVENED = "intervened_by = :principal, intervened_at = :now, intervention_reason = :reason"

# `+status` keeps SQLite off the status index: without it the planner walks every FAILED step
# of every process (9 ms at 63,000 of them, inside the write lock) instead of this process's
# few steps through the (process_id, position) index. A SKIPPED step counts as done; a CANCELLED
# process stays so (and keeps updated_at, which retention reads as the time it finished).
REFRESH_PROCESS = """
    UPDATE processes SET updated_at = :now, status = CASE
        WHEN EXISTS (SELECT 1 FROM steps WHERE process_id = :pid AND +status = 'FAILED') THEN 'FAILED'
        WHEN (SELECT status FROM steps WHERE process_id = :pid ORDER BY position DESC LIMIT 1)
             IN ('COMPLETED', 'SKIPPED') THEN 'COMPLETED'
        ELSE 'RUNNING' END
    WHERE id = :pid AND status != 'CANCELLED'
"""
# PostgreSQL's refresh says the status it moved from too: the row locked and read as it is now (FOR
# UPDATE reads the newest version, which the UPDATE then changes), where SQLite reads it first.
REFRESH_PROCESS_RETURNING_BOTH = (
    REFRESH_PROCESS.replace(
        "WHERE id = :pid AND status != 'CANCELLED'",
        "FROM (SELECT status FROM processes WHERE id = :pid FOR UPDATE) AS old"
        " WHERE processes.id = :pid AND processes.status != 'CANCELLED'",
    )
    + " RETURNING old.status, processes.status"
)
TOUCH_RUNNING_PROCESS = "UPDATE processes SET updated_at = :now WHERE id = :pid AND +status = 'RUNNING'"
STEP_COLUMNS = (
    "id, process_id, position, type, status, params, result, attempts, error_type, error_message,"
    " deferred, next_retry_at, runner_id, created_at, started_at, finished_at,"
    " intervened_by, intervened_at, intervention_reason"
)
PROCESS_COLUMNS = (
    "seq, id, name, status, principal, created_at, updated_at, intervened_by, intervened_at, intervention_reason"
)
# What beginning a step's next attempt needs to know of it (Change.begin).
BEGIN_COLUMNS = "s.id, s.process_id, s.type, s.status, s.params, s.attempts, s.retries_used"
# The step after step `?` in its process, as Change.begin needs it, and who started the process.
NEXT_STEP = (
    f"SELECT {BEGIN_COLUMNS}, p.principal, done.position AS done_position FROM steps s"
    " JOIN steps done ON done.id = ? AND s.process_id = done.process_id AND s.position = done.position + 1"
    " JOIN processes p ON p.id = s.process_id"
)
# Steps a runner is executing (INDEXED BY: left to itself the planner prefers the status index,
# which holds every STARTED step, deferred ones and those waiting for a retry included).
EXECUTING_STEPS = (
    f"SELECT id, process_id, type, attempts, runner_id FROM steps INDEXED BY steps_running WHERE {EXECUTING}"
)
# Nodes (PostgreSQL) whose heartbeat, by the server's clock, is older than `?` seconds.
DEAD_NODES_IDS = "SELECT id FROM nodes WHERE heartbeat_at < now() - make_interval(secs => ?)"
# Runners whose node has no row: it is gone (its row was deleted by its own clean stop, with a runner
# it could not see end, or by another node's sweep). A runner's registration writes its node's row in
# its own transaction (Store.heartbeat), so a node that died before its first beat is not one of these:
# its row ages like any other's.
NODELESS_RUNNERS = (
    "SELECT id FROM runners WHERE node_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM nodes n WHERE n.id = node_id)"
)
DEAD_NODES = f"{DEAD_NODES_IDS} UNION ALL {NODELESS_RUNNERS} LIMIT 1"
DEAD_NODES_RUNNING = (
    "SELECT s.id, s.process_id, s.type, s.attempts, s.runner_id, r.node_id, n.pid AS node_pid,"
    " n.host AS node_host FROM steps s JOIN runners r ON r.id = s.runner_id LEFT JOIN nodes n ON n.id = r.node_id"
    " WHERE s.status = 'STARTED' AND s.deferred = 0 AND s.next_retry_at IS NULL AND r.node_id IS NOT NULL"
    " AND (n.id IS NULL OR n.heartbeat_at < now() - make_interval(secs => ?))"
)
# The compare-and-set's own condition for one of them: this runner, of this node, which has still no
# fresh heartbeat now (stale, or its row gone).
ON_A_DEAD_NODE = (
    "runner_id = :runner_id AND EXISTS (SELECT 1 FROM runners r WHERE r.id = :runner_id AND r.node_id = :node_id)"
    " AND NOT EXISTS (SELECT 1 FROM nodes n WHERE n.id = :node_id"
    " AND n.heartbeat_at >= now() - make_interval(secs => :stale))"
)
# The dead nodes' rows and their runners', in one statement: one snapshot, and a node that beats
# meanwhile keeps its row (the DELETE checks its heartbeat again on the newest row) and its runners.
FORGET_DEAD_NODES = (
    "WITH dead AS (DELETE FROM nodes WHERE heartbeat_at < now() - make_interval(secs => ?) RETURNING id)"
    f" DELETE FROM runners WHERE node_id IN (SELECT id FROM dead) OR id IN ({NODELESS_RUNNERS})"
)
# SQLite's claim of one queued attempt that QUEUED_STEPS found, by compare-and-set (Store.claim_queued).
CLAIM_QUEUED = f"UPDATE steps SET runner_id = ? WHERE id = ? AND attempts = ? AND {unindexed(QUEUED)}"
QUEUED_STEPS = (
    "SELECT id, process_id, position, type, params, attempts, retries_used,"
    " (SELECT request_id FROM attempts WHERE step_id = steps.id AND attempt = steps.attempts) AS request_id"
    f" FROM steps INDEXED BY steps_running WHERE {QUEUED} ORDER BY started_at LIMIT ?"
)
DUE_RETRIES = (
    f"SELECT {BEGIN_COLUMNS}, a.principal, a.request_id"
    " FROM steps s INDEXED BY steps_due_retries JOIN attempts a ON a.step_id = s.id AND a.attempt = s.attempts"
    " WHERE s.next_retry_at <= ? AND +s.status = 'STARTED' ORDER BY s.next_retry_at LIMIT ?"
)
INSERT_ATTEMPT = (
    "INSERT INTO attempts (step_id, attempt, trigger, principal, params, status, started_at, request_id)"
    " VALUES (:step_id, :attempt, :trigger, :principal, :params, 'STARTED', :now, :request_id)"
)
# Finished processes old enough for retention, oldest first (INDEXED BY: the status index would
# read every COMPLETED process and sort them).
FINISHED_BEFORE = (
    "SELECT id FROM processes INDEXED BY processes_finished_oldest_first"
    f" WHERE {PROCESS_FINISHED} AND updated_at < ? ORDER BY updated_at LIMIT ?"
)
CLOSE_ATTEMPT = (
    "UPDATE attempts SET status = :status, error_type = :error_type, error_message = :error_message,"
    " finished_at = :now WHERE step_id = :step_id AND attempt = :attempt AND status = 'STARTED'"
)

# -- the statements PostgreSQL spells its own way ------------------------------------------------
# Beginning or ending an attempt: the step's compare-and-set and the attempt's row in one statement
# (data-modifying WITH, which SQLite lacks), where SQLite runs two: each is a round trip to the server,
# and a noop step begins and ends one attempt. The attempt's row is written only if the step moved.
CAS_STEP = "UPDATE steps SET {sets} WHERE id = :step_id AND attempts = :attempt AND {when} RETURNING id"
BEGIN_AND_INSERT = (
    f"WITH moved AS ({CAS_STEP})"
    " INSERT INTO attempts (step_id, attempt, trigger, principal, params, status, started_at, request_id)"
    " SELECT id, :next_attempt, :trigger, :principal, :params, 'STARTED', :now, :request_id FROM moved"
)
END_AND_CLOSE = (
    f"WITH moved AS ({CAS_STEP}),"
    " closed AS (UPDATE attempts SET status = :status, error_type = :error_type, error_message = :error_message,"
    " finished_at = :now WHERE step_id = :step_id AND attempt = :attempt AND status = 'STARTED'"
    " AND EXISTS (SELECT 1 FROM moved) RETURNING 1)"
    " SELECT (SELECT count(*) FROM moved), (SELECT count(*) FROM closed)"
)
# PostgreSQL records a batch of a runner's completions, and begins each one's next step for the same
# runner, in one statement: SQLite's statements are calls into a library, PostgreSQL's round trips to
# a server (measured: 4 a step, each ~100 us of the node's CPU and as much of the server's). Each
# step's compare-and-set and its attempt's row are as Change.end and Change.begin write them one by
# one; the statement's parts all see the state before it (data-modifying WITH), which is all they
# read: the next step was PENDING, the process's principal does not change.
COMPLETE_AND_BEGIN_NEXT = f"""
    WITH outcome AS (
        SELECT * FROM unnest(:step_ids::text[], :attempts::integer[], :results::text[], :request_ids::text[])
            AS o(step_id, attempt, result, request_id)
    ), ended AS (
        UPDATE steps s SET error_type = NULL, error_message = NULL, status = 'COMPLETED',
            result = o.result::json, finished_at = :now
        FROM outcome o WHERE s.id = o.step_id AND s.attempts = o.attempt
            AND {unindexed("s." + EXECUTING.replace(" AND ", " AND s."))}
        RETURNING s.id, s.process_id, s.position, s.type, s.attempts, o.request_id
    ), closed AS (
        UPDATE attempts a SET status = 'COMPLETED', error_type = NULL, error_message = NULL, finished_at = :now
        FROM ended e WHERE a.step_id = e.id AND a.attempt = e.attempts AND +a.status = 'STARTED'
        RETURNING a.step_id
    ), begun AS (
        UPDATE steps s SET status = 'STARTED', attempts = s.attempts + 1, runner_id = :runner_id, started_at = :now
        FROM ended e WHERE s.process_id = e.process_id AND s.position = e.position + 1 AND +s.status = 'PENDING'
        RETURNING s.id, s.process_id, s.type, s.params, s.attempts, e.id AS after, e.request_id
    ), inserted AS (
        INSERT INTO attempts (step_id, attempt, trigger, principal, params, status, started_at, request_id)
        SELECT b.id, b.attempts, 'start', p.principal, b.params, 'STARTED', :now, b.request_id
        FROM begun b JOIN processes p ON p.id = b.process_id
    ), touched AS (
        UPDATE processes p SET updated_at = :now FROM begun b WHERE p.id = b.process_id AND +p.status = 'RUNNING'
        RETURNING p.id
    )
    SELECT e.id, e.process_id, e.position, e.type, c.step_id IS NOT NULL AS closed, b.id AS next_id,
        b.type AS next_type, b.params AS next_params, b.attempts AS next_attempt, t.id IS NOT NULL AS touched
    FROM ended e LEFT JOIN closed c ON c.step_id = e.id LEFT JOIN begun b ON b.after = e.id
        LEFT JOIN touched t ON t.id = e.process_id
"""
# SQLite's COMPLETE_AND_BEGIN_NEXT, a statement at a time (Change._complete): what Change.end and
# Change.begin write for a completion and for the next step's start (END_ATTEMPT and OUTCOME,
# CLOSE_ATTEMPT, BEGIN_ATTEMPT, INSERT_ATTEMPT), spelt with positional arguments.
END_COMPLETED = (
    "UPDATE steps SET error_type = NULL, error_message = NULL, status = 'COMPLETED', result = ?, finished_at = ?"
    f" WHERE id = ? AND attempts = ? AND {unindexed(EXECUTING)}"
)
CLOSE_COMPLETED = (
    "UPDATE attempts SET status = 'COMPLETED', error_type = NULL, error_message = NULL, finished_at = ?"
    " WHERE step_id = ? AND attempt = ? AND status = 'STARTED'"
)
BEGIN_FOLLOWING = (
    "UPDATE steps SET status = 'STARTED', attempts = attempts + 1, runner_id = ?, started_at = ?"
    f" WHERE id = ? AND attempts = ? AND {unindexed(IS_PENDING)}"
)
INSERT_FOLLOWING = (
    "INSERT INTO attempts (step_id, attempt, trigger, principal, params, status, started_at, request_id)"
    " VALUES (?, ?, 'start', ?, ?, 'STARTED', ?, ?)"
)
# Claims. SQLite's writers take turns, so a claim looks, then sets each row by compare-and-set. On
# PostgreSQL the nodes claim at once: one statement takes the oldest queued attempts that no other
# transaction has locked (FOR UPDATE SKIP LOCKED passes over them rather than waiting), and the
# UPDATE checks QUEUED again on the rows it locked. Two claimers never get one attempt, nor wait on
# each other. Returned oldest first, as SQLite's claim returns them.
CLAIM_QUEUED_SKIPPING_LOCKED = (
    f"WITH picked AS (SELECT id FROM steps WHERE {QUEUED} ORDER BY started_at LIMIT ? FOR UPDATE SKIP LOCKED),"
    f" claimed AS (UPDATE steps SET runner_id = ? FROM picked WHERE steps.id = picked.id AND {unindexed(QUEUED)}"
    " RETURNING steps.id, process_id, position, type, params, attempts, retries_used, started_at)"
    " SELECT id, process_id, position, type, params, attempts, retries_used,"
    " (SELECT request_id FROM attempts WHERE step_id = claimed.id AND attempt = claimed.attempts) AS request_id"
    " FROM claimed ORDER BY started_at"
)
# Due retries to begin: on PostgreSQL the steps are locked as they are read, skipping those another
# claim holds (each then begins by its compare-and-set, which a lock held here cannot lose).
DUE_RETRIES_TO_BEGIN = {SQLITE: DUE_RETRIES, POSTGRES: DUE_RETRIES + " FOR UPDATE OF s SKIP LOCKED"}
# A cancel locks its process's steps first, on PostgreSQL: every other change of a step locks the
# step before its process (the compare-and-set, then the process's refresh), so taking them in that
# order too, a cancel and a restart (or a completion) of the same process queue one behind the other
# instead of each holding what the other waits for (a deadlock, which PostgreSQL breaks by failing one).
LOCK_STEPS_BEFORE_CANCEL = {
    SQLITE: None,
    POSTGRES: "SELECT id FROM steps WHERE process_id = ? ORDER BY position FOR NO KEY UPDATE",
}
# Retention on PostgreSQL: every node purges, so each batch locks the processes it deletes as it reads
# them, skipping those another node's batch holds. Without the lock two nodes read the same processes,
# both took them out of the tallies, and one deleted them: the tallies counted them out twice.
LOCK_TO_DELETE = {SQLITE: "", POSTGRES: " FOR UPDATE SKIP LOCKED"}
# An Idempotency-Key's look-up (idempotency.py, in the transaction that stores its answer): SQLite's
# writer holds the file's lock from the look-up on, so a repeat sent at once waits and finds the first
# answer. On PostgreSQL a repeat sent to another node at the same moment found no answer and acted
# again (two processes for one key): the key is locked first (an advisory lock until the transaction
# ends; two keys sharing a hash only wait for each other).
LOCK_ANSWER = {SQLITE: None, POSTGRES: "SELECT pg_advisory_xact_lock(hashtext(?), hashtext(?))"}
# PostgreSQL's wake-up between nodes (SPEC 12): a group that queued work its own node did not claim
# all of sends this in its transaction (dispatch.py); PostgreSQL delivers it to every node LISTENing
# (node.py) once that transaction commits, and drops it if it rolls back. The payload is the sending
# node's id, so a node passes over its own.
QUEUED_CHANNEL = "stepd_queued"
TELL_QUEUED = f"SELECT pg_notify('{QUEUED_CHANNEL}', ?)"
# The first token: "no token yet" must still hold when it is inserted. SQLite's writer holds the
# file's lock; on PostgreSQL another node may be checking at the same moment, so the table is locked
# first (against other inserts; reads go on).
LOCK_TOKENS = {SQLITE: None, POSTGRES: "LOCK TABLE tokens IN SHARE ROW EXCLUSIVE MODE"}
# GET /metrics' tallies: SQLite keeps one row each; PostgreSQL a row per change, summed here and
# folded into one now and then (postgres.py's migration 3 says why).
TALLIES = {
    SQLITE: "SELECT series, a, b, n FROM tally ORDER BY series, a, b",
    POSTGRES: "SELECT series, a, b, sum(n)::bigint FROM tally GROUP BY series, a, b ORDER BY series, a, b",
}
# The minute an attempt ended in ('YYYY-MM-DDTHH:MM'): SQLite keeps times as stepd's ISO text,
# PostgreSQL as timestamptz.
FINISHED_MINUTE = {
    SQLITE: "substr(finished_at, 1, 16)",
    POSTGRES: """to_char(finished_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI')""",
}


def _read_tallies(conn, dialect):
    """The tally table on `conn`: {"steps": [(status, n)], "processes": [(status, n)], "attempts":
    [(type, trigger, n)], "outcomes": [(type, outcome, n)]}."""
    tallies = {"steps": [], "processes": [], "attempts": [], "outcomes": []}
    for series, a, b, n in conn.execute(TALLIES[dialect]):
        tallies[series].append((a, n) if series in ("steps", "processes") else (a, b, n))
    return tallies


def _queued_job(row):
    """The Job of a claimed queued attempt, from its row (QUEUED_STEPS' columns). A process's first
    step has no results before it: its ctx.results are known without a read (Store.earlier_results)."""
    params = params_from_json(row["params"])
    return Job(
        row["id"], row["process_id"], row["type"], params, row["attempts"], row["retries_used"],
        results={} if row["position"] == 0 else None, request_id=row["request_id"],
    )  # fmt: skip


def _refused_status(conn, table, row_id, read, allowed):
    """The status a 412 names after a compare-and-set on a row changed nothing: the one `read` before
    it, unless that one was `allowed` (on PostgreSQL, another node's writer won between the read and
    the compare-and-set), and then the one it has now. SQLite's refusals read nothing more."""
    if read not in allowed:
        return read
    now = conn.execute(f"SELECT status FROM {table} WHERE id = ?", (row_id,)).fetchone()
    return "deleted" if now is None else now["status"]  # retention deleted its process meanwhile


# The tallies GET /metrics reads (migration 7's table): each change counts what it changed
# (`Change.tally`), and the writer adds the counts of a whole group once, last in its transaction
# (`Store._job`, `add_to_tally` through the database's `count_in_groups`). Until migration 8 triggers
# kept them, per row: a fifth of a step's cost in the store (measured, 136-164 us a step without them
# against 203-223 with). On SQLite every key a group changed is added in one upsert (a key's row is
# made by the first change that counts it: a step type's first attempt): measured, one statement for
# a failure's five keys 4.5 us against 8.2 for an UPDATE a key. On PostgreSQL each group inserts its
# own rows (a log of changes: no shared row for the nodes' writers to wait on; postgres.py).
ADD_TO_TALLY = (
    "INSERT INTO tally (series, a, b, n) VALUES {rows} ON CONFLICT (series, a, b) DO UPDATE SET n = n + excluded.n"
)


@functools.cache
def _add_to_tally(keys):
    """ADD_TO_TALLY for `keys` keys (a group changes at most a few dozen: a statement each count)."""
    return ADD_TO_TALLY.format(rows=", ".join(["(?, ?, ?, ?)"] * keys))


def add_to_tally(conn, counts, dialect=SQLITE):
    """Add `counts` ({(series, a, b): n}) to the tallies, in the caller's transaction."""
    changed = [(*key, n) for key, n in counts.items() if n]
    if dialect == POSTGRES:
        _log_tally_rows(conn, changed)
    elif changed:
        conn.execute(_add_to_tally(len(changed)), [value for row in changed for value in row])


def _log_tally_rows(conn, rows):
    """PostgreSQL's rows of a change, in one INSERT: a change of a step's status logs about four
    (measured: 3.4 INSERTs a noop step, each a round trip to the server on the writer's loop). Its
    values are spelt out (Connection.literal) so that it needs no answer and waits to go with the
    next statement, most often the group's COMMIT (postgres.Connection.execute_later)."""
    if rows:
        values = ", ".join(f"({', '.join(map(conn.literal, row))})" for row in rows)
        conn.execute_later(f"INSERT INTO tally (series, a, b, n) VALUES {values}")


def outcome_name(status, error):
    """The `outcome` label of an ended attempt (COMPLETED or FAILED), as stepd_step_outcomes_total says it."""
    if status == COMPLETED:
        return "completed"
    return {"Interrupted": "interrupted", "Timeout": "timeout"}.get(error and error["type"], "failed")


def _untally(conn, process_ids, marks, dialect):
    """Take these processes and their steps, about to be deleted, out of the status tallies (the
    counters of attempts and outcomes keep them: a counter never goes back)."""
    counts = collections.Counter()
    for table, series, where in (("processes", "processes", "id"), ("steps", "steps", "process_id")):
        rows = conn.execute(
            f"SELECT status, COUNT(*) FROM {table} WHERE {where} IN ({marks}) GROUP BY status", process_ids
        )
        for status, count in rows:
            counts[(series, status, "")] -= count
    add_to_tally(conn, counts, dialect)


def _dead_node_message(row):
    """The Interrupted message of a step whose node is dead (a row of DEAD_NODES_RUNNING)."""
    if row["node_pid"] is None:
        return f"The node running this step (node {row['node_id']}) is gone: it has no row left."
    node = f"node {row['node_id']}, process {row['node_pid']} on {row['node_host']}"
    return f"The node running this step ({node}) stopped beating: it is gone."


def _error(error_type, message):
    return None if error_type is None else {"type": error_type, "message": message}


def _intervention(row):
    """Who cancelled or skipped this step or process, when and why; None if nobody did."""
    if row["intervened_by"] is None:
        return None
    return {
        "action": "skip" if row["status"] == SKIPPED else "cancel",
        "principal": row["intervened_by"],
        "at": row["intervened_at"],
        "reason": row["intervention_reason"],
    }


def merged_results(results):
    """Results merged in position order, a later step's name winning (a process's variables).

    `results`: {position: typed params} of the steps that have a result."""
    variables = {}
    for position in sorted(results):
        variables.update(results[position])
    return variables


def _phase(row, now):
    """Where a STARTED step is (its phase); None for every other status."""
    if row["status"] != "STARTED":
        return None
    if row["deferred"]:
        return "DEFERRED"
    if row["next_retry_at"] is not None:
        return "RETRY_WAIT" if row["next_retry_at"] > now else "QUEUED"  # a due retry waits for a claim
    return "QUEUED" if row["runner_id"] is None else "RUNNING"


def _step(row, now):
    """A step row as a dict; `now` (read once per query, not per row) decides a due retry's phase."""
    return {
        "id": row["id"],
        "process_id": row["process_id"],
        "position": row["position"],
        "type": row["type"],
        "status": row["status"],
        "params": params_from_json(row["params"]),
        "result": params_from_json(row["result"]),
        "attempts": row["attempts"],
        "error": _error(row["error_type"], row["error_message"]),
        "deferred": bool(row["deferred"]),
        "next_retry_at": row["next_retry_at"],
        "phase": _phase(row, now),
        "created_at": row["created_at"],
        "started_at": row["started_at"],
        "finished_at": row["finished_at"],
        "intervention": _intervention(row),
    }


def _attempt(row):
    return {
        "attempt": row["attempt"],
        "trigger": row["trigger"],
        "principal": row["principal"],
        "params": params_from_json(row["params"]),
        "status": row["status"],
        "error": _error(row["error_type"], row["error_message"]),
        "started_at": row["started_at"],
        "finished_at": row["finished_at"],
        "request_id": row["request_id"],
    }


def _process(row):
    process = {key: row[key] for key in ("id", "name", "status", "created_at", "updated_at")}
    process["intervention"] = _intervention(row)
    return process


def process_filters(where):
    """The (sql, value) conditions of a list of processes (a None value: any)."""
    # A time window with both ends is read through processes_by_creation and sorted (a page
    # costs in proportion to the processes in the window); one end alone walks seq from the
    # newest, which finds a page of createdAfter at once.
    return [
        ("status = ?", where.get("status")),
        ("name = ?", where.get("name")),
        ("created_at > ?", where.get("created_after")),
        ("created_at < ?", where.get("created_before")),
    ]


# The WHERE of steps_by_status (migration 10), word for word: SQLite reads a partial index only for
# a query that has the index's WHERE among its own terms (a status bound as `?` proves nothing).
UNINDEXED_STATUS = COMPLETED
INDEXED_STATUSES = f"status != '{UNINDEXED_STATUS}'"


def step_filters(where):
    """The (sql, value) conditions of a list of steps (a None value: any)."""
    # A process has at most 100 steps: with process_id given, `+` keeps SQLite on its index
    # rather than on the index of a status (say, every FAILED step of every process). A status the
    # index leaves out (COMPLETED) is looked for newest first, row by row.
    other = "+" if where.get("process_id") is not None else ""
    status = where.get("status")
    # The status index only for a status alone: with a type or an error type too, their own
    # index finds a page sooner (a type's FAILED steps among every FAILED step, say).
    alone = all(where.get(key) is None for key in ("process_id", "type", "error_type"))
    indexed = alone and status is not None and status != UNINDEXED_STATUS
    return [
        ("process_id = ?", where.get("process_id")),
        (f"status = ? AND {INDEXED_STATUSES}" if indexed else f"{other}status = ?", status),
        (f"{other}type = ?", where.get("type")),
        (f"{other}error_type = ?", where.get("error_type")),
    ]


def page_query(table, columns, conditions, before_seq, limit):
    """(sql, args) of `limit` rows of `table`, newest first, before `before_seq` (if given), that
    meet every (sql, value) condition whose value is not None."""
    wanted = [(sql, value) for sql, value in conditions if value is not None]
    if before_seq is not None:
        wanted.append(("seq < ?", before_seq))
    where = ("WHERE " + " AND ".join(sql for sql, _value in wanted)) if wanted else ""
    args = (*(value for _sql, value in wanted), limit)
    return f"SELECT {columns} FROM {table} {where} ORDER BY seq DESC LIMIT ?", args


_NO_STEP_COLUMNS = dict.fromkeys(column.strip() for column in STEP_COLUMNS.split(","))
_NO_PARAMS = params_to_json({})  # a step sent without params (most are): written once, not per step


def _new_step_row(process_id, position, step_type, params, now):
    """A new PENDING step as its row reads back (every STEP_COLUMNS key; NULL where not given)."""
    return {
        **_NO_STEP_COLUMNS,
        "id": new_id(), "process_id": process_id, "position": position, "type": step_type, "status": "PENDING",
        "params": params_to_json(params) if params else _NO_PARAMS, "attempts": 0, "deferred": 0, "created_at": now,
    }  # fmt: skip


NEW_PROCESS = (
    "INSERT INTO processes (id, name, status, principal, created_at, updated_at)"
    " VALUES (:id, :name, 'RUNNING', :principal, :now, :now)"
)
NEW_STEP = (
    "INSERT INTO steps (id, process_id, position, type, status, params, attempts, runner_id, created_at, started_at)"
    " VALUES (:id, :process_id, :position, :type, :status, :params, :attempts, :runner_id, :created_at, :started_at)"
)


def _insert_new_process_sqlite(conn, process, rows):
    conn.execute(NEW_PROCESS, process)
    conn.executemany(NEW_STEP, rows)
    first = rows[0]
    conn.execute(
        INSERT_ATTEMPT, {**process, "step_id": first["id"], "attempt": 1, "trigger": "start", "params": first["params"]}
    )


# PostgreSQL: the process, its steps and step 0's attempt in one statement (one round trip, where
# SQLite's three statements are calls into a library). Its foreign keys are checked at its end.
NEW_PROCESS_AT_ONCE = f"""
    WITH process AS ({NEW_PROCESS}), steps AS (
        INSERT INTO steps (id, process_id, position, type, status, params, attempts, runner_id, created_at, started_at)
        SELECT id, :id, position, type, status, params::json, attempts, runner_id, :now, started_at::timestamptz
        FROM unnest(:ids::text[], :positions::integer[], :types::text[], :statuses::text[], :params::text[],
            :attempts::integer[], :runner_ids::text[], :started::text[])
            AS s(id, position, type, status, params, attempts, runner_id, started_at)
    )
    INSERT INTO attempts (step_id, attempt, trigger, principal, params, status, started_at, request_id)
    VALUES (:first_id, 1, 'start', :principal, :first_params, 'STARTED', :now, :request_id)
"""


def _insert_new_process_postgres(conn, process, rows):
    def column(key):
        return [row[key] for row in rows]

    conn.execute(
        NEW_PROCESS_AT_ONCE,
        {
            **process, "ids": column("id"), "positions": column("position"), "types": column("type"),
            "statuses": column("status"), "params": column("params"), "attempts": column("attempts"),
            "runner_ids": column("runner_id"), "started": column("started_at"),
            "first_id": rows[0]["id"], "first_params": rows[0]["params"],
        },
    )  # fmt: skip


INSERT_NEW_PROCESS = {SQLITE: _insert_new_process_sqlite, POSTGRES: _insert_new_process_postgres}


class Change:
    """The step transitions of one write transaction.

    Each begins or ends an attempt by compare-and-set on the step's row; the attempt's own row
    is written with it, and every process touched has its status refreshed once, at the end.
    """

    def __init__(self, conn, now, on_queued, request_id=None, dialect=SQLITE):
        self.conn = conn
        self.dialect = dialect  # PostgreSQL: a move and its attempt's row in one statement (BEGIN_AND_INSERT)
        self.now = now
        self.on_queued = on_queued
        self.request_id = request_id  # of the request making this change: its attempts record it
        self.touched = set()
        self.tally = collections.Counter()  # what this change adds to the tallies (once its group commits)

    def moved(self, series, old, new, count=1):
        """`count` steps or processes went from status `old` to `new` (a tally each)."""
        if old != new:
            self.tally[(series, old, "")] -= count
            self.tally[(series, new, "")] += count

    def _move(self, step_id, attempt, when, sets, values):
        """The compare-and-set: SET `sets` on the step iff it is still at `attempt` and `when` holds."""
        sql = f"UPDATE steps SET {sets} WHERE id = :step_id AND attempts = :attempt AND {unindexed(when)}"
        return self.conn.execute(sql, {**values, "step_id": step_id, "attempt": attempt, "now": self.now}).rowcount == 1

    def _begin_move(self, step_id, attempt, when, sets, values):
        """The compare-and-set beginning attempt `attempt` + 1, and that attempt's row; whether it did.
        On PostgreSQL one statement (a round trip to the server less, for every attempt begun)."""
        values = {**values, "step_id": step_id, "attempt": attempt, "next_attempt": attempt + 1, "now": self.now}
        if self.dialect == POSTGRES:
            return self.conn.execute(BEGIN_AND_INSERT.format(sets=sets, when=unindexed(when)), values).rowcount == 1
        if not self._move(step_id, attempt, when, sets, values):
            return False
        self.conn.execute(INSERT_ATTEMPT, {**values, "attempt": attempt + 1})
        return True

    def _end_move(self, step_id, attempt, when, sets, values):
        """The compare-and-set ending attempt `attempt`, and its row closed: None if the step was not
        at it, else whether its row was still open. On PostgreSQL one statement, as `_begin_move`."""
        values = {**values, "step_id": step_id, "attempt": attempt, "now": self.now}
        if self.dialect == POSTGRES:
            moved, closed = self.conn.execute(END_AND_CLOSE.format(sets=sets, when=unindexed(when)), values).fetchone()
            return bool(closed) if moved else None
        if not self._move(step_id, attempt, when, sets, values):
            return None
        return self.conn.execute(CLOSE_ATTEMPT, values).rowcount == 1

    def begin(self, step, trigger, principal, when, also=None, params=None, runner_id=None, request_id=None):
        """Begin `step`'s next attempt if `when` still holds; returns its Job, or None.

        `step` is a row of BEGIN_COLUMNS; `params` replaces the step's own (a restart's overlay);
        `request_id` is the one the attempt keeps when it is not this change's request's (a
        retry keeps its attempt's, the next step a completion begins its process's)."""
        request_id = request_id or self.request_id
        if params is None:  # the step's own: its attempt's row keeps the same text
            stored_params, params = step["params"], params_from_json(step["params"])
        else:
            stored_params = params_to_json(params)
        sets = BEGIN_ATTEMPT + (f", {also}" if also else "")
        values = {"runner_id": runner_id, "params": stored_params}
        attempt = step["attempts"] + 1
        row = {**values, "trigger": trigger, "principal": principal, "request_id": request_id}
        if not self._begin_move(step["id"], step["attempts"], when, sets, row):
            return None
        self.began((step["id"], attempt), step["type"], step["status"], trigger, runner_id)
        self.touched.add(step["process_id"])
        retries_used = step["retries_used"] + 1 if trigger == "retry" else 0
        return Job(step["id"], step["process_id"], step["type"], params, attempt, retries_used, request_id=request_id)

    def began(self, key, step_type, old_status, trigger, runner_id):
        """What an attempt begun (`key`: step id, attempt) counts and tells, whichever statement
        wrote it: the step's status moved, the attempts' counter, the node told of one queued (no
        runner), its queue time started."""
        self.moved("steps", old_status, "STARTED")
        self.tally[("attempts", step_type, trigger)] += 1
        if runner_id is None:
            self.on_queued()
        metrics.begun(key)

    def end(self, step, attempt, *, status, when, also, step_status, error=None, **values):
        """End the attempt if `when` still holds; the attempt's row gets `status`. Returns whether it did.

        `step`: (id, process id, type). `also`: what this kind of ending sets on the step besides its
        error (`:status` there is `status`); `step_status`: the step's status after it (it was
        STARTED), which `also` sets."""
        step_id, process_id, step_type = step
        error_values = {"error_type": error and error["type"], "error_message": error and error["message"]}
        values = {**values, **error_values, "status": status}
        closed = self._end_move(step_id, attempt, when, f"{END_ATTEMPT}, {also}", values)
        if closed is None:
            return False
        self.moved("steps", "STARTED", step_status)
        if closed:
            self.tally[("outcomes", step_type, outcome_name(status, error))] += 1
        self.touched.add(process_id)
        return True

    def begin_next(self, step_id, runner_id, results=None, result=None, request_id=None):
        """The step after `step_id` begins its first attempt (after a completion); its Job or None.

        `results`: the finished step's own ctx.results, when known (a runner's outcome): the next
        step's are those plus the finished step's `result`, with no read (the steps before a
        running one are done, and a done step's result never changes)."""
        row = self.conn.execute(NEXT_STEP, (step_id,)).fetchone()
        if row is None:
            return None
        job = self.begin(row, "start", row["principal"], IS_PENDING, runner_id=runner_id, request_id=request_id)
        if job is not None and results is not None:
            job.results = results if result is None else {**results, row["done_position"]: result}
        return job

    # -- what a runner reports of an attempt (dispatch.py records a batch in one change) -----
    def fail(self, job, error):
        """End a running attempt FAILED, and its step; whether it did (a stale outcome, whose step
        was failed, completed or interrupted meanwhile, changes nothing). A completion, which
        begins the next step, goes through record_all."""
        return self.end(
            job.step, job.attempt, status=FAILED, when=EXECUTING, also=OUTCOME, step_status=FAILED, error=error,
            result=None,
        )  # fmt: skip

    def retry_later(self, job, error, retry_at):
        """Close a failed attempt and leave the step STARTED until `retry_at` (ISO time), when
        any runner may begin it (claim_due_retries). Returns whether the attempt was current."""
        return self.end(
            job.step, job.attempt, status=FAILED, when=EXECUTING, also="next_retry_at = :retry_at, runner_id = NULL",
            step_status="STARTED", error=error, retry_at=retry_at,
        )  # fmt: skip

    def defer(self, job):
        """Mark a running attempt as waiting for complete-step or fail-step."""
        self.conn.execute(
            f"UPDATE steps SET deferred = 1 WHERE id = ? AND attempts = ? AND {unindexed(STARTED_ANYHOW)}",
            (job.step_id, job.attempt),
        )

    def record_all(self, outcomes, runner_id, admits=None):
        """Record a runner's Outcomes; returns the Jobs of the next steps they began, for the same
        runner, in the outcomes' order. The completions are recorded together (`_complete_all`);
        a next step `admits` turns down is begun queued, for any runner to claim."""
        completions = [outcome for outcome in outcomes if outcome.kind == COMPLETED]
        for outcome in outcomes:
            if outcome.kind != COMPLETED:
                self.record(outcome)
        begun = self._complete_all(completions, runner_id, admits) if completions else {}
        return [begun[outcome.job.step_id] for outcome in completions if outcome.job.step_id in begun]

    def _complete_all(self, completions, runner_id, admits=None):
        """Each completion's step COMPLETED, its attempt closed, and the next step begun for the same
        runner: {finished step id: its next step's Job}. An outcome whose attempt is no longer
        executing changes nothing. COMPLETE_AND_BEGIN_NEXT's rows, from one statement on PostgreSQL."""
        results = [None if outcome.result is None else params_to_json(outcome.result) for outcome in completions]
        if self.dialect == POSTGRES:
            jobs = [outcome.job for outcome in completions]
            rows = self.conn.execute(
                COMPLETE_AND_BEGIN_NEXT,
                {
                    "step_ids": [job.step_id for job in jobs], "attempts": [job.attempt for job in jobs],
                    "results": results, "request_ids": [job.request_id or self.request_id for job in jobs],
                    "runner_id": runner_id, "now": self.now,
                },
            ).fetchall()  # fmt: skip
        else:
            rows = [
                row
                for outcome, result in zip(completions, results, strict=True)
                if (row := self._complete(outcome.job, result, runner_id, admits))
            ]
        finished = {outcome.job.step_id: outcome for outcome in completions}
        begun = {}
        for row in rows:
            self.moved("steps", "STARTED", COMPLETED)
            if row["closed"]:
                self.tally[("outcomes", row["type"], "completed")] += 1
            if row["next_id"] is None or not row["touched"]:  # its last step, or not RUNNING: the full refresh
                self.touched.add(row["process_id"])
            if row["next_id"] is not None and self.dialect == SQLITE and row["queued"]:  # no place for it
                self.began((row["next_id"], row["next_attempt"]), row["next_type"], "PENDING", "start", None)
            elif row["next_id"] is not None:
                begun[row["id"]] = self._begun_next(row, finished[row["id"]], runner_id)
        return begun

    def _complete(self, job, result, runner_id, admits=None):
        """SQLite's COMPLETE_AND_BEGIN_NEXT for one completion (SQLite has no data-modifying WITH):
        the same writes as Change.end and Change.begin, statement by statement, and the row that
        statement returns; None if the attempt was no longer executing. Written out here, with
        positional arguments: the runner's hot path, where those two's layers cost more than the
        statements (13 us of 108 a step, in-process, measured)."""
        conn, now = self.conn, self.now
        if conn.execute(END_COMPLETED, (result, now, job.step_id, job.attempt)).rowcount != 1:
            return None
        closed = conn.execute(CLOSE_COMPLETED, (now, job.step_id, job.attempt)).rowcount == 1
        row = {"id": job.step_id, "process_id": job.process_id, "type": job.type, "closed": closed, "next_id": None}
        following = conn.execute(NEXT_STEP, (job.step_id,)).fetchone()
        if following is None:
            return row
        next_id, attempt = following["id"], following["attempts"] + 1
        queued = admits is not None and not admits(following["type"])
        begun_for = None if queued else runner_id
        if conn.execute(BEGIN_FOLLOWING, (begun_for, now, next_id, following["attempts"])).rowcount != 1:
            return row
        request_id = job.request_id or self.request_id
        conn.execute(INSERT_FOLLOWING, (next_id, attempt, following["principal"], following["params"], now, request_id))
        touched = conn.execute(TOUCH_RUNNING_PROCESS, {"pid": job.process_id, "now": now}).rowcount == 1
        return row | {
            "position": following["done_position"], "next_id": next_id, "next_type": following["type"],
            "next_params": following["params"], "next_attempt": attempt, "touched": touched, "queued": queued,
        }  # fmt: skip

    def _begun_next(self, row, outcome, runner_id):
        """The Job of the step COMPLETE_AND_BEGIN_NEXT began after `outcome`'s (`row`), as begin_next's."""
        self.began((row["next_id"], row["next_attempt"]), row["next_type"], "PENDING", "start", runner_id)
        done = outcome.job
        results = done.results or {}
        if outcome.result is not None:
            results = {**results, row["position"]: outcome.result}
        return Job(
            row["next_id"], row["process_id"], row["next_type"], params_from_json(row["next_params"]),
            row["next_attempt"], 0, results=results, request_id=done.request_id or self.request_id,
        )  # fmt: skip

    def record(self, outcome):
        """Record one Outcome that is not a completion (`record_all` records those)."""
        job = outcome.job
        if outcome.kind == FAILED and outcome.retry_at is not None:
            self.retry_later(job, outcome.error, outcome.retry_at)
        elif outcome.kind == FAILED:
            self.fail(job, outcome.error)
        else:
            self.defer(job)

    def skip(self, step_id, process_id, attempt, result, principal, reason):
        """FAILED -> SKIPPED with `result` (typed params or None), if the step is still FAILED at
        `attempt`; no attempt is begun or ended. Returns whether it did."""
        sets = f"status = 'SKIPPED', result = :result, finished_at = :now, {INTERVENED}"
        result = None if result is None else params_to_json(result)
        values = {"result": result, "principal": principal, "reason": reason}
        if not self._move(step_id, attempt, IS_FAILED, sets, values):
            return False
        self.moved("steps", FAILED, SKIPPED)
        self.touched.add(process_id)
        return True

    def cancel_steps(self, process_id, principal, reason):
        """Every PENDING, STARTED or FAILED step of the process becomes CANCELLED; an attempt
        still open (queued, running or deferred) ends CANCELLED. Its process is not refreshed:
        the caller set it CANCELLED in this transaction, by its own compare-and-set."""
        values = {"pid": process_id, "now": self.now, "principal": principal, "reason": reason}
        self.conn.execute(
            "UPDATE attempts SET status = 'CANCELLED', finished_at = :now WHERE status = 'STARTED'"
            f" AND step_id IN (SELECT id FROM steps WHERE process_id = :pid AND {STARTED_ANYHOW})",
            values,
        )
        cancelled = self.conn.execute(
            f"SELECT status, COUNT(*) FROM steps WHERE process_id = :pid AND {NOT_DONE} GROUP BY status", values
        ).fetchall()
        for old, count in cancelled:
            self.moved("steps", old, "CANCELLED", count)
        # runner_id stays: the runner that has the attempt sees it is no longer executing there,
        # and sets ctx.cancelled (Runner._let_go_of_ended).
        self.conn.execute(
            "UPDATE steps SET status = 'CANCELLED', finished_at = :now, deferred = 0, next_retry_at = NULL,"
            f" {INTERVENED} WHERE process_id = :pid AND {NOT_DONE}",
            values,
        )

    def refresh_processes(self):
        """A process is FAILED while a step is, COMPLETED when its last step is, else RUNNING. (A
        completion that began the next step leaves its process RUNNING and only touches it: it is
        not one of these, `_complete_all`.)"""
        for process_id in self.touched:
            values = {"pid": process_id, "now": self.now}
            if self.dialect == POSTGRES:  # one round trip: the status before, locked, and after
                row = self.conn.execute(REFRESH_PROCESS_RETURNING_BOTH, values).fetchone()
                old, new = row if row is not None else (None, None)
            else:
                old = self.conn.execute("SELECT status FROM processes WHERE id = :pid", values).fetchone()
                row = self.conn.execute(REFRESH_PROCESS + " RETURNING status", values).fetchone()
                old, new = (old and old[0]), (row and row[0])
            if old is not None and new is not None:
                self.moved("processes", old, new)


class Store:
    """The domain's reads and compare-and-set changes, over one `db.Database`."""

    def __init__(self, db):
        self.db = db
        # Called inside the transaction that queues an attempt (no runner yet): the node's
        # dispatcher then claims at the end of that group (a rolled-back one costs it one look).
        self.on_queued = lambda: None
        db.count_in_groups(functools.partial(add_to_tally, dialect=db.dialect))

    def _apply(self, change_it):
        """`change_it(change)` as one write, run on the writer's loop (a job: no switch to the
        caller's greenlet or thread while the group holds the lock), every process it touched
        refreshed at the end; its result once its group committed. Inside another write of this
        caller it is a savepoint of that one."""

        return self.db.write(self._job(change_it))

    def _job(self, change_it):
        """`change_it(change)` as a writer's job: `job(conn)`."""

        request_id = current_request_id.get()  # the caller's: the job runs on the writer's loop

        def job(conn):
            change = Change(conn, now_iso(), self.on_queued, request_id, self.db.dialect)
            result = change_it(change)
            change.refresh_processes()
            if not self.db.add_counts(change.tally):  # once a group, with the other members' (writer.py)
                add_to_tally(conn, change.tally, self.db.dialect)
            return result

        return job

    def atomic(self, rollback=False):
        """Everything inside is one transaction (nested calls become savepoints); `rollback=True`
        checks it all and undoes it (a dry run)."""
        return self.db.transaction(rollback)

    def ping(self):
        self.db.ping()

    def checkpoint(self):
        """Copy the write-ahead log into the file (the node's checkpoint chore, wiring.py)."""
        self.db.checkpoint()

    # -- processes -------------------------------------------------------------------
    def create_process(self, name, steps, principal, runner_id):
        """Insert a process and its PENDING steps, step 0 begun; returns (process, job). Step 0 is
        inserted STARTED with its attempt's row (a new row needs no compare-and-set), and the answer
        is made of the rows written, as a read of them would give it (no read after)."""
        process_id = new_id()

        def change_it(change):
            now = change.now
            rows = [
                _new_step_row(process_id, position, step_type, params, now)
                for position, (step_type, params) in enumerate(steps)
            ]
            first = rows[0]
            first.update(status="STARTED", attempts=1, runner_id=runner_id, started_at=now)
            request_id = change.request_id
            insert = INSERT_NEW_PROCESS[self.db.dialect]
            insert(
                change.conn,
                {"id": process_id, "name": name, "principal": principal, "now": now, "request_id": request_id},
                rows,
            )
            change.tally[("processes", "RUNNING", "")] += 1
            change.tally[("steps", "PENDING", "")] += len(rows)
            change.began((first["id"], 1), first["type"], "PENDING", "start", runner_id)
            process = {
                "id": process_id, "name": name, "status": "RUNNING", "created_at": now, "updated_at": now,
                "intervention": None, "steps": [_step(row, now) for row in rows], "variables": {},
            }  # fmt: skip
            job = Job(first["id"], process_id, first["type"], process["steps"][0]["params"], 1, request_id=request_id)
            return process, job

        return self._apply(change_it)

    def get_process(self, process_id):
        with self.db.snapshot() as conn:
            return self._load_process(conn, process_id)

    def list_processes(self, where, limit=50, before_seq=None):
        """A page of processes, newest first, and the seq to continue before (None on the last page).

        `where`: status, name (exact), created_after, created_before (stepd's UTC text, strict);
        None or absent means any."""
        return self._newest_first("processes", PROCESS_COLUMNS, _process, limit, before_seq, process_filters(where))

    @staticmethod
    def _load_process(conn, process_id):
        row = conn.execute(f"SELECT {PROCESS_COLUMNS} FROM processes WHERE id = ?", (process_id,)).fetchone()
        if row is None:
            return None
        process = _process(row)
        rows = conn.execute(
            f"SELECT {STEP_COLUMNS} FROM steps WHERE process_id = ? ORDER BY position", (process_id,)
        ).fetchall()
        now = now_iso()
        process["steps"] = [_step(r, now) for r in rows]
        process["variables"] = merged_results(
            {step["position"]: step["result"] for step in process["steps"] if step["result"] is not None}
        )
        return process

    def _newest_first(self, table, columns, convert, limit, before_seq, conditions):
        """A page of `limit` rows, newest first, that meet every (sql, value) condition whose value
        is not None, and the seq to continue before (None on the last page)."""
        rows = self.db.rows(*page_query(table, columns, conditions, before_seq, limit + 1))
        next_seq = rows[limit - 1]["seq"] if len(rows) > limit else None
        return [convert(r) for r in rows[:limit]], next_seq

    # -- steps -----------------------------------------------------------------------
    def get_step(self, step_id, with_history=False):
        with self.db.snapshot() as conn:
            step = self._read_step(conn, step_id, now_iso())
            if step is None:
                return None
            if with_history:
                rows = conn.execute("SELECT * FROM attempts WHERE step_id = ? ORDER BY attempt", (step_id,)).fetchall()
                step["attempt_history"] = [_attempt(r) for r in rows]
        return step

    @staticmethod
    def _read_step(conn, step_id, now):
        """One step as a dict (None if no step has this id), on `conn` (a snapshot or a change)."""
        row = conn.execute(f"SELECT {STEP_COLUMNS} FROM steps WHERE id = ?", (step_id,)).fetchone()
        return None if row is None else _step(row, now)

    def list_steps(self, where, limit=50, before_seq=None):
        """A page of steps, newest first, like list_processes; `where`: status, type, process_id,
        error_type (exact; None or absent means any)."""
        columns = f"seq, {STEP_COLUMNS}"
        convert = functools.partial(_step, now=now_iso())  # one time for the whole page
        return self._newest_first("steps", columns, convert, limit, before_seq, step_filters(where))

    def earlier_results(self, step_id):
        """{position: result} of the steps before this one in its process that have a result
        (ctx.results, typed), as the database has them now."""
        rows = self.db.rows(
            "SELECT e.position, e.result FROM steps s JOIN steps e ON e.process_id = s.process_id"
            " AND e.position < s.position WHERE s.id = ? AND e.result IS NOT NULL ORDER BY e.position",
            (step_id,),
        )
        return {row["position"]: params_from_json(row["result"]) for row in rows}

    def failed_steps(self, where, after=None, limit=1000):
        """FAILED steps matching `where` (type, process_id, failed_before, failed_after, failed_until
        (also strictly before); None = any), oldest failure first, after the (finished_at, seq) position `after`.

        Returns up to `limit` (id, finished_at, seq) rows and whether more match.
        """
        conditions, args = [IS_FAILED], []
        for column, operator, key in (
            ("type", "=", "type"),
            ("process_id", "=", "process_id"),
            ("finished_at", "<", "failed_before"),
            ("finished_at", ">", "failed_after"),
            ("finished_at", "<", "failed_until"),
        ):
            if where.get(key) is not None:
                conditions.append(f"{column} {operator} ?")
                args.append(where[key])
        if after is not None:
            conditions.append("(finished_at, seq) > (?, ?)")
            args.extend(after)
        where_all = " AND ".join(conditions)
        rows = self.db.rows(
            f"SELECT id, finished_at, seq FROM steps WHERE {where_all} ORDER BY finished_at, seq LIMIT ?",
            (*args, limit + 1),
        )
        return [tuple(row) for row in rows[:limit]], len(rows) > limit

    def attempt_is_current(self, job):
        """Whether this attempt is still STARTED and waiting for its delegate (a cheap read)."""
        sql = f"SELECT 1 FROM steps WHERE id = ? AND attempts = ? AND {unindexed(EXECUTING)}"
        return self.db.row(sql, (job.step_id, job.attempt)) is not None

    # -- beginning attempts ------------------------------------------------------------
    def restart_failed_step(self, step_id, overrides, principal, runner_id, has_delegate):
        """FAILED -> STARTED for one step, with the given params laid over the failed ones (a name
        given as None is removed); its Job."""

        def change_it(change):
            row = change.conn.execute(f"SELECT {BEGIN_COLUMNS} FROM steps s WHERE s.id = ?", (step_id,)).fetchone()
            if row is None:
                raise PreconditionFailed.on("step_id", "No step has this id.")
            if row["status"] != FAILED:
                raise PreconditionFailed.on("status", f"Step is {row['status']}; only a FAILED step can be restarted.")
            if not has_delegate(row["type"]):
                raise PreconditionFailed.on("type", f"No delegate is registered for step type {row['type']!r}.")
            merged = {**params_from_json(row["params"]), **overrides}
            params = {name: value for name, value in merged.items() if value is not None}
            if len(params) > MAX_PARAMS:
                message = f"The merged params have {len(params)} names; at most {MAX_PARAMS} are allowed."
                raise PreconditionFailed.on("params", message)
            job = change.begin(row, "restart", principal, IS_FAILED, AFTER_RESTART, params, runner_id)
            if job is None:  # another restart (on PostgreSQL, another node's) won meanwhile
                status = _refused_status(change.conn, "steps", step_id, row["status"], (FAILED,))
                raise PreconditionFailed.on("status", f"Step is {status}; only a FAILED step can be restarted.")
            return job

        return self._apply(change_it)

    def claim_queued(self, runner_id, limit, admits=None):
        """Take up to `limit` queued attempts, oldest first, for this runner; their Jobs.

        The compare-and-set on `runner_id IS NULL` gives each attempt to exactly one runner. On
        SQLite `admits(step type)` may turn one down (the runner has no place for its type): it
        stays queued."""
        if self.db.dialect == POSTGRES:
            if not self.db.row(QUEUED_STEPS, (1,)):
                return []  # look first: the claim's write only for work
            with self.db.transaction() as conn:
                return [_queued_job(row) for row in conn.execute(CLAIM_QUEUED_SKIPPING_LOCKED, (limit, runner_id))]
        rows = self.db.rows(QUEUED_STEPS, (limit,))  # read first, the write only for work (each row a compare-and-set)
        if not rows:
            return []
        jobs = []
        with self.db.transaction() as conn:
            for row in rows:
                if admits is not None and not admits(row["type"]):
                    continue
                claimed = conn.execute(CLAIM_QUEUED, (runner_id, row["id"], row["attempts"])).rowcount
                if claimed == 1:
                    jobs.append(_queued_job(row))
        return jobs

    def has_claimable(self):
        """Whether an attempt is queued or a retry is due (a cheap look before claiming)."""
        return self.db.row(QUEUED_STEPS, (1,)) is not None or self.db.row(DUE_RETRIES, (now_iso(), 1)) is not None

    def unclaim_key(self, key, runner_id):
        """Give back a claimed attempt, (step id, attempt), whose delegate was never called: it is
        QUEUED again."""
        with self.db.transaction() as conn:
            conn.execute(
                "UPDATE steps SET runner_id = NULL WHERE id = ? AND attempts = ? AND +runner_id = ?"
                f" AND {unindexed(EXECUTING)}",
                (*key, runner_id),
            )

    def running_attempts(self, runner_id):
        """The (step id, attempt) pairs this runner is executing, as the database says."""
        rows = self.db.rows(EXECUTING_STEPS + " AND runner_id = ?", (runner_id,))
        return {(row["id"], row["attempts"]) for row in rows}

    def claim_due_retries(self, runner_id, limit):
        """Begin the next attempt (trigger 'retry') of up to `limit` steps whose retry is due.

        The compare-and-set on attempts and next_retry_at makes each retry begin exactly once,
        however many runners look for due retries at the same moment.
        """
        if not self.db.row(DUE_RETRIES, (now_iso(), 1)):
            return []  # polled often by every runner: look first, take the write lock only for work

        def change_it(change):
            rows = change.conn.execute(DUE_RETRIES_TO_BEGIN[self.db.dialect], (change.now, limit)).fetchall()
            jobs = [
                change.begin(
                    row,
                    "retry",
                    row["principal"],
                    WAITING_FOR_RETRY,
                    AFTER_RETRY,
                    runner_id=runner_id,
                    request_id=row["request_id"],
                )  # fmt: skip
                for row in rows
            ]
            return [job for job in jobs if job is not None]

        return self._apply(change_it)

    # -- ending attempts ---------------------------------------------------------------
    def finish_attempt(self, job, status, result=None, error=None, runner_id=None):
        """Record what a delegate did; COMPLETED begins the next step. Returns the next job or None.

        A stale outcome (the step was failed, completed or interrupted meanwhile) changes
        nothing and returns None.
        """
        if status == COMPLETED:  # as a runner's are recorded (COMPLETE_AND_BEGIN_NEXT)
            begun = self._apply(lambda change: change.record_all([Outcome(job, COMPLETED, result=result)], runner_id))
            return begun[0] if begun else None
        if status != FAILED:
            raise ValueError(f"an attempt finishes COMPLETED or FAILED, not {status}")
        self._apply(lambda change: change.fail(job, error))
        return None

    def schedule_retry(self, job, error, retry_at):
        """Close a failed attempt and leave the step STARTED until `retry_at` (ISO time); returns
        whether the attempt was still current."""
        return self._apply(lambda change: change.retry_later(job, error, retry_at))

    def defer_attempt(self, job):
        """Mark a running attempt as waiting for complete-step or fail-step."""
        self._apply(lambda change: change.defer(job))

    def outcomes_job(self, outcomes, runner_id, admits=None):
        """A writer's job recording a runner's `outcomes` in one change (dispatch.py submits
        it); it returns the Jobs of the next steps they began, for the same runner. On SQLite
        `admits(step type)` may say the runner has no place for a next step: that one is queued."""

        def change_it(change):
            return change.record_all(outcomes, runner_id, admits)

        return self._job(change_it)

    def complete_step(self, step_id, result, runner_id):
        """STARTED -> COMPLETED from outside; returns (step, next job or None)."""
        return self._end_started_step(step_id, COMPLETED, result, None, runner_id)

    def fail_step(self, step_id, message):
        """STARTED -> FAILED from outside; returns the step."""
        step, _ = self._end_started_step(step_id, FAILED, None, {"type": "ExternalFailure", "message": message}, None)
        return step

    def _end_started_step(self, step_id, status, result, error, runner_id):
        def change_it(change):
            row = change.conn.execute(
                "SELECT process_id, type, status, attempts, next_retry_at FROM steps WHERE id = ?", (step_id,)
            ).fetchone()
            if row is None:
                raise PreconditionFailed.on("step_id", "No step has this id.")
            if row["next_retry_at"] is not None and status == COMPLETED:
                message = "Step is waiting for an automatic retry; fail it to stop the retries."
                raise PreconditionFailed.on("status", message)
            ended = change.end(
                (step_id, row["process_id"], row["type"]), row["attempts"], status=status, when=STARTED_ANYHOW,
                also=f"{OUTCOME}, deferred = 0, next_retry_at = NULL", step_status=status, error=error,
                result=None if result is None else params_to_json(result),
            )  # fmt: skip
            if not ended:  # not STARTED, or (on PostgreSQL) another node ended it meanwhile
                now_status = _refused_status(change.conn, "steps", step_id, row["status"], ("STARTED",))
                message = f"Step is {now_status}; only a STARTED step can be {status.lower()}."
                raise PreconditionFailed.on("status", message)
            next_job = change.begin_next(step_id, runner_id) if status == COMPLETED else None
            step = self._read_step(change.conn, step_id, change.now)
            return step, next_job

        return self._apply(change_it)

    # -- an operator's interventions: cancel a process, skip a failed step ----------------
    def cancel_process(self, process_id, reason, principal):
        """RUNNING or FAILED -> CANCELLED, with each of its steps not yet done; returns the process.

        One transaction: the compare-and-set on the process's status makes one of any number of
        concurrent cancels win; a delegate's late outcome, a restart or a retry of its steps then
        finds them CANCELLED and changes nothing."""

        def change_it(change):
            if LOCK_STEPS_BEFORE_CANCEL[self.db.dialect]:
                change.conn.execute(LOCK_STEPS_BEFORE_CANCEL[self.db.dialect], (process_id,))
            # Read once its steps are locked: a change of one of them (another node's restart) that
            # committed meanwhile has refreshed the process, and its status now is what the cancel
            # moves from (the tallies count it out of that one; read before, it could be stale).
            row = change.conn.execute("SELECT status FROM processes WHERE id = ?", (process_id,)).fetchone()
            if row is None:
                raise PreconditionFailed.on("process_id", "No process has this id.")
            cancelled = change.conn.execute(
                f"UPDATE processes SET status = 'CANCELLED', updated_at = :now, {INTERVENED}"
                f" WHERE id = :pid AND {unindexed(PROCESS_CANCELLABLE)}",
                {"pid": process_id, "now": change.now, "principal": principal, "reason": reason},
            ).rowcount
            if not cancelled:  # on PostgreSQL, maybe cancelled by another node meanwhile: said as it is now
                status = _refused_status(change.conn, "processes", process_id, row["status"], ("RUNNING", "FAILED"))
                message = f"Process is {status}; only a RUNNING or FAILED process can be cancelled."
                raise PreconditionFailed.on("status", message)
            change.moved("processes", row["status"], "CANCELLED")
            change.cancel_steps(process_id, principal, reason)
            process = self._load_process(change.conn, process_id)
            return process

        return self._apply(change_it)

    def skip_step(self, step_id, result, reason, principal, runner_id):
        """FAILED -> SKIPPED with `result`, and the process carries on; returns (step, next job or None)."""

        def change_it(change):
            row = change.conn.execute(
                "SELECT process_id, status, attempts FROM steps WHERE id = ?", (step_id,)
            ).fetchone()
            if row is None:
                raise PreconditionFailed.on("step_id", "No step has this id.")
            if not change.skip(step_id, row["process_id"], row["attempts"], result, principal, reason):
                status = _refused_status(change.conn, "steps", step_id, row["status"], (FAILED,))
                raise PreconditionFailed.on("status", f"Step is {status}; only a FAILED step can be skipped.")
            next_job = change.begin_next(step_id, runner_id)
            step = self._read_step(change.conn, step_id, change.now)
            return step, next_job

        return self._apply(change_it)

    # -- retention: deleting finished processes ------------------------------------------
    def finished_before(self, before, limit):
        """Up to `limit` COMPLETED or CANCELLED processes that finished before `before` (stepd's
        UTC text), oldest first, as (id, rows): how many rows deleting it deletes (the process,
        its steps and their attempts)."""
        with self.db.snapshot() as conn:
            ids = [row["id"] for row in conn.execute(FINISHED_BEFORE, (before, limit))]
            if not ids:
                return []
            marks = ",".join("?" * len(ids))
            sizes = dict(
                conn.execute(
                    f"SELECT process_id, COUNT(*) + SUM(attempts) FROM steps WHERE process_id IN ({marks})"
                    " GROUP BY process_id",
                    ids,
                ).fetchall()
            )
        return [(process_id, 1 + sizes.get(process_id, 0)) for process_id in ids]

    def count_finished_before(self, before):
        """How many COMPLETED or CANCELLED processes finished before `before`."""
        return self.db.row(
            "SELECT COUNT(*) FROM processes INDEXED BY processes_finished_oldest_first"
            f" WHERE {PROCESS_FINISHED} AND updated_at < ?",
            (before,),
        )[0]

    def delete_finished(self, process_ids, before):
        """Delete these processes, with their steps and attempts, in one transaction: those that
        are still COMPLETED or CANCELLED since before `before` (a finished process never changes
        again, but the check costs nothing). Returns (processes, rows) deleted."""
        if not process_ids:
            return 0, 0
        marks = ",".join("?" * len(process_ids))
        with self.db.transaction() as conn:
            # Checked here, not in the WHERE: given the status, SQLite would walk its index (every
            # COMPLETED process) instead of looking these few up by id.
            rows = conn.execute(
                f"SELECT id, status, updated_at FROM processes WHERE id IN ({marks}){LOCK_TO_DELETE[self.db.dialect]}",
                process_ids,
            )
            ids = [
                row["id"] for row in rows if row["status"] in FINISHED_PROCESS_STATUSES and row["updated_at"] < before
            ]
            if not ids:
                return 0, 0
            marks = ",".join("?" * len(ids))
            _untally(conn, ids, marks, self.db.dialect)
            steps = f"SELECT id FROM steps WHERE process_id IN ({marks})"
            rows = conn.execute(f"DELETE FROM attempts WHERE step_id IN ({steps})", ids).rowcount
            rows += conn.execute(f"DELETE FROM steps WHERE process_id IN ({marks})", ids).rowcount
            deleted = conn.execute(f"DELETE FROM processes WHERE id IN ({marks})", ids).rowcount
        return deleted, rows + deleted

    # -- runners: who is executing which step ------------------------------------------
    def heartbeat(self, runner):
        """Say this runner is alive (registering it if needed). `runner`: id, host, pid, pid_started,
        and on PostgreSQL node_id, the node it works for (SQLite's runners have no such column)."""
        node = (", node_id", ", :node_id") if "node_id" in runner else ("", "")
        with self.db.transaction() as conn:
            if "node_id" in runner:  # its node's row first (NODELESS_RUNNERS), from this process: the node's
                conn.execute(
                    "INSERT INTO nodes (id, host, pid) VALUES (?, ?, ?) ON CONFLICT (id) DO NOTHING",
                    (runner["node_id"], runner["host"], os.getpid()),
                )
            conn.execute(
                f"INSERT INTO runners (id, host, pid, pid_started, started_at, heartbeat_at{node[0]})"
                f" VALUES (:id, :host, :pid, :pid_started, :now, :beat{node[1]})"
                " ON CONFLICT (id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
                {**runner, "now": now_iso(), "beat": time.time()},
            )

    # -- nodes (PostgreSQL only: SPEC 12) --------------------------------------------------
    def beat_node(self, node):
        """The node's heartbeat (registering it if needed), on the heartbeat's own connection, by the
        server's clock. `node`: id, host, pid."""
        self.db.beat_connection().execute(
            "INSERT INTO nodes (id, host, pid) VALUES (:id, :host, :pid)"
            " ON CONFLICT (id) DO UPDATE SET heartbeat_at = now()",
            node,
        )

    def tell_nodes_queued(self, node_id):
        """Wake the other nodes (their LISTEN, node.py): NOTIFY on QUEUED_CHANNEL, sent by the
        caller's write transaction, so only once it commits, and never by one rolled back."""
        self.db.row(TELL_QUEUED, (node_id,))

    def listening_for_queued(self):
        """The LISTEN of `tell_nodes_queued`'s NOTIFY, on a connection of its own (postgres.py's
        `listening`): yields heard(timeout), the payloads (node ids) notified within `timeout`."""
        return self.db.listening(QUEUED_CHANNEL)

    def forget_node(self, node_id):
        """A node that stopped cleanly: its row goes (its runners' ended with them)."""
        with self.db.transaction() as conn:
            conn.execute("DELETE FROM nodes WHERE id = ?", (node_id,))

    def interrupt_dead_nodes(self, stale_seconds):
        """Interrupt the running attempts of the runners of every node whose heartbeat is older than
        `stale_seconds` (or whose row is gone), and forget those nodes and runners; returns the steps'
        ids. Queued attempts (no runner) are left for any node to claim.

        Running means claimed: an attempt the dead node claimed but may never have sent to its runner
        is Interrupted too, never queued again. Nobody can know whether it was sent (the node died
        between its claim's commit and the send, or after), and a delegate is called at most once
        per attempt: an operator restarts it (SPEC 12).

        Each attempt ends by a compare-and-set naming its attempt, its runner and the dead node,
        still dead as the UPDATE reads it: a node that beat again meanwhile (only slow, not dead)
        keeps its attempts, which a node judged dead once and for all could not (river#1302)."""
        with self.db.snapshot() as conn:  # every node, every second: look first, write only for work
            if conn.execute(DEAD_NODES, (stale_seconds,)).fetchone() is None:
                return []

        def change_it(change):
            rows = change.conn.execute(DEAD_NODES_RUNNING, (stale_seconds,)).fetchall()
            interrupted = [
                row["id"]
                for row in rows
                if self._interrupt(
                    change,
                    row,
                    _dead_node_message(row),
                    when=f"{EXECUTING} AND {ON_A_DEAD_NODE}",
                    runner_id=row["runner_id"],
                    node_id=row["node_id"],
                    stale=stale_seconds,
                )  # fmt: skip
            ]
            change.conn.execute(FORGET_DEAD_NODES, (stale_seconds,))
            return interrupted

        return self._apply(change_it)

    def beat(self, runner_ids):
        """A heartbeat for each of these runners at once."""
        marks = ",".join("?" * len(runner_ids))
        with self.db.transaction() as conn:
            conn.execute(f"UPDATE runners SET heartbeat_at = ? WHERE id IN ({marks})", (time.time(), *runner_ids))

    def runners(self):
        """Every registered runner's row: id, host, pid, pid_started, started_at, heartbeat_at."""
        return [dict(row) for row in self.db.rows("SELECT * FROM runners ORDER BY started_at")]

    def interrupt_orphans(self, is_alive):
        """Fail every executing step whose runner is gone; forget gone runners.

        `is_alive(row)` judges a runners row; a step whose runner has no row is orphaned
        too. Returns the ids of the steps it failed (none if another sweep was first).
        """
        # Called every second by every runner: look first, take the write lock only for work.
        with self.db.snapshot() as conn:
            orphans, gone = self._find_orphans(conn, is_alive)
        if not orphans and not gone:
            return []

        def change_it(change):
            orphans, gone = self._find_orphans(change.conn, is_alive)  # again: another sweep may have been first
            # Only those this sweep ended: on PostgreSQL another node's sweep may end some first (its
            # compare-and-set wins, and this one's finds them ended).
            gone_message = "The worker running this step (runner {}) is gone."
            interrupted = [
                row["id"] for row in orphans if self._interrupt(change, row, gone_message.format(row["runner_id"]))
            ]
            change.conn.executemany("DELETE FROM runners WHERE id = ?", [(runner_id,) for runner_id in gone])
            return interrupted

        return self._apply(change_it)

    @staticmethod
    def _find_orphans(conn, is_alive):
        """(executing step rows whose runner is gone, ids of gone runners)."""
        # A queued attempt (no runner yet) was never handed to a delegate: it waits for a claim. Left
        # out in SQL, not here: under a backlog the queue is most of the index (this runs every second).
        # The steps are read before the runners: a runner registers before its first claim, so every
        # runner a step read here names is in the runners read next, unless it is gone. In the other
        # order, on PostgreSQL (each statement its own snapshot), a runner registered and given a claim
        # between the two reads made its step look orphaned.
        executing = conn.execute(EXECUTING_STEPS + " AND runner_id IS NOT NULL").fetchall()
        runners = conn.execute("SELECT * FROM runners").fetchall()
        alive = {r["id"] for r in runners if is_alive(r)}
        gone = [r["id"] for r in runners if r["id"] not in alive]
        orphans = [row for row in executing if row["runner_id"] not in alive]
        return orphans, gone

    def interrupt_runner(self, runner_id, reason):
        """Fail the executing steps of one runner that is stopping, and forget it."""

        def change_it(change):
            rows = change.conn.execute(EXECUTING_STEPS + " AND runner_id = ?", (runner_id,)).fetchall()
            interrupted = [row["id"] for row in rows if self._interrupt(change, row, reason)]
            change.conn.execute("DELETE FROM runners WHERE id = ?", (runner_id,))
            return interrupted

        return self._apply(change_it)

    @staticmethod
    def _interrupt(change, row, message, when=EXECUTING, **values):
        """End an executing attempt FAILED/Interrupted; returns whether it was still executing (and
        `when` held: `values` fill its marks)."""
        return change.end(
            (row["id"], row["process_id"], row["type"]), row["attempts"], status=FAILED, when=when,
            also="status = 'FAILED', finished_at = :now", step_status=FAILED,
            error={"type": "Interrupted", "message": message}, **values,
        )  # fmt: skip

    # -- answers to requests with an Idempotency-Key ----------------------------------------
    def stored_answer(self, principal, key):
        """The answer stored for this principal's key in the last ANSWER_KEPT_SECONDS, or None. Inside
        a write transaction on PostgreSQL the key is locked first, until that transaction ends."""
        if LOCK_ANSWER[self.db.dialect]:
            self.db.row(LOCK_ANSWER[self.db.dialect], (principal, key))
        row = self.db.row(
            "SELECT fingerprint, status, body FROM idempotent_requests"
            " WHERE principal = ? AND key = ? AND created_at >= ?",
            (principal, key, time.time() - ANSWER_KEPT_SECONDS),
        )
        return dict(row) if row else None

    def store_answer(self, principal, key, fingerprint, status, body):
        with self.db.transaction() as conn:
            conn.execute(
                "INSERT INTO idempotent_requests (principal, key, fingerprint, status, body, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (principal, key) DO UPDATE SET"
                " fingerprint = excluded.fingerprint, status = excluded.status, body = excluded.body,"
                " created_at = excluded.created_at",
                (principal, key, fingerprint, status, body, time.time()),
            )

    def forget_answers(self):
        """Delete answers older than ANSWER_KEPT_SECONDS; returns how many."""
        before = time.time() - ANSWER_KEPT_SECONDS
        if not self.db.row("SELECT 1 FROM idempotent_requests WHERE created_at < ? LIMIT 1", (before,)):
            return 0
        with self.db.transaction() as conn:
            return conn.execute("DELETE FROM idempotent_requests WHERE created_at < ?", (before,)).rowcount

    # -- API tokens ------------------------------------------------------------------
    def add_token(self, name, role, secret_hash):
        """Insert a token; returns False if the name is taken."""
        try:
            with self.db.transaction() as conn:
                self._insert_token(conn, name, role, secret_hash)
        except Conflict:
            return False
        return True

    def add_first_token(self, name, role, secret_hash):
        """Insert a token only if no token exists at all; returns whether it did."""
        with self.db.transaction() as conn:
            if LOCK_TOKENS[self.db.dialect]:
                conn.execute(LOCK_TOKENS[self.db.dialect])
            if conn.execute("SELECT 1 FROM tokens LIMIT 1").fetchone():
                return False
            self._insert_token(conn, name, role, secret_hash)
        return True

    @staticmethod
    def _insert_token(conn, name, role, secret_hash):
        conn.execute(
            "INSERT INTO tokens (name, role, secret_hash, created_at) VALUES (?, ?, ?, ?)",
            (name, role, secret_hash, now_iso()),
        )

    def token_by_hash(self, secret_hash):
        row = self.db.row("SELECT name, role, secret_hash FROM tokens WHERE secret_hash = ?", (secret_hash,))
        return dict(row) if row else None

    def token_by_name(self, name):
        row = self.db.row("SELECT name, role, secret_hash FROM tokens WHERE name = ?", (name,))
        return dict(row) if row else None

    def list_tokens(self):
        return [dict(r) for r in self.db.rows("SELECT name, role, created_at FROM tokens ORDER BY name")]

    def revoke_token(self, name):
        with self.db.transaction() as conn:
            return conn.execute("DELETE FROM tokens WHERE name = ?", (name,)).rowcount == 1

    # == the operator page's reads (stepd/ui) ===================================================
    # Read-only, each one query or one snapshot; nothing above calls them.
    def secret(self, name):
        """A secret the service keeps in its file (migration 4 makes 'session'), or None."""
        row = self.db.row("SELECT value FROM secrets WHERE name = ?", (name,))
        return row["value"] if row else None

    def status_counts(self):
        """({step status: how many}, {process status: how many}), the statuses some step or process
        has, from the tallies (exact, as a count would say; a count of the steps by status would
        read every row: the index of statuses leaves out COMPLETED, the commonest)."""
        with self.db.snapshot() as conn:
            tallies = _read_tallies(conn, self.db.dialect)
        steps = {status: count for status, count in tallies["steps"] if count}
        return steps, {status: count for status, count in tallies["processes"] if count}

    def metric_tallies(self):
        """The tallies GET /metrics reads (each change adds to them: Change.tally), and the runners' rows, as one
        snapshot has them: {"steps": [(status, n)], "processes": [(status, n)], "attempts": [(type,
        trigger, n)], "outcomes": [(type, outcome, n)], "runners": [row]}, with the attempts waiting for a
        runner (queued, or a retry due): "queued" (how many), "queued_since" (the oldest one's time, or
        None) and "now"."""
        with self.db.snapshot() as conn:
            tallies = _read_tallies(conn, self.db.dialect)
            tallies["runners"] = conn.execute("SELECT host, pid, pid_started, heartbeat_at FROM runners").fetchall()
            now = now_iso()
            queued = conn.execute(
                f"SELECT COUNT(*), MIN(started_at) FROM steps INDEXED BY steps_running WHERE {QUEUED}"
            )
            due = conn.execute(
                "SELECT COUNT(*), MIN(next_retry_at) FROM steps INDEXED BY steps_due_retries"
                " WHERE next_retry_at <= ? AND +status = 'STARTED'",
                (now,),
            )
            (queued, queued_since), (due, due_since) = queued.fetchone(), due.fetchone()
        tallies["queued"] = queued + due
        tallies["queued_since"] = min((t for t in (queued_since, due_since) if t is not None), default=None)
        tallies["now"] = now
        return tallies

    def outcomes_by_minute(self, since):
        """{(minute, outcome): how many} of the attempts that ended at or after `since` (stepd's UTC
        text). minute: 'YYYY-MM-DDTHH:MM'; outcome: 'completed', 'interrupted' (failed because its
        runner went away or stopped) or 'failed' (any other failure)."""
        # No index on attempts.finished_at: this reads every attempt (about 0.1 s at 10^6 of them).
        rows = self.db.rows(
            f"SELECT {FINISHED_MINUTE[self.db.dialect]} AS minute,"
            " CASE WHEN status = 'COMPLETED' THEN 'completed'"
            " WHEN error_type = 'Interrupted' THEN 'interrupted' ELSE 'failed' END AS outcome,"
            " COUNT(*) AS count FROM attempts"
            " WHERE finished_at >= ? AND status IN ('COMPLETED', 'FAILED') GROUP BY minute, outcome",
            (since,),
        )
        return {(row["minute"], row["outcome"]): row["count"] for row in rows}

    def oldest_queued_at(self, now):
        """Since when the attempt that has waited longest for a runner has been waiting (a queued
        attempt's start, a due retry's due time), or None when none waits."""
        with self.db.snapshot() as conn:
            queued = conn.execute(f"SELECT MIN(started_at) FROM steps INDEXED BY steps_running WHERE {QUEUED}")
            queued = queued.fetchone()[0]
            due = conn.execute(
                "SELECT MIN(next_retry_at) FROM steps INDEXED BY steps_due_retries"
                " WHERE next_retry_at <= ? AND +status = 'STARTED'",
                (now,),
            ).fetchone()[0]
        waiting = [moment for moment in (queued, due) if moment is not None]
        return min(waiting) if waiting else None

    @staticmethod
    def _failed_matching(where):
        """The (sql, args) conditions on FAILED steps matching `where`: type, error_type, process_name
        (exact; None: any)."""
        conditions, args = [IS_FAILED], []
        for sql, key in (
            ("type = ?", "type"),
            ("error_type = ?", "error_type"),
            ("process_id IN (SELECT id FROM processes WHERE name = ?)", "process_name"),
        ):
            if where.get(key) is not None:
                conditions.append(sql)
                args.append(where[key])
        return conditions, args

    def failed_page(self, where, before=None, limit=50):
        """A page of FAILED steps matching `where` (see _failed_matching), newest failure first, each
        with its process's name (`process_name`), before the (finished_at, seq) position `before`.
        Returns (steps, the position to continue before, or None on the last page)."""
        conditions, args = self._failed_matching(where)
        if before is not None:
            conditions.append("(finished_at, seq) < (?, ?)")
            args.extend(before)
        # INDEXED BY: walked newest first, the FAILED steps' own index gives the order and stops at
        # a page; left to itself, the planner sorts every FAILED step (or every one of a type).
        rows = self.db.rows(
            f"SELECT seq, {STEP_COLUMNS}, (SELECT name FROM processes p WHERE p.id = steps.process_id)"
            f" AS process_name FROM steps INDEXED BY steps_failed_oldest_first WHERE {' AND '.join(conditions)}"
            " ORDER BY finished_at DESC, seq DESC LIMIT ?",
            (*args, limit + 1),
        )
        now = now_iso()
        steps = [{**_step(row, now), "process_name": row["process_name"]} for row in rows[:limit]]
        last = rows[limit - 1] if len(rows) > limit else None
        return steps, (last["finished_at"], last["seq"]) if last is not None else None

    def failed_ids(self, where, until, limit):
        """The ids of up to `limit` FAILED steps matching `where` that failed before `until`, oldest
        failure first (the order a bulk restart takes them in), and whether more match."""
        conditions, args = self._failed_matching(where)
        rows = self.db.rows(
            f"SELECT id FROM steps INDEXED BY steps_failed_oldest_first WHERE {' AND '.join(conditions)}"
            " AND finished_at < ? ORDER BY finished_at, seq LIMIT ?",
            (*args, until, limit + 1),
        )
        return [row["id"] for row in rows[:limit]], len(rows) > limit

    def count_failed_since(self, where, since, leaving_out=()):
        """How many FAILED steps matching `where` failed at or after `since`, but those in `leaving_out`."""
        conditions, args = self._failed_matching(where)
        rows = self.db.rows(
            f"SELECT id FROM steps INDEXED BY steps_failed_oldest_first WHERE {' AND '.join(conditions)}"
            " AND finished_at >= ?",
            (*args, since),
        )
        leaving_out = set(leaving_out)
        return sum(1 for row in rows if row["id"] not in leaving_out)
