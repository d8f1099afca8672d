import pytest
from helpers import FIGURES, PLUGINS, Api, Server, wait_for

from app import create_app, start_background, stop_background
from auth import hash_secret
from db import Database
from store import Store

OPERATOR_SECRET = "operator-secret-for-tests"
READER_SECRET = "reader-secret-for-tests"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    """No STEPD_* variable of the machine leaks into a test."""
    import os

    for key in list(os.environ):
        if key.startswith("STEPD_"):
            monkeypatch.delenv(key)


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "stepd.db"


@pytest.fixture
def app(db_path):
    app = create_app({"STEPD_DB": str(db_path), "STEPD_DELEGATES_PATH": str(PLUGINS), "STEPD_THREADS": 4})
    store = app.extensions["stepd"].store
    store.add_token("ops", "operator", hash_secret(OPERATOR_SECRET))
    store.add_token("viewer", "reader", hash_secret(READER_SECRET))
    start_background(app)
    yield app
    stop_background(app, grace=2)


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def api(client):
    """Calls as the operator token 'ops'."""
    return Api(client, {"Authorization": f"Bearer {OPERATOR_SECRET}"})


@pytest.fixture
def reader_api(client):
    return Api(client, {"Authorization": f"Bearer {READER_SECRET}"})


@pytest.fixture
def gate(tmp_path, app):
    """A file path a `wait` step waits for; created at teardown so no delegate is left running."""
    path = tmp_path / "gate"
    yield path
    path.touch()
    runner = app.extensions["stepd"].runner
    wait_for(lambda: runner._busy == 0, timeout=5, what="delegates to finish")


@pytest.fixture
def store(app):
    return app.extensions["stepd"].store


@pytest.fixture
def server_factory(tmp_path):
    """Start real gunicorn servers; every one is stopped at the end of the test."""
    servers = []

    def make(**kwargs):
        kwargs.setdefault("db_path", tmp_path / "served.db")
        server = Server(**kwargs)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


# Every backend the store's contract suite (test_store.py) runs against.
STORE_BACKENDS = ["sqlite"]


@pytest.fixture(params=STORE_BACKENDS)
def open_store(request, tmp_path):
    """Opens stores on one fresh, migrated database of each backend; each call is another
    connection to it, as another worker process would have."""
    path = tmp_path / "contract.db"
    Database(path).prepare()
    return lambda: Store(Database(path))


@pytest.fixture
def contract_store(open_store):
    """A store of the contract suite, on a fresh database of each backend."""
    return open_store()


def pytest_terminal_summary(terminalreporter):
    """The reliability figures of this run (README, section Reliability), if those tests ran."""
    if FIGURES:
        terminalreporter.section("reliability figures")
        for name, text in sorted(FIGURES.items()):
            terminalreporter.write_line(f"{name}: {text}")
