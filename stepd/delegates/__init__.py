"""Step delegates: the `@delegate` decorator, the context a delegate gets, and discovery.

A delegate is a plain function marked with ``@delegate("type")``. Marking does not
register anything globally: `load_registry` scans the built-in modules of this
package and every ``.py`` file of the user's folder and builds a fresh `Registry`.
That keeps tests independent and lets a module be loaded twice without conflicts.

A delegate module writes ``from stepd import delegate``. The user's folder is put at the end of
the import path, and each of its modules is imported under its own name (``invoices.py`` as
``invoices``), so a delegate module imports a helper beside it as any Python module would
(``from _rates import RATE``, ``from config import Config``: stepd's own modules all live inside
the ``stepd`` package, so the user's ``config.py``, ``db.py`` or ``app.py`` is the user's own).
Files whose name starts with ``_`` are not scanned for delegates: they are helpers, loaded when a
delegate module imports them. A module whose name a library or the standard library already
has (``json.py``, ``requests.py``) would never be the one imported: it stops the start, naming
both files.

``from delegates import delegate``, as stepd taught before it was one package, still loads: the
name ``delegates`` is served by `LegacyImport` (when nothing else on the path has it), which
says once in the log that it is deprecated.
"""

import functools
import importlib
import importlib.abc
import importlib.util
import inspect
import logging
import math
import pkgutil
import random
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "Abort",
    "Context",
    "Delegate",
    "DelegateLoadError",
    "Registry",
    "RetryPolicy",
    "delegate",
    "load_registry",
]

_MARK = "_stepd_delegate_type"
_RETRY = "_stepd_retry_policy"
_TIMEOUT = "_stepd_timeout"


class DelegateLoadError(Exception):
    """A delegate module does not import, or two delegates claim one type."""


class Abort(Exception):
    """Raise to fail a step at once, with this message, whatever its retry policy."""


@dataclass(frozen=True)
class RetryPolicy:
    """How often, and how long after, a step whose delegate raised is retried by itself.

    Retry n (0 for the first) waits a random time between half and all of
    min(max_delay, delay * backoff**n) seconds: the jitter spreads out retries of many
    steps that failed together (say, when the service they call went down).
    """

    retries: int = 0
    backoff: float = 2.0
    delay: float = 1.0
    max_delay: float = 300.0

    def __post_init__(self):
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or self.retries < 0:
            raise ValueError(f"retries must be a whole number >= 0, not {self.retries!r}")
        for name in ("backoff", "delay", "max_delay"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number of seconds, not {value!r}")
        if self.backoff < 1:
            raise ValueError(f"backoff must be >= 1, not {self.backoff!r}")
        if not 0 <= self.delay <= self.max_delay:
            raise ValueError(f"need 0 <= delay <= max_delay, not delay={self.delay!r}, max_delay={self.max_delay!r}")

    def seconds_before(self, retry_number):
        """How long to wait before automatic retry number `retry_number` (0-based)."""
        try:
            ceiling = min(self.max_delay, self.delay * self.backoff**retry_number)
        except OverflowError:
            ceiling = self.max_delay
        return random.uniform(ceiling / 2, ceiling)


class _Deferred:
    """Returned by `Context.defer`: the step waits for complete-step or fail-step."""

    def __repr__(self):
        return "DEFERRED"


DEFERRED = _Deferred()


def delegate(step_type, retries=0, backoff=2.0, delay=1.0, max_delay=300.0, timeout=None):
    """Mark a function as the delegate for `step_type`.

    With `retries`, a step whose delegate raises is retried by itself, up to that many
    times (see RetryPolicy for the waits), before it is FAILED for an operator. With
    `timeout` (seconds), an attempt still running that long after its delegate was called
    fails with error type `Timeout` (and its `ctx.cancelled` is set); without it,
    STEPD_STEP_TIMEOUT applies, if set.
    """
    if not isinstance(step_type, str) or not step_type:
        raise ValueError("delegate() needs a non-empty step type")
    policy = RetryPolicy(retries, backoff, delay, max_delay)
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, int | float) or not math.isfinite(timeout) or timeout <= 0
    ):
        raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")

    def mark(fn):
        setattr(fn, _MARK, step_type)
        setattr(fn, _RETRY, policy)
        setattr(fn, _TIMEOUT, timeout)
        return fn

    return mark


def _no_results():
    return {}


@dataclass
class Context:
    """What a delegate receives: plain params and where it runs.

    `cancelled` is set when the attempt was ended from outside while the delegate runs (a
    timeout, fail-step, a cancel of its process): its outcome will be ignored, so a long
    delegate may check it and stop.

    `results` and `variables` are what the earlier steps of its process produced, read from the
    database on first use (`load_results`), so a restarted step sees them as they are now.
    """

    params: dict
    process_id: str
    step_id: str
    attempt: int
    log: logging.LoggerAdapter = field(repr=False)
    cancelled: threading.Event = field(default_factory=threading.Event, repr=False)
    # () -> {position: {name: plain value}} of the earlier steps that have a result
    load_results: object = field(default=_no_results, repr=False)

    @functools.cached_property
    def results(self):
        """{position (int): {name: value}} of each earlier step that has a result (a returned
        dict, or the result it was skipped with), in position order."""
        return dict(sorted(self.load_results().items()))

    @functools.cached_property
    def variables(self):
        """Every earlier result merged in position order: {name: value}, a later step's name winning."""
        merged = {}
        for result in self.results.values():
            merged.update(result)
        return merged

    def defer(self):
        """Leave the step STARTED until complete-step or fail-step says how it ended."""
        return DEFERRED


@dataclass(frozen=True)
class Delegate:
    type: str
    fn: object
    source: str  # the file it was defined in, for error messages
    retry: RetryPolicy = RetryPolicy()
    timeout: float | None = None  # seconds, or None: STEPD_STEP_TIMEOUT (if set) applies

    @property
    def description(self):
        doc = inspect.getdoc(self.fn) or ""
        return doc.splitlines()[0] if doc else ""


class Registry:
    """Delegates keyed by step type; refuses a second delegate for one type."""

    def __init__(self):
        self._by_type = {}

    def add(self, step_type, fn, source, retry=RetryPolicy(), timeout=None):
        existing = self._by_type.get(step_type)
        if existing is not None:
            raise DelegateLoadError(f"two delegates for step type {step_type!r}: {existing.source} and {source}")
        self._by_type[step_type] = Delegate(step_type, fn, source, retry, timeout)

    def remove(self, step_type):
        self._by_type.pop(step_type, None)

    def get(self, step_type):
        return self._by_type.get(step_type)

    def __contains__(self, step_type):
        return step_type in self._by_type

    def all(self):
        return sorted(self._by_type.values(), key=lambda d: d.type)


def _add_module(registry, module):
    source = getattr(module, "__file__", None) or module.__name__
    for value in vars(module).values():
        step_type = getattr(value, _MARK, None)
        # Count a function only where it is defined, not where it is imported.
        if step_type and getattr(value, "__module__", None) == module.__name__:
            existing = registry.get(step_type)
            if existing is not None and existing.fn is value:
                continue  # the same function under a second name (an alias), not a second delegate
            registry.add(
                step_type, value, source, getattr(value, _RETRY, RetryPolicy()), getattr(value, _TIMEOUT, None)
            )


def _builtin_modules():
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            yield importlib.import_module(f"{__name__}.{info.name}")


_user_folder = {"path": None}  # the folder the last load put on sys.path (a process loads one at a time)


def _use_folder(root):
    """Put `root` at the end of sys.path instead of the folder of an earlier load (the tests load
    many), and forget the modules imported from that one, so this load imports its own."""
    previous = _user_folder["path"]
    if previous is not None:
        if previous in sys.path:
            sys.path.remove(previous)
        for name, module in list(sys.modules.items()):
            if Path(getattr(module, "__file__", None) or "/").is_relative_to(previous):
                del sys.modules[name]
    sys.path.append(str(root))
    _user_folder["path"] = str(root)
    importlib.invalidate_caches()  # files written since the last look at the folder


def _name_problem(path):
    """Why the user's module `path` cannot be imported under its own name, or None. Another module
    of that name on the path (stepd's, a library's) would be imported instead, as the user's folder
    is last."""
    if "." in path.stem:
        return f"delegate module {path}: a module's name has no dot in it: rename it"
    try:
        origin = getattr(importlib.util.find_spec(path.stem), "origin", None)
    except ValueError:  # a module loaded without a spec, such as __main__
        origin = getattr(sys.modules[path.stem], "__file__", None) or f"the module {path.stem}"
    if origin is None or Path(origin).resolve() == path.resolve():
        return None
    return f"delegate module {path} has the name of {origin}, which is imported instead: rename it"


def _import(name, path):
    try:
        return importlib.import_module(name)
    except Exception as exc:
        sys.modules.pop(name, None)
        raise DelegateLoadError(f"delegate module {path} does not import: {type(exc).__name__}: {exc}") from exc


def _user_modules(folder):
    """The delegate modules of the user's folder, imported; every module that clashes or does not
    import is named in one DelegateLoadError, so one start shows them all."""
    root = Path(folder).resolve()
    if not root.is_dir():
        raise DelegateLoadError(f"STEPD_DELEGATES_PATH {folder} is not a directory")
    _use_folder(root)
    problems, modules = [], []
    for path in sorted(root.glob("*.py")):
        problem = _name_problem(path)
        if problem is not None:
            problems.append(problem)
        elif not path.name.startswith("_"):
            try:
                modules.append(_import(path.stem, path))
            except DelegateLoadError as exc:
                problems.append(str(exc))
    if problems:
        raise DelegateLoadError("\n".join(problems))
    return modules


class LegacyImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves `import delegates` (the import stepd taught before it was one package) as this
    module's public names, and logs once that it is deprecated. Last on sys.meta_path: a module
    named `delegates` anywhere on the path (the user's own) wins over it."""

    NAME = "delegates"
    said_by_another = False  # under `stepd serve` its main process said it: its children stay quiet

    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name == self.NAME else None

    def create_module(self, spec):
        return None  # the default module object

    def exec_module(self, module):
        this = sys.modules[__name__]
        module.__dict__.update({name: getattr(this, name) for name in __all__})
        module.__all__ = list(__all__)
        level = logging.DEBUG if LegacyImport.said_by_another else logging.WARNING
        logging.getLogger("stepd.delegates").log(
            level,
            "%s imports `delegates`, which is deprecated: write `from stepd import delegate` instead",
            _importer() or "a delegate module",
        )


def _importer():
    """The file of the code whose import statement is being run, for the deprecation line."""
    frame = sys._getframe(1)
    while frame is not None:
        name = frame.f_code.co_filename
        if not name.startswith("<frozen") and name != __file__:
            return name
        frame = frame.f_back
    return None


def _serve_legacy_name():
    if not any(isinstance(finder, LegacyImport) for finder in sys.meta_path):
        sys.meta_path.append(LegacyImport())


def load_registry(user_folder=None):
    """Build the registry from the built-in delegates and, if given, the user's folder."""
    _serve_legacy_name()
    registry = Registry()
    for module in _builtin_modules():
        _add_module(registry, module)
    if user_folder:
        for module in _user_modules(user_folder):
            _add_module(registry, module)
    return registry
