"""The operator page, /ui/ (SPEC 11): server-rendered HTML (Jinja), one small plain script, no
build step and no request to any other host. It calls the engine's verbs and reads through the
store; the same tokens and roles as the API let people in (access.py).

`init_app` gives the app what the page needs: the secret key that signs its session cookie and
CSRF tokens (STEPD_SECRET_KEY, else the one migration 4 made in the database, so every process
of the service signs alike and a restart keeps the sessions), Flask-WTF's CSRFProtect (the JSON
API is exempt: its callers send credentials, not cookies, and a JSON body no form can send), and
the headers of every HTML answer.
"""

from flask.sessions import SecureCookieSessionInterface
from flask_wtf.csrf import CSRFProtect

from stepd.ui import access
from stepd.ui.views import ui

csrf = CSRFProtect()
SESSION_HOURS = 12  # how long a signed-in session and a page's CSRF token last
PAGE_PATH = "/ui"


class PageSessions(SecureCookieSessionInterface):
    """Sessions are the page's alone (their cookie's path is /ui/): a request anywhere else, the JSON
    API's, gets the empty null session at once. Flask would otherwise build the cookie's signer and
    look for a cookie on every request (measured at 5% of a restart's time in the node)."""

    def open_session(self, app, request):
        if not request.path.startswith(PAGE_PATH):
            return self.make_null_session(app)
        return super().open_session(app, request)


def init_app(app, store, exempt=()):
    """Serve the page under /ui/ in `app`; `exempt`: the blueprints whose POSTs carry no CSRF token."""
    app.secret_key = app.config.get("STEPD_SECRET_KEY") or store.secret("session")
    app.session_interface = PageSessions()
    app.config.update(
        SESSION_COOKIE_NAME="stepd_session",
        SESSION_COOKIE_PATH="/ui/",
        SESSION_COOKIE_SAMESITE="Lax",
        PERMANENT_SESSION_LIFETIME=SESSION_HOURS * 3600,
        WTF_CSRF_TIME_LIMIT=SESSION_HOURS * 3600,
    )
    csrf.init_app(app)
    for blueprint in exempt:
        csrf.exempt(blueprint)
    app.register_blueprint(ui)
    app.after_request(access.secure_html)
