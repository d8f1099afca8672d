"""Idempotency-Key: a POST sent again with the same key gets its first answer, and nothing is redone.

The key's answer is kept in the database (store.stored_answer / store_answer) for
store.ANSWER_KEPT_SECONDS, in the same transaction as the change it reports; the runners
delete the answers that no longer count (store.forget_answers), twice a minute.
"""

import functools
import hashlib
import json
import re

from flask import current_app, request
from marshmallow import ValidationError

from stepd.auth import current_principal
from stepd.errors import answer_for
from stepd.model import PreconditionFailed, now_iso

IDEMPOTENCY_HEADER = "Idempotency-Key"
MAX_KEY = 255  # characters of a key, each printable ASCII (KEY_PATTERN); the OpenAPI document says both
KEY_PATTERN = r"^[ -~]+$"
_KEY = re.compile(KEY_PATTERN)
EXTENSION = "stepd.idempotency"


def init_app(app, store):
    """Keep `app`'s Idempotency-Key answers in `store`."""
    app.extensions[EXTENSION] = store


class _Undo(Exception):
    """Carries an answer that decided nothing out of an idempotent request's transaction, which
    it rolls back, so that the answer is not kept for the key."""

    def __init__(self, response):
        super().__init__(response.status_code)
        self.response = response


def idempotent(view):
    """Answer a repeated POST with the same Idempotency-Key from the database, not by redoing it.

    The key's answer is stored in the same transaction as the change it made, and the
    transaction holds the write lock from the look-up on: concurrent repeats, in any worker,
    queue behind the first and then find its answer. Kept for 24 hours: a 2xx, and a 412 from
    a check of the state (say, the step is not FAILED). Not kept, as they decided nothing: the
    refusal of input that could not be read (412 on the body or query, 413) and any 5xx; the
    request, corrected or not, can be sent again with the same key (as Stripe does).
    """

    @functools.wraps(view)
    def run(*args, **kwargs):
        key = request.headers.get(IDEMPOTENCY_HEADER)
        if key is None:
            return view(*args, **kwargs)
        if not 1 <= len(key) <= MAX_KEY or not _KEY.fullmatch(key):
            raise ValidationError({IDEMPOTENCY_HEADER: [f"Must be 1 to {MAX_KEY} printable ASCII characters."]})
        fingerprint = request_fingerprint()
        principal = current_principal().name
        store = current_app.extensions[EXTENSION]
        try:
            with store.atomic():
                stored = store.stored_answer(principal, key)
                if stored is not None:
                    return replay(stored, fingerprint, key)
                response, decided = answer_of(view, args, kwargs)
                if not decided:
                    raise _Undo(response)
                store.store_answer(principal, key, fingerprint, response.status_code, response.get_data(True))
                return response
        except _Undo as undo:
            return undo.response

    run.idempotent = True  # the OpenAPI document lists the header for this view
    return run


def request_fingerprint():
    """What makes two requests the same one: method, path, query and JSON body (key order aside)."""
    raw = request.get_data(cache=True)
    try:
        body = json.dumps(json.loads(raw), sort_keys=True, separators=(",", ":"))
    except (ValueError, RecursionError):
        body = raw.hex()
    query = sorted(request.args.items(multi=True))
    text = json.dumps([request.method, request.path, query, body])
    return hashlib.sha256(text.encode("utf-8", "backslashreplace")).hexdigest()


def answer_of(view, args, kwargs):
    """(the view's response, whether it decided something): exceptions become their error
    responses as Flask would make them; those errors.ERRORS marks `kept` (a state check's 412)
    count as a decision."""
    try:
        return current_app.make_response(view(*args, **kwargs)), True
    except Exception as exc:  # noqa: BLE001 - each error handler decides what the client sees
        decided = answer_for(exc).kept
        return current_app.make_response(current_app.handle_user_exception(exc)), decided


def replay(stored, fingerprint, key):
    if stored["fingerprint"] != fingerprint:
        raise PreconditionFailed({IDEMPOTENCY_HEADER: [f"The key {key!r} was used with a different request."]})
    body = json.loads(stored["body"])
    body["timestamp"] = now_iso()
    response = current_app.json.response(body)  # written as the first answer was, byte for byte
    response.status_code = stored["status"]
    response.headers["Idempotent-Replayed"] = "true"
    return response
