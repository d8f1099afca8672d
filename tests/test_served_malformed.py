"""Requests the HTTP front cannot parse (SPEC 9): two Content-Lengths (equal or not), a negative
or non-numeric one, a Transfer-Encoding other than chunked, Transfer-Encoding with Content-Length,
and a chunked body over 1 MiB. Each is answered in the envelope as the client's error (412, or 413
for the body over the limit), never a 500, and leaves no traceback in the log."""

import contextlib
import json
import socket
import threading

import pytest
from helpers import wait_for

ENVELOPE_KEYS = {"message", "timestamp", "data", "version"}
BODY = b'{"steps": [{"type": "noop"}]}'
HEAD = b"POST /api/v1/processes HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
MALFORMED = {
    "two-equal-content-lengths": HEAD + b"Content-Length: 29\r\nContent-Length: 29\r\n\r\n" + BODY,
    "two-different-content-lengths": HEAD + b"Content-Length: 29\r\nContent-Length: 5\r\n\r\n" + BODY,
    "negative-content-length": HEAD + b"Content-Length: -1\r\n\r\n" + BODY,
    "letters-content-length": HEAD + b"Content-Length: abc\r\n\r\n" + BODY,
    "exponent-content-length": HEAD + b"Content-Length: 1e3\r\n\r\n" + BODY,
    "gzip-transfer-encoding": HEAD + b"Transfer-Encoding: gzip\r\n\r\n" + BODY,
    "chunked-gzip-transfer-encoding": HEAD + b"Transfer-Encoding: chunked, gzip\r\n\r\n" + BODY,
    "transfer-encoding-and-content-length": HEAD
    + b"Transfer-Encoding: chunked\r\nContent-Length: 29\r\n\r\n1d\r\n"
    + BODY
    + b"\r\n0\r\n\r\n",
}


def exchange(port, raw):
    """Send `raw` while reading the whole answer (the front may answer and close before it has
    read everything: a body over the limit); (status, head, body)."""
    chunks = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:

        def read():
            with contextlib.suppress(ConnectionResetError):
                while chunk := sock.recv(65536):
                    chunks.append(chunk)

        reader = threading.Thread(target=read)
        reader.start()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            for start in range(0, len(raw), 65536):
                sock.sendall(raw[start : start + 65536])
        reader.join(timeout=10)
    answer = b"".join(chunks)
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), head.decode("latin-1"), body


@pytest.fixture(scope="module")
def front(tmp_path_factory):
    from helpers import Server

    server = Server(db_path=tmp_path_factory.mktemp("malformed") / "m.db").start()
    yield server
    server.stop()


@pytest.mark.parametrize("name", list(MALFORMED))
def test_a_request_the_front_cannot_parse_is_a_412_in_the_envelope(front, name):
    before = front.output().count("Traceback")
    before_412 = front.output().count('" 412 ')
    raw = MALFORMED[name].replace(b"Host: x", b"Host: x\r\nAuthorization: Bearer " + front.token.encode())
    status, head, body = exchange(front.port, raw)
    assert status == 412, (head, body)
    document = json.loads(body)
    assert set(document) == ENVELOPE_KEYS and document["message"] == "Precondition failed", document
    assert "x-request-id" in head.lower()
    assert front.output().count("Traceback") == before, front.output()[-3000:]
    # and its access line says what the client got
    wait_for(lambda: front.output().count('" 412 ') > before_412, what="the access line")


def test_a_chunked_body_over_1_mib_is_a_413(front):
    chunk = b"x" * 65536
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(33)) + b"0\r\n\r\n"
    raw = HEAD.replace(b"Host: x", b"Host: x\r\nAuthorization: Bearer " + front.token.encode())
    status, head, answer = exchange(front.port, raw + b"Transfer-Encoding: chunked\r\n\r\n" + body)
    assert status == 413, (head, answer)
    assert json.loads(answer)["message"] == "Payload too large"
