from helpers import DELEGATES


def test_seed_flow(api):
    process = api.start(("noop", {}), ("check", {"ok": 0}), ("noop", {}))
    failed = api.wait_process(process["processId"], "FAILED")
    step = failed["steps"][1]
    assert step["error"] == {"type": "ValueError", "message": "ok is 0, not 1"}
    restarted = api.restart(step["processStepId"], ok=1)
    assert restarted.status_code == 200
    api.wait_process(process["processId"], "COMPLETED")


def test_gunicorn_serves(server_factory):
    server = server_factory().start()
    assert server.get(DELEGATES).status_code == 200
