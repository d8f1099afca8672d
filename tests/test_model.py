"""The model module alone: ids, times, the typed-params codec, delegates' results."""

import math
import pickle
import re
import time
from dataclasses import fields
from datetime import UTC, datetime, timedelta, timezone

import pytest

from stepd.model import (
    FAILED,
    ID_PATTERN,
    Job,
    Outcome,
    PreconditionFailed,
    iso,
    new_id,
    params_from_json,
    params_to_json,
    plain_values,
    typed_result,
)


@pytest.mark.parametrize(
    ("outcome", "typed"),
    [
        (None, None),
        ({}, {}),
        ({"s": "x", "l": 5, "d": 0.5}, {"s": ("STRING", "x"), "l": ("LONG", 5), "d": ("DOUBLE", 0.5)}),
        ({"max": 2**63 - 1, "min": -(2**63)}, {"max": ("LONG", 2**63 - 1), "min": ("LONG", -(2**63))}),
    ],
)
def test_typed_result(outcome, typed):
    assert typed_result(outcome) == typed


@pytest.mark.parametrize(
    "outcome",
    [[1], "text", 5, {"b": True}, {"n": None}, {"big": 2**63}, {"nan": math.nan}, {"inf": math.inf}, {1: "x"}],
)
def test_untyped_results_are_refused(outcome):
    with pytest.raises(TypeError):
        typed_result(outcome)


def test_ids_are_url_safe_and_distinct():
    ids = {new_id() for _ in range(1000)}
    assert len(ids) == 1000 and all(re.fullmatch(ID_PATTERN, i) for i in ids)


def test_ids_sort_by_the_millisecond_they_were_made():
    earlier = [new_id() for _ in range(100)]
    time.sleep(0.002)
    later = new_id()
    assert all(len(i) == 22 and not i.startswith("-") for i in [*earlier, later])
    assert max(earlier) < later  # ASCII order: the alphabet is in its value order


def test_ids_of_one_millisecond_differ_in_their_random_part():
    ids = [new_id() for _ in range(2000)]
    assert len(set(ids)) == 2000
    assert len({i[7:] for i in ids}) == 2000  # the 42 bits of time are the first 7 characters


def test_times_are_utc_with_milliseconds_and_sort_as_text():
    later = datetime(2024, 3, 29, 15, 14, 52, 856999, tzinfo=timezone(timedelta(hours=2)))
    assert iso(later) == "2024-03-29T13:14:52.856Z"
    assert iso(datetime(2024, 3, 29, 13, 14, 52, 857000, tzinfo=UTC)) > iso(later)


def test_params_round_trip_through_json_with_their_types():
    params = {"s": ("STRING", "x"), "l": ("LONG", 2**63 - 1), "d": ("DOUBLE", 0.5)}
    assert params_from_json(params_to_json(params)) == params
    assert params_from_json(None) is None
    assert plain_values(params) == {"s": "x", "l": 2**63 - 1, "d": 0.5}
    with pytest.raises(ValueError):
        params_to_json({"nan": ("DOUBLE", math.nan)})


def test_no_params_read_back_as_a_new_empty_dict_each_time():
    """The empty params' shortcut (no JSON parse) gives what the parse gives, and never one shared dict."""
    first, second = params_from_json(params_to_json({})), params_from_json("{}")
    assert first == second == {} and first is not second
    first["x"] = ("LONG", 1)
    assert params_from_json("{}") == {}


def test_a_precondition_names_its_field_in_the_domain():
    assert PreconditionFailed.on("step_id", "No step has this id.").errors == {"step_id": ["No step has this id."]}
    assert repr(Job("s", "p", "t", {}, 2)) == "Job('s', attempt=2)"


def test_jobs_and_outcomes_travel_to_and_from_a_runner_whole():
    """channel.py pickles them; each spells its own fields (__reduce__): none may be lost, and a
    field added to Job or Outcome without being added there fails here."""
    job = Job(
        "step", "process", "noop", {"n": ("LONG", 1)}, 3, retries_used=2, results={0: {"x": ("STRING", "y")}},
        request_id="req",
    )  # fmt: skip
    error = {"type": "E", "message": "m"}
    outcome = Outcome(job, FAILED, result={"r": ("DOUBLE", 1.5)}, error=error, retry_at="t", quick=True)
    for value in (job, outcome):
        copy = pickle.loads(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))
        assert type(copy) is type(value)
        assert {f.name: getattr(copy, f.name) for f in fields(value)} == {
            f.name: getattr(value, f.name) for f in fields(value)
        }
        assert all(getattr(value, f.name) != f.default for f in fields(value))  # every field set, none at its default
