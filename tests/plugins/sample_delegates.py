"""Delegates the tests use, loaded through STEPD_DELEGATES_PATH like a user's own."""

import json
import time
from pathlib import Path

from stepd.delegates import delegate


@delegate("check")
def check(ctx):
    """Fail unless param `ok` is 1; the fix a restart can bring."""
    ctx.log.info("checking ok=%r", ctx.params.get("ok"))
    if ctx.params.get("ok") != 1:
        raise ValueError(f"ok is {ctx.params.get('ok')!r}, not 1")
    return {"checked": 1}


@delegate("count")
def count(ctx):
    """Append one line per call to the file in param `file`, then fail if param `fail` is 1."""
    with open(ctx.params["file"], "a") as out:
        out.write(f"{ctx.step_id} {ctx.attempt}\n")
    if ctx.params.get("fail") == 1:
        raise RuntimeError("count failed on purpose")


@delegate("wait")
def wait(ctx):
    """Wait until the file in param `file` exists (at most param `seconds`), then complete."""
    if "started" in ctx.params:  # tells a test that the delegate has really been called
        Path(ctx.params["started"]).touch()
    deadline = time.monotonic() + ctx.params.get("seconds", 30.0)
    while not Path(ctx.params["file"]).exists():
        if time.monotonic() > deadline:
            raise TimeoutError("file never appeared")
        time.sleep(0.02)


@delegate("external")
def external(ctx):
    """Hand the work to something outside; it reports back with complete-step or fail-step."""
    ctx.log.info("deferred step %s", ctx.step_id)
    return ctx.defer()


@delegate("results")
def results(ctx):
    """Return one value of each result type."""
    return {"text": "héllo", "count": 2**63 - 1, "ratio": 0.5}


@delegate("bad_result")
def bad_result(ctx):
    """Return something that is not a result."""
    return ["not", "a", "dict"]


@delegate("echo")
def echo(ctx):
    """Return the context it got, as a result."""
    return {
        "process": ctx.process_id,
        "step": ctx.step_id,
        "attempt": ctx.attempt,
        "names": ",".join(sorted(ctx.params)),
    }


# -- results that flow forward (SPEC 10) ------------------------------------------------------------
@delegate("produce")
def produce(ctx):
    """Return its params as its result, for the steps after it."""
    return dict(ctx.params)


@delegate("consume")
def consume(ctx):
    """Return what it saw of the earlier steps: ctx.results and ctx.variables as JSON, and the keys' types."""
    return {
        "results": json.dumps({str(position): result for position, result in ctx.results.items()}, sort_keys=True),
        "variables": json.dumps(ctx.variables, sort_keys=True),
        "positions": ",".join(f"{type(position).__name__}:{position}" for position in ctx.results),
    }


@delegate("need")
def need(ctx):
    """Fail unless ctx.variables holds the name in param `name`; return that variable as `got`."""
    name = ctx.params["name"]
    if name not in ctx.variables:
        raise KeyError(f"no variable {name!r} among {sorted(ctx.variables)}")
    return {"got": ctx.variables[name]}


# -- delegates with retry policies (tests/test_api_retries.py and friends) ---------------------------
def _count_call(ctx):
    with open(ctx.params["file"], "a") as out:
        out.write(f"{ctx.step_id} {ctx.attempt}\n")


def _count_then_fail_before_pass_at(ctx):
    """Count the call in param `file`; fail before attempt param `pass_at` (always, without it)."""
    _count_call(ctx)
    if ctx.attempt < ctx.params.get("pass_at", 2**62):
        raise ConnectionError(f"attempt {ctx.attempt} failed")


@delegate("retry_count", retries=3, backoff=2.0, delay=0.1, max_delay=0.3)
def retry_count(ctx):
    """Count the call in param `file`; fail before attempt param `pass_at` (always, without it)."""
    _count_then_fail_before_pass_at(ctx)


@delegate("retry_window", retries=3, backoff=4.0, delay=0.2, max_delay=0.5)
def retry_window(ctx):
    """Count the call in param `file` and fail: waits of 0.1-0.2, 0.25-0.5 and 0.25-0.5 s."""
    _count_call(ctx)
    raise ConnectionError(f"attempt {ctx.attempt} failed")


@delegate("retry_abort", retries=3, delay=0.1)
def retry_abort(ctx):
    """Count the call in param `file`, then give up at once with delegates.Abort."""
    from stepd.delegates import Abort

    _count_call(ctx)
    raise Abort(ctx.params.get("message", "gave up"))


@delegate("retry_soon", retries=1, backoff=1.0, delay=0.6, max_delay=0.6)
def retry_soon(ctx):
    """Count the call in param `file`; fail before attempt param `pass_at`; one retry after 0.3-0.6 s."""
    _count_then_fail_before_pass_at(ctx)


@delegate("retry_later", retries=1, backoff=1.0, delay=2.0, max_delay=2.0)
def retry_later(ctx):
    """Count the call in param `file`; fail before attempt param `pass_at`; one retry after 1-2 s."""
    _count_then_fail_before_pass_at(ctx)


@delegate("retry_slow", retries=2, backoff=1.0, delay=30.0, max_delay=30.0)
def retry_slow(ctx):
    """Count the call in param `file` and fail; the retry waits 15-30 s."""
    _count_call(ctx)
    raise ConnectionError(f"attempt {ctx.attempt} failed")


@delegate("retry_gate", retries=2, delay=0.1)
def retry_gate(ctx):
    """Count the call in param `file`, wait for the file in param `gate` (10 s at most), then fail."""
    _count_call(ctx)
    deadline = time.monotonic() + 10
    while not Path(ctx.params["gate"]).exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    raise ConnectionError(f"attempt {ctx.attempt} failed")


@delegate("nap")
def nap(ctx):
    """Sleep for param `seconds`, then fail if param `fail` is 1; a step a crash can land in. With
    param `file`, first count the call there."""
    if "file" in ctx.params:
        _count_call(ctx)
    time.sleep(ctx.params.get("seconds", 0.05))
    if ctx.params.get("fail") == 1:
        raise RuntimeError("nap failed on purpose")


# -- delegates that misbehave: timeouts, hangs, and ones that take their process down ------------
@delegate("linger", timeout=0.5)
def linger(ctx):
    """Wait up to param `seconds` (default 30) for ctx.cancelled; write 'cancelled' to param `file` if it came."""
    if ctx.cancelled.wait(ctx.params.get("seconds", 30.0)):
        Path(ctx.params["file"]).write_text("cancelled")


@delegate("hang")
def hang(ctx):
    """Wait up to param `seconds` (default 30) for ctx.cancelled (no timeout of its own); record it in param `file`."""
    if "started" in ctx.params:
        Path(ctx.params["started"]).touch()
    if ctx.cancelled.wait(ctx.params.get("seconds", 30.0)):
        Path(ctx.params["file"]).write_text("cancelled")


@delegate("crash")
def crash(ctx):
    """Take the runner's process down as param `how` says: exit1, exit3, exit4, sigkill, segfault."""
    import ctypes
    import os
    import signal

    how = ctx.params["how"]
    if how.startswith("exit"):
        os._exit(int(how[4:]))
    if how == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    if how == "segfault":
        ctypes.string_at(0)
    raise ValueError(f"unknown param how {how!r}")


@delegate("hold_gil")
def hold_gil(ctx):
    """Hold the GIL in one C call for a few seconds (a huge integer power), then complete."""
    digits = (7 ** ctx.params.get("exponent", 8_000_000)).bit_length()
    return {"bits": digits}
