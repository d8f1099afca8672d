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
READ_BYTES = 65536  # at most this much a read


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
    """One end of a connection: `send` from any thread, `receive` (or `receive_all`) from one."""

    def __init__(self, sock):
        self.sock = sock
        self._sending = threading.Lock()
        self._buffer = bytearray()  # what was read and not yet taken as whole messages
        # The socket itself, for a read that must not wait: gevent's socket (the node) waits for
        # data even when asked not to, and the socket it wraps does not.
        self._raw = getattr(sock, "_sock", sock)

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
        """The next message, or None once the connection is closed (at either end)."""
        while (message := self._take_whole()) is None:
            if not self._read(wait=True):
                return None
        return message

    def receive_all(self):
        """Every whole message that has come (waiting for the first only), or None once the
        connection is closed: a reader that records what it reads takes many messages in one go.
        On a socket without a timeout (a blocking one, or gevent's): Python waits out a timeout
        before any read, even one asked not to wait."""
        first = self.receive()
        if first is None:
            return None
        messages = [first]
        while True:
            while (message := self._take_whole()) is not None:
                messages.append(message)
            if not self._read(wait=False):
                return messages

    def _read(self, wait):
        """Add what has come to the buffer (`wait`: for something to come). False when nothing
        was read: the end of the stream, or (not waiting) nothing there now."""
        try:
            data = self.sock.recv(READ_BYTES) if wait else self._raw.recv(READ_BYTES, socket.MSG_DONTWAIT)
        except OSError:  # BlockingIOError: nothing there now; any other: closed by this end meanwhile
            return False
        self._buffer += data
        return bool(data)

    def _take_whole(self):
        """The first whole message of the buffer, taken out of it (None: none is whole yet)."""
        buffer = self._buffer
        if len(buffer) < HEADER.size:
            return None
        (size,) = HEADER.unpack_from(buffer)
        if len(buffer) < HEADER.size + size:
            return None
        data = bytes(buffer[HEADER.size : HEADER.size + size])
        del buffer[: HEADER.size + size]
        return pickle.loads(data)  # noqa: S301 - from stepd's own process on this machine, this user

    def close(self):
        """Close the connection: the other end reads its end, and so does this end's reader."""
        with contextlib.suppress(OSError):  # the other end may be gone already
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
