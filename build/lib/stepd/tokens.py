"""API tokens: their names, roles and secrets, how a secret is stored, and the first token a new
database gets. No HTTP here: auth.py checks a request's credentials against these; the `stepd
token` commands (cli.py) create, list and revoke them.

Secrets are 256-bit random strings, so a single SHA-256 is a safe way to store them and costs
microseconds per request; a slow password hash would cap throughput.
"""

import hashlib
import logging
import re
import secrets
import sys

from stepd.logs import log_format_in_use, say

READER, OPERATOR = "reader", "operator"
ROLES = (OPERATOR, READER)
ENV_TOKEN_NAME = "env"  # STEPD_TOKEN's principal
FIRST_TOKEN_NAME = "admin"
TOKEN_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def hash_secret(secret):
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def new_secret():
    return "stepd_" + secrets.token_urlsafe(32)


def name_problem(name):
    """Why `name` cannot name a token, or None."""
    if not TOKEN_NAME.match(name) or name == ENV_TOKEN_NAME:
        return f"{name!r} cannot name a token: use 1-64 of A-Z a-z 0-9 _ . - (and not 'env')"
    return None


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
                " with `stepd token create NAME --role operator`",
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
