"""Delegates for `make bench`, loaded through STEPD_DELEGATES_PATH like a user's own folder."""

import time

from stepd.delegates import Abort, delegate


@delegate("bench.fail")
def fail_at_once(ctx):
    """Fail at once, so a restarted step is FAILED (restartable) again within milliseconds."""
    raise Abort("bench.fail fails at once")


@delegate("bench.defer")
def defer_when_fixed(ctx):
    """Fail unless param `defer` is 1 (LONG); then defer, leaving the step STARTED."""
    if ctx.params.get("defer") != 1:
        raise Abort("bench.defer needs param defer = 1")
    return ctx.defer()


@delegate("bench.clock")
def clock(ctx):
    """Complete with the moment it was called (`called`, seconds since the epoch), for queue latency."""
    return {"called": time.time()}


@delegate("bench.tick")
def tick(ctx):
    """Complete with the moment it was called (`calledNs`, time.monotonic_ns(): one clock for every
    process of the machine), for the step-to-step row: one delegate's call to the next step's."""
    return {"calledNs": time.monotonic_ns()}
