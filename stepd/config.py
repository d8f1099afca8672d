"""Settings from STEPD_* environment variables, with their defaults (the README's Configuration)."""

import math
import os
import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

DEFAULTS = {
    "STEPD_DB": "var/stepd.db",
    "STEPD_HOST": "127.0.0.1",
    "STEPD_PORT": "8080",
    "STEPD_WORKERS": "2",
    "STEPD_THREADS": "4",
    "STEPD_TOKEN": "",
    "STEPD_DELEGATES_PATH": "",
    "STEPD_LOG_LEVEL": "INFO",
    "STEPD_SYNC": "full",
    "STEPD_RUNNERS": "1",
    "STEPD_STEP_TIMEOUT": "",
    "STEPD_LOG_FORMAT": "text",
    "STEPD_RETENTION_DAYS": "",
    "STEPD_SECRET_KEY": "",  # signs the operator page's cookies; unset: the one kept in the database
}
INTEGERS = {"STEPD_PORT": (1, 65535), "STEPD_WORKERS": (1, 64), "STEPD_THREADS": (1, 256), "STEPD_RUNNERS": (0, 64)}
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# full: fsync on every commit, nothing acknowledged is lost even on power loss.
# normal: fsync at WAL checkpoints only; a crash of the service loses nothing, power loss may
# lose the last commits.
SYNC_MODES = ("full", "normal")
# text: lines for people; json: one JSON object a line, for a log collector (logs.py).
LOG_FORMATS = ("text", "json")
# STEPD_DB: a path (or sqlite:///path) is an SQLite file; a URL of these schemes is a PostgreSQL
# database (SPEC 12), as libpq spells it (postgresql://user:password@host:5432/name?options).
POSTGRES_SCHEMES = ("postgresql", "postgres")
URL_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


class ConfigError(ValueError):
    """A STEPD_* variable holds a value the service cannot use."""


def from_env(environ=None):
    """Read every STEPD_* setting; integers become ints; a variable set to "" counts as unset."""
    environ = os.environ if environ is None else environ
    settings = {key: environ.get(key) or default for key, default in DEFAULTS.items()}
    for key, (low, high) in INTEGERS.items():
        try:
            settings[key] = int(settings[key])
        except ValueError:
            raise ConfigError(f"{key} must be a whole number, not {settings[key]!r}") from None
        if not low <= settings[key] <= high:
            raise ConfigError(f"{key} must be between {low} and {high}, not {settings[key]}")
    settings["STEPD_LOG_LEVEL"] = settings["STEPD_LOG_LEVEL"].upper()
    if settings["STEPD_LOG_LEVEL"] not in LOG_LEVELS:
        raise ConfigError(f"STEPD_LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}")
    settings["STEPD_STEP_TIMEOUT"] = _positive("STEPD_STEP_TIMEOUT", settings["STEPD_STEP_TIMEOUT"], "seconds")
    settings["STEPD_RETENTION_DAYS"] = _positive("STEPD_RETENTION_DAYS", settings["STEPD_RETENTION_DAYS"], "days")
    settings["STEPD_SYNC"] = settings["STEPD_SYNC"].lower()
    if settings["STEPD_SYNC"] not in SYNC_MODES:
        raise ConfigError(f"STEPD_SYNC must be one of {', '.join(SYNC_MODES)}")
    settings["STEPD_LOG_FORMAT"] = settings["STEPD_LOG_FORMAT"].lower()
    if settings["STEPD_LOG_FORMAT"] not in LOG_FORMATS:
        raise ConfigError(f"STEPD_LOG_FORMAT must be one of {', '.join(LOG_FORMATS)}")
    # A relative path means one in the folder of the process that reads it; `stepd serve` passes
    # its children the absolute path, so the service started from any folder uses one database.
    settings["STEPD_DB"] = database(settings["STEPD_DB"])
    if settings["STEPD_DELEGATES_PATH"]:
        settings["STEPD_DELEGATES_PATH"] = os.path.abspath(settings["STEPD_DELEGATES_PATH"])
    return settings


def database(text):
    """STEPD_DB as the rest of stepd reads it: an SQLite file's absolute path (from a path or from
    sqlite:///path, where a fourth slash starts an absolute path, as SQLAlchemy reads it), or a
    PostgreSQL URL as it was given. Any other URL is refused."""
    match = URL_SCHEME.match(text)
    if match is None:
        return os.path.abspath(text)
    scheme = match.group(1).lower()
    if scheme in POSTGRES_SCHEMES:
        return text
    rest = text[match.end() :]  # after "sqlite://": an empty host, then the path
    if scheme == "sqlite" and rest.startswith("/") and len(rest) > 1:
        return os.path.abspath(rest[1:])
    if scheme == "sqlite":
        raise ConfigError(f"STEPD_DB={text} names no file: sqlite:///relative/path or sqlite:////absolute/path")
    raise ConfigError(
        f"STEPD_DB must be a file path, sqlite:///path or postgresql://user:password@host/db, not a {scheme}:// URL"
    )


def is_postgres(db):
    """Whether STEPD_DB (as from_env left it) names a PostgreSQL database rather than an SQLite file."""
    match = URL_SCHEME.match(db)
    return match is not None and match.group(1).lower() in POSTGRES_SCHEMES


def shown_database(db):
    """STEPD_DB as it may be said in a line or a log: a PostgreSQL URL's password (in its user part or
    as a password= option) replaced by ***; a path as it is."""
    if not is_postgres(db):
        return db
    parts = urlsplit(db)
    netloc = parts.netloc
    if "@" in netloc:
        user, _, host = netloc.rpartition("@")
        if ":" in user:
            user = user.split(":", 1)[0] + ":***"
        netloc = f"{user}@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, "***" if k == "password" else v) for k, v in pairs], safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def log_format(environ=None):
    """STEPD_LOG_FORMAT if it is usable, else 'text': the format to say even a bad setting in."""
    environ = os.environ if environ is None else environ
    chosen = (environ.get("STEPD_LOG_FORMAT") or "text").lower()
    return chosen if chosen in LOG_FORMATS else "text"


def _positive(key, text, unit):
    """A positive, finite number of `unit` (fractions allowed), or None when unset."""
    if not text:
        return None
    try:
        number = float(text)
    except ValueError:
        raise ConfigError(f"{key} must be a number of {unit}, not {text!r}") from None
    if not math.isfinite(number) or number <= 0:
        raise ConfigError(f"{key} must be a positive number of {unit}, not {text!r}")
    return number
