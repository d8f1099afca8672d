"""Credentials of an HTTP request: Bearer or Basic (name:secret), checked against the API tokens
(tokens.py), and the roles a view requires (`@reads`, `@writes`).

The app gives this module its store and STEPD_TOKEN once, when it is built (`init_app`): the
check lives in the app's extensions under this module's own `Credentials`, a shape no other
module knows.
"""

import functools
import hmac
from dataclasses import dataclass

from flask import current_app, g, request
from flask_httpauth import HTTPBasicAuth, HTTPTokenAuth, MultiAuth
from werkzeug.exceptions import Forbidden, Unauthorized

from stepd.errors import answer
from stepd.tokens import ENV_TOKEN_NAME, OPERATOR, READER, hash_secret

CHALLENGE = 'Bearer realm="stepd", Basic realm="stepd"'
EXTENSION = "stepd.auth"

bearer = HTTPTokenAuth(scheme="Bearer", realm="stepd")
basic = HTTPBasicAuth(realm="stepd")
auth = MultiAuth(bearer, basic)


@dataclass(frozen=True)
class Principal:
    name: str
    role: str


@dataclass(frozen=True)
class Credentials:
    """What a request's credentials are checked against: the tokens in `store`, and STEPD_TOKEN."""

    store: object
    env_token: str

    @functools.cached_property
    def env_hash(self):
        return hash_secret(self.env_token) if self.env_token else None

    def env_principal(self, secret, secret_hash=None):
        secret_hash = secret_hash or hash_secret(secret)
        if self.env_hash and hmac.compare_digest(secret_hash, self.env_hash):
            return Principal(ENV_TOKEN_NAME, OPERATOR)
        return None

    def by_secret(self, secret):
        # STEPD_TOKEN first: it is checked in memory, where a stored token costs a read of the
        # file (9% of a restart's time in the node, with the benchmark's STEPD_TOKEN). A stored
        # token with the same secret cannot be made: secrets are drawn at random.
        secret_hash = hash_secret(secret)
        if principal := self.env_principal(secret, secret_hash):
            return principal
        row = self.store.token_by_hash(secret_hash)
        return Principal(row["name"], row["role"]) if row is not None else None

    def by_name(self, name, secret):
        if name == ENV_TOKEN_NAME:
            return self.env_principal(secret)
        row = self.store.token_by_name(name)
        if row is not None and hmac.compare_digest(hash_secret(secret), row["secret_hash"]):
            return Principal(row["name"], row["role"])
        return None

    def named(self, name):
        """(the principal of the token `name`, its secret's hash), or None if there is none."""
        if name == ENV_TOKEN_NAME:
            return (Principal(ENV_TOKEN_NAME, OPERATOR), hash_secret(self.env_token)) if self.env_token else None
        row = self.store.token_by_name(name)
        return (Principal(row["name"], row["role"]), row["secret_hash"]) if row is not None else None


def init_app(app, store):
    """Check `app`'s requests against the tokens of `store` and the app's STEPD_TOKEN."""
    app.extensions[EXTENSION] = Credentials(store, app.config.get("STEPD_TOKEN") or "")


def _credentials():
    return current_app.extensions[EXTENSION]


def _known(principal):
    """The caller, once let in; its name goes on the request's log lines (httplogs.py) and access line."""
    if principal is not None:
        g.principal = principal.name
    return principal


@bearer.verify_token
def verify_token(secret):
    return _known(_credentials().by_secret(secret)) if secret else None


@basic.verify_password
def verify_password(name, secret):
    return _known(_credentials().by_name(name, secret)) if name and secret else None


def roles_of(principal):
    return [READER, OPERATOR] if principal.role == OPERATOR else [READER]


bearer.get_user_roles(roles_of)
basic.get_user_roles(roles_of)


def _auth_error(status):
    """A refusal, answered as errors.ERRORS says; the 401 also says how to send credentials."""
    if status == 403:
        return answer(Forbidden())
    response = answer(Unauthorized())
    response.headers["WWW-Authenticate"] = CHALLENGE
    return response


# Set as the callback itself, not through error_handler(): that wrapper adds a WWW-Authenticate
# challenge to every refusal, the 403 too, whose credentials were good (the challenge belongs to 401).
bearer.auth_error_callback = _auth_error
basic.auth_error_callback = _auth_error


def _requiring(role):
    """A view decorator that lets only `role` (or above) in; the view says so in `view.role`,
    which the OpenAPI document reads (a view without it needs no credentials).

    The choice is MultiAuth's (Bearer, unless the request's Authorization is Basic), but each
    scheme's guard is made once here: MultiAuth.login_required wraps the view again on every
    request (functools.wraps each time, 2% of a restart's CPU in `make bench --profile`)."""

    def decorate(view):
        by_bearer = bearer.login_required(role=role)(view)
        by_basic = basic.login_required(role=role)(view)

        @functools.wraps(view)
        def guarded(*args, **kwargs):
            headers = request.headers
            if not bearer.is_compatible_auth(headers) and basic.is_compatible_auth(headers):
                return by_basic(*args, **kwargs)
            return by_bearer(*args, **kwargs)

        guarded.role = role
        return guarded

    return decorate


reads = _requiring(READER)
writes = _requiring(OPERATOR)


def current_principal():
    return auth.current_user()


# -- a session signed in on the operator page (stepd/ui) -----------------------------------------
# The session keeps the token's name and this proof, never the secret. The proof is made from the
# hash the token has now, keyed by the app's secret key: a revoked or replaced token ends the session.
def _proof(name, secret_hash):
    key = current_app.secret_key
    key = key.encode() if isinstance(key, str) else key
    return hmac.new(key, f"{name}\0{secret_hash}".encode(), "sha256").hexdigest()


def session_proof(name, secret):
    """What a session signed in as the token `name` with `secret` keeps (once the secret was checked)."""
    return _proof(name, hash_secret(secret))


def session_principal(name, proof):
    """The principal of a signed-in session, if its token still has the secret it was signed in with."""
    found = _credentials().named(name) if isinstance(name, str) and isinstance(proof, str) else None
    if found is None or not hmac.compare_digest(_proof(name, found[1]), proof):
        return None
    return _known(found[0])
