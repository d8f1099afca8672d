"""Every fixture of the suite (test files define none); what they share besides lives in helpers.py."""

import json
import os
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from helpers import (
    CHROMIUM,
    COMPLETE,
    ENV_SECRET,
    FAIL,
    FIGURES,
    GATED_COUNT,
    OPENAPI,
    OPERATOR_SECRET,
    PLUGINS,
    READER_SECRET,
    RESTART,
    SECOND_SECRET,
    SKIP,
    Api,
    Page,
    PostgresCluster,
    Server,
    basic,
    postgres_missing,
    queued_steps,
    wait_for,
)

from stepd import envelope, schemas
from stepd.app import create_app, start_background, stop_background
from stepd.auth import hash_secret
from stepd.db import Database
from stepd.service import remove_folders_of_gone_services
from stepd.store import Store

# Fixtures that start real service processes: a test that uses one is slow.
SERVICE_FIXTURES = {"server_factory", "served"}


def pytest_collection_modifyitems(items):
    """Mark `slow` every test that starts a service (`make test-fast` leaves them out): those of the
    test_served_* modules, and any other that uses a fixture which starts one."""
    for item in items:
        served_module = item.path.name.startswith("test_served_")
        if served_module or SERVICE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    """No STEPD_* variable of the machine leaks into a test."""
    for key in list(os.environ):
        if key.startswith("STEPD_"):
            monkeypatch.delenv(key)


@pytest.fixture(autouse=True)
def answers_dumped_as_marshmallow_dumps_them(monkeypatch):
    """Every answer an in-process app gives is dumped by schemas.dumper (marshmallow's work done
    once per schema): each is held here to marshmallow's own dump of the same payload, key order
    included (it is on the wire). A difference fails the test that made it, at its end."""
    differences = []

    def checking(schema_class, many=False):
        fast = schemas.dumper(schema_class, many)

        def dump(payload):
            dumped = fast(payload)
            expected = schemas.one(schema_class, many).dump(payload)
            if json.dumps(dumped) != json.dumps(expected):
                differences.append((schema_class.__name__, dumped, expected))
            return dumped

        return dump

    monkeypatch.setattr(envelope, "dumper", checking)
    yield
    assert not differences, f"schemas.dumper differs from marshmallow's dump: {differences[:3]}"


# -- the app in this process, through Flask's test client ------------------------------------
@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "stepd.db"


@pytest.fixture
def database(tmp_path):
    """A migrated db.Database on a file of its own (no app)."""
    database = Database(tmp_path / "s.db")
    database.prepare()
    return database


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
def page(client):
    """The operator page as the operator 'ops', with HTTP Basic (a browser's own prompt)."""
    return Page(client, {"Authorization": basic("ops", OPERATOR_SECRET)})


@pytest.fixture
def reader_page(app):
    """The operator page as the reader 'viewer', with HTTP Basic, on a test client of its own."""
    return Page(app.test_client(), {"Authorization": basic("viewer", READER_SECRET)})


@pytest.fixture
def store(app):
    return app.extensions["stepd"].store


@pytest.fixture
def second_operator(store):
    """Headers of a second operator token, 'ops2' (Bearer)."""
    store.add_token("ops2", "operator", hash_secret(SECOND_SECRET))
    return {"Authorization": f"Bearer {SECOND_SECRET}"}


@pytest.fixture
def second_operator_basic(second_operator):
    """Headers of the second operator token 'ops2', sent with HTTP Basic."""
    return {"Authorization": basic("ops2", SECOND_SECRET)}


@pytest.fixture(params=["override", "environment"])
def env_app(request, tmp_path, monkeypatch):
    """An app whose only token is STEPD_TOKEN=ENV_SECRET, given as a setting or in the environment."""
    settings = {"STEPD_DB": str(tmp_path / "env.db"), "STEPD_DELEGATES_PATH": str(PLUGINS)}
    if request.param == "override":
        settings["STEPD_TOKEN"] = ENV_SECRET
    else:
        monkeypatch.setenv("STEPD_TOKEN", ENV_SECRET)
    app = create_app(settings)
    start_background(app)
    yield app
    stop_background(app, grace=2)


@pytest.fixture
def fresh_app(tmp_path):
    """An app whose routes a test may still add to (no request has been served yet); STEPD_TOKEN=ENV_SECRET."""
    return create_app({"STEPD_DB": str(tmp_path / "fresh" / "stepd.db"), "STEPD_TOKEN": ENV_SECRET})


@pytest.fixture
def corpus_app(tmp_path):
    """(app, database file) for the injection corpus: STEPD_TOKEN=ENV_SECRET and a reader 'someone'."""
    db = tmp_path / "corpus.db"
    app = create_app({"STEPD_DB": str(db), "STEPD_DELEGATES_PATH": str(PLUGINS), "STEPD_TOKEN": ENV_SECRET})
    app.extensions["stepd"].store.add_token("someone", "reader", hash_secret("someone-secret"))
    start_background(app)
    yield app, db
    stop_background(app, grace=1)


@pytest.fixture(scope="module")
def module_client(tmp_path_factory):
    """One app for a whole module (hypothesis runs hundreds of examples; an app each would be too
    slow): its test client, as the STEPD_TOKEN principal 'env' (ENV_HEADERS)."""
    db = tmp_path_factory.mktemp("module") / "stepd.db"
    app = create_app({"STEPD_DB": str(db), "STEPD_DELEGATES_PATH": str(PLUGINS), "STEPD_TOKEN": ENV_SECRET})
    start_background(app)
    yield app.test_client()
    stop_background(app, grace=1)


# -- steps in a given state ------------------------------------------------------------------
@pytest.fixture
def gate(tmp_path, app):
    """A file path a `wait` step waits for; created at teardown so no delegate is left running."""
    path = tmp_path / "gate"
    yield path
    path.touch()
    runner = app.extensions["stepd"].runner
    wait_for(lambda: runner._busy == 0, timeout=5, what="delegates to finish")


@pytest.fixture
def counted(tmp_path):
    """The file the `count` and `retry_*` delegates write a line per call to (see helpers.calls)."""
    return tmp_path / "calls.txt"


@pytest.fixture
def failed_step(api):
    """A FAILED `check` step (ok=0), followed by a PENDING `noop`."""
    process = api.start(("check", {"ok": 0}), ("noop", {}))
    return api.wait_process(process["processId"], "FAILED")["steps"][0]


@pytest.fixture
def failed_check_step(api):
    """A FAILED `check` step whose params are ok=0, keep="k", ratio=0.5, followed by a `noop`."""
    process = api.start(("check", {"ok": 0, "keep": "k", "ratio": 0.5}), ("noop", {}))
    return api.wait_process(process["processId"], "FAILED")["steps"][0]


@pytest.fixture
def deferred_step(api):
    """A STARTED `external` step its delegate has deferred, followed by a PENDING `noop`."""
    process = api.start(("external", {"job": "j-1"}), ("noop", {}))
    return api.wait_deferred(process["steps"][0]["processStepId"])


@pytest.fixture(params=["restart", "fail", "complete", "skip"])
def action_step(request, api):
    """(path, step): an action endpoint on a step id and a step it would accept."""
    if request.param in ("restart", "skip"):
        process = api.start(("check", {"ok": 0}))
        step = api.wait_process(process["processId"], "FAILED")["steps"][0]
        return {"restart": RESTART, "skip": SKIP}[request.param], step
    process = api.start(("external", {}))
    step = api.wait_deferred(process["steps"][0]["processStepId"])
    return {"fail": FAIL, "complete": COMPLETE}[request.param], step


@pytest.fixture
def target(request, api):
    """A params target of test_api_params.py, built for this test from the class it is
    parametrized with: @pytest.mark.parametrize("target", [...], indirect=True)."""
    return request.param(api)


# -- the OpenAPI document ----------------------------------------------------------------------
@pytest.fixture
def spec(client):
    response = client.get(OPENAPI)
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    return response.json


@pytest.fixture
def scenario(api):
    """A completed process, a failed one, and one waiting on a deferred step."""
    done = api.start(("results", {}), ("noop", {}), name="done")
    failed = api.start(("check", {"ok": 0, "note": "x"}), ("noop", {}))
    waiting = api.start(("external", {"ratio": 0.5}), ("noop", {}))
    api.wait_process(done["processId"], "COMPLETED")
    failed = api.wait_process(failed["processId"], "FAILED")
    api.wait_deferred(waiting["steps"][0]["processStepId"])
    return {
        "done": done["processId"],
        "done_step": done["steps"][0]["processStepId"],
        "failed_step": failed["steps"][0]["processStepId"],
        "waiting_step": waiting["steps"][0]["processStepId"],
    }


# -- real gunicorn ---------------------------------------------------------------------------
@pytest.fixture(scope="session")
def default_service(tmp_path_factory):
    """The service `served` hands out: started once, at its first use, and stopped at the end."""
    server = Server(db_path=tmp_path_factory.mktemp("served") / "served.db").start()
    yield server
    server.stop()


@pytest.fixture
def served(default_service):
    """One real service with Server's defaults (2 HTTP workers, 1 runner of 4 threads, the delegates
    of tests/plugins, STEPD_TOKEN: the principal 'env'), shared by every test of the session that
    only uses it: such a test does not stop, kill, restart or reconfigure it, and keeps to its own
    processes (never all of the database's) and to the log lines written while it ran
    (`offset = len(served.output())` first). Each test leaves it idle: nothing it started queued."""
    assert default_service.proc.poll() is None, f"the shared service stopped:\n{default_service.output()[-3000:]}"
    yield default_service
    assert default_service.proc.poll() is None, "a test stopped the shared service"
    wait_for(lambda: not queued_steps(default_service.env["STEPD_DB"]), timeout=60, what="its queue to empty")


# -- a real browser: Playwright driving Debian's chromium ------------------------------------------------
@pytest.fixture(scope="session")
def chromium():
    """Debian's chromium (/usr/bin/chromium), driven by Playwright (no `playwright install`). Where it
    is not installed the browser tests are skipped, saying so; under CI (which installs it, .ci/run)
    they fail instead."""
    if not Path(CHROMIUM).exists():
        why = f"{CHROMIUM} is not installed: sudo apt-get install -y chromium (.ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(f"CI needs the browser tests: {why}")
        pytest.skip(why)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        yield browser
        browser.close()


@pytest.fixture
def browse(chromium, served):
    """Opens pages of the shared service, each in a browser context of its own (its own cookies):
    browse() as the operator 'env' (HTTP Basic, answered as the browser's prompt would be),
    browse(None) with no credentials. Every request any of them makes is recorded
    (`browse.requests`), and one to any host but 127.0.0.1 is refused; at the end none may have
    been made."""
    contexts, seen, outside = [], [], []

    def guard(route):
        if urlsplit(route.request.url).hostname == "127.0.0.1":
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    def open_page(credentials=("env", served.token)):
        login = {"username": credentials[0], "password": credentials[1]} if credentials else None
        context = chromium.new_context(base_url=served.url, http_credentials=login)
        context.on("request", lambda request: seen.append(request))
        context.route("**/*", guard)
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(15_000)
        return page

    open_page.requests = seen
    yield open_page
    for context in contexts:
        context.close()
    assert not outside, f"requests to another host than 127.0.0.1: {outside}"
    assert all(urlsplit(request.url).hostname == "127.0.0.1" for request in seen)


@pytest.fixture
def server_factory(tmp_path):
    """Start real gunicorn servers; every one still running is killed at the end of the test."""
    servers = []

    def make(**kwargs):
        kwargs.setdefault("db_path", tmp_path / "served.db")
        server = Server(**kwargs)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.discard()


@pytest.fixture
def gated_delegates(tmp_path):
    """The test delegates of tests/plugins plus `gated_count` (helpers.GATED_COUNT), as a user's
    delegate folder."""
    folder = tmp_path / "delegates"
    folder.mkdir()
    for module in PLUGINS.glob("*.py"):
        (folder / module.name).write_text(module.read_text())
    (folder / "gated.py").write_text(GATED_COUNT)
    return folder


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs of our own, so filling it up harms nothing else (needs root)."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(mount_point)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


@pytest.fixture
def app_with(tmp_path):
    """Builds an app with these settings and its own runner, as the `app` fixture does; returns
    (app, an operator Api). Each one is stopped at the end of the test."""
    apps = []

    def make(**settings):
        made = create_app(
            {"STEPD_DB": str(tmp_path / f"app{len(apps)}.db"), "STEPD_DELEGATES_PATH": str(PLUGINS), **settings}
        )
        made.extensions["stepd"].store.add_token("ops", "operator", hash_secret(OPERATOR_SECRET))
        start_background(made)
        apps.append(made)
        return made, Api(made.test_client(), {"Authorization": f"Bearer {OPERATOR_SECRET}"})

    yield make
    for made in apps:
        stop_background(made, grace=0.5)


# -- PostgreSQL: a server of the tests' own ------------------------------------------------------
@pytest.fixture(scope="session")
def postgres_cluster():
    """A PostgreSQL 15 cluster for this test process (helpers.PostgresCluster), started at its first
    use and stopped at the end. Where Debian's postgresql-15 is not installed the tests that need it
    are skipped, saying so; under CI (which installs it, .ci/run) they fail instead."""
    why = postgres_missing()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"CI needs the PostgreSQL tests: {why}")
        pytest.skip(why)
    cluster = PostgresCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def postgres_url(postgres_cluster):
    """The URL of a fresh, empty database of the session's cluster, dropped after the test."""
    url = postgres_cluster.new_database()
    yield url
    postgres_cluster.drop_database(url)


# -- the store's contract suite: one factory per backend ----------------------------------------
def sqlite_backend(request):
    """SQLite: a file of the test's own, migrated; each store opened on it has a Database (so a
    connection, and a writer) of its own."""
    path = request.getfixturevalue("tmp_path") / "contract.db"
    Database(path).prepare()
    return lambda: Store(Database(path))


def postgres_backend(request):
    """PostgreSQL: a fresh database of the test process's cluster, migrated; each store opened on it
    has a PostgresDatabase (so connections, and a writer) of its own, as another node would. Each is
    closed at the end of the test, before the database is dropped."""
    from stepd.postgres import PostgresDatabase  # psycopg: for the PostgreSQL tests only

    url = request.getfixturevalue("postgres_url")
    PostgresDatabase(url).prepare()
    opened = []

    def open_one():
        database = PostgresDatabase(url)
        opened.append(database)
        return Store(database)

    request.addfinalizer(lambda: [database.close() for database in opened])
    return open_one


# Every backend the store's contract suite (test_store.py) runs against: a factory each, called with
# the test's request (to ask for the fixtures it needs: postgres_backend asks for postgres_url),
# returning what opens stores on one fresh, migrated database of its own. A backend joins the suite
# by its factory's being added here; the tests' ids name it (`[sqlite]`, `[postgres]`).
STORE_BACKENDS = [sqlite_backend, postgres_backend]


@pytest.fixture(params=STORE_BACKENDS, ids=lambda backend: backend.__name__.removesuffix("_backend"))
def open_store(request):
    """Opens stores on one fresh, migrated database of each backend; each call is another
    connection to it, as another worker process would have."""
    return request.param(request)


@pytest.fixture
def contract_store(open_store):
    """A store of the contract suite, on a fresh database of each backend."""
    return open_store()


def pytest_sessionfinish(session):
    """In a test process of pytest-xdist (`make test` runs two): hand this process's reliability
    figures to the main one. Then delete the metrics folders of the services the tests killed
    (SIGKILL leaves them in the temporary folder; the next `stepd serve` would delete them too)."""
    if hasattr(session.config, "workeroutput"):
        session.config.workeroutput["stepd_figures"] = json.dumps(FIGURES)
    remove_folders_of_gone_services(Path(tempfile.gettempdir()))


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """In pytest-xdist's main process: gather the figures each test process reported."""
    for name, text in json.loads(getattr(node, "workeroutput", {}).get("stepd_figures", "{}")).items():
        FIGURES[name] = f"{FIGURES[name]} | {text}" if name in FIGURES else text  # both, never one lost


def pytest_terminal_summary(terminalreporter):
    """The reliability figures of this run (docs/design.md says what each test checks; BENCHMARKS.md
    keeps dated figures), if those tests ran."""
    if FIGURES:
        terminalreporter.section("reliability figures")
        for name, text in sorted(FIGURES.items()):
            terminalreporter.write_line(f"{name}: {text}")
