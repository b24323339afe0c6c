"""What a running task can know about its attempt, and how it learns that it should stop.

The worker runs each function on a thread of its pool, with a TaskContext that the function
reaches through `current_task()`: the task id, the attempt number, and whether the attempt is
still on. The worker stops a context when its heartbeat learns that the attempt is over:

- the task was cancelled (engine.cancel)           -> TaskCancelled
- the attempt overran the task's timeout           -> TaskTimeout
- another worker took the task over (lease lost)   -> LeaseLostError

Lesson 07: a durable task also ends its own attempt when it waits for children that have not
finished: TaskSuspended, raised by `wait()` (durable.py) after the database has recorded it.

Python cannot stop a thread from outside, so stopping is cooperative: a long task calls
`check()`, or sleeps with `sleep()`, now and then, and either raises once the attempt is over.
A task that never checks is not dangerous, only wasteful: its result is fenced off anyway.
"""

from __future__ import annotations

import contextvars
import datetime
import threading
import time
from collections.abc import Callable
from typing import Any


class TaskStopped(Exception):
    """The current attempt is over: the function should stop; its result would be dropped."""


class TaskCancelled(TaskStopped):
    """Someone cancelled the task while it was running."""


class TaskTimeout(TaskStopped, TimeoutError):
    """The attempt ran longer than the task's timeout, and was failed (and maybe retried)."""


class TaskSuspended(TaskStopped):
    """Lesson 07: the durable task waits for children, and its attempt ended as suspended.

    Raised by `ctx.wait()` / `ctx.wait_all()` once the suspension is committed: the function
    unwinds, the worker's slot is free, and the task runs again, from the top, replaying its
    log, when its children have finished. Catching it changes nothing: the attempt is over.
    """


class LeaseLostError(TaskStopped):
    """This worker's lease on the task ended, and another worker has taken the task over.

    Raised to the function (by check() and sleep()), and to the worker when the database
    rejected its write of a result: that attempt is no longer the task's current one.
    """


# region: context
class TaskContext:
    """One attempt of one task, as the function running it sees it."""

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
        self.parent_id = parent_id  # lesson 07: the durable task that spawned this one, if any
        # When the attempt times out, on this machine's monotonic clock. A duration measured
        # here, not a time compared across machines: the one case the local clock is right for.
        self.deadline = time.monotonic() + timeout.total_seconds()
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

_current: contextvars.ContextVar[TaskContext] = contextvars.ContextVar("current_task")


def current_task() -> TaskContext:
    """The context of the task this thread is running. For task functions."""
    try:
        return _current.get()
    except LookupError:
        raise RuntimeError("current_task() was called outside a running task") from None


def run_in_context(context: TaskContext, function: Callable[[Any], Any], input: Any) -> Any:
    """Call `function(input)` with `context` as current_task() (on the calling thread)."""
    token = _current.set(context)
    try:
        return function(input)
    finally:
        _current.reset(token)
