"""Who may see and do what on the operator page, and the headers that keep it to its own origin.

Credentials are the API's tokens (auth.py): HTTP Basic (name and secret), so a browser's own
prompt works, a Bearer header, or a session signed in with the sign-in form. A reader sees the
pages; only an operator may post an action. Every form is checked by Flask-WTF's CSRFProtect
(its token, tied to the session) and, here, by its Origin: a form posted from another site
changes nothing.
"""

import functools
import secrets
from urllib.parse import urlsplit

from flask import g, render_template, request, session
from werkzeug.exceptions import Forbidden

from stepd import auth
from stepd.tokens import OPERATOR, READER

CHALLENGE = 'Basic realm="stepd", charset="UTF-8"'  # Basic alone: a browser prompts for it


class CrossOrigin(Forbidden):
    """A form posted from a page of another origin."""

    description = "This form was posted from a page of another site; nothing changed."


def caller():
    """The principal of this request: its Authorization header (Basic or Bearer), else its signed-in
    session; None if it has neither or they are not good."""
    header = request.authorization
    if header is not None:
        if header.type == "basic":
            return auth.verify_password(header.username or "", header.password or "")
        if header.type == "bearer":
            return auth.verify_token(header.token or "")
        return None
    return auth.session_principal(session.get("principal"), session.get("proof"))


def page(role=READER):
    """A view of the page: 401 with a Basic challenge without credentials, 403 below `role`."""

    def decorate(view):
        @functools.wraps(view)
        def run(**kwargs):
            principal = caller()
            if principal is None:
                return challenge()
            if role == OPERATOR and principal.role != OPERATOR:
                raise Forbidden("A reader's token may look, not act: sign in with an operator token.")
            g.ui_principal = principal
            return view(**kwargs)

        return run

    return decorate


def challenge():
    """401: the browser asks for a token name and secret; the page offers the sign-in form."""
    body = render_template("sign_in_needed.html", next=request.full_path.rstrip("?"))
    return body, 401, {"WWW-Authenticate": CHALLENGE}


def can_act():
    principal = g.get("ui_principal")
    return principal is not None and principal.role == OPERATOR


def same_origin_only():
    """Refuse a POST whose Origin is another site's (the CSRF token is checked before this)."""
    if request.method in ("GET", "HEAD", "OPTIONS"):
        return
    origin = request.headers.get("Origin")
    if origin is not None and (origin == "null" or urlsplit(origin).netloc != request.host):
        raise CrossOrigin()
    if request.headers.get("Sec-Fetch-Site") == "cross-site":
        raise CrossOrigin()


# -- the headers of every HTML answer ---------------------------------------------------------------
def csp_nonce():
    """This answer's nonce: only a <script> that carries it runs."""
    if "csp_nonce" not in g:
        g.csp_nonce = secrets.token_urlsafe(16)
    return g.csp_nonce


def policy(nonce):
    scripts = f"'nonce-{nonce}'" if nonce else "'none'"
    return (
        f"default-src 'none'; script-src {scripts}; style-src 'self'; img-src 'self'; connect-src 'self';"
        " form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    )


def secure_html(response):
    """Every HTML answer of the app: a strict Content-Security-Policy, never framed. An answer the
    node made for the front (handoff.py) has its own, with the nonce of the page it rendered."""
    if response.mimetype == "text/html" and "Content-Security-Policy" not in response.headers:
        response.headers["Content-Security-Policy"] = policy(g.get("csp_nonce"))
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Referrer-Policy"] = "same-origin"
    return response
