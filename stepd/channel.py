"""The connection between a node and a runner: messages over a local stream socket.

A message is a tuple `(kind, payload)`, pickled and sent with its length in front. Both ends
are stepd's own processes on one machine, under one user (a socketpair from the node to the
runner it started, or the node's abstract Unix socket for `stepd runner`), so pickle carries
Job and Outcome as they are. The connection is also the runner's liveness: when a runner dies,
however it dies, the kernel closes its end and the node reads the end of the stream.

What travels:
    runner -> node   ("hello", {"pid", "places"})      once, first
                     ("outcomes", [model.Outcome])      what its delegates did
                     ("unstarted", [(step id, attempt)]) at a stop: claimed, never called
    node -> runner   ("run", [model.Job])               attempts whose claim is committed
                     ("cancel", [(step id, attempt)])    ended from outside: set ctx.cancelled
"""

import contextlib
import hashlib
import os
import pickle
import socket
import struct
import threading

HEADER = struct.Struct("!I")


def peer_uid(sock):
    """The user id of the process at the other end of a Unix socket (Linux's SO_PEERCRED): a node
    takes runners and fronts of its own user only, as what they send is unpickled and trusted."""
    pid_uid_gid = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", pid_uid_gid)[1]


def node_address(db_path):
    """The abstract Unix socket (no file: nothing to clean up after a crash) where the node of
    this database file accepts `stepd runner` processes."""
    digest = hashlib.sha256(os.path.realpath(db_path).encode()).hexdigest()[:20]
    return f"\0stepd-{digest}-node"


class Channel:
    """One end of a connection: `send` from any thread, `receive` from one."""

    def __init__(self, sock):
        self.sock = sock
        self._sending = threading.Lock()
        self._reader = sock.makefile("rb")

    def send(self, kind, payload):
        """Send one message; False if the other end is gone."""
        data = pickle.dumps((kind, payload), protocol=pickle.HIGHEST_PROTOCOL)
        try:
            with self._sending:
                self.sock.sendall(HEADER.pack(len(data)) + data)
        except OSError:
            return False
        return True

    def receive(self):
        """The next message, or None once the connection is closed (at either end). The reading
        thread closes its reader then: another thread closing it would wait for its lock."""
        try:
            head = self._reader.read(HEADER.size)
            (size,) = HEADER.unpack(head) if len(head) == HEADER.size else (None,)
            data = self._reader.read(size) if size is not None else b""
        except (OSError, ValueError):  # ValueError: closed by this end meanwhile
            size, data = None, b""
        if size is None or len(data) < size:
            self._reader.close()
            return None
        return pickle.loads(data)  # noqa: S301 - from stepd's own process on this machine, this user

    def close(self):
        """Close the connection: the other end reads its end, and so does this end's reader."""
        with contextlib.suppress(OSError):  # the other end may be gone already
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
