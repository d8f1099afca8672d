"""The HTTP front against clients that stall (SPEC 9's companion, issue 10 item 2): idle
keep-alive connections and half-sent requests take no request's place, and a SIGTERM with
them open still stops the service cleanly and soon."""

import socket
import time

import pytest
from helpers import P

IDLE, HALF_SENT = 100, 20


def stall(server):
    """Open IDLE keep-alive connections that went quiet after one answer, and HALF_SENT
    requests whose head (or body) never ends; returns the sockets."""
    sockets = []
    for _ in range(IDLE):
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        sockets.append(sock)
    for n in range(HALF_SENT):
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        if n % 2:
            sock.sendall(b'POST /api/v1/processes HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"st')
        else:
            sock.sendall(b"GET /api/v1/processes HTTP/1.1\r\nHost: x\r\nX-Half: ")
        sockets.append(sock)
    return sockets


@pytest.mark.timeout(120)
def test_stalled_clients_take_no_place_of_a_normal_request(served):
    server = served
    sockets = stall(server)
    try:
        time.sleep(0.5)
        for _ in range(5):
            began = time.monotonic()
            response = server.get(f"{P}?limit=1", timeout=5)
            assert response.status_code == 200
            assert time.monotonic() - began < 1.0
        process = server.start_process(("noop", {}))
        server.wait_process(process["processId"], "COMPLETED")
    finally:
        for sock in sockets:
            sock.close()


@pytest.mark.timeout(120)
def test_sigterm_with_stalled_clients_stops_cleanly_within_10_s(server_factory):
    server = server_factory().start()
    sockets = stall(server)
    try:
        began = time.monotonic()
        code = server.stop(timeout=30)
        took = time.monotonic() - began
    finally:
        for sock in sockets:
            sock.close()
    assert code == 0, server.output()[-2000:]
    assert took < 10, took
    assert "did not stop" not in server.output()
