"""The node as a process of its own (`stepd serve`: the node, its runners, and the HTTP front that
hands it its writes): the process tree, a node that dies and is started again, and the node's
socket, which answers only processes of the service's own user."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
from helpers import P, ok, wait_for


def parent_of(pid):
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def test_serve_starts_the_node_with_its_runners_and_the_http_front_beside_it(server_factory):
    server = server_factory(runners=2).start()
    (node,) = server.node_pids()
    master = server.gunicorn_pid()
    assert parent_of(node) == parent_of(master) == server.proc.pid
    assert len(server.runner_pids()) == 2 and {parent_of(pid) for pid in server.runner_pids()} == {node}
    (worker,) = server.worker_pids()
    assert parent_of(worker) == master
    # The node serves no HTTP: no TCP socket of the service's port is open in it, and the worker has one.
    port = f":{server.port:04X}"

    def tcp_inodes():
        return {line.split()[9] for line in Path("/proc/net/tcp").read_text().splitlines()[1:] if port in line}

    def socket_inodes(pid):
        links = (os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir())
        return {link[8:-1] for link in links if link.startswith("socket:[")}

    with requests.Session() as session:  # a connection held open: the worker's
        session.get(server.url + "/healthz", timeout=5)
        assert socket_inodes(worker) & tcp_inodes()
        assert not socket_inodes(node) & tcp_inodes()


@pytest.mark.timeout(60)
def test_a_node_killed_is_started_again_its_steps_interrupted_and_the_api_never_500s(server_factory):
    server = server_factory(runners=1).start()
    hung = server.start_process(("hang", {}))["steps"][0]["processStepId"]
    wait_for(lambda: server.step(hung)["phase"] == "RUNNING", what="the delegate to run")
    statuses, stop = {"read": [], "write": []}, threading.Event()

    def keep_asking():
        while not stop.is_set():
            statuses["read"].append(server.get(f"{P}?limit=1", timeout=5).status_code)
            body = {"steps": [{"type": "noop", "params": {}}]}
            statuses["write"].append(server.post(P, body, timeout=5).status_code)

    (node,) = server.node_pids()
    prober = threading.Thread(target=keep_asking)
    prober.start()
    try:
        time.sleep(0.3)
        os.kill(node, signal.SIGKILL)
        killed = time.monotonic()
        wait_for(lambda: (p := server.node_pids()) and node not in p, what="a new node")
        failed = wait_for(lambda: (s := server.step(hung))["status"] == "FAILED" and s, timeout=10, what="Interrupted")
        took = time.monotonic() - killed
        wait_for(lambda: statuses["write"][-3:] == [201] * 3, timeout=10, what="writes to work again")
    finally:
        stop.set()
        prober.join(10)
    assert failed["error"]["type"] == "Interrupted"
    assert took < 5, f"Interrupted {took:.1f} s after the node died"
    assert set(statuses["read"]) == {200}, "reads are the front's own: they never stop"
    assert set(statuses["write"]) <= {201, 503}, statuses["write"]
    ok(server.get("/healthz"))
    assert "the node exited with code -9; starting another" in server.output()


def node_socket_name(server):
    (node,) = server.node_pids()
    environment = Path(f"/proc/{node}/environ").read_bytes().split(b"\0")
    [name] = [entry.split(b"=", 1)[1] for entry in environment if entry.startswith(b"STEPD_NODE_SOCKET=")]
    return name.decode()


CONNECT_AS_NOBODY = """
import os, socket, sys
os.setgid(65534); os.setuid(65534)
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect("\\0" + sys.argv[1])
sock.settimeout(5)
try:
    sock.sendall(b"\\0\\0\\0\\x05hello")
    print("answered" if sock.recv(100) else "closed")
except (BrokenPipeError, ConnectionResetError):  # closed before our bytes, or with them unread
    print("closed")
"""


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to connect as another user")
def test_the_node_closes_a_connection_from_another_users_process(server_factory):
    server = server_factory().start()
    answer = subprocess.run(
        [sys.executable, "-c", CONNECT_AS_NOBODY, node_socket_name(server)], capture_output=True, text=True, timeout=20
    )
    assert answer.stdout.strip() == "closed", answer  # without a word
    assert "refused a connection to the node's socket from another user's process" in server.output()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as mine:  # this user's: taken
        mine.connect("\0" + node_socket_name(server))
    ok(server.post(P, {"steps": [{"type": "noop", "params": {}}]}), 201)
