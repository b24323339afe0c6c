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


# region: json
# The deepest nesting a stored JSON value may have. PostgreSQL would take deeper ones, but
# Python's json module, which psycopg uses both ways, gives up at its recursion limit (a
# thousand levels, less whatever the stack holds already). No sane document needs a hundred.
MAX_JSON_DEPTH = 100


def check_json(value: object) -> None:
    """Raise TypeError or ValueError unless `value` can be stored in a jsonb column as it is.

    Checked here, where the mistake is, rather than by the database later, in a worker:
    - dicts, lists (tuples become lists), strings, numbers, True, False and None only;
    - dict keys are strings: json.dumps would turn the key 1 into "1" without a word, and
      `{1: "a", "1": "b"}` into `{"1": "b"}`;
    - no NaN or Infinity, which are not JSON (`allow_nan=False`);
    - text PostgreSQL can store (check_text);
    - at most MAX_JSON_DEPTH levels deep (a list that contains itself never ends).
    What comes back from the database is what JSON can say: tuples come back as lists.
    """
    _check_structure(value, depth=1)
    json.dumps(value, allow_nan=False)  # the types, NaN and infinity


def _check_structure(value: object, depth: int) -> None:
    if isinstance(value, str):
        check_text(value)
        return
    if not isinstance(value, dict | list | tuple):
        return
    if depth > MAX_JSON_DEPTH:
        raise ValueError(
            f"it is nested more than {MAX_JSON_DEPTH} levels deep (or contains itself)"
        )
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                # Not the key's repr(): it is the caller's code, and could raise.
                raise TypeError(f"dict keys must be strings, not {type(key).__name__}")
            check_text(key)
            _check_structure(item, depth + 1)
    else:
        for item in value:
            _check_structure(item, depth + 1)


def check_text(text: str) -> None:
    """Raise ValueError unless PostgreSQL can store `text`: no NUL, valid UTF-8.

    PostgreSQL refuses the NUL character in text and jsonb alike. A lone surrogate, half of a
    UTF-16 pair, is what Python makes of bytes that are not UTF-8 (`os.fsdecode` of a file
    name, say); it has no UTF-8 form at all, so it cannot even be sent.
    """
    if "\x00" in text:
        raise ValueError("it contains a NUL character (\\x00), which PostgreSQL cannot store")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        bad = text[err.start : err.end].encode("utf-8", "backslashreplace").decode()
        raise ValueError(
            f"it contains {bad}, a lone surrogate, which is not valid UTF-8 (decode bytes with"
            " errors='replace', or store them as base64)"
        ) from None


def json_problem(value: object) -> str | None:
    """Why `value` cannot be stored as JSON (check_json), as storable text; None if it can.

    For what a task returns: whatever that is, the answer is text the worker can record.
    """
    try:
        check_json(value)
    except Exception as err:
        return describe_json_error(err)
    return None


def describe_json_error(err: Exception) -> str:
    """What check_json raised, as storable text: its message, or, for anything other than the
    TypeError or ValueError it raises itself, what a container of the caller's own raised."""
    if isinstance(err, TypeError | ValueError):
        return storable_text(error_message(err), MAX_ERROR_LENGTH)
    return describe_error(err)


# endregion


# region: describe_error
# An error message is for people: long enough for a message and its context, short enough that
# a task raising a megabyte of text does not copy it into every row that records the failure.
MAX_ERROR_LENGTH = 2000


def describe_error(err: BaseException) -> str:
    """`ValueError: bad address`: the exception's type and message, as the database stores it.

    Whatever the exception is made of, this returns text the database can store, so that a
    task's failure is recorded as one, and never crashes the worker recording it.
    """
    message = error_message(err)
    text = f"{type(err).__name__}: {message}" if message else type(err).__name__
    return storable_text(text, MAX_ERROR_LENGTH)


def error_message(err: BaseException) -> str:
    """`str(err)`, or a placeholder if the exception's own __str__ raises."""
    try:
        return str(err)
    # BaseException: a __str__ that raises anything must not take the worker down with it.
    except BaseException as broken:
        return f"<str() of the exception raised {type(broken).__name__}>"


def storable_text(text: str, limit: int) -> str:
    """`text`, with NUL and lone surrogates escaped (check_text), cut to `limit` characters."""
    text = text.replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode("utf-8")
    if len(text) > limit:
        text = f"{text[:limit]}... ({len(text) - limit} more characters)"
    return text


# endregion


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

        check_task_name(name)

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
    try:
        check_text(concurrency_key)
    except ValueError as err:
        message = f"concurrency_key {concurrency_key!r} cannot be stored: {err}"
        raise TaskOptionError(message) from None
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


def check_task_name(name: object) -> None:
    """Raise ValueError unless `name` is a non-empty string the database can store."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a task name must be a non-empty string, got {name!r}")
    try:
        check_text(name)
    except ValueError as err:
        raise ValueError(f"task name {name!r} cannot be stored: {err}") from None
