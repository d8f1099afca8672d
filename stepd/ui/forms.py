"""The operator page's forms: typed params as rows of inputs and back, a reason, the fields a
412 names, and what changed between two attempts' params.

Values are checked by the API's own schemas (schemas.TypedValueSchema, ParamName, Text), so the
page accepts exactly what the API accepts; the errors are keyed by the form field they belong to.
"""

import re
from dataclasses import dataclass, field

from marshmallow import ValidationError

from stepd import schemas as s
from stepd.model import MAX_PARAMS, MAX_REASON, VALUE_TYPES

BLANK_ROWS = 3  # empty rows under a step's params, to add params (or a skip's result) with
ROW = re.compile(r"^([pn][0-9]{1,3})-name$")  # p0, p1...: a param the step has; n0, n1...: a new one
WHOLE_NUMBER = re.compile(r"[+-]?[0-9]{1,20}")
NUMBER = re.compile(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]{1,4})?")
FORM = "_form"  # the key of errors that belong to no one field


@dataclass
class Row:
    """One param as the form shows it: `key` names its inputs (`p0-name`, `p0-type`, `p0-value`,
    `p0-remove`); `existing` rows show a param the step has, the others add one."""

    key: str
    name: str = ""
    type: str = "STRING"
    value: str = ""
    remove: bool = False

    @property
    def existing(self):
        return self.key.startswith("p")

    @property
    def blank(self):
        return not self.existing and not self.name.strip() and not self.value

    @property
    def long(self):
        """Whether the value needs a text area (it has a line break, or is long)."""
        return "\n" in self.value or len(self.value) > 120


@dataclass
class FormState:
    """One action form as a page shows it: its rows (if it edits params), what was typed, the
    errors by field, and the Idempotency-Key it carries."""

    key: str
    rows: list = field(default_factory=list)
    values: dict = field(default_factory=dict)
    errors: dict = field(default_factory=dict)
    preview: dict | None = None  # a dry run's effective params

    def error(self, name):
        return self.errors.get(name, [])


def shown(kind, value):
    """A typed value as text in an input: LONG and DOUBLE as JSON writes them, STRING as it is."""
    if kind == "DOUBLE":
        return repr(float(value))
    return str(value)


def rows_of(params, blank=BLANK_ROWS):
    """The rows of a params editor: one per param (by name), then `blank` empty ones."""
    named = sorted(params.items())
    rows = [Row(f"p{n}", name, kind, shown(kind, value)) for n, (name, (kind, value)) in enumerate(named)]
    return rows + [Row(f"n{n}") for n in range(blank)]


def rows_from(form):
    """The rows a posted form holds, in their order (at most MAX_PARAMS + BLANK_ROWS are read)."""
    keys = [match.group(1) for name in form if (match := ROW.match(name))]
    rows = []
    for key in sorted(set(keys), key=lambda k: (k[0] != "p", int(k[1:])))[: MAX_PARAMS + BLANK_ROWS]:
        rows.append(
            Row(
                key,
                name=form.get(f"{key}-name", ""),
                type=form.get(f"{key}-type", "STRING"),
                value=form.get(f"{key}-value", ""),
                remove=form.get(f"{key}-remove") == "on",
            )
        )
    return rows


def typed_value(kind, text):
    """(TYPE, value) from an input's text, checked as the API checks a typed value."""
    if kind not in VALUE_TYPES:
        raise ValidationError(f"Must be one of {', '.join(VALUE_TYPES)}.")
    if kind == "LONG":
        if not WHOLE_NUMBER.fullmatch(text.strip()):
            raise ValidationError("Not a whole number: a LONG is an integer such as 42 or -7.")
        value = int(text.strip())
    elif kind == "DOUBLE":
        if not NUMBER.fullmatch(text.strip()):
            raise ValidationError("Not a number: a DOUBLE is written like 0.5, 3 or 1e-3.")
        value = float(text.strip())
    else:
        value = text
    try:
        return s.one(s.TypedValueSchema).load({"type": kind, s.VALUE_FIELD[kind]: value})
    except ValidationError as exc:
        raise ValidationError([m for messages in exc.messages.values() for m in messages]) from None


def params_from(rows):
    """({name: (TYPE, value), or None to remove it}, errors by field) from a params editor's rows.

    Blank new rows are left out; a new row may not reuse a name another row has."""
    params, errors = {}, {}
    for row in rows:
        if row.blank:
            continue
        try:
            name = s.ParamName().deserialize(row.name)
        except ValidationError as exc:
            errors[f"{row.key}-name"] = exc.messages
            continue
        if name in params:
            errors[f"{row.key}-name"] = [f"{name!r} is given twice: change that param's own row instead."]
            continue
        if row.existing and row.remove:
            params[name] = None
            continue
        try:
            params[name] = typed_value(row.type, row.value)
        except ValidationError as exc:
            errors[f"{row.key}-value"] = exc.messages
    if len([value for value in params.values() if value is not None]) > MAX_PARAMS:
        errors.setdefault("params", []).append(f"At most {MAX_PARAMS} names are allowed.")
    return params, errors


def reason_from(form, errors):
    """A cancel's or skip's reason (None when empty); a fault goes into `errors`."""
    try:
        return s.Text(MAX_REASON, allow_none=True).deserialize(form.get("reason") or None)
    except ValidationError as exc:
        errors["reason"] = exc.messages
        return None


# What a 412 from the engine names (model.PreconditionFailed), and where the page shows it.
SHOWN_AT = {"params": "params", "result": "params", "reason": "reason"}


def placed(errors):
    """The engine's field errors keyed by where the form shows them (the rest: above the form)."""
    out = {}
    for name, messages in errors.items():
        out.setdefault(SHOWN_AT.get(name, FORM), []).extend(messages)
    return out


def changes(before, after):
    """What changed from one attempt's params to the next: [(name, 'added'|'removed'|'changed', old, new)]."""
    names = sorted(set(before) | set(after))
    out = []
    for name in names:
        old, new = before.get(name), after.get(name)
        if old == new:
            continue
        out.append((name, "added" if old is None else "removed" if new is None else "changed", old, new))
    return out
