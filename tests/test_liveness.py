"""The liveness module alone: whether a runner's process is alive."""

import os
import subprocess
import sys
import time

from helpers import wait_for

from stepd.liveness import HOST, process_start_time, runner_is_alive


def test_process_start_time_tells_live_dead_and_zombie_processes():
    assert process_start_time(os.getpid()) is not None
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    assert process_start_time(child.pid) is not None
    child.kill()
    wait_for(lambda: process_start_time(child.pid) is None, what="the killed child to stop counting")  # a zombie
    child.wait()
    assert process_start_time(child.pid) is None


def test_liveness_on_this_host_is_the_process_not_the_heartbeat():
    me = {"host": HOST, "pid": os.getpid(), "pid_started": process_start_time(os.getpid()), "heartbeat_at": 0.0}
    assert runner_is_alive(me)  # an old heartbeat does not matter while the process lives
    assert not runner_is_alive({**me, "pid_started": "1"})  # the pid was reused by another process
    elsewhere = {"host": "other-host", "pid": 1, "pid_started": "1"}
    assert runner_is_alive({**elsewhere, "heartbeat_at": time.time()})
    assert not runner_is_alive({**elsewhere, "heartbeat_at": time.time() - 60})


def test_what_start_up_made_is_frozen_and_its_garbage_collected_first():
    """In a process of its own (freezing is for the rest of a process's life): after the call
    the collector's full passes skip start-up's objects, and a cycle left as garbage before it
    was freed, not frozen."""
    code = """
import gc, weakref
from stepd.liveness import freeze_startup_objects
class Cycle: pass
garbage = Cycle(); garbage.me = garbage
gone = weakref.ref(garbage); del garbage
freeze_startup_objects()
print(gc.get_freeze_count() > 1000, gone() is None)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["True", "True"]
