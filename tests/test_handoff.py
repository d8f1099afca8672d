"""The hand-off (handoff.py): an HTTP front's app that writes nothing itself, its writes run by a node.

In-process: the node is an app with a runner on its threads and handoff.Counter on a Unix socket;
the front is another app over the same file, built with that socket (as `stepd http`'s worker is).
The served tests (test_served_*) run the same parts as processes."""

import os
import socket
import threading
import time

import pytest
from helpers import OPERATOR_SECRET, PLUGINS, RESTART, Api, P, wait_for

from stepd.app import create_app, start_background, stop_background
from stepd.handoff import VERBS, Counter, Window
from stepd.model import Unavailable, new_id
from stepd.tokens import hash_secret


class Pair:
    """A node (an app with a runner on its threads, serving handoff.Counter) and a front over its socket."""

    def __init__(self, folder):
        settings = {"STEPD_DB": str(folder / "handoff.db"), "STEPD_DELEGATES_PATH": str(PLUGINS)}
        self.node_app = create_app(settings)
        self.node_app.extensions["stepd"].store.add_token("ops", "operator", hash_secret(OPERATOR_SECRET))
        start_background(self.node_app)
        self.address = str(folder / "node.sock")
        self.counter = self.serve()
        self.front_app = create_app(settings, node_address=self.address)
        self.api = Api(self.front_app.test_client(), {"Authorization": f"Bearer {OPERATOR_SECRET}"})
        self.node_store = self.node_app.extensions["stepd"].store

    def serve(self):
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.address)
        listener.listen(8)
        return Counter(listener, self.node_app.extensions["stepd"].engine, self.node_app).start()

    def close(self):
        self.front_app.extensions["stepd"].engine.window.close()
        self.counter.stop()
        stop_background(self.node_app, grace=1)


@pytest.fixture
def pair(tmp_path):
    pair = Pair(tmp_path)
    yield pair
    pair.close()


def failed_step(pair):
    process = pair.api.start(("fail", {}))
    return pair.api.wait_step(process["steps"][0]["processStepId"], "FAILED")


def test_a_process_started_through_the_front_is_written_and_run_by_the_node(pair):
    process = pair.api.start(("noop", {}), ("noop", {}))
    assert pair.api.wait_process(process["processId"], "COMPLETED")
    written, members = pair.node_store.db.group_commits()
    assert written >= 1 and members >= 1, "the node's writer made the writes"


def test_the_front_writes_nothing_itself(pair):
    store = pair.front_app.extensions["stepd"].store
    with pytest.raises(RuntimeError, match="writes nothing"):
        store.create_process(None, [("noop", {})], "ops", None)


def test_a_refusal_of_the_node_is_the_fronts_answer(pair):
    missing = pair.api.post(RESTART, {"processStepId": new_id()})
    assert missing.status_code == 412 and "processStepId" in missing.json["data"], missing.json
    done = pair.api.start(("noop", {}))
    step = pair.api.wait_process(done["processId"], "COMPLETED")["steps"][0]
    refused = pair.api.post(RESTART, {"processStepId": step["processStepId"]})
    assert refused.status_code == 412 and refused.json["data"] == {
        "status": ["Step is COMPLETED; only a FAILED step can be restarted."]
    }


def test_a_restart_and_its_dry_run_through_the_front(pair):
    step = failed_step(pair)
    dry = pair.api.post(RESTART + "?dryRun=true", {"processStepId": step["processStepId"]})
    assert dry.status_code == 200, dry.json
    assert pair.api.step(step["processStepId"])["status"] == "FAILED", "a dry run changes nothing"
    done = pair.api.post(RESTART, {"processStepId": step["processStepId"]})
    assert done.status_code == 200 and done.json["data"]["processStepId"] == step["processStepId"]
    wait_for(lambda: (s := pair.api.step(step["processStepId"]))["attempts"] == 2 and s["status"] == "FAILED")


def test_the_request_id_goes_with_the_attempt_the_node_begins(pair):
    answer = pair.api.post(P, {"steps": [{"type": "noop", "params": {}}]}, headers={"X-Request-Id": "rid-front-1"})
    assert answer.status_code == 201
    step = pair.api.step(answer.json["data"]["steps"][0]["processStepId"])
    assert step["attemptHistory"][0]["requestId"] == "rid-front-1"


def test_an_idempotency_key_is_answered_once_by_the_node_however_many_fronts_send_it(pair):
    """Ten concurrent POSTs under one key, through the front: the node runs the first and replays
    its answer for the others (the request is forwarded whole: the answer is kept in its transaction)."""
    answers, body = [], {"steps": [{"type": "noop", "params": {}}]}

    def post():
        answers.append(pair.api.post(P, body, headers={"Idempotency-Key": "once"}))

    threads = [threading.Thread(target=post) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert [a.status_code for a in answers] == [201] * 10
    assert len({a.json["data"]["processId"] for a in answers}) == 1
    assert sum(a.headers.get("Idempotent-Replayed") == "true" for a in answers) == 9
    assert len({a.headers["X-Request-Id"] for a in answers}) == 10, "each answer has its own request's id"
    other = pair.api.post(P, {"steps": [{"type": "fail", "params": {}}]}, headers={"Idempotency-Key": "once"})
    assert other.status_code == 412 and "Idempotency-Key" in other.json["data"]


def test_a_node_that_is_gone_is_a_503_and_the_front_connects_again_once_it_is_back(pair):
    pair.api.start(("noop", {}))  # the front's connection is open
    pair.counter.stop()
    for front in list(pair.counter.fronts):
        front.close()
    wait_for(lambda: not pair.counter.fronts, what="the connection to close")
    gone = pair.api.post(P, {"steps": [{"type": "noop", "params": {}}]})
    assert gone.status_code == 503 and gone.json["message"] == "Service unavailable"
    assert pair.api.get(f"{P}?limit=1").status_code == 200, "reads are the front's own"
    os.unlink(pair.address)
    pair.counter = pair.serve()
    assert pair.api.post(P, {"steps": [{"type": "noop", "params": {}}]}).status_code == 201


def test_the_node_runs_only_the_engines_writes(pair):
    window = Window(pair.address)
    try:
        with pytest.raises(ValueError, match="not a write"):
            window.call("processes", {}, 10, None)
        assert set(VERBS) == {"start_process", "cancel", "restart", "restart_many", "complete", "skip", "fail"}
    finally:
        window.close()


def test_a_window_on_no_node_is_unavailable(tmp_path):
    window = Window(str(tmp_path / "nobody.sock"))
    with pytest.raises(Unavailable, match="does not answer"):
        window.call("start_process", None, [], "ops")


def test_a_chunked_body_forwarded_whole_reaches_the_node_as_the_front_read_it(pair):
    """The front sends the bytes it read, with their length; the client's framing (chunked) stays behind."""
    body = b'{"steps": [{"type": "noop", "params": {}}]}'
    environ = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": P,
        "CONTENT_TYPE": "application/json",
        "SERVER_NAME": "localhost",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "wsgi.url_scheme": "http",
        "HTTP_HOST": "localhost",
        "HTTP_AUTHORIZATION": f"Bearer {OPERATOR_SECRET}",
        "HTTP_IDEMPOTENCY_KEY": "chunked-once",
        "HTTP_TRANSFER_ENCODING": "chunked",
    }
    status, headers, answer = pair.front_app.extensions["stepd"].engine.window.forward(environ, body)
    assert status == 201, answer


def test_an_answer_pickle_cannot_carry_is_an_error_the_caller_gets(pair, monkeypatch):
    engine = pair.node_app.extensions["stepd"].engine
    monkeypatch.setattr(engine, "fail", lambda *args: threading.Lock())  # a lock cannot be pickled
    window = Window(pair.address)
    try:
        with pytest.raises(RuntimeError, match="could not be sent"):
            window.call("fail", new_id(), "message", "ops")
        assert window.call("start_process", None, [("noop", {})], "ops")["status"] == "RUNNING", "the connection lives"
    finally:
        window.close()


def test_a_runner_a_reload_retires_gets_no_new_attempt_and_its_next_steps_run_elsewhere(app, api, gate):
    """dispatch.Dispatcher.retire: no claim for it, and the next step its outcome begins is queued
    again in the same group, for another runner, rather than sent to one that calls no more delegates."""
    node = app.extensions["stepd"].node
    process = api.start(("wait", {"file": str(gate)}), ("noop", {}))
    first, second = (step["processStepId"] for step in process["steps"])
    wait_for(lambda: api.step(first)["phase"] == "RUNNING", what="the first step to run")
    node.dispatcher.retire({os.getpid()})  # the runner on this process's threads
    waiting = api.start(("noop", {}))["steps"][0]["processStepId"]
    gate.touch()
    wait_for(lambda: api.step(first)["status"] == "COMPLETED", what="the first step to end")
    time.sleep(0.3)
    assert api.step(second)["phase"] == "QUEUED" and api.step(waiting)["phase"] == "QUEUED"
    node.start_runners_here(1)
    api.wait_process(process["processId"], "COMPLETED")
    assert api.step(second)["attempts"] == 1
    assert api.step(waiting)["status"] == "COMPLETED"
