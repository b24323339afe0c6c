"""The client side of the queue: register task functions, enqueue tasks, look them up.

A task is a row in `tasks`: the name of a registered function and its input, as JSON, and
optionally a concurrency key whose limit it counts against. Enqueueing is one INSERT (two with a
key); running it is the worker's job (worker.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

from db.models import Task
from db.queries import Querier
from psycopg_pool import ConnectionPool

TaskFunction = Callable[[Any], Any]
F = TypeVar("F", bound=TaskFunction)


class UnknownTaskError(LookupError):
    """enqueue() was given a task name that no function is registered under."""


class TaskInputError(ValueError):
    """enqueue() was given an input that cannot be stored as JSON."""


class TaskOptionError(ValueError):
    """enqueue() was given a concurrency key or limit that makes no sense."""


# max_running is an `integer` column: PostgreSQL's int4.
MAX_RUNNING_LIMIT = 2**31 - 1


def check_json(value: object) -> None:
    """Raise TypeError or ValueError unless `value` can be stored in a jsonb column.

    `allow_nan=False`: Python happily writes `NaN` and `Infinity`, which are not JSON, and
    PostgreSQL would reject them only later, inside the INSERT. What comes back from the database
    is what JSON can say: tuples come back as lists, and integer dict keys as strings.
    The NUL character is valid JSON but PostgreSQL refuses it in jsonb, hence the second check.
    """
    json.dumps(value, allow_nan=False)
    if contains_nul(value):
        raise ValueError("it contains a NUL character (\\x00), which PostgreSQL cannot store")


def contains_nul(value: object) -> bool:
    """Whether a string anywhere in `value` (dict keys included) holds the NUL character."""
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(contains_nul(key) or contains_nul(item) for key, item in value.items())
    if isinstance(value, list | tuple):
        return any(contains_nul(item) for item in value)
    return False


class Engine:
    """A registry of task functions plus a connection pool to the database holding the queue.

    Every process that enqueues or runs tasks builds an Engine and registers the functions it
    knows. The `tasks` table stores only a task's name; the registry turns it back into code.
    """

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url
        self.registry: dict[str, TaskFunction] = {}
        # A pool rather than a connection per call: connecting costs a few milliseconds (the
        # server forks a process), an INSERT a fraction of one. And rather than one shared
        # connection: threads would take turns on it, and a transaction one thread opened would
        # swallow the other threads' statements. The pool lends each caller its own.
        # Autocommit: each query commits on its own unless we open a transaction ourselves.
        self.pool = ConnectionPool(
            database_url, min_size=1, max_size=4, kwargs={"autocommit": True}, open=True
        )

    def close(self) -> None:
        self.pool.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def task(self, name: str) -> Callable[[F], F]:
        """Decorator: `@engine.task("send_email")` registers the function under that name.

        The function takes the task's input (a JSON value) and returns its output (a JSON value).
        The name, not the Python function, is what the database stores, so renaming the function
        is safe, and renaming the task is a change of contract between deploys.
        """

        def register(function: F) -> F:
            if name in self.registry:
                raise ValueError(f"a task named {name!r} is already registered")
            self.registry[name] = function
            return function

        return register

    # region: enqueue
    def enqueue(
        self,
        name: str,
        input: Any = None,
        *,
        concurrency_key: str | None = None,
        max_running: int | None = None,
    ) -> int:
        """Add a task to the queue and return its id. Nothing is written if the task is invalid.

        `concurrency_key` (a tenant id, say) and `max_running` go together: across all workers, at
        most `max_running` tasks with that key run at once. The limit belongs to the key, and
        the latest enqueue naming the key sets it. It is passed here, rather than configured
        once per key somewhere else, because the producer is who knows the tenant (and its
        plan), and a key needs no setup step that could be forgotten. Lowering a limit never
        stops tasks already running; it only holds back new claims.

        Every check happens here, in the caller's process, because this is where the mistake is
        and where a traceback helps: a typo found by a worker hours later helps no one.
        """
        if name not in self.registry:
            known = ", ".join(sorted(self.registry)) or "none"
            raise UnknownTaskError(f"no task named {name!r} is registered (registered: {known})")
        try:
            check_json(input)
        except (TypeError, ValueError) as err:
            raise TaskInputError(f"input of task {name!r} is not JSON-serializable: {err}") from err
        check_concurrency_options(concurrency_key, max_running)
        with self.pool.connection() as conn, conn.transaction():
            queries = Querier(conn)
            # The key's row first: the task's foreign key needs it. One transaction, so the
            # two writes commit together (and cost one commit, not two).
            if concurrency_key is not None and max_running is not None:
                queries.upsert_concurrency_key(key=concurrency_key, max_running=max_running)
            task_id = queries.enqueue_task(name=name, input=input, concurrency_key=concurrency_key)
        assert task_id is not None  # INSERT ... RETURNING always returns the row it inserted
        return task_id

    # endregion

    def get(self, task_id: int) -> Task | None:
        """The task's row as it is now (status, output or error, who ran it), or None."""
        with self.pool.connection() as conn:
            return Querier(conn).get_task(id=task_id)


def check_concurrency_options(concurrency_key: object, max_running: object) -> None:
    """Raise TaskOptionError unless both are None, or a non-empty key and a limit in range."""
    if concurrency_key is None and max_running is None:
        return
    if concurrency_key is None:
        raise TaskOptionError(
            f"max_running={max_running!r} needs a concurrency_key: it limits the tasks sharing one"
        )
    if not isinstance(concurrency_key, str) or not concurrency_key:
        raise TaskOptionError(
            f"concurrency_key must be a non-empty string, got {concurrency_key!r}"
        )
    if max_running is None:
        raise TaskOptionError(
            f"concurrency_key {concurrency_key!r} needs max_running: how many of its tasks may run"
            " at once"
        )
    # bool is a subclass of int, and `max_running=True` is surely a mistake.
    if (
        not isinstance(max_running, int)
        or isinstance(max_running, bool)
        or not 1 <= max_running <= MAX_RUNNING_LIMIT
    ):
        raise TaskOptionError(
            f"max_running must be an integer from 1 to {MAX_RUNNING_LIMIT}, got {max_running!r}"
        )
