"""The operator page's actions run exactly once per form: each form carries an Idempotency-Key made
when the page was rendered, and the action's answer is kept under it in the same transaction as
the change (store.stored_answer / store_answer, as idempotency.py does for the API). A second
POST of the same form, however soon and in whichever worker, finds that answer and shows it.
"""

import hashlib
import json
import re
import secrets

from flask import current_app, g, request

from stepd.model import PreconditionFailed

KEY = re.compile(r"[0-9a-f]{32}")
KEY_PREFIX = "ui:"  # the page's keys beside the API's, under the same principal
IGNORED = ("csrf_token",)  # a new token for the same form is the same request


def new_key():
    return secrets.token_hex(16)


def form_key():
    """The posted form's Idempotency-Key, or None if it has none that the page could have made."""
    key = request.form.get("idempotency_key", "")
    return key if KEY.fullmatch(key) else None


def fingerprint():
    """What makes two posts the same one: the path and every field but the CSRF token."""
    fields = sorted((name, value) for name, value in request.form.items(multi=True) if name not in IGNORED)
    return hashlib.sha256(json.dumps([request.path, fields]).encode("utf-8", "backslashreplace")).hexdigest()


def once(key, act):
    """The answer of `act()` for this principal's form key: run now, or the one kept from before.

    `act()` returns a dict (a success: status 200 is added); a model.PreconditionFailed it
    raises is an answer too (status 412 and its field errors), kept like a success: it was a
    decision about the state. Anything else (the database busy, a bug) keeps nothing and
    propagates, and the same form can be sent again."""
    store = current_app.extensions["stepd"].store
    principal, stored_key, sent = g.ui_principal.name, KEY_PREFIX + key, fingerprint()
    with store.atomic():  # the write lock from the look-up on: a concurrent repeat waits, then finds this answer
        stored = store.stored_answer(principal, stored_key)
        if stored is not None:
            if stored["fingerprint"] != sent:
                message = "This form was already sent with other values; reload the page to start again."
                return {"status": 412, "errors": {"_form": [message]}, "replayed": True}
            return {**json.loads(stored["body"]), "replayed": True}
        try:
            answer = {"status": 200, **act()}
        except PreconditionFailed as exc:
            answer = {"status": 412, "errors": exc.errors}
        store.store_answer(principal, stored_key, sent, answer["status"], json.dumps(answer))
    return answer


def kept(key):
    """The answer kept for this principal's form key (to show after the redirect), or None."""
    if not key or not KEY.fullmatch(key):
        return None
    stored = current_app.extensions["stepd"].store.stored_answer(g.ui_principal.name, KEY_PREFIX + key)
    return json.loads(stored["body"]) if stored is not None else None
