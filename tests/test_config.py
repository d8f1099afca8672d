"""STEPD_* settings: defaults, parsing, refusals."""

import os

import pytest

from stepd import config


def test_defaults_are_those_of_the_spec():
    assert config.from_env({}) == {
        "STEPD_DB": os.path.abspath("var/stepd.db"),
        "STEPD_HOST": "127.0.0.1",
        "STEPD_PORT": 8080,
        "STEPD_WORKERS": 2,
        "STEPD_THREADS": 4,
        "STEPD_RUNNERS": 1,
        "STEPD_STEP_TIMEOUT": None,
        "STEPD_RETENTION_DAYS": None,
        "STEPD_TOKEN": "",
        "STEPD_DELEGATES_PATH": "",
        "STEPD_LOG_LEVEL": "INFO",
        "STEPD_SYNC": "full",
        "STEPD_LOG_FORMAT": "text",
        "STEPD_SECRET_KEY": "",
    }


def test_relative_paths_are_resolved_once_against_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = config.from_env({"STEPD_DB": "data/s.db", "STEPD_DELEGATES_PATH": "mine"})
    assert settings["STEPD_DB"] == str(tmp_path / "data" / "s.db")
    assert settings["STEPD_DELEGATES_PATH"] == str(tmp_path / "mine")
    assert config.from_env({"STEPD_DB": "/abs/s.db"})["STEPD_DB"] == "/abs/s.db"


def test_empty_values_count_as_unset():
    empty = {key: "" for key in config.DEFAULTS}
    assert config.from_env(empty) == config.from_env({})


def test_values_are_read():
    settings = config.from_env({"STEPD_PORT": "9000", "STEPD_WORKERS": "3", "STEPD_LOG_LEVEL": "debug"})
    assert (settings["STEPD_PORT"], settings["STEPD_WORKERS"], settings["STEPD_LOG_LEVEL"]) == (9000, 3, "DEBUG")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("STEPD_PORT", "http"),
        ("STEPD_PORT", "70000"),
        ("STEPD_WORKERS", "0"),
        ("STEPD_THREADS", "x"),
        ("STEPD_LOG_LEVEL", "LOUD"),
        ("STEPD_SYNC", "off"),
        ("STEPD_LOG_FORMAT", "yaml"),
        ("STEPD_RETENTION_DAYS", "0"),
        ("STEPD_RETENTION_DAYS", "-1"),
        ("STEPD_RETENTION_DAYS", "a week"),
        ("STEPD_RETENTION_DAYS", "inf"),
        ("STEPD_RETENTION_DAYS", "nan"),
    ],
)
def test_bad_values_are_refused_naming_the_variable(key, value):
    with pytest.raises(config.ConfigError, match=key):
        config.from_env({key: value})


def test_log_format_is_read_in_any_case_and_a_bad_one_says_itself_in_text():
    assert config.from_env({"STEPD_LOG_FORMAT": "JSON"})["STEPD_LOG_FORMAT"] == "json"
    assert config.log_format({"STEPD_LOG_FORMAT": "json"}) == "json"
    assert config.log_format({"STEPD_LOG_FORMAT": "yaml"}) == "text"


@pytest.mark.parametrize(("text", "days"), [("30", 30.0), ("0.5", 0.5), ("1e-5", 1e-5), (" 7 ", 7.0)])
def test_retention_days_are_a_positive_number_fractions_allowed(text, days):
    assert config.from_env({"STEPD_RETENTION_DAYS": text})["STEPD_RETENTION_DAYS"] == days


def test_a_bad_retention_is_one_line_naming_the_variable_and_the_value():
    with pytest.raises(config.ConfigError) as refused:
        config.from_env({"STEPD_RETENTION_DAYS": "-2"})
    assert str(refused.value) == "STEPD_RETENTION_DAYS must be a positive number of days, not '-2'"


@pytest.mark.parametrize(("value", "pragma"), [("full", 2), ("NORMAL", 1)])
def test_sync_setting_reaches_sqlite(tmp_path, value, pragma):
    from stepd.db import Database

    settings = config.from_env({"STEPD_SYNC": value})
    database = Database(tmp_path / "s.db", settings["STEPD_SYNC"])
    assert database.connection().execute("PRAGMA synchronous").fetchone()[0] == pragma


# -- STEPD_DB: a path, sqlite:///path or a PostgreSQL URL --------------------------------------------
@pytest.mark.parametrize(
    ("value", "path"),
    [
        ("data/s.db", "data/s.db"),  # a relative path, as ever
        ("sqlite:///data/s.db", "data/s.db"),  # three slashes: relative (SQLAlchemy's reading)
        ("sqlite:////abs/s.db", "/abs/s.db"),  # a fourth: absolute
        ("SQLite:////abs/s.db", "/abs/s.db"),
    ],
)
def test_a_path_or_an_sqlite_url_is_an_sqlite_file(tmp_path, monkeypatch, value, path):
    monkeypatch.chdir(tmp_path)
    db = config.from_env({"STEPD_DB": value})["STEPD_DB"]
    assert db == str(tmp_path / path) if not path.startswith("/") else db == path
    assert not config.is_postgres(db)


@pytest.mark.parametrize(
    "url", ["postgresql://stepd:pw@db.example:5432/stepd", "postgres://db/stepd", "POSTGRESQL://u@h/d?sslmode=require"]
)
def test_a_postgresql_url_is_kept_as_given_and_selects_postgresql(url):
    db = config.from_env({"STEPD_DB": url})["STEPD_DB"]
    assert db == url and config.is_postgres(db)


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("mysql://u@h/d", "not a mysql:// URL"),
        ("postgresql+psycopg://u@h/d", "not a postgresql+psycopg:// URL"),
        ("sqlite://", "names no file"),
        ("sqlite:///", "names no file"),
        ("sqlite://host/s.db", "names no file"),
    ],
)
def test_any_other_database_url_is_refused_in_one_line(value, why):
    with pytest.raises(config.ConfigError, match="STEPD_DB") as refused:
        config.from_env({"STEPD_DB": value})
    assert why in str(refused.value) and "\n" not in str(refused.value)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://stepd:s3cret@db:5432/stepd", "postgresql://stepd:***@db:5432/stepd"),
        ("postgresql://stepd@db/stepd", "postgresql://stepd@db/stepd"),
        ("postgres://db/stepd?password=s3cret&sslmode=require", "postgres://db/stepd?password=***&sslmode=require"),
        ("postgresql://u:p%40ss@db/d", "postgresql://u:***@db/d"),
        ("/var/lib/stepd/stepd.db", "/var/lib/stepd/stepd.db"),
    ],
)
def test_a_database_is_said_without_its_password(url, shown):
    assert config.shown_database(url) == shown
