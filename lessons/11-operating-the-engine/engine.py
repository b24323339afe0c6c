"""The client side of the queue: register task functions, enqueue tasks, look them up, cancel.

A task is a row in `tasks`: the name of a registered function and its input, as JSON,
optionally a concurrency key whose limit it counts against, and how to run it: priority, when,
how many attempts, how long each may take. Enqueueing is one INSERT (two with a key), for one
task or for a whole batch; running it is the worker's job (worker.py).

Two kinds of task. A regular task (`@engine.task`) is lesson 04's: its function runs from the
top on every attempt, and may do anything. A durable task (`@engine.durable_task`) is lessons
05-06's: an event log, steps, replays, so its function must be deterministic; and it may spawn
regular tasks as children, and wait for them without holding a worker.

Lesson 09: durable tasks sleep, and wait for events, holding no worker either; anyone sends an
event (send_event): another task, a script, a person pressing "approve".

Lesson 10: fork a finished task from event n of its history (fork): a new task, with a copy
of the first n events, runs the code deployed now from there.

Lesson 11: what operators and other programs need. Tasks carry tags to find them by
(enqueue(tags=...), list_tasks(tags=...)); a waiting task can be moved up or down its queue
(reprioritize); queue_stats() says what waits and what runs, per task name. A task may be
declared without a function (declare_task): a worker written in another language runs it,
through the HTTP API (api.py). And `@engine.step` makes a plain function call a durable step.
"""

from __future__ import annotations

import contextvars
import dataclasses
import datetime
import functools
import inspect
import json
import select
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import psycopg
from db.models import (
    EventKind,
    OperatorAction,
    OperatorActionKind,
    Task,
    TaskAttempt,
    TaskEvent,
    TaskStatus,
)
from db.queries import Querier, QueueStatsRow
from outages import DatabaseUnavailableError, is_outage, reason
from psycopg_pool import ConnectionPool, PoolTimeout

if TYPE_CHECKING:
    from task_context import TaskContext

TaskFunction = Callable[[Any], Any]
F = TypeVar("F", bound=TaskFunction)

# The task this thread (or coroutine) is running: set by the worker around the function
# (task_context.run_in_context), read by current_task() and by `@engine.step` functions. Here,
# rather than in task_context.py, because every module imports this one, and it imports none of
# them: Engine.step can read it without a circular import.
CURRENT_TASK: contextvars.ContextVar[TaskContext] = contextvars.ContextVar("current_task")


class UnknownTaskError(LookupError):
    """enqueue() was given a task name that no function is registered under."""


class TaskInputError(ValueError):
    """enqueue() was given an input that cannot be stored as JSON."""


class TaskOptionError(ValueError):
    """A concurrency key, limit or task option (priority, max_attempts...) that makes no sense."""


class TaskNotFoundError(LookupError):
    """No task has this id: it never existed, or the retention query deleted it."""


class TaskStateError(ValueError):
    """retry() of a task that has not failed (or been cancelled); replay() of an unfinished one;
    either of a child, which is operated through its parent."""


class IdempotencyKeyError(ValueError):
    """enqueue() was given an idempotency key that an earlier enqueue used for another task."""


# max_running, priority and max_attempts are `integer` columns: PostgreSQL's int4.
MAX_RUNNING_LIMIT = 2**31 - 1
# Task ids are `bigint`: PostgreSQL's int8.
MAX_TASK_ID = 2**63 - 1

# How the engine opens every connection: the Engine's pool, a worker's own connection and its
# step connections alike.
CONNECTION_OPTIONS: dict[str, Any] = {
    # Each statement commits on its own, unless the code opens a transaction itself.
    "autocommit": True,
    # A server that does not answer is an outage after 5 seconds, not a hang: libpq's default
    # is to wait forever. Over TCP, the keepalives notice within a minute a server that vanished
    # without a word (a host that lost power sends no goodbye).
    "connect_timeout": 5,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
    # Plan every statement for the tables as they are now. psycopg prepares a statement it has
    # run five times, and PostgreSQL may then keep one "generic" plan for it, chosen for the
    # tables as they were at that moment: a plan made while task_attempts held fifty rows reads
    # all of it to update one, and goes on doing so at a million (see "Stale plans" in
    # docs/performance.md).
    "options": "-c plan_cache_mode=force_custom_plan",
}

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


# region: options
@dataclasses.dataclass(frozen=True)
class TaskOptions:
    """How a task runs: defaults per task name at registration, overridable per enqueue.

    Durations are in seconds. All of it is stored in the task's row, so that every worker,
    including the one that finds the task abandoned by a dead worker, applies the same policy.
    """

    priority: int = 0  # higher runs first
    max_attempts: int = 3  # 1: never retry
    timeout: float = 300.0  # per attempt
    backoff: float = 1.0  # the wait before attempt 2; it doubles for each attempt after that
    backoff_cap: float = 300.0  # ...but never grows past this

    def __post_init__(self) -> None:
        check_int("priority", self.priority, -MAX_RUNNING_LIMIT, MAX_RUNNING_LIMIT)
        check_int("max_attempts", self.max_attempts, 1, 1000)
        for name in ("timeout", "backoff", "backoff_cap"):
            check_seconds(name, getattr(self, name), positive=True)
        if self.backoff_cap < self.backoff:
            raise TaskOptionError(
                f"backoff_cap ({self.backoff_cap}) must be at least backoff ({self.backoff})"
            )


# endregion


class Engine:
    """A registry of task functions plus a connection pool to the database holding the queue.

    Every process that enqueues or runs tasks builds an Engine and registers the functions it
    knows. The `tasks` table stores only a task's name; the registry turns it back into code.
    """

    def __init__(self, database_url: str, *, connect_timeout: float = 5.0) -> None:
        self.database_url = database_url
        self.registry: dict[str, TaskFunction] = {}
        self.options: dict[str, TaskOptions] = {}  # each registered name's defaults
        self.durable: set[str] = set()  # the names registered with durable_task()
        # Lesson 11: the names declared with declare_task(): their functions run elsewhere, in
        # a worker that talks to the HTTP API. They have options, and no entry in `registry`.
        self.declared: set[str] = set()
        # How long a call waits for a connection before it raises DatabaseUnavailableError.
        self.connect_timeout = connect_timeout
        # A pool rather than a connection per call: connecting costs a few milliseconds (the
        # server forks a process), an INSERT a fraction of one. And rather than one shared
        # connection: threads would take turns on it, and a transaction one thread opened would
        # swallow the other threads' statements. The pool lends each caller its own.
        # `check`: each connection lent is checked first (is_alive), so that the first call
        # after a database restart gets a new connection, not one the restart broke: that call
        # would fail, and could not tell whether its write had happened.
        self.pool = ConnectionPool(
            database_url,
            min_size=1,
            max_size=4,
            kwargs=CONNECTION_OPTIONS,
            check=is_alive,
            open=True,
        )

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection]:
        """A connection from the pool, for one call. DatabaseUnavailableError, naming the cause,
        when none can be had within `connect_timeout` seconds, or when it breaks during the call.
        """
        try:
            with self.pool.connection(timeout=self.connect_timeout) as conn:
                yield conn
        except psycopg.OperationalError as err:
            if not is_outage(err):
                raise
            if isinstance(err, PoolTimeout):
                cause = self._why_no_connection()
            else:
                cause = reason(err)
            raise DatabaseUnavailableError(f"database unavailable: {cause}") from err

    def _why_no_connection(self) -> str:
        """The pool only says it timed out (its log has why): ask the server once, directly."""
        try:
            psycopg.connect(self.database_url, connect_timeout=5).close()
        except psycopg.Error as err:
            return reason(err)
        return (
            f"no connection free in the pool after {self.connect_timeout:g}s"
            f" (all {self.pool.max_size} in use)"
        )

    def close(self) -> None:
        self.pool.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def task(self, name: str, **options: Any) -> Callable[[F], F]:
        """Decorator: `@engine.task("send_email", max_attempts=5)` registers the function.

        The function takes the task's input (a JSON value) and returns its output (a JSON value).
        The name, not the Python function, is what the database stores, so renaming the function
        is safe, and renaming the task is a change of contract between deploys. `options` are
        the task's defaults (TaskOptions); a bad one is refused here, when the module loads.
        """
        check_name("task name", name)
        defaults = with_options(TaskOptions(), options)

        def register(function: F) -> F:
            if name in self.registry:
                raise ValueError(f"a task named {name!r} is already registered")
            self.registry[name] = function
            self.options[name] = defaults
            return function

        return register

    def durable_task(self, name: str, **options: Any) -> Callable[[F], F]:
        """Decorator: `@engine.durable_task("research")` registers a durable task.

        Its function gets a DurableContext from `current_task()`: steps, recorded values and
        patches (lessons 05-06), and children: `ctx.spawn()`, `ctx.wait()`, `ctx.wait_all()`.
        """
        register = self.task(name, **options)

        def register_durable(function: F) -> F:
            register(function)
            self.durable.add(name)
            return function

        return register_durable

    # region: declare_task
    def declare_task(self, name: str, *, durable: bool = False, **options: Any) -> None:
        """Lesson 11: a task whose function this process does not have: a worker in another
        language runs it, through the HTTP API (api.py, its /worker endpoints).

        Enqueue checks its name and options as for any task; this process's Python workers
        never claim it (their task_names are the registry's); an HTTP worker claims it by name.
        `durable=True`: the HTTP worker may record steps in its event log.
        """
        check_name("task name", name)
        if name in self.options:
            raise ValueError(f"a task named {name!r} is already registered")
        self.options[name] = with_options(TaskOptions(), options)
        self.declared.add(name)
        if durable:
            self.durable.add(name)

    # endregion

    # region: step_decorator
    def step(
        self,
        function: Callable[..., Any] | None = None,
        *,
        name: str | None = None,
        hash_input: bool = False,
    ) -> Any:
        """Decorator (lesson 11): calling the function inside a durable task is a step.

        `@engine.step` over `def charge(order)`: inside a durable task, `charge(order)` is
        `ctx.step("charge", charge, order)` (recorded once, replayed after); anywhere else it
        is a plain call. Inside another step it is a plain call too: it is part of that step,
        whose result is what the log records. `async def` functions work the same, awaited.

        The step's name is the function's name unless `name` says otherwise: renaming the
        function renames the step, and a task recorded before would diverge on its retry
        (lesson 06). Give `name=` to rename the function freely.
        """
        if function is None:  # @engine.step(name="charge")
            return lambda f: as_step(f, name or f.__name__, hash_input)
        return as_step(function, name or function.__name__, hash_input)  # @engine.step

    # endregion

    def enqueue(
        self,
        name: str,
        input: Any = None,
        *,
        idempotency_key: str | None = None,
        concurrency_key: str | None = None,
        max_running: int | None = None,
        delay: float = 0,
        run_at: datetime.datetime | None = None,
        tags: Mapping[str, str] | None = None,
        **options: Any,
    ) -> int:
        """Add a task to the queue and return its id. Nothing is written if the task is invalid.

        `idempotency_key` (an order id, a request id) makes the enqueue safe to repeat: an
        enqueue that names a key used before writes nothing and returns the id of the task it
        created. A producer whose enqueue failed with a broken connection cannot know whether
        the task was written; with a key, it simply enqueues again. The key is remembered as
        long as its task is (retention deletes both). IdempotencyKeyError if that task has
        another name or input: one key, one request.

        `concurrency_key` (a tenant id, say) and `max_running` go together: across all workers, at
        most `max_running` tasks with that key run at once. The limit belongs to the key, and
        the latest enqueue naming the key sets it. It is passed here, rather than configured
        once per key somewhere else, because the producer is who knows the tenant (and its
        plan), and a key needs no setup step that could be forgotten. Lowering a limit never
        stops tasks already running; it only holds back new claims.

        `delay` (seconds, on the database's clock) or `run_at` (an aware datetime) schedule the
        task for later; `options` override the task's defaults (TaskOptions).

        `tags` (lesson 11): strings by name, {"customer": "42"}, to find the task by later
        (list_tasks(tags=...), `tasks list --tag customer=42`).

        Every check happens here, in the caller's process, because this is where the mistake is
        and where a traceback helps: a typo found by a worker hours later helps no one.
        DatabaseUnavailableError if the database cannot be reached.
        """
        ids = self._enqueue(
            name,
            [input],
            idempotency_key,
            concurrency_key=concurrency_key,
            max_running=max_running,
            delay=delay,
            run_at=run_at,
            tags=tags,
            options=options,
        )
        return ids[0]

    def enqueue_many(
        self,
        name: str,
        inputs: Iterable[Any],
        *,
        concurrency_key: str | None = None,
        max_running: int | None = None,
        delay: float = 0,
        run_at: datetime.datetime | None = None,
        tags: Mapping[str, str] | None = None,
        **options: Any,
    ) -> list[int]:
        """Add one task per input, all alike otherwise, with ONE statement; return their ids.

        One round trip and one commit for the lot: a commit waits for the disk, and a thousand
        commits wait a thousand times.
        """
        return self._enqueue(
            name,
            list(inputs),
            None,
            concurrency_key=concurrency_key,
            max_running=max_running,
            delay=delay,
            run_at=run_at,
            tags=tags,
            options=options,
        )

    # region: enqueue
    def _enqueue(
        self,
        name: str,
        inputs: list[Any],
        idempotency_key: str | None,
        *,
        concurrency_key: str | None,
        max_running: int | None,
        delay: float,
        run_at: datetime.datetime | None,
        tags: Mapping[str, str] | None,
        options: dict[str, Any],
    ) -> list[int]:
        chosen = self._check(name, inputs, delay, run_at, options)
        check_tags(tags)
        check_concurrency_options(concurrency_key, max_running)
        if idempotency_key is not None:
            check_name("idempotency_key", idempotency_key)
        params = dict(
            name=name,
            concurrency_key=concurrency_key,
            priority=chosen.priority,
            run_at=run_at,
            delay=seconds(delay),
            max_attempts=chosen.max_attempts,
            backoff_base=seconds(chosen.backoff),
            backoff_cap=seconds(chosen.backoff_cap),
            timeout=seconds(chosen.timeout),
            tags=dict(tags or {}),
        )
        with self.connection() as conn:
            queries = Querier(conn)
            # check_concurrency_options: the key and its limit come together, or not at all.
            if concurrency_key is None or max_running is None:
                # One statement, in autocommit: one round trip. (BEGIN and COMMIT would be two
                # more, which is most of the cost of enqueueing a single task.)
                return self._insert(queries, inputs, idempotency_key, params)
            # The key's row first: the task's foreign key needs it. One transaction, so the
            # two writes commit together (and cost one commit, not two).
            with conn.transaction():
                queries.upsert_concurrency_key(key=concurrency_key, max_running=max_running)
                return self._insert(queries, inputs, idempotency_key, params)

    # endregion

    # region: insert
    @staticmethod
    def _insert(
        queries: Querier, inputs: list[Any], idempotency_key: str | None, params: dict[str, Any]
    ) -> list[int]:
        """INSERT the tasks; with an idempotency key, return the earlier task's id if it exists.

        The key's check is the unique index, not a SELECT first: two enqueues with one key at
        the same instant would both find nothing, and both insert. With the index, the second
        INSERT waits for the first to commit, then inserts nothing (ON CONFLICT DO NOTHING).
        The SELECT after it is a new statement, with a new snapshot, which holds that row.
        """
        if len(inputs) != 1:
            return queries.enqueue_tasks(inputs=inputs, **params)
        while True:
            task_id = queries.enqueue_task(
                input=inputs[0], idempotency_key=idempotency_key, **params
            )
            if task_id is not None:
                return [task_id]
            assert idempotency_key is not None  # only the key's unique index refuses an INSERT
            earlier = queries.get_task_by_idempotency_key(idempotency_key=idempotency_key)
            if earlier is None:
                continue  # deleted in between by the retention query: the key is free again
            if earlier.name != params["name"] or earlier.input != json.loads(json.dumps(inputs[0])):
                raise IdempotencyKeyError(
                    f"idempotency key {idempotency_key!r} was used by task {earlier.id}"
                    f" ({earlier.name!r}) with another name or input: one key, one request"
                )
            return [earlier.id]

    # endregion

    def _check(
        self,
        name: str,
        inputs: list[Any],
        delay: object,
        run_at: object,
        options: dict[str, Any],
    ) -> TaskOptions:
        """The checks of enqueue: raise a specific error, or return the task's options."""
        # self.options, not self.registry: it has the declared tasks too (declare_task).
        if name not in self.options:
            known = ", ".join(sorted(self.options)) or "none"
            raise UnknownTaskError(f"no task named {name!r} is registered (registered: {known})")
        for input in inputs:
            try:
                check_json(input)
            except (TypeError, ValueError) as err:
                raise TaskInputError(
                    f"input of task {name!r} is not JSON-serializable: {err}"
                ) from err
        check_seconds("delay", delay, positive=False)
        if run_at is not None:
            if delay:
                raise TaskOptionError("give delay or run_at, not both")
            if not isinstance(run_at, datetime.datetime) or run_at.tzinfo is None:
                # A naive datetime means local time on the caller's machine, and maybe another
                # on the database server: refuse it rather than guess.
                raise TaskOptionError(f"run_at must be a timezone-aware datetime, got {run_at!r}")
        return with_options(self.options[name], options)

    def get(self, task_id: int) -> Task | None:
        """The task's row as it is now (status, output or error, who ran it), or None."""
        if not is_task_id(task_id):
            return None
        with self.connection() as conn:
            return Querier(conn).get_task(id=task_id)

    def attempts(self, task_id: int) -> list[TaskAttempt]:
        """Every attempt of the task, first to last: who ran it, when, and how it ended."""
        if not is_task_id(task_id):
            return []
        with self.connection() as conn:
            return Querier(conn).list_attempts(task_id=task_id)

    def events(self, task_id: int) -> list[TaskEvent]:
        """The task's event log, first to last: each step's result or error, and its attempt.

        Every history of the task, in order: `event.replay` tells them apart (0 is the first).
        """
        if not is_task_id(task_id):
            return []
        with self.connection() as conn:
            return Querier(conn).list_events(task_id=task_id)

    def children(self, task_id: int) -> list[Task]:
        """The tasks this task spawned, first to last, whatever their status."""
        if not is_task_id(task_id):
            return []
        with self.connection() as conn:
            return Querier(conn).list_children(parent_id=task_id)

    def forks(self, task_id: int) -> list[Task]:
        """The tasks forked from this one (lesson 10), first forked first."""
        if not is_task_id(task_id):
            return []
        with self.connection() as conn:
            return Querier(conn).list_forks(id=task_id)

    def history(self, task_id: int) -> list[TaskEvent]:
        """The task's current history (lesson 10): what a fork copies and a check replays."""
        if not is_task_id(task_id):
            return []
        with self.connection() as conn:
            return Querier(conn).load_whole_history(task_id=task_id)

    def actions(self, task_id: int) -> list[OperatorAction]:
        """What operators did to the task (retry, replay), first to last: the audit."""
        if not is_task_id(task_id):
            return []
        with self.connection() as conn:
            return Querier(conn).list_operator_actions(task_id=task_id)

    def wait(self, task_id: int, timeout: float = 60.0) -> Task:
        """Poll until the task has finished (completed, failed or cancelled); for demos and tests.

        Polling every 50 ms, still (lesson 08): workers hear of new work through notifications,
        but a task's end notifies nobody, which would put every completion's commit under
        NOTIFY's lock (lesson 08's README); a caller waiting for one task can afford to poll.
        """
        check_seconds("timeout", timeout, positive=False)
        deadline = time.monotonic() + timeout
        while True:
            task = self.get(task_id)
            if task is None:
                raise TaskNotFoundError(f"no task with id {task_id}")
            if task.finished_at is not None:
                return task
            if time.monotonic() > deadline:
                raise TimeoutError(f"task {task_id} is still {task.status} after {timeout}s")
            time.sleep(0.05)

    # region: cancel
    def cancel(self, task_id: int) -> bool:
        """Cancel a task that has not finished, and its unfinished children; False if it had
        finished already, and then nothing changes.

        A queued task will never run. A running task's attempt ends at once in the database, so
        nothing its worker writes later can complete or fail it; the worker's next heartbeat
        tells the function (TaskCancelled, from `current_task().check()` or `.sleep()`).

        A suspended task is cancelled like a queued one, and so is a durable task asleep or
        waiting for an event (lesson 09): a retry of it waits again, until the same moment.
        A parent's cancel cancels its scheduled, queued, running and suspended children, in the
        same transaction (the close policy); its finished children keep their outcome. A
        child's cancel wakes its parent if the parent was waiting for it: the parent's wait
        then raises ChildTaskError.
        """
        if not is_task_id(task_id):
            raise TaskNotFoundError(f"no task with id {task_id!r}")
        with self.connection() as conn, conn.transaction():
            queries = Querier(conn)
            # The locking rule (queries.sql, LockTasks): the parent, the task, its children
            # (lesson 10: and theirs, the whole tree below it), in id order. With the task
            # locked, it cannot spawn a child behind our back.
            queries.lock_family(id=task_id)
            cancelled = queries.cancel_task(id=task_id)
            if cancelled is None:
                if queries.get_task(id=task_id) is None:
                    raise TaskNotFoundError(f"no task with id {task_id}")
                return False
            # New statements: its children go with it; its parent wakes if this was the last
            # child it waited for.
            close_tree(queries, [task_id])
            if cancelled.parent_id is not None:
                queries.wake_parents(ids=[cancelled.parent_id])
            return True

    # endregion

    # region: fork
    def fork(self, task_id: int, at: int | None = None, *, before: str | None = None) -> int:
        """A new task, queued, whose history is a copy of the first `at` events of this one's;
        return its id. Or, with `before`, of the events before the first one named `before`
        (a step's name, say): `fork(7, before="apply discount")` re-runs from that step.

        The new task runs the code deployed now: the copied events replay (their steps do not
        run again), and everything after them runs. The original is untouched; each records
        the other (forked_from and forked_at; ListForks). `at=0` is a replay into a new task.

        Its children: a child whose outcome the copied history recorded is copied as it ended
        (it does not run again); a child it spawned but had not yet recorded the outcome of,
        at the fork point, is spawned again, a new task with the same input, and runs with the
        code of now, as everything after the fork point does. The fork's events name the
        fork's own children: a fork shares nothing with its original.

        Only a finished task without a parent: a fork of a running task would do, at the same
        time as the task itself, whatever comes after the fork point (cancel it first); and a
        child's history belongs to its parent's (fork the parent).
        """
        if not is_task_id(task_id):
            raise TaskNotFoundError(f"no task with id {task_id!r}")
        if (at is None) == (before is None):
            raise TaskOptionError("fork needs the fork point: at=N (events kept) or before=NAME")
        with self.connection() as conn, conn.transaction():
            queries = Querier(conn)
            task = queries.lock_task_to_fork(id=task_id)
            if task is None:
                raise TaskNotFoundError(f"no task with id {task_id}")
            if task.parent_id is not None:
                raise TaskStateError(
                    f"task {task_id} is a child of task {task.parent_id}: its history belongs to"
                    f" its parent's; fork task {task.parent_id} instead"
                )
            if task.finished_at is None:
                raise TaskStateError(
                    f"task {task_id} is {task.status}: only a finished task can be forked (a fork"
                    " would do what comes after the fork point while the task does too;"
                    " cancel it first)"
                )
            history = queries.load_whole_history(task_id=task_id)
            at = fork_point(task_id, history, at, before)
            kept = history[:at]
            # The attempt that recorded the last copied event, and those before it.
            attempts = max((event.attempt for event in kept), default=0)
            fork_id = queries.fork_task(id=task_id, at=at, attempts=attempts)
            assert fork_id is not None  # the task is there: we hold its lock
            queries.copy_attempts(fork_id=fork_id, id=task_id, attempts=attempts)
            ended = {e.child_id for e in kept if e.kind in CHILD_OUTCOMES}
            children = [e.child_id for e in kept if e.kind == EventKind.CHILD_SPAWNED]
            copies = []
            for child in children:
                assert child is not None  # the constraint child_events_name_their_child
                copy = queries.copy_child(id=child, parent_id=fork_id, finished=child in ended)
                assert copy is not None  # the child is there: children go with their parent
                copies.append(copy)
            queries.copy_events(
                fork_id=fork_id, id=task_id, at=at,
                children=[c for c in children if c is not None], copies=copies,
            )  # fmt: skip
        return fork_id

    # endregion

    # region: send_event
    def send_event(self, name: str, payload: Any = None) -> SentEvent:
        """Send the event `name`, with `payload` (any JSON value): every task waiting for it
        (ctx.wait_for_event) is queued at once, and every later wait for it receives it too.

        The first send of a name is the event; a later one changes nothing (SentEvent.first is
        False, and .payload is the first one's): safe to repeat, from a retried task or a
        double-clicked button. One transaction: the name's lock (the one a wait takes before it
        suspends, so that no wait misses this send), the event, and the waiters queued.
        """
        check_name("an event's name", name)
        try:
            check_json(payload)
        except (TypeError, ValueError) as err:
            message = f"payload of event {name!r} is not JSON-serializable: {err}"
            raise TaskInputError(message) from err
        with self.connection() as conn:
            queries = Querier(conn)
            with conn.transaction():
                queries.lock_event_name(name=name)
                row = queries.send_event(name=name, payload=payload)
                assert row is not None  # one row, always (SendEvent's SELECT has no FROM)
            if row.sent:
                return SentEvent(name, payload, first=True, woken=row.woken)
            earlier = queries.get_sent_event(name=name)
        assert earlier is not None  # sent events are never deleted
        return SentEvent(name, earlier.payload, first=False, woken=[])

    # endregion

    # region: cleanup
    def cleanup(self, older_than: float, batch: int = 1000) -> int:
        """Delete the tasks (and attempts) that finished over `older_than` seconds ago; how many.

        Run it from cron, or from a worker now and then. The claim's indexes hold only unfinished
        tasks, so old rows do not slow claims down, but they take disk space and make every
        vacuum, backup and dashboard query slower. Batches keep each transaction short.
        """
        check_seconds("older_than", older_than, positive=False)
        check_int("batch", batch, 1, 100_000)
        deleted = 0
        with self.connection() as conn:
            queries = Querier(conn)
            while True:
                n = queries.delete_finished_tasks(older_than=seconds(older_than), batch=batch)
                deleted += n
                if n < batch:
                    return deleted

    # endregion

    # region: operator
    def retry(self, task_id: int, *, attempts: int = 1) -> OperatorAction:
        """Run a failed (or cancelled) task again, on the history it has; return the audit row.

        What a worker does after a failed attempt, by hand: the steps in the log replay, and
        the function goes on from where it failed. For a failure that time or a fix cured: a
        service that was down, a bug fixed in a step the task had not recorded yet, or a
        deploy that made the task diverge (NonDeterminismError), rolled back.
        """
        return self._requeue(task_id, OperatorActionKind.RETRY, attempts)

    def replay(self, task_id: int, *, attempts: int = 1) -> OperatorAction:
        """Run a failed, cancelled or completed task again from an EMPTY history.

        For a task whose history no longer fits its code (NonDeterminismError): every step
        runs again, on the code deployed now, including steps whose side effects have
        happened already (a charge, an email), so they must be safe to repeat (an idempotency
        key) or a human must have decided. The old history is set aside, not deleted: its
        events keep their `replay` number, and the audit row says how many there were.
        Returns the audit row.

        A durable task's spawns are in that history, so the replay spawns new children; a
        retry replays the spawns and the waits, and no child runs again, except those that
        were cancelled with their parent, and whose end its history has not recorded: they
        are queued again, so that the retry can go on (RequeueTask).

        A child is not retried or replayed on its own: its outcome belongs to its parent's
        history, which recorded it, or will. Retry or replay the parent.
        """
        return self._requeue(task_id, OperatorActionKind.REPLAY, attempts)

    def _requeue(self, task_id: int, action: OperatorActionKind, attempts: int) -> OperatorAction:
        """`attempts` more attempts: one by default, since an operator wants to see the outcome
        (not another round of backoff). Safe against a worker still running the task (a
        zombie of a cancelled or timed-out attempt): every write it makes names its attempt,
        which is over, so the database refuses them, and the next claim starts a new one.
        """
        check_int("attempts", attempts, 1, 1000)
        if not is_task_id(task_id):
            raise TaskNotFoundError(f"no task with id {task_id!r}")
        with self.connection() as conn:
            queries = Querier(conn)
            row = queries.requeue_task(id=task_id, action=action, more_attempts=attempts)
            if row is not None:
                return row
            task = queries.get_task(id=task_id)
        if task is None:
            raise TaskNotFoundError(f"no task with id {task_id}")
        if task.parent_id is not None:
            raise TaskStateError(
                f"task {task_id} is a child of task {task.parent_id}: its outcome belongs to its"
                f" parent's history; retry or replay task {task.parent_id} instead"
            )
        if action == OperatorActionKind.RETRY:
            allowed = "only a failed or cancelled task can be retried"
        else:
            allowed = "only a failed, cancelled or completed task can be replayed"
        raise TaskStateError(f"task {task_id} is {task.status}: {allowed}")

    # endregion

    # region: operate
    def list_tasks(
        self,
        *,
        status: TaskStatus | str | None = None,
        name: str | None = None,
        concurrency_key: str | None = None,
        older_than: float | None = None,
        tags: Mapping[str, str] | None = None,
        limit: int = 50,
    ) -> list[Task]:
        """Lesson 11: the newest `limit` tasks that match every filter given (SearchTasks).

        `older_than`: created more than that many seconds ago. `tags`: carrying all of these.
        """
        if status is not None:
            try:
                status = TaskStatus(status)
            except ValueError:
                known = ", ".join(s.value for s in TaskStatus)
                raise TaskOptionError(f"status must be one of {known}, got {status!r}") from None
        for what, value in (("name", name), ("concurrency_key", concurrency_key)):
            if value is not None:
                check_name(what, value)
        if older_than is not None:
            check_seconds("older_than", older_than, positive=False)
        check_tags(tags)
        check_int("limit", limit, 1, 10_000)
        with self.connection() as conn:
            return Querier(conn).search_tasks(
                status=status,
                name=name,
                concurrency_key=concurrency_key,
                older_than=None if older_than is None else seconds(older_than),
                tags=dict(tags or {}),
                max_tasks=limit,
            )

    def reprioritize(self, task_id: int, priority: int) -> Task:
        """Lesson 11: give a task that waits for a worker (queued or scheduled) another priority
        (higher runs first); the audit says who was moved. TaskStateError if it is not waiting.
        """
        check_int("priority", priority, -MAX_RUNNING_LIMIT, MAX_RUNNING_LIMIT)
        if not is_task_id(task_id):
            raise TaskNotFoundError(f"no task with id {task_id!r}")
        with self.connection() as conn:
            queries = Querier(conn)
            task = queries.reprioritize_task(id=task_id, priority=priority)
            if task is not None:
                return task
            task = queries.get_task(id=task_id)
        if task is None:
            raise TaskNotFoundError(f"no task with id {task_id}")
        raise TaskStateError(
            f"task {task_id} is {task.status}: only a queued or scheduled task can be reprioritized"
        )

    def queue_stats(self) -> list[QueueStatsRow]:
        """Lesson 11: per task name: queued, scheduled, running, suspended, leases expired,
        completed and failed lately, and how long the oldest queued task has waited."""
        with self.connection() as conn:
            return Querier(conn).queue_stats()

    # endregion


def check_concurrency_options(concurrency_key: object, max_running: object) -> None:
    """Raise TaskOptionError unless both are None, or a non-empty key and a limit in range."""
    if concurrency_key is None and max_running is None:
        return
    if concurrency_key is None:
        raise TaskOptionError(
            f"max_running={max_running!r} needs a concurrency_key: it limits the tasks sharing one"
        )
    check_name("concurrency_key", concurrency_key)
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


def with_options(base: TaskOptions, overrides: dict[str, Any]) -> TaskOptions:
    """`base` with some fields replaced; an unknown option name is a TaskOptionError."""
    names = [field.name for field in dataclasses.fields(TaskOptions)]
    for option in overrides:
        if option not in names:
            raise TaskOptionError(f"unknown task option {option!r} (options: {', '.join(names)})")
    return dataclasses.replace(base, **overrides)


def is_alive(conn: psycopg.Connection) -> None:
    """Raise OperationalError if the server has closed this idle connection (the pool's check).

    An idle connection has nothing to read: if its socket is readable, the server hung up (a
    restart closes every connection) or sent the reason it is about to. One system call, no
    round trip: an empty query would do the same job at the cost of a round trip per call,
    which for a single enqueue is a third of its time. (A server that vanished without
    closing its connections, a host that lost power, is only found by the statement, which
    fails: the keepalives in CONNECTION_OPTIONS bound how long that takes.)
    """
    readable, _, _ = select.select([conn.fileno()], [], [], 0)
    if readable:
        conn.close()  # closed, the pool throws it away; open, it would lend it again
        raise psycopg.OperationalError("the server closed this connection while it was idle")


def close_tree(queries: Querier, ids: list[int]) -> list[int]:
    """The close policy, down the tree: cancel the unfinished children of those of these tasks
    that have finished, then theirs, level by level; return every task cancelled. The caller
    holds the tree's locks already (LockTasks, LockFamily), taken in id order."""
    closed: list[int] = []
    while ids:
        ids = queries.close_children(ids=ids)
        closed += ids
    return closed


CHILD_OUTCOMES = (EventKind.CHILD_COMPLETED, EventKind.CHILD_FAILED)


def fork_point(task_id: int, history: list[TaskEvent], at: int | None, before: str | None) -> int:
    """How many events of `history` a fork keeps: `at`, checked, or the place of the first
    event named `before`."""
    if before is not None:
        for event in history:
            if event.name == before:
                return event.seq - 1
        names = ", ".join(dict.fromkeys(event.name for event in history)) or "none"
        raise TaskOptionError(f"task {task_id} has no event named {before!r} (its events: {names})")
    check_int("at", at, 0, len(history))
    assert at is not None
    return at


@dataclasses.dataclass(frozen=True)
class SentEvent:
    """What engine.send_event() did."""

    name: str
    payload: Any  # the event's payload: this send's, or the first send's if this one was a repeat
    first: bool  # False: an event of this name had been sent already, and it stays as it was
    woken: list[int]  # the tasks that were waiting for it, queued now


# region: as_step
def as_step(function: Callable[..., Any], name: str, hash_input: bool) -> Callable[..., Any]:
    """`function`, which asks the task it runs in, if any, what a call of it is (step_call)."""
    if inspect.iscoroutinefunction(function):

        @functools.wraps(function)
        async def call_async(*args: Any, **kwargs: Any) -> Any:
            ctx = CURRENT_TASK.get(None)
            if ctx is None:  # outside any task
                return await function(*args, **kwargs)
            return await ctx.astep_call(name, function, args, kwargs, hash_input)

        return call_async

    @functools.wraps(function)
    def call(*args: Any, **kwargs: Any) -> Any:
        ctx = CURRENT_TASK.get(None)
        if ctx is None:
            return function(*args, **kwargs)
        return ctx.step_call(name, function, args, kwargs, hash_input)

    return call


# endregion


def check_tags(tags: object) -> None:
    """Raise TaskOptionError unless `tags` is None or a mapping of strings to strings."""
    if tags is None:
        return
    if not isinstance(tags, Mapping):
        raise TaskOptionError(f"tags must be a mapping of strings to strings, got {tags!r}")
    for key, value in tags.items():
        check_name("a tag's name", key)
        if not isinstance(value, str):
            raise TaskOptionError(f"tag {key!r} must be a string, got {value!r}")
        try:
            check_text(value)
        except ValueError as err:
            raise TaskOptionError(f"tag {key!r} cannot be stored: {err}") from None


def check_name(what: str, name: object) -> None:
    """Raise TaskOptionError unless `name` is a non-empty string the database can store."""
    if not isinstance(name, str) or not name:
        raise TaskOptionError(f"{what} must be a non-empty string, got {name!r}")
    try:
        check_text(name)
    except ValueError as err:
        raise TaskOptionError(f"{what} {name!r} cannot be stored: {err}") from None


def is_task_id(task_id: object) -> bool:
    """Whether `task_id` could be a task's id; TypeError if it is not even an integer.

    Checked before any query: `engine.cancel("12")` is a mistake to point out, not a driver
    error to decode; and an integer too large for a bigint names no task at all.
    """
    if not isinstance(task_id, int) or isinstance(task_id, bool):
        raise TypeError(f"a task id is an integer, got {task_id!r}")
    return 1 <= task_id <= MAX_TASK_ID


def check_int(name: str, value: object, low: int, high: int) -> None:
    # bool is a subclass of int, and `max_attempts=True` is surely a mistake.
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise TaskOptionError(f"{name} must be an integer from {low} to {high}, got {value!r}")


def check_seconds(name: str, value: object, *, positive: bool) -> None:
    """Raise TaskOptionError unless `value` is a number of seconds: at least a millisecond if
    `positive` (the database keeps microseconds, and `timeout=1e-9` would be stored as 0), at
    least 0 otherwise, and less than 1e9 (about 31 years)."""
    lowest = 0.001 if positive else 0
    # `value < 1e9` also refuses NaN (every comparison with NaN is false) and infinity.
    if isinstance(value, bool) or not isinstance(value, int | float) or not lowest <= value < 1e9:
        bound = "at least 0.001" if positive else "0 or more"
        raise TaskOptionError(f"{name} must be a number of seconds, {bound}, got {value!r}")


def seconds(value: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=value)
