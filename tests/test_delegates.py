"""The delegates package alone: the registry, discovery of built-in and user modules, retry policies."""

import importlib.util
import json
import logging
import random
import sys
from pathlib import Path

import pytest
from helpers import write_file

from stepd.delegates import DelegateLoadError, RetryPolicy, delegate, load_registry


# -- the registry and discovery --------------------------------------------------------------------
def test_builtins_are_registered_with_their_docstrings():
    registry = load_registry()
    assert {d.type: d.description for d in registry.all()} == {
        "noop": "Do nothing and complete.",
        "sleep": "Sleep for param `seconds` (DOUBLE), then complete.",
        "fail": "Fail with param `message` (STRING).",
    }


def test_user_folder_is_loaded(tmp_path):
    write_file(
        tmp_path,
        "invoices.py",
        '''
        from stepd.delegates import delegate

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
    write_file(tmp_path, "reuse.py", "from stepd.delegates.builtin import noop  # imported, not defined here\n")
    assert [d.type for d in load_registry(tmp_path).all()] == ["fail", "noop", "sleep"]


def test_duplicate_type_names_both_files(tmp_path):
    source = 'from stepd import delegate\n@delegate("dup")\ndef f(ctx):\n    pass\n'
    first = write_file(tmp_path, "a.py", source)
    second = write_file(tmp_path, "b.py", source)
    with pytest.raises(DelegateLoadError) as refused:
        load_registry(tmp_path)
    assert str(first) in str(refused.value) and str(second) in str(refused.value)


def test_a_user_delegate_cannot_take_a_builtin_type(tmp_path):
    write_file(tmp_path, "mine.py", 'from stepd import delegate\n@delegate("noop")\ndef f(ctx):\n    pass\n')
    with pytest.raises(DelegateLoadError, match="noop"):
        load_registry(tmp_path)


def test_module_that_does_not_import_is_named(tmp_path):
    broken = write_file(tmp_path, "broken.py", "raise RuntimeError('boom at import')\n")
    with pytest.raises(DelegateLoadError) as refused:
        load_registry(tmp_path)
    assert str(broken) in str(refused.value)
    assert "boom at import" in str(refused.value)


def test_syntax_error_is_named(tmp_path):
    broken = write_file(tmp_path, "typo.py", "def f(:\n")
    with pytest.raises(DelegateLoadError, match="typo.py"):
        load_registry(tmp_path)
    assert broken.exists()


def test_every_module_that_does_not_import_is_named_at_once(tmp_path):
    fine = write_file(tmp_path, "fine.py", 'from stepd import delegate\n@delegate("fine")\ndef f(ctx):\n    pass\n')
    broken = write_file(tmp_path, "broken.py", "raise RuntimeError('boom at import')\n")
    typo = write_file(tmp_path, "typo.py", "def f(:\n")
    missing = write_file(tmp_path, "missing.py", "import no_such_module_anywhere\n")
    with pytest.raises(DelegateLoadError) as refused:
        load_registry(tmp_path)
    message = str(refused.value)
    for path in (broken, typo, missing):
        assert str(path) in message, message
    assert "boom at import" in message and "no_such_module_anywhere" in message
    assert str(fine) not in message


# -- a user's folder: its modules import each other; none may take a name already on the path -------
def test_a_delegate_module_imports_a_helper_beside_it(tmp_path):
    write_file(tmp_path, "_rates.py", "RATE = 3\n")  # a `_` module is only a helper: not scanned for delegates
    write_file(
        tmp_path,
        "invoices.py",
        """
        from _rates import RATE
        from stepd.delegates import delegate

        @delegate("invoice.send")
        def send(ctx):
            return {"rate": RATE}
        """,
    )
    registry = load_registry(tmp_path)
    assert registry.get("invoice.send").fn(None) == {"rate": 3}


def test_a_helper_imported_by_two_delegate_modules_is_one_module(tmp_path):
    write_file(tmp_path, "shared.py", "calls = []\n")
    for name in ("first", "second"):
        write_file(tmp_path, f"{name}.py", f"import shared\n\nshared.calls.append({name!r})\n")
    load_registry(tmp_path)
    assert sys.modules["shared"].calls == ["first", "second"]


def test_a_later_load_of_another_folder_uses_that_folders_modules(tmp_path):
    for folder, value in (("one", 1), ("two", 2)):
        (tmp_path / folder).mkdir()
        write_file(tmp_path / folder, "_value.py", f"VALUE = {value}\n")
        write_file(
            tmp_path / folder,
            "values.py",
            "from _value import VALUE\nfrom stepd import delegate\n\n\n"
            '@delegate("value")\ndef f(ctx):\n    return VALUE\n',
        )
    assert load_registry(tmp_path / "one").get("value").fn(None) == 1
    assert load_registry(tmp_path / "two").get("value").fn(None) == 2
    assert str(tmp_path / "one") not in sys.path


@pytest.mark.parametrize(
    ("name", "theirs"),
    [
        # stepd's own modules all live inside the stepd package: these names are the user's.
        ("config.py", None),
        ("store.py", None),
        ("app.py", None),
        ("db.py", None),
        ("delegates.py", None),
        ("_helpers_of_mine.py", None),
        ("json.py", Path(json.__file__)),
        ("flask.py", Path(importlib.util.find_spec("flask").origin)),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_a_module_named_as_one_already_on_the_path_is_refused_naming_both(tmp_path, name, theirs):
    mine = write_file(tmp_path, name, "X = 1\n")
    if theirs is None:  # not a clash: loads
        load_registry(tmp_path)
        return
    with pytest.raises(DelegateLoadError) as refused:
        load_registry(tmp_path)
    assert str(mine) in str(refused.value) and str(theirs) in str(refused.value), refused.value


def test_a_module_whose_name_has_a_dot_is_refused(tmp_path):
    dotted = write_file(tmp_path, "my.tools.py", "X = 1\n")
    with pytest.raises(DelegateLoadError, match="no dot") as refused:
        load_registry(tmp_path)
    assert str(dotted) in str(refused.value)


def test_a_clash_and_a_broken_module_are_named_in_one_start(tmp_path):
    clash = write_file(tmp_path, "json.py", "X = 1\n")
    broken = write_file(tmp_path, "broken.py", "raise RuntimeError('boom')\n")
    with pytest.raises(DelegateLoadError) as refused:
        load_registry(tmp_path)
    assert str(clash) in str(refused.value) and str(broken) in str(refused.value)


def test_a_delegate_imports_the_users_own_config_db_and_app_modules(tmp_path):
    """The user's application has a config.py (the most common top-level name there is), a db.py
    and an app.py; a delegate that imports its billing module gets the user's, not stepd's."""
    write_file(tmp_path, "_support.py", "")
    write_file(tmp_path, "config.py", "class Config:\n    RATE = 7\n")
    write_file(tmp_path, "db.py", "NAME = 'users db'\n")
    write_file(tmp_path, "app.py", "TITLE = 'users app'\n")
    write_file(
        tmp_path,
        "billing.py",
        "from config import Config\nimport db, app\n\n\ndef total():\n    return Config.RATE, db.NAME, app.TITLE\n",
    )
    write_file(
        tmp_path,
        "invoices.py",
        "import billing\nfrom stepd import delegate\n\n\n"
        '@delegate("invoice.total")\ndef f(ctx):\n    return billing.total()\n',
    )
    assert load_registry(tmp_path).get("invoice.total").fn(None) == (7, "users db", "users app")


def test_the_old_delegates_import_still_loads_and_says_once_it_is_deprecated(tmp_path, caplog):
    for name in ("old_one.py", "old_two.py"):
        write_file(
            tmp_path,
            name,
            "from delegates import delegate, Abort\n\n\n"
            f'@delegate("{name[:-3]}", retries=1)\ndef f(ctx):\n    raise Abort("no")\n',
        )
    sys.modules.pop("delegates", None)  # as in a fresh process
    with caplog.at_level(logging.WARNING, logger="stepd.delegates"):
        registry = load_registry(tmp_path)
        load_registry(tmp_path)
    assert registry.get("old_one").retry.retries == 1 and registry.get("old_two") is not None
    deprecations = [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()]
    assert len(deprecations) == 1, deprecations
    assert "from stepd import delegate" in deprecations[0] and "old_one.py" in deprecations[0]
    assert sys.modules["delegates"].delegate is delegate


def test_missing_folder_is_refused(tmp_path):
    with pytest.raises(DelegateLoadError, match="not a directory"):
        load_registry(tmp_path / "nowhere")


def test_registry_remove(tmp_path):
    registry = load_registry()
    registry.remove("noop")
    assert "noop" not in registry and registry.get("noop") is None


def test_delegate_needs_a_type():
    from stepd.delegates import delegate

    with pytest.raises(ValueError):
        delegate("")


def test_an_alias_of_a_delegate_is_not_a_duplicate(tmp_path):
    write_file(
        tmp_path,
        "alias.py",
        'from stepd import delegate\n@delegate("x.send")\ndef send(ctx):\n    """Send."""\nsend_again = send\n',
    )
    assert load_registry(tmp_path).get("x.send").description == "Send."


# -- retry policies --------------------------------------------------------------------------------
def test_seconds_before_lies_in_half_to_all_of_the_capped_exponential_ceiling():
    policy = RetryPolicy(retries=5, backoff=3.0, delay=0.5, max_delay=10.0)
    for n, ceiling in enumerate([0.5, 1.5, 4.5, 10.0, 10.0]):
        waits = [policy.seconds_before(n) for _ in range(400)]
        assert all(ceiling / 2 <= w <= ceiling for w in waits), (n, min(waits), max(waits))
        # jitter: spread over the window, not one fixed value
        assert min(waits) < ceiling * 0.6 and max(waits) > ceiling * 0.9, (n, min(waits), max(waits))


def test_seconds_before_of_a_huge_retry_number_is_capped_not_an_overflow():
    policy = RetryPolicy(retries=10**6, backoff=10.0, delay=1.0, max_delay=60.0)
    assert all(30.0 <= policy.seconds_before(10**5) <= 60.0 for _ in range(50))


def test_zero_delay_retries_at_once():
    assert RetryPolicy(retries=2, delay=0, max_delay=0).seconds_before(3) == 0


def test_the_default_policy_has_no_retries():
    assert RetryPolicy() == RetryPolicy(0, 2.0, 1.0, 300.0)


BAD_POLICIES = [
    {"retries": -1},
    {"retries": 1.5},
    {"retries": True},
    {"retries": "3"},
    {"backoff": 0.5},
    {"backoff": float("nan")},
    {"backoff": "2"},
    {"delay": -0.1},
    {"delay": float("inf")},
    {"delay": True},
    {"delay": 10.0, "max_delay": 5.0},
    {"max_delay": float("nan")},
]


@pytest.mark.parametrize("kwargs", BAD_POLICIES, ids=repr)
def test_a_bad_policy_is_a_value_error_at_decoration(kwargs):
    with pytest.raises(ValueError):
        delegate("x", **kwargs)


def test_random_jitter_is_used_not_a_fixed_point(monkeypatch):
    monkeypatch.setattr(random, "uniform", lambda low, high: (low, high))
    assert RetryPolicy(retries=3, backoff=2.0, delay=1.0, max_delay=3.0).seconds_before(2) == (1.5, 3.0)


# -- the context: results of the earlier steps (SPEC 10) ---------------------------------------------
def test_results_are_loaded_once_when_first_asked_for_and_merged_in_position_order():
    from stepd.delegates import Context

    loads = []

    def load():
        loads.append(1)
        return {2: {"invoice": "INV-2", "sent": 1}, 0: {"invoice": "INV-1", "amount": 5}}

    ctx = Context(params={}, process_id="p", step_id="s", attempt=1, log=None, load_results=load)
    assert loads == []  # a delegate that never looks costs no read
    assert ctx.results == {0: {"invoice": "INV-1", "amount": 5}, 2: {"invoice": "INV-2", "sent": 1}}
    assert list(ctx.results) == [0, 2]
    assert ctx.variables == {"invoice": "INV-2", "amount": 5, "sent": 1}  # a later step's name wins
    assert loads == [1]


def test_a_context_without_results_has_empty_ones():
    from stepd.delegates import Context

    ctx = Context(params={}, process_id="p", step_id="s", attempt=1, log=None)
    assert (ctx.results, ctx.variables) == ({}, {})
