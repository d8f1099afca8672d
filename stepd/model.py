"""The vocabulary every other module speaks: statuses, limits, ids, times, typed params, the
record of one attempt, and the domain's errors.

It imports nothing of stepd, so any module may import it.
"""

import base64
import contextvars
import json
import math
import secrets
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime

VERSION = "1.0.0"  # the service's version, in every answer's envelope and the OpenAPI document

# -- statuses -------------------------------------------------------------------------------
PENDING, STARTED, COMPLETED, FAILED = "PENDING", "STARTED", "COMPLETED", "FAILED"
RUNNING = "RUNNING"
SKIPPED, CANCELLED = "SKIPPED", "CANCELLED"  # an operator stepped over a failure, or gave a process up
STEP_STATUSES = (PENDING, STARTED, COMPLETED, FAILED, SKIPPED, CANCELLED)
PROCESS_STATUSES = (RUNNING, COMPLETED, FAILED, CANCELLED)
ATTEMPT_STATUSES = (STARTED, COMPLETED, FAILED, CANCELLED)  # CANCELLED: its process was cancelled meanwhile
DONE_STATUSES = (COMPLETED, SKIPPED)  # a step the process has got past
FINISHED_PROCESS_STATUSES = (COMPLETED, CANCELLED)  # what retention deletes, once old enough
INTERVENTIONS = ("cancel", "skip")  # what an operator did to a step or process (its `intervention`)
TRIGGERS = ("start", "restart", "retry")  # what began an attempt
# Where a STARTED step is: committed and not yet claimed by a runner, its delegate running,
# waiting for complete-step/fail-step, waiting for an automatic retry.
PHASES = ("QUEUED", "RUNNING", "DEFERRED", "RETRY_WAIT")

# -- limits ---------------------------------------------------------------------------------
MAX_PARAMS = 256  # names in one params dictionary, also after a restart's overlay
MAX_NAME = 128  # characters of a param name
MAX_STRING = 65536  # characters of a STRING value
MAX_STEPS = 100  # steps of one process
MAX_BULK = 1000  # steps one bulk restart takes
MAX_REASON = 1024  # characters of a cancel's or skip's reason
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
# A param name has no control characters: Unicode's category Cc is exactly U+0000-U+001F and U+007F-U+009F.
NAME_PATTERN = r"^[^\x00-\x1f\x7f-\x9f]*$"
MAX_DOUBLE = sys.float_info.max  # a DOUBLE is finite: within the largest finite double either way
VALUE_TYPES = ("STRING", "LONG", "DOUBLE")


# -- ids and times --------------------------------------------------------------------------
# The X-Request-Id of the request this code serves (envelope.py sets it), or None: the attempts a
# request begins record it (store.Change), so every line about them can name it.
current_request_id = contextvars.ContextVar("stepd_request_id", default=None)


# Ids are 22 URL-safe characters: 42 bits of the time in milliseconds (until 2109), then 90 random
# bits, in an alphabet whose ASCII order is its value order, so ids sort by the millisecond they
# were made.
# Why: rows made together then sit together in every index keyed by an id (steps.id, attempts'
# (step_id, attempt), processes.id). With random ids each step's transition wrote a random page of
# each such index: 98 KiB written per group of 4 steps against 69 KiB, and 25-40% more steps/s,
# measured over 10^5 stored steps. 90 random bits keep an id unguessable, and unique: two ids of
# the same millisecond collide with a chance of 2^-90. An id never starts with "-" (that would be
# before 1972), so a command line never takes one for an option.
ID_ALPHABET = b"-0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz"
_BASE64URL = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_TO_SORTED = bytes.maketrans(_BASE64URL, ID_ALPHABET)
ID_RANDOM_BITS = 90


def new_id():
    """An opaque URL-safe id (22 characters) that sorts by the millisecond it was made."""
    bits = (time.time_ns() // 1_000_000) << ID_RANDOM_BITS | secrets.randbits(ID_RANDOM_BITS)  # 132 bits
    # 132 bits are 22 base64 digits: as 18 bytes (shifted to their top), the first 22 of 24 digits.
    digits = base64.urlsafe_b64encode((bits << 12).to_bytes(18, "big"))[:22]
    return digits.translate(_TO_SORTED).decode("ascii")


def iso(moment):
    """A time as stepd writes it: UTC, ISO 8601 with milliseconds and a Z suffix (so it sorts as text)."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def now_iso():
    return iso(datetime.now(UTC))


# -- typed params ---------------------------------------------------------------------------
# Params are held as {name: (TYPE, value)} in Python and as {name: [TYPE, value]} in JSON.
def params_to_json(params):
    return json.dumps({name: [kind, value] for name, (kind, value) in params.items()}, allow_nan=False)


def params_from_json(text):
    if text is None:
        return None
    if text == "{}":  # most steps have no params: no parse for them
        return {}
    return {name: (kind, value) for name, (kind, value) in json.loads(text).items()}


def plain_values(params):
    """What a delegate sees: {name: value}, without the types."""
    return {name: value for name, (_kind, value) in params.items()}


def typed_result(outcome):
    """A delegate's return value as typed params: str -> STRING, int -> LONG, float -> DOUBLE."""
    if outcome is None:
        return None
    if not isinstance(outcome, dict):
        raise TypeError(f"a delegate must return None, a dict or ctx.defer(), not {type(outcome).__name__}")
    typed = {}
    for name, value in outcome.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"result names must be non-empty strings, not {name!r}")
        if isinstance(value, str):
            typed[name] = ("STRING", value)
        elif isinstance(value, int) and not isinstance(value, bool) and INT64_MIN <= value <= INT64_MAX:
            typed[name] = ("LONG", value)
        elif isinstance(value, float) and math.isfinite(value):
            typed[name] = ("DOUBLE", value)
        else:
            raise TypeError(f"result {name!r} must be a str, a 64-bit int or a finite float, not {value!r}")
    return typed


# -- records --------------------------------------------------------------------------------
@dataclass(slots=True)
class Job:
    """One attempt of one step, to be handed to its delegate."""

    step_id: str
    process_id: str
    type: str
    params: dict
    attempt: int
    retries_used: int = 0  # automatic retries since the last start or manual restart
    results: dict | None = None  # ctx.results: {position: typed result} of the steps before, read at the claim
    request_id: str | None = None  # the X-Request-Id of the request that began it (a retry keeps its attempt's)

    def __repr__(self):
        return f"Job({self.step_id!r}, attempt={self.attempt})"

    def __reduce__(self):
        # Pickled as its fields, in order (channel.py sends Jobs and Outcomes to and from every
        # runner): a slotted dataclass's default goes through copyreg and its state, 2.3x slower
        # both ways (10 us a message in the node, measured).
        fields = (self.step_id, self.process_id, self.type, self.params, self.attempt, self.retries_used)
        return Job, (*fields, self.results, self.request_id)

    @property
    def key(self):
        """(step id, attempt): which attempt this is, wherever it travels."""
        return self.step_id, self.attempt

    @property
    def step(self):
        """(step id, process id, type): the step this attempt is of, as the store's Change.end takes it."""
        return self.step_id, self.process_id, self.type


@dataclass(slots=True)
class Outcome:
    """What a runner reports of one attempt: `kind` COMPLETED (with `result`), FAILED (with
    `error`, and `retry_at` when its retry policy retries it), or DEFERRED."""

    job: Job
    kind: str
    result: dict | None = None
    error: dict | None = None
    retry_at: str | None = None
    quick: bool = False  # its delegate returned within runner.QUICK_SECONDS (dispatch.QUICK_DEPTH)

    def __reduce__(self):
        return Outcome, (self.job, self.kind, self.result, self.error, self.retry_at, self.quick)


# -- errors ---------------------------------------------------------------------------------
class PreconditionFailed(Exception):
    """A request that is well formed but does not fit the current state (HTTP 412).

    `errors` is shaped as marshmallow shapes field errors, {field: [message]}, with the
    domain's field names (`step_id`); the HTTP layer renames them to the wire's.
    """

    def __init__(self, errors):
        super().__init__(errors)
        self.errors = errors

    @classmethod
    def on(cls, field, message):
        return cls({field: [message]})


class NotFound(Exception):
    """Nothing has the id asked for (HTTP 404); the message says what was looked for."""


class Busy(Exception):
    """Another writer held the database's write lock past the busy timeout; retry shortly."""


class Unwritable(Exception):
    """The database cannot be written now (disk full, read-only file); reads still work."""


class Unavailable(Exception):
    """The database does not answer at all."""


class NoRunner(Exception):
    """No runner is alive: queued steps would never run."""


class Unusable(Exception):
    """The database file cannot be used by this stepd (not a database, a newer schema)."""


class Conflict(Exception):
    """A row with this key exists already (a token name)."""
