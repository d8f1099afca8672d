"""The delegate registry, discovery of built-in and user modules, and the built-in step types."""

import textwrap

import pytest

import delegates.builtin
from delegates import DelegateLoadError, load_registry

BUILTIN_TESTS = {}  # step type -> the test that covers it; a built-in without one fails a test


def covers(step_type):
    def mark(test):
        BUILTIN_TESTS[step_type] = test
        return test

    return mark


def write(folder, name, source):
    path = folder / name
    path.write_text(textwrap.dedent(source))
    return path


def test_builtins_are_registered_with_their_docstrings():
    registry = load_registry()
    assert {d.type: d.description for d in registry.all()} == {
        "noop": "Do nothing and complete.",
        "sleep": "Sleep for param `seconds` (DOUBLE), then complete.",
        "fail": "Fail with param `message` (STRING).",
    }


def test_every_builtin_delegate_has_a_test():
    builtin_types = {d.type for d in load_registry().all() if d.source == delegates.builtin.__file__}
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


def test_user_folder_is_loaded(tmp_path):
    write(
        tmp_path,
        "invoices.py",
        '''
        from delegates import delegate

        @delegate("invoice.send")
        def send(ctx):
            """Send the invoice.

            More text that is not part of the description.
            """
        ''',
    )
    registry = load_registry(tmp_path)
    assert registry.get("invoice.send").description == "Send the invoice."
    assert "noop" in registry


def test_an_imported_delegate_is_not_counted_twice(tmp_path):
    write(tmp_path, "reuse.py", "from delegates.builtin import noop  # imported, not defined here\n")
    assert [d.type for d in load_registry(tmp_path).all()] == ["fail", "noop", "sleep"]


def test_duplicate_type_names_both_files(tmp_path):
    source = 'from delegates import delegate\n@delegate("dup")\ndef f(ctx):\n    pass\n'
    first = write(tmp_path, "a.py", source)
    second = write(tmp_path, "b.py", source)
    with pytest.raises(DelegateLoadError) as refused:
        load_registry(tmp_path)
    assert str(first) in str(refused.value) and str(second) in str(refused.value)


def test_a_user_delegate_cannot_take_a_builtin_type(tmp_path):
    write(tmp_path, "mine.py", 'from delegates import delegate\n@delegate("noop")\ndef f(ctx):\n    pass\n')
    with pytest.raises(DelegateLoadError, match="noop"):
        load_registry(tmp_path)


def test_module_that_does_not_import_is_named(tmp_path):
    broken = write(tmp_path, "broken.py", "raise RuntimeError('boom at import')\n")
    with pytest.raises(DelegateLoadError) as refused:
        load_registry(tmp_path)
    assert str(broken) in str(refused.value)
    assert "boom at import" in str(refused.value)


def test_syntax_error_is_named(tmp_path):
    broken = write(tmp_path, "typo.py", "def f(:\n")
    with pytest.raises(DelegateLoadError, match="typo.py"):
        load_registry(tmp_path)
    assert broken.exists()


def test_missing_folder_is_refused(tmp_path):
    with pytest.raises(DelegateLoadError, match="not a directory"):
        load_registry(tmp_path / "nowhere")


def test_create_app_refuses_a_bad_folder(tmp_path):
    from app import create_app

    write(tmp_path, "broken.py", "import no_such_module_anywhere\n")
    with pytest.raises(DelegateLoadError, match="broken.py"):
        create_app({"STEPD_DB": str(tmp_path / "x.db"), "STEPD_DELEGATES_PATH": str(tmp_path)})


def test_registry_remove(tmp_path):
    registry = load_registry()
    registry.remove("noop")
    assert "noop" not in registry and registry.get("noop") is None


def test_delegate_needs_a_type():
    from delegates import delegate

    with pytest.raises(ValueError):
        delegate("")


def test_context_reaches_the_delegate(api):
    process = api.start(("echo", {"b": 1, "a": "x"}))
    step = api.wait_process(process["processId"], "COMPLETED")["steps"][0]
    values = {name: v[{"STRING": "strValue", "LONG": "longValue"}[v["type"]]] for name, v in step["result"].items()}
    assert values == {"process": process["processId"], "step": step["processStepId"], "attempt": 1, "names": "a,b"}


def test_abort_fails_the_step(tmp_path, db_path):
    from helpers import Api

    from app import create_app, start_background, stop_background
    from auth import hash_secret

    write(
        tmp_path,
        "aborting.py",
        'from delegates import Abort, delegate\n@delegate("abort")\ndef f(ctx):\n    raise Abort("stop now")\n',
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


def test_an_alias_of_a_delegate_is_not_a_duplicate(tmp_path):
    write(
        tmp_path,
        "alias.py",
        'from delegates import delegate\n@delegate("x.send")\ndef send(ctx):\n    """Send."""\nsend_again = send\n',
    )
    assert load_registry(tmp_path).get("x.send").description == "Send."
