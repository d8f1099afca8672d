"""The hop: HTTP processes hand two verbs (create_process, restart_failed_step) to the node over
a Unix socket, length-prefixed pickles, requests multiplexed by id on one connection a process.
Only what the engine and restart rows of the benchmark call; no Idempotency-Key, no dry run."""

import itertools
import os
import pickle
import socket
import struct

import gevent
from gevent.event import AsyncResult
from gevent.lock import Semaphore

HEADER = struct.Struct("!I")
ADDRESS = "\0stepd-hop-" + os.environ.get("HOP_TAG", "x")
VERBS = ("create_process", "restart_failed_step")


def _send(sock, lock, obj):
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    with lock:
        sock.sendall(HEADER.pack(len(data)) + data)


def _recv(reader):
    head = reader.read(HEADER.size)
    if len(head) < HEADER.size:
        return None
    (n,) = HEADER.unpack(head)
    return pickle.loads(reader.read(n))


def serve(store, registry, engine):
    """In the node (gevent): answer each HTTP process's verbs on a greenlet each. A new process first
    waits while the node is crowded (admission.py), as in the node that serves HTTP itself."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(ADDRESS)
    listener.listen(64)

    def connection(sock):
        reader, lock = sock.makefile("rb"), Semaphore()

        def answer(rid, verb, args):
            try:
                if verb == "create_process" and engine.admission is not None:
                    engine.admission.wait()
                if verb == "restart_failed_step":
                    args = (*args, registry.__contains__)
                reply = (rid, True, getattr(store, verb)(*args))
            except Exception as exc:  # the caller raises it, as if the verb had run in its process
                reply = (rid, False, exc)
            _send(sock, lock, reply)

        while (message := _recv(reader)) is not None:
            gevent.spawn(answer, *message)

    def accept():
        while True:
            sock, _ = listener.accept()
            gevent.spawn(connection, sock)

    gevent.spawn(accept)


class Client:
    """In an HTTP process (gevent): one connection to the node, requests multiplexed by id."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(ADDRESS)
        self.reader, self.lock, self.ids, self.waiting = self.sock.makefile("rb"), Semaphore(), itertools.count(), {}
        gevent.spawn(self._read)

    def _read(self):
        while (message := _recv(self.reader)) is not None:
            rid, ok, value = message
            self.waiting.pop(rid).set((ok, value))

    def call(self, verb, *args):
        rid, result = next(self.ids), AsyncResult()
        self.waiting[rid] = result
        _send(self.sock, self.lock, (rid, verb, args))
        ok, value = result.get()
        if not ok:
            raise value
        return value


def hand_writes_to_node(store):
    client = Client()
    store.create_process = lambda *a: client.call("create_process", *a)
    store.restart_failed_step = lambda step_id, overrides, principal, runner_id, has_delegate: client.call(
        "restart_failed_step", step_id, overrides, principal, runner_id
    )
