"""The client side of the queue: register task functions, enqueue tasks, look them up, cancel.

A task is a row in `tasks`: the name of a registered function and its input, as JSON,
optionally a concurrency key whose limit it counts against, and how to run it: priority, when,
how many attempts, how long each may take. Enqueueing is one INSERT (two with a key), for one
task or for a whole batch; running it is the worker's job (worker.py).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from db.models import OperatorAction, OperatorActionKind, Task, TaskAttempt, TaskEvent
from db.queries import Querier
from psycopg_pool import ConnectionPool

TaskFunction = Callable[[Any], Any]
F = TypeVar("F", bound=TaskFunction)


class UnknownTaskError(LookupError):
    """enqueue() was given a task name that no function is registered under."""


class TaskInputError(ValueError):
    """enqueue() was given an input that cannot be stored as JSON."""


class TaskOptionError(ValueError):
    """A concurrency key, limit or task option (priority, max_attempts...) that makes no sense."""


class TaskNotFoundError(LookupError):
    """No task has this id: it never existed, or the retention query deleted it."""


class TaskStateError(ValueError):
    """retry() or replay() of a task that has not failed (or been cancelled)."""


# max_running, priority and max_attempts are `integer` columns: PostgreSQL's int4.
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

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url
        self.registry: dict[str, TaskFunction] = {}
        self.options: dict[str, TaskOptions] = {}  # each registered name's defaults
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

    def task(self, name: str, **options: Any) -> Callable[[F], F]:
        """Decorator: `@engine.task("send_email", max_attempts=5)` registers the function.

        The function takes the task's input (a JSON value) and returns its output (a JSON value).
        The name, not the Python function, is what the database stores, so renaming the function
        is safe, and renaming the task is a change of contract between deploys. `options` are
        the task's defaults (TaskOptions); a bad one is refused here, when the module loads.
        """
        defaults = with_options(TaskOptions(), options)

        def register(function: F) -> F:
            if name in self.registry:
                raise ValueError(f"a task named {name!r} is already registered")
            self.registry[name] = function
            self.options[name] = defaults
            return function

        return register

    def enqueue(
        self,
        name: str,
        input: Any = None,
        *,
        concurrency_key: str | None = None,
        max_running: int | None = None,
        delay: float = 0,
        run_at: datetime.datetime | None = None,
        **options: Any,
    ) -> int:
        """Add a task to the queue and return its id. Nothing is written if the task is invalid.

        `concurrency_key` (a tenant id, say) and `max_running` go together: across all workers, at
        most `max_running` tasks with that key run at once. The limit belongs to the key, and
        the latest enqueue naming the key sets it. It is passed here, rather than configured
        once per key somewhere else, because the producer is who knows the tenant (and its
        plan), and a key needs no setup step that could be forgotten. Lowering a limit never
        stops tasks already running; it only holds back new claims.

        `delay` (seconds, on the database's clock) or `run_at` (an aware datetime) schedule the
        task for later; `options` override the task's defaults (TaskOptions).

        Every check happens here, in the caller's process, because this is where the mistake is
        and where a traceback helps: a typo found by a worker hours later helps no one.
        """
        ids = self.enqueue_many(
            name,
            [input],
            concurrency_key=concurrency_key,
            max_running=max_running,
            delay=delay,
            run_at=run_at,
            **options,
        )
        return ids[0]

    # region: enqueue
    def enqueue_many(
        self,
        name: str,
        inputs: Iterable[Any],
        *,
        concurrency_key: str | None = None,
        max_running: int | None = None,
        delay: float = 0,
        run_at: datetime.datetime | None = None,
        **options: Any,
    ) -> list[int]:
        """Add one task per input, all alike otherwise, with ONE statement; return their ids.

        One round trip and one commit for the lot: a commit waits for the disk, and a thousand
        commits wait a thousand times.
        """
        inputs = list(inputs)
        chosen = self._check(name, inputs, delay, run_at, options)
        check_concurrency_options(concurrency_key, max_running)
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
        )
        with self.pool.connection() as conn:
            queries = Querier(conn)
            if concurrency_key is None:
                # One statement, in autocommit: one round trip. (BEGIN and COMMIT would be two
                # more, which is most of the cost of enqueueing a single task.)
                return self._insert(queries, inputs, params)
            # The key's row first: the task's foreign key needs it. One transaction, so the
            # two writes commit together (and cost one commit, not two).
            with conn.transaction():
                queries.upsert_concurrency_key(key=concurrency_key, max_running=max_running)
                return self._insert(queries, inputs, params)

    # endregion

    @staticmethod
    def _insert(queries: Querier, inputs: list[Any], params: dict[str, Any]) -> list[int]:
        if len(inputs) != 1:
            return queries.enqueue_tasks(inputs=inputs, **params)
        task_id = queries.enqueue_task(input=inputs[0], **params)
        assert task_id is not None  # INSERT ... RETURNING always returns the row it inserted
        return [task_id]

    def _check(
        self,
        name: str,
        inputs: list[Any],
        delay: object,
        run_at: object,
        options: dict[str, Any],
    ) -> TaskOptions:
        """The checks of enqueue: raise a specific error, or return the task's options."""
        if name not in self.registry:
            known = ", ".join(sorted(self.registry)) or "none"
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
        with self.pool.connection() as conn:
            return Querier(conn).get_task(id=task_id)

    def attempts(self, task_id: int) -> list[TaskAttempt]:
        """Every attempt of the task, first to last: who ran it, when, and how it ended."""
        with self.pool.connection() as conn:
            return Querier(conn).list_attempts(task_id=task_id)

    def events(self, task_id: int) -> list[TaskEvent]:
        """The task's event log, first to last: each step's result or error, and its attempt.

        Every history of the task, in order: `event.replay` tells them apart (0 is the first).
        """
        with self.pool.connection() as conn:
            return Querier(conn).list_events(task_id=task_id)

    def actions(self, task_id: int) -> list[OperatorAction]:
        """What operators did to the task (retry, replay), first to last: the audit."""
        with self.pool.connection() as conn:
            return Querier(conn).list_operator_actions(task_id=task_id)

    def wait(self, task_id: int, timeout: float = 60.0) -> Task:
        """Poll until the task has finished (completed, failed or cancelled); for demos and tests.

        Polling every 50 ms, because this lesson has nothing better (no LISTEN/NOTIFY yet).
        """
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
        """Cancel a queued or running task; False if it had already finished.

        A queued task will never run. A running task's attempt ends at once in the database, so
        nothing its worker writes later can complete or fail it; the worker's next heartbeat
        tells the function (TaskCancelled, from `current_task().check()` or `.sleep()`).
        """
        with self.pool.connection() as conn:
            queries = Querier(conn)
            if queries.cancel_task(id=task_id) is not None:
                return True
            if queries.get_task(id=task_id) is None:
                raise TaskNotFoundError(f"no task with id {task_id}")
            return False

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
        """Run a failed (or cancelled) task again from an EMPTY history; return the audit row.

        For a task whose history no longer fits its code (NonDeterminismError): every step
        runs again, on the code deployed now, including steps whose side effects have
        happened already (a charge, an email), so they must be safe to repeat (an idempotency
        key) or a human must have decided. The old history is set aside, not deleted: its
        events keep their `replay` number, and the audit row says how many there were.
        """
        return self._requeue(task_id, OperatorActionKind.REPLAY, attempts)

    def _requeue(self, task_id: int, action: OperatorActionKind, attempts: int) -> OperatorAction:
        """`attempts` more attempts: one by default, since an operator wants to see the outcome
        (not another round of backoff). Safe against a worker still running the task (a
        zombie of a cancelled or timed-out attempt): every write it makes names its attempt,
        which is over, so the database refuses them, and the next claim starts a new one.
        """
        check_int("attempts", attempts, 1, 1000)
        with self.pool.connection() as conn:
            queries = Querier(conn)
            row = queries.requeue_task(id=task_id, action=action, more_attempts=attempts)
            if row is not None:
                return row
            task = queries.get_task(id=task_id)
        if task is None:
            raise TaskNotFoundError(f"no task with id {task_id}")
        verb = "retried" if action == OperatorActionKind.RETRY else "replayed"
        raise TaskStateError(
            f"task {task_id} is {task.status}: only a failed or cancelled task can be {verb}"
        )

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
        with self.pool.connection() as conn:
            queries = Querier(conn)
            while True:
                n = queries.delete_finished_tasks(older_than=seconds(older_than), batch=batch)
                deleted += n
                if n < batch:
                    return deleted

    # endregion


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


def with_options(base: TaskOptions, overrides: dict[str, Any]) -> TaskOptions:
    """`base` with some fields replaced; an unknown option name is a TaskOptionError."""
    names = [field.name for field in dataclasses.fields(TaskOptions)]
    for option in overrides:
        if option not in names:
            raise TaskOptionError(f"unknown task option {option!r} (options: {', '.join(names)})")
    return dataclasses.replace(base, **overrides)


def check_int(name: str, value: object, low: int, high: int) -> None:
    # bool is a subclass of int, and `max_attempts=True` is surely a mistake.
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise TaskOptionError(f"{name} must be an integer from {low} to {high}, got {value!r}")


def check_seconds(name: str, value: object, *, positive: bool) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    # `value < 1e9` also refuses NaN (every comparison with NaN is false) and infinity.
    if not ok or not (0 < value < 1e9 if positive else 0 <= value < 1e9):
        bound = "more than 0" if positive else "0 or more"
        raise TaskOptionError(f"{name} must be a number of seconds, {bound}, got {value!r}")


def seconds(value: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=value)
