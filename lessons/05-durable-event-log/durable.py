"""Durable functions: every step a task takes is logged, and a retry replays the log.

A task function wraps each piece of work that must not be repeated (charge the card, book the
room, send the email) in a step:

    ctx = current_durable_task()
    payment = ctx.step("charge", charge_card, order["card"], order["total"])

The first time, the step runs, and its result is appended to the task's event log
(`task_events`) by one statement that also proves this worker still holds the task. When the
task is retried (the function raised, or its worker died and its lease ran out), the function
runs again from the top. Each step already in the log returns its recorded result without
running; the first step that is not in the log runs, and so does everything after it. The log
is the function's progress: that is all durable execution is.

What the function's author must know, decided here and explained in the README:
- a step is found in the log by its position: the n-th step of a run replays event n, whatever
  its name (the name is recorded, for people; names may repeat);
- a step's result must be JSON, because the log stores it; the first run returns the stored
  value too, so a replay cannot see anything else;
- a step that raises is not recorded, so the retry runs it again, unless the function catches
  the error and takes another step: then the error is history, and replays as the same
  StepError;
- the code between steps runs again on every attempt: it must come to the same decisions
  given the same step results (no clock, no randomness outside a step; lesson 06).

The database may go away while a step runs (a restart, a failover: outages.py). The step's
result then waits, and its append is tried again with backoff, until the database answers or
the lease has surely run out. An append whose answer was lost may have landed: the next try
looks for it first, so that a step is never recorded twice.
"""

from __future__ import annotations

import dataclasses
import datetime
import time
from collections.abc import Callable
from typing import Any, TypeVar, cast

import psycopg
from db.models import EventKind, TaskEvent
from db.queries import Querier
from engine import check_json, check_text, describe_error, describe_json_error
from outages import Backoff, is_outage
from psycopg_pool import ConnectionPool
from task_context import LeaseLostError, TaskContext, TaskStopped, current_task

T = TypeVar("T")


class StepError(Exception):
    """A step raised, or returned a value that is not JSON. `ctx.step` raises this, on the run
    where the step failed and on every replay of that failure, so a function that catches it
    takes the same path both times. The original exception is the `__cause__` (first run only).
    """

    def __init__(self, step: str, error: str) -> None:
        super().__init__(f"step {step!r} failed: {error}")
        self.step = step
        self.error = error  # "Type: message", as recorded in task_events.error


@dataclasses.dataclass
class _Failure:
    """A step that failed in this attempt and is not in the log (yet)."""

    seq: int
    name: str
    error: str
    duration: datetime.timedelta


def current_durable_task() -> DurableContext:
    """current_task(), typed as what it is in this lesson: every task is durable, and its
    function sees a DurableContext (steps, and what the worker's TaskContext has)."""
    ctx = current_task()
    assert isinstance(ctx, DurableContext), "the worker gives every task a DurableContext"
    return ctx


class DurableContext(TaskContext):
    """A TaskContext (task_context.py) that also keeps the task's event log: `step()`.

    One per attempt, made by the worker at the claim. Its steps talk to the database through
    `connections`, the worker's pool of one connection per slot: a function's step never
    waits for another's, nor for the worker's loop, which has its own connection.
    """

    def __init__(
        self,
        connections: ConnectionPool,
        task_id: int,
        attempt: int,
        timeout: datetime.timedelta,
    ) -> None:
        super().__init__(task_id, attempt, timeout)
        self._connections = connections
        self._history: list[TaskEvent] | None = None  # loaded at the first step
        self._steps = 0  # steps this run has taken so far, replayed or run
        self._failure: _Failure | None = None
        self._in_step: str | None = None
        self.replayed = 0  # for the worker's log: how this attempt went
        self.ran = 0

    def history(self) -> list[TaskEvent]:
        """What earlier attempts recorded: ONE query per attempt, at its first step.

        A first attempt has no history, and asks nothing. Reading one event per step instead
        would cost a round trip per step on every attempt, for nothing: no other worker can add
        to this task's log while we hold its lease.
        """
        if self._history is None:
            if self.attempt == 1:
                self._history = []
            else:
                self._history = self._database(
                    lambda conn, retried: Querier(conn).load_history(
                        task_id=self.task_id, attempt=self.attempt
                    )
                )
        return self._history

    # region: step
    def step(self, name: str, function: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Run `function(*args, **kwargs)` once for this task, or return what it returned before.

        Raises StepError if the step raised or returned something that is not JSON: nothing
        is recorded, so a retry runs the step again, unless the function catches the error and
        takes another step. Raises LeaseLostError, TaskCancelled or TaskTimeout if this attempt
        is over: nothing is recorded either, and the attempt that holds the task now, if any,
        runs the step.
        """
        check_step_name(name)
        if self._in_step is not None:
            # The outer step's result would be replayed without running it, so the inner
            # step's event would never be asked for, and the next step would get it instead.
            outer = self._in_step
            raise RuntimeError(f"step {name!r} called inside step {outer!r}: steps cannot nest")
        history = self.history()
        if self._failure is not None:
            # The function caught the last step's StepError and carried on: the path it is
            # taking now depends on that failure, so the failure becomes history first.
            failure, self._failure = self._failure, None
            self._append(failure.seq, EventKind.STEP_FAILED, failure.name, None, failure.error,
                         failure.duration)  # fmt: skip
        self._steps += 1
        seq = self._steps

        if seq <= len(history):  # replay: the step is in the log, do not run it
            event = history[seq - 1]
            self.replayed += 1
            if event.kind == EventKind.STEP_FAILED:
                raise StepError(event.name, event.error or "")
            return cast(T, event.result)  # what the function returned then, through JSON

        self.check()  # the attempt is over (cancelled, timed out, lease lost): do not start
        self.ran += 1
        self._in_step = name
        started = time.monotonic()
        cause: BaseException | None = None
        error: str | None = None
        try:
            result = function(*args, **kwargs)
        except TaskStopped:
            raise  # not the step's failure: the attempt ended while the step ran
        except Exception as err:
            cause, error = err, describe_error(err)
        else:
            try:
                check_json(result)
            except Exception as err:
                problem = describe_json_error(err)
                cause, error = err, f"returned a value that is not JSON-serializable: {problem}"
        finally:
            self._in_step = None
        duration = datetime.timedelta(seconds=time.monotonic() - started)

        if error is None:
            return self._append(seq, EventKind.STEP_COMPLETED, name, result, None, duration)
        # Not recorded: if the failure ends the attempt, the retry runs the step again.
        self._failure = _Failure(seq, name, error, duration)
        raise StepError(name, error) from cause

    # endregion

    # region: append
    def _append(
        self,
        seq: int,
        kind: EventKind,
        name: str,
        result: Any,
        error: str | None,
        duration: datetime.timedelta,
    ) -> Any:
        """Append one event, fenced by the lease: ONE statement, one round trip, own commit."""

        def append(conn: psycopg.Connection, retried: bool) -> Any:
            queries = Querier(conn)
            if retried:  # the last try's connection broke: maybe after its commit
                event = queries.get_event(task_id=self.task_id, seq=seq, attempt=self.attempt)
                if event is not None:
                    return event
            return queries.append_event(
                task_id=self.task_id, attempt=self.attempt, seq=seq, kind=kind, name=name,
                result=result, error=error, duration=duration,
            )  # fmt: skip

        row = self._database(append)
        if row is None:
            # Fenced out: the database ended this attempt (a timeout or a cancel, which the
            # heartbeat may already have told us about), or its lease ran out, and another
            # worker may be running the task. Whatever this step did, the log did not take it.
            lost = self.reason or LeaseLostError(
                f"task {self.task_id}: attempt {self.attempt} no longer holds the task"
                f" (lease expired, cancelled or timed out): step {seq} ({name!r}) not recorded"
            )
            self.stop(lost)
            raise lost
        return row.result

    # endregion

    # region: outages
    def _database(self, work: Callable[[psycopg.Connection, bool], T]) -> T:
        """`work(conn, retried)` on a step connection, tried again through an outage.

        The database away is not the step's failure: the attempt waits for it, with backoff.
        `retried` tells `work` that its last try's connection broke, maybe after the commit.
        Past the lease, it gives up: the heartbeats could not reach the database either, so
        the lease has run out, and the task is another attempt's to run (LeaseLostError).
        """
        backoff = Backoff()
        retried = False
        while True:
            wait_for = max(0.1, min(5.0, self.lease_deadline - time.monotonic()))
            try:
                with self._connections.connection(timeout=wait_for) as conn:
                    return work(conn, retried)
            except psycopg.OperationalError as err:
                if not is_outage(err):
                    raise
            retried = True
            delay = backoff.next_delay()
            if time.monotonic() + delay >= self.lease_deadline:
                lost = self.reason or LeaseLostError(
                    f"task {self.task_id}: attempt {self.attempt}: the database was unavailable"
                    " for longer than the lease"
                )
                self.stop(lost)
                raise lost
            self.sleep(delay)  # ends early, raising, if the worker stops the attempt

    # endregion

    def report(self) -> str | None:
        """For the worker's log: how much of the function's work the log saved (a retry)."""
        if not self.replayed:
            return None
        return f"{self.replayed} steps replayed from the log, {self.ran} run"


def check_step_name(name: object) -> None:
    """Raise ValueError unless `name` is a non-empty string the log can store."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a step needs a name, a non-empty string, not {name!r}")
    try:
        check_text(name)
    except ValueError as err:
        raise ValueError(f"step name {name!r} cannot be stored: {err}") from None
