"""Delegates as the app runs them: GET /api/v1/delegates, the built-in step types, results and
exceptions of delegates, Abort, and an app that refuses to start with a bad delegate folder."""

import textwrap

import pytest
from helpers import DELEGATES, RESTART, Api, P, ok, out, parse_time, typed, write_file

import stepd.delegates.builtin
from stepd.app import create_app, start_background, stop_background
from stepd.auth import hash_secret
from stepd.delegates import DelegateLoadError, load_registry


# -- GET /api/v1/delegates -------------------------------------------------------------------------
def test_delegates_lists_every_type_with_the_first_docstring_line(app, api):
    def multi(ctx):
        """First line only.

        Not this one.
        """

    app.extensions["stepd"].registry.add("multi.line", multi, "test")
    listed = ok(api.get(DELEGATES))
    assert all(set(d) == {"type", "description", "retry"} for d in listed)
    assert all(set(d["retry"]) == {"retries", "backoff", "delay", "maxDelay"} for d in listed)
    by_type = {d["type"]: d["description"] for d in listed}
    assert len(by_type) == len(listed)
    assert by_type["noop"] == "Do nothing and complete."
    assert by_type["sleep"] == "Sleep for param `seconds` (DOUBLE), then complete."
    assert by_type["fail"] == "Fail with param `message` (STRING)."
    assert by_type["check"] == "Fail unless param `ok` is 1; the fix a restart can bring."
    assert by_type["multi.line"] == "First line only."
    registry = app.extensions["stepd"].registry
    assert set(by_type) == {d.type for d in registry.all()}
    registry.remove("multi.line")
    assert "multi.line" not in {d["type"] for d in ok(api.get(DELEGATES))}


# -- the built-in step types -----------------------------------------------------------------------
BUILTIN_TESTS = {}  # step type -> the test that covers it; a built-in without one fails a test


def covers(step_type):
    def mark(test):
        BUILTIN_TESTS[step_type] = test
        return test

    return mark


def test_every_builtin_delegate_has_a_test():
    builtin_types = {d.type for d in load_registry().all() if d.source == stepd.delegates.builtin.__file__}
    assert builtin_types == set(BUILTIN_TESTS)


@covers("noop")
def test_noop_completes_with_no_result(api):
    process = api.start(("noop", {}))
    done = api.wait_process(process["processId"], "COMPLETED")
    assert done["steps"][0]["result"] is None
    assert done["steps"][0]["attempts"] == 1


@covers("sleep")
def test_sleep_sleeps_and_reports(api):
    process = api.start(("sleep", {"seconds": 0.05}))
    done = api.wait_process(process["processId"], "COMPLETED")
    assert done["steps"][0]["result"] == {
        "slept": {"strValue": None, "longValue": None, "doubleValue": 0.05, "type": "DOUBLE"}
    }


@pytest.mark.parametrize(
    ("params", "error_type"),
    [({}, "ValueError"), ({"seconds": "soon"}, "TypeError"), ({"seconds": -1.0}, "ValueError")],
)
def test_sleep_with_bad_seconds_fails_the_step(api, params, error_type):
    process = api.start(("sleep", params))
    failed = api.wait_process(process["processId"], "FAILED")
    assert failed["steps"][0]["error"]["type"] == error_type


@covers("fail")
def test_fail_raises_with_its_message(api):
    process = api.start(("fail", {"message": "card declined"}))
    failed = api.wait_process(process["processId"], "FAILED")
    assert failed["steps"][0]["error"] == {"type": "StepFailure", "message": "card declined"}


# -- results and errors ----------------------------------------------------------------------------
def test_results_are_typed_from_python_types(api):
    process = api.start(("results", {}))
    step = api.wait_process(process["processId"], "COMPLETED")["steps"][0]
    assert step["result"] == {
        "text": out("STRING", "héllo"),
        "count": out("LONG", 2**63 - 1),
        "ratio": out("DOUBLE", 0.5),
    }


def test_a_delegate_sees_its_context(api):
    process = api.start(("echo", {"b": 1, "a": "x"}))
    step = api.wait_process(process["processId"], "COMPLETED")["steps"][0]
    assert step["result"] == {
        "process": out("STRING", process["processId"]),
        "step": out("STRING", step["processStepId"]),
        "attempt": out("LONG", 1),
        "names": out("STRING", "a,b"),
    }


def test_context_reaches_the_delegate(api):
    process = api.start(("echo", {"b": 1, "a": "x"}))
    step = api.wait_process(process["processId"], "COMPLETED")["steps"][0]
    values = {name: v[{"STRING": "strValue", "LONG": "longValue"}[v["type"]]] for name, v in step["result"].items()}
    assert values == {"process": process["processId"], "step": step["processStepId"], "attempt": 1, "names": "a,b"}


def test_a_delegate_returning_a_non_dict_fails_the_step_with_type_error(api):
    response = api.post(P, {"steps": [{"type": "bad_result"}, {"type": "noop"}]})
    process = ok(response, 201)
    failed = api.wait_process(process["processId"], "FAILED")
    assert failed["steps"][0]["error"]["type"] == "TypeError"
    assert failed["steps"][0]["result"] is None
    assert failed["steps"][1]["status"] == "PENDING"


@pytest.mark.parametrize(
    ("step_type", "params", "error"),
    [
        ("fail", {"message": "card declined"}, {"type": "StepFailure", "message": "card declined"}),
        ("check", {"ok": 2}, {"type": "ValueError", "message": "ok is 2, not 1"}),
        ("sleep", {}, {"type": "ValueError", "message": "param 'seconds' (DOUBLE) is required"}),
        ("count", {}, {"type": "KeyError", "message": "'file'"}),
    ],
)
def test_a_delegate_exception_is_a_failed_step_never_an_http_error(api, step_type, params, error):
    response = api.post(P, {"steps": [{"type": step_type, "params": typed(**params)}]})
    process = ok(response, 201)
    failed = api.wait_process(process["processId"], "FAILED")
    assert failed["steps"][0]["error"] == error
    assert ok(api.post(RESTART, {"processStepId": failed["steps"][0]["processStepId"]}))["params"] is not None


def test_sleep_completes_with_how_long_it_slept(api):
    process = api.start(("sleep", {"seconds": 0.05}))
    step = api.wait_process(process["processId"], "COMPLETED")["steps"][0]
    assert step["result"] == {"slept": out("DOUBLE", 0.05)}
    elapsed = parse_time(step["finishedAt"]) - parse_time(step["startedAt"])
    assert elapsed.total_seconds() >= 0.04


def test_fail_without_a_message_still_fails(api):
    process = api.start(("fail", {}))
    error = api.wait_process(process["processId"], "FAILED")["steps"][0]["error"]
    assert error["type"] == "StepFailure" and error["message"]


def test_abort_fails_the_step(tmp_path, db_path):
    write_file(
        tmp_path,
        "aborting.py",
        'from stepd import Abort, delegate\n@delegate("abort")\ndef f(ctx):\n    raise Abort("stop now")\n',
    )
    app = create_app({"STEPD_DB": str(db_path), "STEPD_DELEGATES_PATH": str(tmp_path)})
    app.extensions["stepd"].store.add_token("t", "operator", hash_secret("s"))
    start_background(app)
    try:
        api = Api(app.test_client(), {"Authorization": "Bearer s"})
        process = api.start(("abort", {}))
        failed = api.wait_process(process["processId"], "FAILED")
        assert failed["steps"][0]["error"] == {"type": "Abort", "message": "stop now"}
    finally:
        stop_background(app, grace=1)


# -- an app with a bad delegate folder refuses to start --------------------------------------------
def test_create_app_refuses_a_bad_folder(tmp_path):
    write_file(tmp_path, "broken.py", "import no_such_module_anywhere\n")
    with pytest.raises(DelegateLoadError, match="broken.py"):
        create_app({"STEPD_DB": str(tmp_path / "x.db"), "STEPD_DELEGATES_PATH": str(tmp_path)})


def test_a_module_with_a_bad_policy_does_not_load_and_the_app_refuses_to_start(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "bad_policy.py").write_text(
        textwrap.dedent(
            """
            from stepd.delegates import delegate

            @delegate("impatient", retries=2, backoff=0.1)
            def impatient(ctx):
                '''Never loads.'''
            """
        )
    )
    with pytest.raises(DelegateLoadError, match=r"bad_policy\.py.*ValueError.*backoff"):
        load_registry(folder)
    with pytest.raises(DelegateLoadError, match=r"bad_policy\.py"):
        create_app({"STEPD_DB": str(tmp_path / "x.db"), "STEPD_DELEGATES_PATH": str(folder)})
