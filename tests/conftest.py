"""Test fixtures: one PostgreSQL server per session, one fresh database per test.

The server comes from, in order: `DATABASE_URL`; a throwaway Postgres 18 container when a Docker
engine answers (testcontainers); the embedded server every lesson uses by default. Each lesson's
schema is loaded once per session into a template database, and every test gets its own copy
(`CREATE DATABASE ... TEMPLATE`), which takes milliseconds, so tests never share state.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator

import psycopg
import pytest
from hardway import postgres
from harness import lesson_dir


def _docker_answers() -> bool:
    try:
        import docker

        docker.from_env(timeout=3).ping()
    except Exception:
        return False
    return True


@pytest.fixture(scope="session")
def pg_server_url() -> Iterator[str]:
    """URL of a server's maintenance database, where the tests may create databases."""
    if os.environ.get("DATABASE_URL"):
        yield postgres.server_url()
    elif _docker_answers():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:18", driver=None) as container:
            yield container.get_connection_url()
    else:
        yield postgres.server_url()


# pytest-xdist runs tests in several processes against one server, and two pytest sessions may
# share a server too: database names carry the process id.
_WORKER = f"p{os.getpid()}"
_counter = itertools.count()


def _admin(server: str) -> psycopg.Connection:
    return psycopg.connect(server, autocommit=True)


@pytest.fixture(scope="session")
def _templates(pg_server_url: str) -> Iterator[dict[str, str]]:
    """Lesson name -> template database name, built on first use, dropped at the end."""
    built: dict[str, str] = {}
    yield built
    with _admin(pg_server_url) as admin:
        for template in built.values():
            admin.execute(f'DROP DATABASE IF EXISTS "{template}" WITH (FORCE)')


@pytest.fixture
def make_database(pg_server_url: str) -> Iterator[Callable[[str, str], str]]:
    """Factory: `make_database(prefix, schema_sql)` -> URL of a new database with that schema."""
    created: list[str] = []

    def make(prefix: str, schema_sql: str) -> str:
        name = f"{prefix}_{_WORKER}_{next(_counter)}"
        created.append(name)
        return postgres.recreate_database(pg_server_url, name, schema_sql)

    yield make
    _drop(pg_server_url, created)


@pytest.fixture
def lesson_db(pg_server_url: str, _templates: dict[str, str]) -> Iterator[Callable[[str], str]]:
    """Factory: `lesson_db("02-simple-task-queue")` -> URL of a fresh copy of that lesson's schema.

    The returned URL's database name (`psycopg.conninfo.conninfo_to_dict(url)["dbname"]`) can be
    handed to a lesson subprocess as LESSON_DBNAME when it must use the same database.
    """
    created: list[str] = []

    def make(lesson: str) -> str:
        template = _templates.get(lesson)
        if template is None:
            template = f"tmpl_{lesson.split('-', 1)[0]}_{_WORKER}"
            schema = (lesson_dir(lesson) / "sql" / "schema.sql").read_text()
            postgres.recreate_database(pg_server_url, template, schema)
            _templates[lesson] = template
        name = f"t{lesson.split('-', 1)[0]}_{_WORKER}_{next(_counter)}"
        with _admin(pg_server_url) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        created.append(name)
        return postgres.database_url(pg_server_url, name)

    yield make
    _drop(pg_server_url, created)


def _drop(server: str, names: list[str]) -> None:
    with _admin(server) as admin:
        for name in names:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# The contract tests: a module that tests a promise across lessons defines a `lesson` fixture,
# parametrized over the lessons that keep it (harness.lessons_from), and gets these two.
@pytest.fixture
def url(lesson, lesson_db) -> str:
    """A fresh database with the schema of the lesson under test."""
    return lesson_db(lesson.name)


@pytest.fixture
def engine(lesson, url):
    """That lesson's Engine on that database."""
    with lesson.engine.Engine(url) as engine:
        yield engine


@pytest.fixture
def current_durable_task(lesson):
    """The lesson's current_durable_task() (lesson 05 on): how a durable function reaches the
    context that runs its steps."""
    return lesson.durable.current_durable_task
