"""The `stepd` command (also `python -m stepd`): serve, runner, migrate, check, backup, purge,
token, version.

Each subcommand reads the STEPD_* settings (config.py) and opens the database through
wiring.open_store. A refusal (a missing file, a wrong role, a bad number, a bad setting) is one
line on standard error and exit code 2; `check` exits 1 when the file's invariants are broken.
Only `serve` and `migrate` make a database that does not exist yet: every other command names
the file it looked for and stops, so one run from the wrong folder cannot leave a stray database.
"""

import math
import sys
from pathlib import Path

import click

from stepd import config
from stepd.model import VERSION

REFUSED = 2  # a refusal's exit code, as for any usage error


class StepdGroup(click.Group):
    """click's group, with every refusal said in one line: `stepd <command>: <why>`, exit 2."""

    def main(self, args=None, prog_name="stepd", **extra):
        extra.pop("standalone_mode", None)
        try:
            code = super().main(args, prog_name=prog_name, standalone_mode=False, **extra)
        except click.Abort:
            print("stepd: aborted", file=sys.stderr)
            sys.exit(1)
        except click.ClickException as exc:
            where = exc.ctx.command_path if getattr(exc, "ctx", None) is not None else prog_name
            print(f"{where}: {' '.join(exc.format_message().split())}", file=sys.stderr)  # one line
            sys.exit(REFUSED)
        sys.exit(code if isinstance(code, int) else 0)


class Refused(click.ClickException):
    """A command cannot do what it was asked; said as `stepd <command>: <why>`, exit 2."""

    exit_code = REFUSED

    def __init__(self, message):
        super().__init__(message)
        self.ctx = click.get_current_context(silent=True)


@click.group(cls=StepdGroup, context_settings={"help_option_names": ["-h", "--help"]})
def stepd():
    """stepd: processes of ordered steps, each run by a delegate; restart a failed step over HTTP.

    Settings come from STEPD_* environment variables (see the README's Configuration).
    """


def settings():
    """The STEPD_* settings; a bad one is a refusal naming it."""
    try:
        return config.from_env()
    except config.ConfigError as exc:
        raise Refused(str(exc)) from None


def existing_file(chosen):
    """STEPD_DB's path, which must be a file: a command other than serve and migrate makes none.
    On PostgreSQL, only `stepd migrate` and `stepd check` work yet (issue 20)."""
    if config.is_postgres(chosen["STEPD_DB"]):
        raise Refused(
            f"STEPD_DB={config.shown_database(chosen['STEPD_DB'])} is a PostgreSQL database: "
            "stepd's PostgreSQL backend is not complete yet, and only `stepd migrate` and `stepd check` work on it"
        )
    path = Path(chosen["STEPD_DB"])
    if not path.is_file():
        raise Refused(f"no database at {path} (STEPD_DB); run where the service runs, or set STEPD_DB to its file")
    return path


def existing_postgres(url):
    """STEPD_DB's PostgreSQL URL, whose database must answer and hold stepd's schema (a command other
    than serve and migrate makes none); a refusal names it without its password."""
    from stepd.model import Unusable
    from stepd.postgres import PostgresDatabase

    try:
        version = PostgresDatabase(url).schema_version()
    except Unusable as exc:
        raise Refused(str(exc)) from None
    if version == 0:
        raise Refused(f"{config.shown_database(url)} has no stepd schema yet; run `stepd migrate` (or start stepd)")
    return url


def opened_store(chosen):
    """The store of STEPD_DB, made and migrated if need be; a file it cannot use is a refusal."""
    from stepd.model import Unusable
    from stepd.wiring import open_store

    try:
        return open_store(chosen)
    except Unusable as exc:
        raise Refused(f"STEPD_DB={chosen['STEPD_DB']} cannot be used: {exc}") from None


def existing_store(chosen):
    """The store of STEPD_DB, which must exist (named on standard error, so the operator sees which
    file a command acted on)."""
    click.echo(f"stepd: database {existing_file(chosen)}", err=True)
    return opened_store(chosen)


# -- running -------------------------------------------------------------------------------------
@stepd.command()
def serve():
    """Serve the API and run the delegates: the node, its STEPD_RUNNERS runner processes, the HTTP front."""
    from stepd import service

    return service.main()


@stepd.command()
def runner():
    """Run one runner process (delegates run here) beside a service started with STEPD_RUNNERS=0."""
    from stepd import service

    return service.runner_main()


@stepd.command(hidden=True)
def http():
    """The HTTP front (gunicorn), which hands its writes to the node: `serve` starts it."""
    from stepd import service

    return service.http_main()


@stepd.command(hidden=True)
def node():
    """The node (the one writer, the dispatcher, the runners' parent): `serve` starts it."""
    from stepd import service

    return service.node_main()


# -- the database --------------------------------------------------------------------------------
@stepd.command()
def migrate():
    """Make STEPD_DB if need be and bring its schema to this stepd's (a start does it too)."""
    chosen = settings()
    if config.is_postgres(chosen["STEPD_DB"]):
        return migrate_postgres(chosen["STEPD_DB"])
    from stepd.db import SCHEMA_VERSION

    opened_store(chosen)
    click.echo(f"{chosen['STEPD_DB']}: schema version {SCHEMA_VERSION}")
    return 0


def migrate_postgres(url):
    """`stepd migrate` on PostgreSQL: connect, and migrate under the advisory lock (postgres.py)."""
    from stepd.model import Unusable
    from stepd.postgres import SCHEMA_VERSION, PostgresDatabase

    try:
        applied = PostgresDatabase(url).prepare()
    except Unusable as exc:
        raise Refused(str(exc)) from None
    shown = config.shown_database(url)
    click.echo(f"{shown}: PostgreSQL schema version {SCHEMA_VERSION} ({applied} migration(s) applied now)")
    return 0


@stepd.command()
def check():
    """Check the invariants of STEPD_DB (read only, beside a running service or not); exit 1 if broken."""
    from stepd.invariants import check as check_database

    chosen = settings()
    if config.is_postgres(chosen["STEPD_DB"]):
        where, shown = existing_postgres(chosen["STEPD_DB"]), config.shown_database(chosen["STEPD_DB"])
    else:
        where = shown = existing_file(chosen)
    report = check_database(where)
    click.echo(f"{shown}: {report.processes} processes, {report.steps} steps, {report.attempts} attempts checked")
    for problem in report.problems:
        click.echo(f"BROKEN: {problem}")
    if report.problems:
        click.echo(f"{len(report.problems)} invariant(s) broken", err=True)
        return 1
    click.echo("ok")
    return 0


@stepd.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
def backup(file):
    """Copy STEPD_DB to FILE, consistently, beside a running service (replaces FILE if it exists)."""
    chosen = settings()
    if config.is_postgres(chosen["STEPD_DB"]):
        raise Refused("STEPD_DB is a PostgreSQL database: back it up with pg_dump (PostgreSQL's own tool)")
    if not file.parent.is_dir():
        raise Refused(f"no folder {file.parent} for the copy")
    store = existing_store(chosen)
    pages = store.db.backup(file)
    click.echo(f"Copied {pages} page(s) to {file}.")


def _days(ctx, param, value):
    if not math.isfinite(value) or value < 0:
        raise click.BadParameter("must be a number of days >= 0 (fractions allowed)")
    return value


@stepd.command()
@click.option("--older-than", "days", type=float, required=True, callback=_days, metavar="DAYS")
@click.option("--dry-run", is_flag=True, help="Count what would be deleted; delete nothing.")
def purge(days, dry_run):
    """Delete COMPLETED and CANCELLED processes that finished more than DAYS days ago."""
    from stepd.retention import purge as purge_finished

    processes, rows = purge_finished(existing_store(settings()), days, dry_run)
    if dry_run:
        click.echo(f"Would delete {processes} process(es) finished more than {days:g} day(s) ago.")
    else:
        click.echo(f"Deleted {processes} process(es) finished more than {days:g} day(s) ago ({rows} rows).")


# -- tokens --------------------------------------------------------------------------------------
@stepd.group()
def token():
    """Create, list and revoke API tokens."""


@token.command("create")
@click.argument("name")
@click.option("--role", type=click.Choice(["operator", "reader"]), required=True)
def create_token(name, role):
    """Create a token; prints its secret alone on the last line."""
    from stepd.tokens import hash_secret, name_problem, new_secret

    problem = name_problem(name)
    if problem is not None:
        raise click.BadParameter(problem, param_hint="NAME")
    store = existing_store(settings())
    secret = new_secret()
    if not store.add_token(name, role, hash_secret(secret)):
        raise Refused(f"a token named {name!r} exists; revoke it first")
    click.echo(f"Created {role} token {name!r}. Its secret is shown only now:")
    click.echo(secret)


@token.command("list")
def list_tokens():
    """List tokens (names and roles, never secrets)."""
    tokens = existing_store(settings()).list_tokens()
    for row in tokens:
        click.echo(f"{row['name']}\t{row['role']}\t{row['created_at']}")
    if not tokens:
        click.echo("stepd: no tokens", err=True)


@token.command("revoke")
@click.argument("name")
def revoke_token(name):
    """Revoke a token by name."""
    if not existing_store(settings()).revoke_token(name):
        raise Refused(f"no token named {name!r}")
    click.echo(f"Revoked token {name!r}.")


@stepd.command()
def version():
    """Print stepd's version."""
    click.echo(VERSION)


def main():
    stepd()
