"""The channel between a node and a runner (and between the front and the node): whole messages in
order, however the bytes arrive, and the end of the connection."""

import pickle
import socket
import threading

import pytest

from stepd.channel import HEADER, READ_BYTES, Channel

pytestmark = pytest.mark.timeout(30)  # a read that never returns fails the test, never hangs it


@pytest.fixture
def pair():
    ours, theirs = socket.socketpair()  # no timeout: a read that must not wait does not (receive_all)
    sender, receiver = Channel(theirs), Channel(ours)
    yield sender, receiver
    sender.close()
    receiver.close()


def test_messages_come_whole_and_in_order_one_at_a_time(pair):
    sender, receiver = pair
    for n in range(5):
        assert sender.send("outcomes", [n])
    assert [receiver.receive() for _ in range(5)] == [("outcomes", [n]) for n in range(5)]


def test_receive_all_takes_every_whole_message_that_has_come(pair):
    sender, receiver = pair
    for n in range(50):
        sender.send("outcomes", [n])
    taken = []
    while len(taken) < 50:
        got = receiver.receive_all()
        assert got, "it waits for the first, and returns at least that one"
        taken += got
    assert taken == [("outcomes", [n]) for n in range(50)]


def test_a_message_larger_than_a_read_and_one_split_anywhere_come_whole(pair):
    sender, receiver = pair
    big = "x" * (3 * READ_BYTES)
    sender.send("run", big)
    assert receiver.receive() == ("run", big)
    # A message whose bytes come in pieces (a header cut in two, then the body in two): the reader
    # waits for the rest, and gives nothing half made.
    body = pickle.dumps(("cancel", [("step", 1)]))
    data = HEADER.pack(len(body)) + body
    got = []
    reader = threading.Thread(target=lambda: got.append(receiver.receive_all()))
    reader.start()
    raw = sender.sock
    for piece in (data[:2], data[2:7], data[7:]):
        raw.sendall(piece)
    reader.join(10)
    assert got == [[("cancel", [("step", 1)])]]


def test_the_end_of_the_connection_is_none_after_what_came_before_it(pair):
    sender, receiver = pair
    sender.send("outcomes", [1])
    sender.close()
    assert receiver.receive_all() == [("outcomes", [1])]
    assert receiver.receive_all() is None
    assert receiver.receive() is None


def test_a_message_cut_off_by_the_end_is_not_given(pair):
    sender, receiver = pair
    sender.sock.sendall(HEADER.pack(100) + b"only part of it")
    sender.close()
    assert receiver.receive() is None


def test_closing_this_end_ends_a_read_waiting_on_it(pair):
    _, receiver = pair
    got = []
    reader = threading.Thread(target=lambda: got.append(receiver.receive()))
    reader.start()
    receiver.close()
    reader.join(10)
    assert not reader.is_alive() and got == [None]
