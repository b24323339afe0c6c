"""The shared bootstrap (hardway/postgres.py), and the OwnedServer that outage tests stop."""

import os
from collections.abc import Iterator
from contextlib import contextmanager

import psutil
import psycopg
import pytest
from hardway import postgres
from harness import lesson_dir, run_main
from pgserver import OwnedServer
from psycopg import conninfo, sql

LESSON = "01-prerequisites"
# Names carry the process id: two pytest sessions (or xdist workers) may share one server.
SUFFIX = f"p{os.getpid()}"
BYSTANDER = f"other_{SUFFIX}"
VICTIM = f"victim_{SUFFIX}"
# Names an f-string would have turned into SQL in `DROP DATABASE IF EXISTS "{name}" WITH (FORCE)`
# then `CREATE DATABASE "{name}"`. The first ends the name early and adds a statement (PostgreSQL
# happens to refuse DROP DATABASE in a multi-statement string); the second drops VICTIM, makes
# the rest of the line a comment, and re-creates VICTIM empty. Both stay under the 63 bytes
# PostgreSQL keeps of a name, even with a 7-digit process id.
INJECTIONS = [f'{BYSTANDER}" WITH (FORCE); DROP DATABASE "{VICTIM}', f'{VICTIM}" --']


@contextmanager
def dropped_afterwards(server: str, *databases: str, role: str | None = None) -> Iterator[None]:
    """Run the block, then drop `databases` and `role` whether the block failed or not."""
    try:
        yield
    finally:
        with psycopg.connect(server, autocommit=True) as admin:
            for name in databases:
                admin.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
                )
            if role:
                admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def database_oids(server: str) -> dict[str, int]:
    """Name -> oid of every database: a database dropped and re-created gets a new oid."""
    with psycopg.connect(server) as conn:
        return dict(conn.execute("SELECT datname, oid FROM pg_database").fetchall())


@pytest.mark.parametrize("dbname", INJECTIONS, ids=["two-statements", "comment"])
def test_lesson_dbname_is_one_quoted_name(pg_server_url, monkeypatch, dbname):
    monkeypatch.setenv("DATABASE_URL", pg_server_url)
    monkeypatch.setenv("LESSON_DBNAME", dbname)
    with dropped_afterwards(pg_server_url, dbname, BYSTANDER, VICTIM):
        with psycopg.connect(pg_server_url, autocommit=True) as admin:
            for name in (BYSTANDER, VICTIM):
                admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        before = database_oids(pg_server_url)

        url = postgres.lesson_database(lesson_dir(LESSON))
        with psycopg.connect(url, autocommit=True) as conn:
            assert conn.execute("SELECT current_database()").fetchone() == (dbname,)
            conn.execute("CREATE TABLE left_by_first_run ()")

        # The second run drops the oddly-named database (and only that one) and re-creates it.
        url = postgres.lesson_database(lesson_dir(LESSON))
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT to_regclass('left_by_first_run')").fetchone() == (None,)
            assert conn.execute("SELECT to_regclass('notes')").fetchone() == ("notes",)

        after = database_oids(pg_server_url)
        assert dbname in after
        assert after[BYSTANDER] == before[BYSTANDER] and after[VICTIM] == before[VICTIM]


def test_role_without_createdb_gets_one_line_error(pg_server_url):
    role, password = f"no_createdb_{SUFFIX}", "not-to-be-printed"
    dbname = f"t01_no_createdb_{SUFFIX}"
    with dropped_afterwards(pg_server_url, dbname, role=role):
        with psycopg.connect(pg_server_url, autocommit=True) as admin:
            admin.execute(
                sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                    sql.Identifier(role), sql.Literal(password)
                )
            )
        # Same server, same way in, another role. The embedded server trusts local connections
        # and ignores the password; a server that checks it (a container) accepts it.
        role_url = conninfo.make_conninfo(pg_server_url, user=role, password=password)
        try:
            psycopg.connect(role_url).close()
        except psycopg.OperationalError as err:
            pytest.skip(f"this server lets no new role log in (pg_hba.conf): {err}")

        result = run_main(LESSON, role_url, dbname)

        assert result.returncode == 1, result.stderr
        assert result.stdout == ""
        assert len(result.stderr.splitlines()) == 1, result.stderr
        assert result.stderr.startswith(f"error: cannot create database {dbname} on "), (
            result.stderr
        )
        assert "permission denied to create database" in result.stderr
        assert f"the role {role} needs CREATEDB" in result.stderr
        assert password not in result.stderr


def test_schema_error_names_database_and_line(pg_server_url):
    dbname = f"bad_schema_{SUFFIX}"
    schema = "CREATE TABLE fine (id int);\nCREAT TABLE typo (id int);\n"
    with dropped_afterwards(pg_server_url, dbname):
        with pytest.raises(postgres.DatabaseSetupError) as caught:
            postgres.recreate_database(pg_server_url, dbname, schema)
    message = str(caught.value)
    assert message.startswith(f"cannot load the schema into database {dbname} on ")
    assert 'syntax error at or near "CREAT" LINE 2: CREAT TABLE' in message
    assert "\n" not in message


def test_errors_raised_by_psycopg_itself_stay_bugs():
    # No SQLSTATE: psycopg refused before asking the server, the calling code is wrong.
    with pytest.raises(psycopg.ProgrammingError):
        with postgres._refusal_as_setup_error("cannot do it"):
            raise psycopg.ProgrammingError("the query has 1 placeholders but 2 parameters")


def shared_server_pid() -> int | None:
    pid_file = postgres.EMBEDDED_DATA_DIR / "postmaster.pid"
    return int(pid_file.read_text().split()[0]) if pid_file.exists() else None


def test_owned_server_crashes_stops_and_starts_alone(pg_server_url):
    shared_pid = shared_server_pid()
    with OwnedServer() as server:
        directory = server.directory
        with psycopg.connect(server.url(), autocommit=True) as conn:
            conn.execute("CREATE TABLE survivors AS SELECT 1 AS id")
            server.restart("immediate")
            with pytest.raises(psycopg.OperationalError):
                conn.execute("SELECT 1")
        with psycopg.connect(server.url()) as conn:
            assert conn.execute("SELECT id FROM survivors").fetchall() == [(1,)]

        server.stop()
        assert server.pid is None
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(server.url())

        server.start()
        with psycopg.connect(server.url()) as conn:
            assert conn.execute("SELECT id FROM survivors").fetchall() == [(1,)]

    assert not directory.exists()
    assert shared_server_pid() == shared_pid


def test_owned_server_is_stopped_and_deleted_when_the_block_fails():
    with pytest.raises(RuntimeError, match="a test failing"):
        with OwnedServer() as server:
            directory, pid = server.directory, server.pid
            raise RuntimeError("a test failing")
    assert not directory.exists()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_url_of_a_lesson_database_leaves_it_as_it_is(pg_server_url, lesson_db, monkeypatch, capsys):
    url = lesson_db("02-simple-task-queue")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE kept (n int)")
        conn.execute("INSERT INTO kept VALUES (42)")
    monkeypatch.setenv("DATABASE_URL", pg_server_url)

    assert postgres.main(["url", conninfo.conninfo_to_dict(url)["dbname"]]) == 0

    printed = capsys.readouterr().out.strip()
    with psycopg.connect(printed) as conn:
        assert conn.execute("SELECT n FROM kept").fetchall() == [(42,)]
