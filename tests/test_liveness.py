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
