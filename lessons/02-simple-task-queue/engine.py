"""The client side of the queue: register task functions, enqueue tasks, look them up.

A task is a row in `tasks`: the name of a registered function and its input, as JSON. Enqueueing
is one INSERT; running it is the worker's job (worker.py).
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

    def enqueue(self, name: str, input: Any = None) -> int:
        """Add a task to the queue and return its id. Nothing is written if the task is invalid.

        Both checks happen here, in the caller's process, because this is where the mistake is
        and where a traceback helps: a typo found by a worker hours later helps no one.
        """
        if name not in self.registry:
            known = ", ".join(sorted(self.registry)) or "none"
            raise UnknownTaskError(f"no task named {name!r} is registered (registered: {known})")
        try:
            check_json(input)
        except (TypeError, ValueError) as err:
            raise TaskInputError(f"input of task {name!r} is not JSON-serializable: {err}") from err
        with self.pool.connection() as conn:
            task_id = Querier(conn).enqueue_task(name=name, input=input)
        assert task_id is not None  # INSERT ... RETURNING always returns the row it inserted
        return task_id

    def get(self, task_id: int) -> Task | None:
        """The task's row as it is now (status, output or error, who ran it), or None."""
        with self.pool.connection() as conn:
            return Querier(conn).get_task(id=task_id)
