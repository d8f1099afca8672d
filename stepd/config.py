"""Settings from STEPD_* environment variables, with their defaults (the README's Configuration)."""

import math
import os

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
    for key in ("STEPD_DB", "STEPD_DELEGATES_PATH"):
        if settings[key]:
            settings[key] = os.path.abspath(settings[key])
    return settings


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
