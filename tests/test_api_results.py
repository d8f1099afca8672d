"""Results flow forward (SPEC 10): ctx.results and ctx.variables for delegates, and `variables` on
the process resource, in typed output form."""

import json

from helpers import RESTART, SKIP, STEPS, db_write, ok, out, typed


def consumed(step):
    """What a `consume` step saw: (ctx.results, ctx.variables, the positions with their types)."""
    result = step["result"]
    return (
        json.loads(result["results"]["strValue"]),
        json.loads(result["variables"]["strValue"]),
        result["positions"]["strValue"],
    )


def test_a_delegate_sees_each_earlier_result_by_position_and_their_merge(api):
    process = api.start(
        ("produce", {"invoice": "INV-1", "amount": 12, "rate": 0.5}),
        ("noop", {}),  # returns None: no result, so no entry
        ("produce", {"invoice": "INV-2"}),  # a later step's name wins in the merge
        ("consume", {}),
    )
    done = api.wait_process(process["processId"], "COMPLETED")
    results, variables, positions = consumed(done["steps"][3])
    assert results == {"0": {"invoice": "INV-1", "amount": 12, "rate": 0.5}, "2": {"invoice": "INV-2"}}
    assert variables == {"invoice": "INV-2", "amount": 12, "rate": 0.5}
    assert positions == "int:0,int:2"  # ctx.results is keyed by int positions, in position order


def test_the_first_step_sees_no_results(api):
    process = api.start(("consume", {}))
    done = api.wait_process(process["processId"], "COMPLETED")
    assert consumed(done["steps"][0]) == ({}, {}, "")


def test_a_step_uses_the_result_of_the_one_before(api):
    process = api.start(("produce", {"invoice": "INV-7"}), ("need", {"name": "invoice"}))
    done = api.wait_process(process["processId"], "COMPLETED")
    assert done["steps"][1]["result"] == {"got": out("STRING", "INV-7")}


def test_the_process_has_its_variables_in_typed_output_form(api):
    process = api.start(("produce", {"a": "x", "n": 1}), ("produce", {"n": 2, "r": 1.5}))
    assert process["variables"] == {}  # nothing has a result yet
    done = api.wait_process(process["processId"], "COMPLETED")
    assert done["variables"] == {"a": out("STRING", "x"), "n": out("LONG", 2), "r": out("DOUBLE", 1.5)}
    assert list(done["variables"]) == ["a", "n", "r"]


def test_a_process_without_results_has_empty_variables(api):
    process = api.start(("noop", {}), ("noop", {}))
    assert api.wait_process(process["processId"], "COMPLETED")["variables"] == {}


def test_a_skipped_step_result_flows_forward_and_into_the_variables(api):
    process = api.start(("produce", {"invoice": "INV-1"}), ("check", {"ok": 0}), ("consume", {}))
    failed = api.wait_process(process["processId"], "FAILED")["steps"][1]
    ok(api.post(SKIP, {"processStepId": failed["processStepId"], "result": typed(invoice="INV-9", sent=1)}))
    done = api.wait_process(process["processId"], "COMPLETED")
    results, variables, _ = consumed(done["steps"][2])
    assert results == {"0": {"invoice": "INV-1"}, "1": {"invoice": "INV-9", "sent": 1}}
    assert variables == {"invoice": "INV-9", "sent": 1}
    assert done["variables"]["invoice"] == out("STRING", "INV-9")


def test_a_step_skipped_without_a_result_provides_none(api):
    process = api.start(("produce", {"v": "a"}), ("check", {"ok": 0}), ("consume", {}))
    failed = api.wait_process(process["processId"], "FAILED")["steps"][1]
    ok(api.post(SKIP, {"processStepId": failed["processStepId"]}))
    done = api.wait_process(process["processId"], "COMPLETED")
    assert consumed(done["steps"][2])[0] == {"0": {"v": "a"}}


def test_a_restart_sees_the_results_as_they_are_now(api, db_path):
    """Results are read when the attempt runs, not kept from the first attempt: a restart after an
    earlier step's result changed (here, written into the file directly) sees the new one."""
    process = api.start(("produce", {"v": "old"}), ("need", {"name": "w"}))
    failed = api.wait_process(process["processId"], "FAILED")["steps"][1]
    assert failed["error"]["type"] == "KeyError"
    first = process["steps"][0]["processStepId"]
    db_write(db_path, "UPDATE steps SET result = ? WHERE id = ?", json.dumps({"w": ["STRING", "new"]}), first)
    ok(api.post(RESTART, {"processStepId": failed["processStepId"]}))
    done = api.wait_process(process["processId"], "COMPLETED")
    assert done["steps"][1]["result"] == {"got": out("STRING", "new")}
    assert done["steps"][1]["attempts"] == 2


def test_a_failed_or_later_step_provides_no_result(api):
    """Only earlier steps count: a consume step does not see its own earlier attempts or later steps."""
    process = api.start(("produce", {"v": 1}), ("consume", {}), ("produce", {"later": 1}))
    done = api.wait_process(process["processId"], "COMPLETED")
    assert consumed(done["steps"][1])[0] == {"0": {"v": 1}}
    step = ok(api.get(f"{STEPS}/{done['steps'][1]['processStepId']}"))
    assert step["result"]["positions"] == out("STRING", "int:0")
