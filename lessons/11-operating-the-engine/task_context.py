"""What a running task can know about its attempt, and how it learns that it should stop.

The worker runs each function on a thread of its pool, with a TaskContext that the function
reaches through `current_task()`: the task id, the attempt number, and whether the attempt is
still on. The worker stops a context when its heartbeat learns that the attempt is over:

- the task was cancelled (engine.cancel)           -> TaskCancelled
- the attempt overran the task's timeout           -> TaskTimeout
- another worker took the task over (lease lost)   -> LeaseLostError

A durable task also ends its own attempt when it waits for children that have not finished:
TaskSuspended, raised by `wait()` (durable.py) after the database has recorded it.

Python cannot stop a thread from outside, so stopping is cooperative: a long task calls
`check()`, or sleeps with `sleep()`, now and then, and either raises once the attempt is over.
A task that never checks is not dangerous, only wasteful: its result is fenced off anyway.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import inspect
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from engine import CURRENT_TASK, describe_error, json_problem

T = TypeVar("T")


class TaskStopped(Exception):
    """The current attempt is over: the function should stop; its result would be dropped."""


class TaskCancelled(TaskStopped):
    """Someone cancelled the task while it was running."""


class TaskTimeout(TaskStopped, TimeoutError):
    """The attempt ran longer than the task's timeout, and was failed (and maybe retried)."""


class TaskSuspended(TaskStopped):
    """The durable task waits for children, and its attempt ended as suspended.

    Raised by `ctx.wait()` / `ctx.wait_all()` once the suspension is committed: the function
    unwinds, the worker's slot is free, and the task runs again, from the top, replaying its
    log, when its children have finished. Catching it changes nothing: the attempt is over.
    """


class LeaseLostError(TaskStopped):
    """This worker's lease on the task ended, and another worker has taken the task over.

    Raised to the function (by check() and sleep()), and to the worker when the database
    rejected its write of a result: that attempt is no longer the task's current one.
    """


# region: non_retryable
class NonRetryableError(Exception):
    """Raise it (or a subclass of it) from a task to fail the task at once, with no retry.

    For the errors that no retry will cure: an invalid input, a card the bank declined, a
    record that does not exist. Any other exception is retried while attempts are left, since
    most failures (a timeout, a service restarting) are over by the next attempt.
    """


def is_retryable(err: BaseException) -> bool:
    """False if `err`, or an exception it was raised from (`raise ... from`), is non-retryable."""
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:  # `seen`: a chain may loop
        if isinstance(cause, NonRetryableError):
            return False
        seen.add(id(cause))
        cause = cause.__cause__
    return True


# endregion


# region: outcome
@dataclasses.dataclass(frozen=True)
class Outcome:
    """How one attempt ended, as the worker records it."""

    output: Any = None
    error: str | None = None  # None: it completed, with `output`
    retryable: bool = True  # False: the task fails now, whatever attempts it has left
    # A durable task that suspended itself to wait for its children: nothing to record, the
    # database has it already.
    suspended: bool = False

    @property
    def kind(self) -> str:
        """completed, failed or suspended (lesson 11: the metrics' label)."""
        if self.suspended:
            return "suspended"
        return "completed" if self.error is None else "failed"


# endregion


# region: context
class TaskContext:
    """One attempt of one task, as the function running it sees it."""

    # Whether the task may have children: only a durable task spawns them (durable.py).
    may_have_children = False

    def __init__(
        self,
        task_id: int,
        attempt: int,
        timeout: datetime.timedelta,
        parent_id: int | None = None,
    ) -> None:
        self.task_id = task_id
        self.attempt = attempt
        self.timeout = timeout
        self.parent_id = parent_id  # the durable task that spawned this one, if any
        # When the attempt times out, on this machine's monotonic clock. A duration measured
        # here, not a time compared across machines: the one case the local clock is right for.
        self.deadline = time.monotonic() + timeout.total_seconds()
        # When this worker's lease on the attempt runs out, at the latest, by the same clock:
        # the claim, or the last heartbeat the database accepted, plus the lease. Past it, a
        # result can no longer be recorded: the worker stops trying (during an outage).
        self.lease_deadline = float("inf")
        self.reason: TaskStopped | None = None
        self._stopped = threading.Event()

    def stop(self, reason: TaskStopped) -> None:
        """Called by the worker: the attempt is over (the first reason given sticks)."""
        if self.reason is None:
            self.reason = reason
        self._stopped.set()

    @property
    def stopped(self) -> bool:
        return self._stopped.is_set()

    @property
    def cancelled(self) -> bool:
        return isinstance(self.reason, TaskCancelled)

    def check(self) -> None:
        """Raise TaskCancelled, TaskTimeout or LeaseLostError if the attempt is over."""
        if self.reason is not None:
            raise self.reason

    def sleep(self, seconds: float) -> None:
        """time.sleep() that ends early, and raises, as soon as the attempt is over."""
        self._stopped.wait(seconds)
        self.check()

    # endregion

    # region: hooks
    # What the worker asks the context once the function is done: the outcome to record, and
    # a line for its log. The worker never looks at what kind of context it holds; a context
    # that knows more about its attempt (a durable one, lesson 05) says more here.
    def returned(self, output: Any) -> Outcome:
        """The function returned `output`: what to record. Never raises.

        The output is checked before the worker writes it, so that the reason is ours ("a set
        is not JSON"), not a driver error in the middle of recording a whole batch.
        """
        problem = json_problem(output)
        if problem is not None:
            return Outcome(error=f"return value is not JSON-serializable: {problem}")
        return Outcome(output=output)

    def raised(self, err: BaseException) -> Outcome:
        """The function raised `err`: what to record. Never raises."""
        return Outcome(error=describe_error(err), retryable=is_retryable(err))

    def report(self) -> str | None:
        """A line for the worker's log about how the attempt went, if there is more to say."""
        return None

    # endregion

    # region: step_call
    def step_call(
        self, name: str, function: Callable[..., T], args: tuple, kwargs: dict, hash_input: bool
    ) -> T:
        """What a call of an `@engine.step` function is in this task (lesson 11). A regular
        task has no log to record it in: a plain call. (DurableContext: a step.)"""
        return function(*args, **kwargs)

    async def astep_call(
        self,
        name: str,
        function: Callable[..., Awaitable[T]],
        args: tuple,
        kwargs: dict,
        hash_input: bool,
    ) -> T:
        return await function(*args, **kwargs)

    # endregion


def current_task() -> TaskContext:
    """The context of the task this thread is running. For task functions."""
    try:
        return CURRENT_TASK.get()
    except LookupError:
        raise RuntimeError("current_task() was called outside a running task") from None


def run_in_context(context: TaskContext, function: Callable[[Any], Any], input: Any) -> Any:
    """Call `function(input)` with `context` as current_task() (on the calling thread).

    Lesson 11: an `async def` function runs to its end on an event loop of its own, on this
    thread (asyncio.run): the worker's slots are threads, and each runs one task at a time.
    asyncio.run copies the context, so current_task() works inside it too.
    """
    token = CURRENT_TASK.set(context)
    try:
        if inspect.iscoroutinefunction(function):
            return asyncio.run(function(input))
        return function(input)
    finally:
        CURRENT_TASK.reset(token)
