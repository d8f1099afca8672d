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


@delegate("bench.record")
def record(ctx):
    """Add "step attempt" as a line to param `file`, then take param `ms` milliseconds: the node-kill
    rows count every call (an attempt run twice would show twice), and a step that takes a while is
    one a kill lands in."""
    with open(ctx.params["file"], "a") as out:
        out.write(f"{ctx.step_id} {ctx.attempt}\n")
    time.sleep(ctx.params.get("ms", 0) / 1000)
