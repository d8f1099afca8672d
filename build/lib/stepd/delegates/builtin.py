"""The built-in step types: noop, sleep and fail."""

import math
import time

from stepd.delegates import delegate


@delegate("noop")
def noop(ctx):
    """Do nothing and complete."""
    return None


@delegate("sleep")
def sleep(ctx):
    """Sleep for param `seconds` (DOUBLE), then complete."""
    if "seconds" not in ctx.params:
        raise ValueError("param 'seconds' (DOUBLE) is required")
    seconds = ctx.params["seconds"]
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        raise TypeError(f"param 'seconds' must be a number, got {type(seconds).__name__}")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError("param 'seconds' must be a finite number >= 0")
    time.sleep(seconds)
    return {"slept": float(seconds)}


class StepFailure(Exception):
    """The error the `fail` step raises."""


@delegate("fail")
def fail(ctx):
    """Fail with param `message` (STRING)."""
    raise StepFailure(str(ctx.params.get("message", "failed on purpose")))
