"""Delegates the tests use, loaded through STEPD_DELEGATES_PATH like a user's own."""

import time
from pathlib import Path

from delegates import delegate


@delegate("check")
def check(ctx):
    """Fail unless param `ok` is 1; the fix a restart can bring."""
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


@delegate("nap")
def nap(ctx):
    """Sleep for param `seconds`, then fail if param `fail` is 1; a step a crash can land in."""
    time.sleep(ctx.params.get("seconds", 0.05))
    if ctx.params.get("fail") == 1:
        raise RuntimeError("nap failed on purpose")
