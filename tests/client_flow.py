"""The whole flow of stepd through a Python client generated from its live OpenAPI document.

tests/test_served_client.py generates the client (the package `stepd_client`) with
openapi-python-client, checks this file with `mypy --strict`, then runs it against real gunicorn:

    python tests/client_flow.py URL TOKEN

It is the README's walkthrough and then every other operation, typed as a user of the client would
write it: `step.error.message`, a status filter that is the step's own `StepStatus`, a restart's
`RestartParams` where None removes a name, a typed value that is one of three forms. It exits
non-zero at the first answer that is not what the flow expects. It is not a test module: it needs
the generated package, which only the test makes.
"""

import sys
import time
from collections.abc import Callable
from typing import TypeVar

from stepd_client import AuthenticatedClient, Client
from stepd_client.api.processes import get_process, list_processes, start_process
from stepd_client.api.service import healthz, list_delegates
from stepd_client.api.steps import (
    complete_step,
    fail_step,
    get_step,
    list_steps,
    restart_failed_step,
    restart_failed_steps,
)
from stepd_client.models import (
    AttemptStatus,
    CompleteStep,
    DelegateListEnvelope,
    DoubleValue,
    DoubleValueType,
    ErrorInput,
    FailStep,
    FieldErrorsEnvelope,
    HealthEnvelope,
    LongValue,
    LongValueType,
    Params,
    Phase,
    Process,
    ProcessEnvelope,
    ProcessPageEnvelope,
    ProcessStatus,
    RestartMany,
    RestartManyResultEnvelope,
    RestartParams,
    RestartResultEnvelope,
    RestartStep,
    StartProcess,
    StepDetail,
    StepDetailEnvelope,
    StepEnvelope,
    StepFilter,
    StepPageEnvelope,
    StepSpec,
    StepStatus,
    StringValue,
    StringValueType,
    TextErrorEnvelope,
    Trigger,
)
from stepd_client.types import UNSET, Response

Answer = TypeVar("Answer")
Parsed = TypeVar("Parsed")


def expect(response: Response[Parsed], status: int, kind: type[Answer]) -> Answer:
    """The parsed answer, which must have this status and this type."""
    parsed = response.parsed
    if response.status_code != status or not isinstance(parsed, kind):
        sys.exit(f"expected {status} {kind.__name__}, got {response.status_code}: {response.content[:300]!r}")
    return parsed


def check(condition: bool, what: str) -> None:
    if not condition:
        sys.exit(f"not so: {what}")


def wait_for(read: Callable[[], Answer], done: Callable[[Answer], bool], what: str) -> Answer:
    """Read until `done` says yes, for 10 seconds at most."""
    deadline = time.monotonic() + 10
    while True:
        value = read()
        if done(value):
            return value
        if time.monotonic() > deadline:
            sys.exit(f"gave up waiting for {what}")
        time.sleep(0.05)


def process_of(client: AuthenticatedClient, process_id: str) -> Process:
    return expect(get_process.sync_detailed(client=client, process_id=process_id), 200, ProcessEnvelope).data


def step_of(client: AuthenticatedClient, step_id: str) -> StepDetail:
    return expect(get_step.sync_detailed(client=client, process_step_id=step_id), 200, StepDetailEnvelope).data


def string(text: str) -> StringValue:
    return StringValue(str_value=text, type_=StringValueType.STRING)


# -- the walkthrough: a step fails, is found, restarted with a corrected param, and completes --
def walkthrough(client: AuthenticatedClient) -> None:
    wrong = Params()
    wrong["seconds"] = string("ten")  # sleep needs a number
    wrong["note"] = string("a param the restart removes")
    body = StartProcess(
        name="generated client", steps=[StepSpec(type_="noop"), StepSpec(type_="sleep", params=wrong), StepSpec("noop")]
    )
    answer = start_process.sync_detailed(client=client, body=body, x_request_id="client-flow-start")
    check(answer.headers["X-Request-Id"] == "client-flow-start", "the request id comes back")
    process_id = expect(answer, 201, ProcessEnvelope).data.process_id

    failed = wait_for(lambda: process_of(client, process_id), lambda p: p.status == ProcessStatus.FAILED, "FAILED")
    error = failed.steps[1].error
    check(error is not None and error.message == "param 'seconds' must be a number, got str", "the step's error")

    page = expect(list_steps.sync_detailed(client=client, status=StepStatus.FAILED), 200, StepPageEnvelope).data
    [step_id] = [step.process_step_id for step in page.items if step.process_id == process_id]

    fix = RestartParams()
    fix["seconds"] = DoubleValue(double_value=0.1, type_=DoubleValueType.DOUBLE)
    fix["note"] = None  # removes the name
    dry = restart_failed_step.sync_detailed(client=client, body=RestartStep(step_id, params=fix), dry_run=True)
    check(expect(dry, 200, RestartResultEnvelope).data.params.additional_keys == ["seconds"], "the dry run's params")
    restarted = expect(
        restart_failed_step.sync_detailed(client=client, body=RestartStep(step_id, params=fix)),
        200,
        RestartResultEnvelope,
    ).data
    seconds = restarted.params["seconds"]
    check(isinstance(seconds, DoubleValue) and seconds.double_value == 0.1, "the effective params")

    wait_for(lambda: process_of(client, process_id), lambda p: p.status == ProcessStatus.COMPLETED, "COMPLETED")
    history = step_of(client, step_id).attempt_history
    check([a.trigger for a in history] == [Trigger.START, Trigger.RESTART], "the attempts' triggers")
    check([a.status for a in history] == [AttemptStatus.FAILED, AttemptStatus.COMPLETED], "the attempts' statuses")


# -- the rest: complete and fail a deferred step, bulk restart, paging, the service, errors ------
def deferred_step(client: AuthenticatedClient) -> str:
    """A step whose delegate (`external`, from tests/plugins) waits for complete-step or fail-step."""
    started = start_process.sync_detailed(client=client, body=StartProcess(steps=[StepSpec(type_="external")]))
    step_id = expect(started, 201, ProcessEnvelope).data.steps[0].process_step_id
    wait_for(lambda: step_of(client, step_id), lambda s: s.phase == Phase.DEFERRED, "DEFERRED")
    return step_id


def outside_work(client: AuthenticatedClient) -> None:
    result = Params()
    result["receipt"] = LongValue(long_value=42, type_=LongValueType.LONG)
    body = CompleteStep(deferred_step(client), result=result)
    completed = expect(complete_step.sync_detailed(client=client, body=body), 200, StepEnvelope).data
    receipt = completed.result["receipt"] if completed.result is not None else None
    check(isinstance(receipt, LongValue) and receipt.long_value == 42, "the completed step's result")

    body_fail = FailStep(deferred_step(client), error=ErrorInput(message="the carrier said no"))
    failed = expect(fail_step.sync_detailed(client=client, body=body_fail), 200, StepEnvelope).data
    check(failed.status == StepStatus.FAILED and failed.error is not None, "fail-step fails it")
    check(failed.error is not None and failed.error.type_ == "ExternalFailure", "the error's type")

    walk = RestartMany(filter_=StepFilter(process_id=failed.process_id))
    bulk = expect(restart_failed_steps.sync_detailed(client=client, body=walk), 200, RestartManyResultEnvelope).data
    check([r.process_step_id for r in bulk.restarted] == [failed.process_step_id], "the bulk restart")
    check(bulk.skipped == [] and bulk.next_cursor is None, "nothing skipped, nothing left")


def paging(client: AuthenticatedClient) -> None:
    seen: list[str] = []
    cursor: str | None = None
    while True:
        answer = list_processes.sync_detailed(client=client, limit=1, cursor=UNSET if cursor is None else cursor)
        page = expect(answer, 200, ProcessPageEnvelope).data
        seen += [p.process_id for p in page.items]
        cursor = page.next_cursor
        if cursor is None or len(seen) > 100:
            break
    check(len(seen) == len(set(seen)) >= 3, "every process once")


def service(client: AuthenticatedClient, url: str) -> None:
    health = expect(healthz.sync_detailed(client=Client(base_url=url)), 200, HealthEnvelope).data
    check(health.database == "ok" and health.runners >= 1, "the service is healthy")
    delegates = expect(list_delegates.sync_detailed(client=client), 200, DelegateListEnvelope).data
    check({"noop", "sleep", "fail"} <= {d.type_ for d in delegates}, "the built-in delegates")


def errors(client: AuthenticatedClient, url: str) -> None:
    missing = get_step.sync_detailed(client=client, process_step_id="NoSuchStep")
    check(expect(missing, 404, TextErrorEnvelope).message == "Not found", "an unknown step is 404")
    refused = restart_failed_step.sync_detailed(client=client, body=RestartStep("NoSuchStep"))
    field_errors = expect(refused, 412, FieldErrorsEnvelope).data
    check(field_errors["processStepId"] == ["No step has this id."], "a 412 names the field")
    stranger = AuthenticatedClient(base_url=url, token="not-a-token")
    unauthorized = list_processes.sync_detailed(client=stranger)
    check(unauthorized.headers["WWW-Authenticate"].startswith("Bearer"), "a 401 says how to authenticate")
    expect(unauthorized, 401, TextErrorEnvelope)


def main(url: str, token: str) -> None:
    client = AuthenticatedClient(base_url=url, token=token)
    walkthrough(client)
    outside_work(client)
    paging(client)
    service(client, url)
    errors(client, url)
    print("client flow: every operation answered as documented")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
