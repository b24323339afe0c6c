"""Helpers the lesson tests share: import a lesson's modules, run its main.py, wait for things."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import uvicorn
from psycopg import sql as pgsql

REPO_ROOT = Path(__file__).resolve().parents[1]
LESSONS_DIR = REPO_ROOT / "lessons"


def lesson_dir(lesson: str) -> Path:
    path = LESSONS_DIR / lesson
    if not path.is_dir():
        raise ValueError(f"no lesson directory {path}")
    return path


def _lesson_module_names() -> set[str]:
    """Top-level module names that lessons define (`db`, `worker`, ...), across all lessons."""
    names = set()
    for path in LESSONS_DIR.glob("[0-9][0-9]-*/*"):
        if path.suffix == ".py" or (path / "__init__.py").exists():
            names.add(path.stem)
    return names


def import_lesson(lesson: str, *modules: str) -> types.SimpleNamespace:
    """Import modules of one lesson, e.g. `import_lesson("02-simple-task-queue", "tasks", "db")`.

    Every lesson has its own `db` package (and often a `worker` module), and lessons import them
    by their plain names, as `main.py` does. Importing two lessons into one pytest process would
    hand lesson 03 the `db` of lesson 02. So: forget every lesson module name, import with this
    lesson's directory first on sys.path, then forget the names again. The returned modules keep
    references to the submodules they imported, so they go on working.
    """
    names = _lesson_module_names()

    def forget() -> None:
        for name in list(sys.modules):
            if name.split(".")[0] in names:
                del sys.modules[name]

    forget()
    sys.path.insert(0, str(lesson_dir(lesson)))
    try:
        loaded = {module.replace(".", "_"): importlib.import_module(module) for module in modules}
    finally:
        sys.path.pop(0)
        forget()
    return types.SimpleNamespace(**loaded)


def lessons_from(first: str) -> list[str]:
    """The lesson directories from lesson `first` ("04") to the latest: every lesson that carries
    what lesson `first` introduced, and so must keep its promises (its contract tests)."""
    lessons = sorted(path.name for path in LESSONS_DIR.glob("[0-9][0-9]-*") if path.is_dir())
    return [lesson for lesson in lessons if lesson[:2] >= first]


# The modules of a lesson that tests use, when the lesson has them.
ENGINE_MODULES = (
    "engine",
    "worker",
    "task_context",
    "outages",
    "durable",
    "listener",
    "check_histories",
    "cli",
    "metrics",
    "remote",
    "dashboard",
    "api",
    "db.models",
    "db.queries",
)


def load_lesson(lesson: str) -> types.SimpleNamespace:
    """The engine modules of one lesson (those it has), plus `name`: its directory name."""
    directory = lesson_dir(lesson)
    present = [
        module
        for module in ENGINE_MODULES
        if (directory / f"{module.replace('.', '/')}.py").exists()
    ]
    namespace = import_lesson(lesson, *present)
    namespace.name = lesson
    return namespace


def durable_task(engine, name: str, **options):
    """Register a durable task: lesson 07 has two kinds of task; in 05 and 06 every task is
    durable (its steps are recorded), so there `engine.task` is the way."""
    register = getattr(engine, "durable_task", engine.task)
    return register(name, **options)


def sql(url: str, query: str, *params):
    """Run one statement on its own connection: its rows, or how many rows it changed."""
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else cur.rowcount


def drop_database(server: str, dbname: str) -> None:
    """Drop a database a lesson's script made for itself (the main.py tests), sessions and all."""
    statement = pgsql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
        pgsql.Identifier(dbname)
    )
    with psycopg.connect(server, autocommit=True) as admin:
        admin.execute(statement)


def status_counts(url: str) -> dict[str, int]:
    """How many tasks have each status."""
    return dict(sql(url, "SELECT status::text, count(*) FROM tasks GROUP BY 1"))


def statuses(tasks) -> list[str]:
    """The statuses of these tasks (rows or dataclasses), as plain strings."""
    return [str(task.status) for task in tasks]


def once(lesson) -> dict:
    """Task options for a task whose first failure is final: from lesson 04 on, a task that
    raises is retried (3 attempts by default), and some tests are about the first outcome."""
    return {"max_attempts": 1} if hasattr(lesson.engine, "TaskOptions") else {}


def add_finished_tasks(conn: psycopg.Connection, count: int, key: str | None = None) -> None:
    """`count` completed tasks, as a queue that has run a long time piles up; with `key`,
    every other one under that concurrency key (lesson 03 on). From lesson 04 on, a task that
    ran has had an attempt (the table checks it)."""
    [(attempts,)] = conn.execute(
        "SELECT EXISTS (SELECT FROM information_schema.columns"
        " WHERE table_name = 'tasks' AND column_name = 'attempts')"
    ).fetchall()
    columns, values = (", attempts", ", 1") if attempts else ("", "")
    if key is not None:
        columns, values = (
            columns + ", concurrency_key",
            values + ", CASE WHEN i %% 2 = 0 THEN %s END",
        )
    query = (
        f"INSERT INTO tasks (name, input, status, worker, started_at, finished_at{columns})"
        f" SELECT 'noop', 'null', 'completed', 'w', now(), now(){values}"
        " FROM generate_series(1, %s) AS i"
    )
    conn.execute(query, (key, count) if key is not None else (count,))


def worker(lesson, engine, name: str = "w", **options):
    """The lesson's Worker, polling every 20 ms unless told otherwise."""
    options.setdefault("poll_interval", 0.02)
    return lesson.worker.Worker(engine, name, **options)


def finish(lesson, engine, *task_ids: int, **worker_options) -> list:
    """Run one worker until every task has finished; return the tasks."""
    with running(worker(lesson, engine, **worker_options)):
        return [engine.wait(task_id, timeout=60) for task_id in task_ids]


def lesson_env(database_url: str, dbname: str | None = None) -> dict[str, str]:
    """Environment for a lesson subprocess: the test server, and a private database name."""
    env = dict(os.environ, DATABASE_URL=database_url, PYTHONUNBUFFERED="1")
    if dbname:
        env["LESSON_DBNAME"] = dbname
    return env


def run_main(
    lesson: str,
    database_url: str,
    dbname: str,
    *args: str,
    timeout: float = 120,
    cwd: Path | None = None,
    script: str = "main.py",
) -> subprocess.CompletedProcess[str]:
    """Run `lessons/<lesson>/main.py` (or another of its scripts, `naive_claim.py`) as a reader
    would, from `cwd` (the repository root by default), and return its finished process."""
    return subprocess.run(
        [sys.executable, str(lesson_dir(lesson) / script), *args],
        cwd=cwd or REPO_ROOT,
        env=lesson_env(database_url, dbname),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def wait_until(condition: Callable[[], object], timeout: float = 30, interval: float = 0.02):
    """Poll `condition` until it returns something truthy; return that, or fail after `timeout`.

    Tests wait for a state they can observe (a row, a status) instead of sleeping a guessed time.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {condition}")
        time.sleep(interval)


@contextmanager
def running(*workers) -> Iterator[None]:
    """Run lesson workers in threads (`worker.run(stop)`) for the duration of a with block.

    On the way out: stop them, wait for them, and fail the test if one did not stop or died
    with an exception (a deadlock, say), which would otherwise be lost in its thread.
    """
    stop = threading.Event()
    errors: list[BaseException] = []

    def work(worker) -> None:
        try:
            worker.run(stop)
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=work, args=(w,), name=w.name) for w in workers]
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a worker did not stop"
    assert not errors, errors


def raises(err: BaseException) -> Callable[[object], None]:
    """A task function that raises `err`, whatever its input."""

    def function(input: object) -> None:
        raise err

    return function


def nested(levels: int) -> list:
    """A list `levels` deep: [[[...]]]."""
    value: list = []
    for _ in range(levels):
        value = [value]
    return value


@contextmanager
def serving(app) -> Iterator[str]:
    """Lesson 11's API `app`, served by uvicorn on a free loopback port, in a thread; its URL.

    Port 0: the system picks a free one. (uvicorn makes the socket: one made here would lack
    TCP_NODELAY, and each response would wait 40 ms for the client's delayed ACK.)
    """
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started or not thread.is_alive(), timeout=10)
        assert server.started, "uvicorn did not start"
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        app.state.remote.stop()  # a claim still waiting answers now, not after its wait
        server.should_exit = True
        thread.join(timeout=10)
    assert not thread.is_alive(), "uvicorn did not stop"
