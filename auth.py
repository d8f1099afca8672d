"""API tokens: Bearer or Basic (name:secret) credentials, roles, and the `token` commands.

Secrets are 256-bit random strings, so a single SHA-256 is a safe way to store them
and costs microseconds per request; a slow password hash would cap throughput.
"""

import hashlib
import hmac
import logging
import re
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

import click
from flask import current_app, g
from flask.cli import AppGroup
from flask_httpauth import HTTPBasicAuth, HTTPTokenAuth, MultiAuth

from envelope import ERROR_TEXT, error
from logs import log_format_in_use, say

READER, OPERATOR = "reader", "operator"
ENV_TOKEN_NAME = "env"
FIRST_TOKEN_NAME = "admin"
TOKEN_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
CHALLENGE = 'Bearer realm="stepd", Basic realm="stepd"'

bearer = HTTPTokenAuth(scheme="Bearer", realm="stepd")
basic = HTTPBasicAuth(realm="stepd")
auth = MultiAuth(bearer, basic)


@dataclass(frozen=True)
class Principal:
    name: str
    role: str


def hash_secret(secret):
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def new_secret():
    return "stepd_" + secrets.token_urlsafe(32)


def _env_principal(secret):
    env_token = current_app.config.get("STEPD_TOKEN")
    if env_token and hmac.compare_digest(hash_secret(secret), hash_secret(env_token)):
        return Principal(ENV_TOKEN_NAME, OPERATOR)
    return None


def _known(principal):
    """The caller, once let in; its name goes on the request's log lines (logs.py) and access line."""
    if principal is not None:
        g.principal = principal.name
    return principal


@bearer.verify_token
def verify_token(secret):
    if not secret:
        return None
    row = current_app.extensions["stepd"].store.token_by_hash(hash_secret(secret))
    if row is not None:
        return _known(Principal(row["name"], row["role"]))
    return _known(_env_principal(secret))


@basic.verify_password
def verify_password(name, secret):
    if not name or not secret:
        return None
    if name == ENV_TOKEN_NAME:
        return _known(_env_principal(secret))
    row = current_app.extensions["stepd"].store.token_by_name(name)
    if row is not None and hmac.compare_digest(hash_secret(secret), row["secret_hash"]):
        return _known(Principal(row["name"], row["role"]))
    return None


def roles_of(principal):
    return [READER, OPERATOR] if principal.role == OPERATOR else [READER]


bearer.get_user_roles(roles_of)
basic.get_user_roles(roles_of)


def _auth_error(status):
    if status == 403:
        return error(403, ERROR_TEXT[403])
    response = error(401, ERROR_TEXT[401])
    response.headers["WWW-Authenticate"] = CHALLENGE
    return response


# Set as the callback itself, not through error_handler(): that wrapper adds a WWW-Authenticate
# challenge to every refusal, the 403 too, whose credentials were good (the challenge belongs to 401).
bearer.auth_error_callback = _auth_error
basic.auth_error_callback = _auth_error


def _requiring(role):
    """A view decorator that lets only `role` (or above) in; the view says so in `view.role`,
    which the OpenAPI document reads (a view without it needs no credentials)."""
    guard = auth.login_required(role=role)

    def decorate(view):
        guarded = guard(view)
        guarded.role = role
        return guarded

    return decorate


reads = _requiring(READER)
writes = _requiring(OPERATOR)


def current_principal():
    return auth.current_user()


def ensure_first_token(store, env_token, new_database):
    """On the first start of a new database, with no STEPD_TOKEN, make an operator token and print it once.

    Never on a later start: revoking every token is a normal response to an incident, and must not
    be undone by a restart. A start with no token at all says how to make one.
    """
    if env_token:
        return None
    if not new_database:
        if not store.list_tokens():
            print(
                "stepd: no API token exists and STEPD_TOKEN is unset, so every request will get 401; create one"
                " with `.venv/bin/flask --app app token create NAME --role operator`",
                file=sys.stderr,
                flush=True,
            )
        return None
    secret = new_secret()
    if not store.add_first_token(FIRST_TOKEN_NAME, OPERATOR, hash_secret(secret)):
        return None
    if log_format_in_use() == "json":  # every line is JSON: the secret is the field `secret`
        say(
            f"first start: created the operator token {FIRST_TOKEN_NAME!r}; its secret, shown only now, is "
            f"the field secret; send it as 'Authorization: Bearer <secret>' or curl -u {FIRST_TOKEN_NAME}:<secret>",
            logging.WARNING,
            logger="stepd.auth",
            secret=secret,
        )
        return secret
    print(
        f"stepd: first start: created the operator token {FIRST_TOKEN_NAME!r}. Its secret, shown only now:\n"
        f"{secret}\n"
        f"stepd: send it as 'Authorization: Bearer <secret>' or curl -u {FIRST_TOKEN_NAME}:<secret>",
        file=sys.stderr,
        flush=True,
    )
    return secret


token_cli = AppGroup("token", help="Create, list and revoke API tokens.")


def command_store():
    """The store of the database a command (token, purge) acts on, which it names on standard error.

    A command never creates a database: run from another folder, STEPD_DB's relative
    default names a file that is not the service's, and a token made there would be refused."""
    path = Path(current_app.config["STEPD_DB"]).resolve()
    if not path.is_file():
        raise click.ClickException(
            f"no database at {path} (STEPD_DB); run the command where the service runs, or set STEPD_DB to its file"
        )
    click.echo(f"stepd: database {path}", err=True)
    return current_app.extensions["stepd"].store


@token_cli.command("create")
@click.argument("name")
@click.option("--role", type=click.Choice([OPERATOR, READER]), required=True)
def create_token(name, role):
    """Create a token; prints its secret alone on the last line."""
    if not TOKEN_NAME.match(name) or name == ENV_TOKEN_NAME:
        raise click.BadParameter("use 1-64 of A-Z a-z 0-9 _ . - (and not 'env')", param_hint="NAME")
    store = command_store()
    secret = new_secret()
    if not store.add_token(name, role, hash_secret(secret)):
        raise click.ClickException(f"a token named {name!r} exists; revoke it first")
    click.echo(f"Created {role} token {name!r}. Its secret is shown only now:")
    click.echo(secret)


@token_cli.command("list")
def list_tokens():
    """List tokens (names and roles, never secrets)."""
    tokens = command_store().list_tokens()
    for token in tokens:
        click.echo(f"{token['name']}\t{token['role']}\t{token['created_at']}")
    if not tokens:
        click.echo("stepd: no tokens", err=True)


@token_cli.command("revoke")
@click.argument("name")
def revoke_token(name):
    """Revoke a token by name."""
    if not command_store().revoke_token(name):
        raise click.ClickException(f"no token named {name!r}")
    click.echo(f"Revoked token {name!r}.")
