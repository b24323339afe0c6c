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
- a step is found in the log by its position: the n-th step of a run replays event n;
- a step's result must be JSON, because the log stores it; the first run returns the stored
  value too, so a replay cannot see anything else;
- a step that raises is not recorded, so the retry runs it again, unless the function catches
  the error and takes another step: then the error is history, and replays as the same
  StepError;
- the code between steps runs again on every attempt: it must come to the same decisions
  given the same step results (no clock, no randomness outside a step: see ctx.now() below).

A replay checks that the code is still the code that wrote the log. Each event
records what the code asked for at its place: a step, a value or a patch (its kind), by name,
and for a step that asks for it, a hash of its arguments. A replay that asks for anything else
at that place raises NonDeterminismError, and the task fails for good with that message,
instead of handing one step's result to another step. A function that returns while its log
holds more than it asked for diverged too. The usual traps get helpers that record what they
read: ctx.now(), ctx.random(), ctx.uuid4(); and a change that must reach tasks already in
flight goes behind `if ctx.patched("name"):`.

A durable task hands work to regular tasks, its children, and waits for them:

    handles = [ctx.spawn("web_search", query) for query in plan]
    results = ctx.wait_all(handles)

Spawning is an event like a step: the child's row and the `child_spawned` event are written by
one transaction, so a replay finds the event and gets the same child back, never a second one.
Waiting is an event too: once every awaited child has finished, how each ended is appended
(`child_completed` or `child_failed`), and replays read it from there. While a child is still
unfinished, the task does not hold its worker: the attempt ends as suspended (TaskSuspended),
the slot is free, and when the last awaited child finishes, it queues the task again, which
replays its log up to the wait, and goes on.

Lesson 09: a durable task waits for time, and for the world, holding nothing:

    ctx.sleep_for("cool-off", 24 * 3600)          # or ctx.sleep_until("renewal", when)
    decision = ctx.wait_for_event(f"approved:{claim}", timeout=3600)  # EventTimeout

Both are events in the log. A sleep records when it ends (`sleep_started`), computed once on
the database's clock, then suspends the attempt: the task goes back to `scheduled`, with that
time as its run_at, and any worker claims it when it comes, replays the log, finds the sleep
over and goes on. A replay after a crash, a retry, sleeps only what is left. A wait records
until when it waits (`event_awaited`), then how it ended (`event_received`, with the event's
payload, or `event_timed_out`): sending the event (engine.send_event) queues the waiting task
at once. Replays return the recorded payload, or raise the recorded EventTimeout.

Lesson 11: `@engine.step` makes the step call itself disappear: a decorated function called
inside a durable task is a step, named after the function (step_call); called anywhere else,
it just runs. And task functions and steps may be `async def` (astep).

The database may go away while a step runs (a restart, a failover: outages.py). The step's
result then waits, and its append is tried again with backoff, until the database answers or
the lease has surely run out. An append whose answer was lost may have landed: the next try
looks for it first, so that a step is never recorded twice.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import hashlib
import json
import os
import random
import signal
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar, cast

import psycopg
from db.models import EventKind, TaskEvent, TaskStatus
from db.queries import Querier, RecordChildOutcomesRow, RecordEventOutcomeRow
from engine import (
    Engine,
    TaskInputError,
    UnknownTaskError,
    check_json,
    check_seconds,
    check_text,
    describe_error,
    describe_json_error,
    seconds,
    with_options,
)
from outages import Backoff, is_outage
from psycopg_pool import ConnectionPool
from task_context import (
    LeaseLostError,
    Outcome,
    TaskContext,
    TaskStopped,
    TaskSuspended,
    current_task,
)

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


# region: children
@dataclasses.dataclass(frozen=True)
class ChildHandle:
    """A child task that this durable task spawned: what `ctx.wait()` takes."""

    task_id: int
    name: str


class ChildTaskError(Exception):
    """A child this task waited for failed (its error) or was cancelled: raised by `ctx.wait()`,
    on the run that recorded it and on every replay, like a StepError."""

    def __init__(self, child: ChildHandle, error: str) -> None:
        super().__init__(f"child task {child.task_id} ({child.name!r}) failed: {error}")
        self.child = child
        self.error = error  # the child's error, "Type: message", or "cancelled"


def crash_point(name: str) -> None:
    """A test hook: kill this process, with SIGKILL, at the point called `name`.

    `DURABLE_CRASH_AT=spawn` makes a worker process die in the middle of its first spawn, as a
    power cut would: the only way to test what a crash there leaves behind is to crash there.
    """
    if os.environ.get("DURABLE_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


# endregion


class EventTimeout(TimeoutError):
    """`ctx.wait_for_event(name, timeout=...)` timed out: no event of that name was sent in time.
    Raised on the run that recorded the timeout and on every replay, like a StepError."""

    def __init__(self, event: str) -> None:
        super().__init__(f"no event {event!r} was sent before the wait timed out")
        self.event = event


# region: identity
# What the code asked for, by the kind of the event that recorded it.
KINDS = {
    EventKind.STEP_COMPLETED: "step",
    EventKind.STEP_FAILED: "step",
    EventKind.VALUE_RECORDED: "value",
    EventKind.PATCH_APPLIED: "patch",
    # A spawn, by the child's task name; a wait, by the name of the child waited for.
    EventKind.CHILD_SPAWNED: "spawn",
    EventKind.CHILD_COMPLETED: "wait",
    EventKind.CHILD_FAILED: "wait",
    # Lesson 09: a sleep, by its name; a wait for an event, and its outcome, by the event's.
    EventKind.SLEEP_STARTED: "sleep",
    EventKind.EVENT_AWAITED: "event",
    EventKind.EVENT_RECEIVED: "event outcome",
    EventKind.EVENT_TIMED_OUT: "event outcome",
}


@dataclasses.dataclass(frozen=True)
class Call:
    """What the code asks for at one place of its log: a step, a value or a patch, by name.

    With its place (the n-th call of a run meets the n-th event of the history), this is an
    event's identity: what a replay checks. What the call returned is not part of it.
    """

    kind: str  # "step", "value" or "patch"; lesson 07: "spawn" or "wait"; lesson 09: "sleep"...
    name: str
    input_hash: str | None = None  # steps called with hash_input=True only

    @classmethod
    def recorded(cls, event: TaskEvent) -> Call:
        """The call that `event` recorded."""
        return cls(KINDS[event.kind], event.name, event.input_hash)

    def matches(self, event: TaskEvent) -> bool:
        recorded = Call.recorded(event)
        if (recorded.kind, recorded.name) != (self.kind, self.name):
            return False
        # Hashes are compared only when both sides have one: a deploy that starts (or stops)
        # hashing a step's input does not make the tasks in flight diverge.
        if recorded.input_hash is None or self.input_hash is None:
            return True
        return recorded.input_hash == self.input_hash

    def describe(self, with_hash: bool = False) -> str:
        """`step 'charge'`, `ctx.now()`, `ctx.patched('fraud-check')`: as the code says it."""
        if self.kind == "value":
            return f"ctx.{self.name}()"
        if self.kind == "patch":
            return f"ctx.patched({self.name!r})"
        if self.kind in ("spawn", "wait"):  # lesson 07
            return f"ctx.{self.kind}() of a {self.name!r} child"
        if self.kind == "sleep":  # lesson 09
            return f"the sleep {self.name!r}"
        if self.kind in ("event", "event outcome"):
            return f"ctx.wait_for_event({self.name!r})"
        hashed = f" with input {self.input_hash[:12]}" if with_hash and self.input_hash else ""
        return f"step {self.name!r}{hashed}"


class NonDeterminismError(Exception):
    """The code asked for something other than what its history recorded at this place.

    The function changed while the task was in flight (a deploy reordered, renamed, removed or
    inserted a step, or changed a step's arguments), or it decided differently given the same
    step results (it read the clock, or a random number, outside a step). Not retryable: the
    same code replays the same history the same way. The task fails for good with this message;
    an operator who has read it can replay the task (engine.replay) from an empty history.
    """

    def __init__(
        self, task_id: int, recorded: TaskEvent, asked: Call | None, detail: str = ""
    ) -> None:
        expected = Call.recorded(recorded)
        # The input hashes are shown when they are the difference, and only then.
        same = asked is not None and (asked.kind, asked.name) == (expected.kind, expected.name)
        actual = f"the code asked for {asked.describe(same)}" if asked else "the function returned"
        super().__init__(
            f"task {task_id} diverged from its history at event {recorded.seq}:"
            f" expected {expected.describe(same)} (recorded by attempt {recorded.attempt}),"
            f" but {actual}{detail}"
        )
        self.seq = recorded.seq
        self.expected = expected
        self.actual = asked  # None: the function returned


def hash_arguments(step: str, args: tuple, kwargs: dict) -> str:
    """SHA-256 of a step's arguments as canonical JSON: sorted keys, no spaces, UTF-8.

    Canonical, so that equal arguments hash alike on every worker, whatever order a dict was
    built in. JSON, like the log: a tuple hashes as the list it becomes, which is what a
    replayed step result is anyway. (Not pickle or repr: their output changes across versions.)
    """
    try:
        text = json.dumps(
            [list(args), kwargs],
            sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False,
        )  # fmt: skip
    except (TypeError, ValueError) as err:
        raise TypeError(f"step {step!r}: hash_input=True needs JSON arguments: {err}") from err
    return hashlib.sha256(text.encode()).hexdigest()


# endregion


@dataclasses.dataclass
class _Failure:
    """A step that failed in this attempt and is not in the log (yet)."""

    seq: int
    name: str
    input_hash: str | None
    error: str
    duration: datetime.timedelta


NO_TIME = datetime.timedelta(0)  # the duration of an event that runs nothing (values, patches)


def current_asyncio_task() -> asyncio.Task | None:
    """The asyncio task running this code; None outside an event loop."""
    try:
        return asyncio.current_task()
    except RuntimeError:  # no running event loop: a plain function, on a worker's thread
        return None


def current_durable_task() -> DurableContext:
    """current_task() inside a durable task: its DurableContext, with steps, spawn and wait.
    A regular task's function has no log to write to, so it gets a clear error instead."""
    ctx = current_task()
    if not isinstance(ctx, DurableContext):
        raise RuntimeError(
            f"task {ctx.task_id} is a regular task: steps, values and children need a durable"
            " task (engine.durable_task)"
        )
    return ctx


class DurableContext(TaskContext):
    """A TaskContext (task_context.py) that also keeps the task's event log: `step()`, the
    recorded values `now()`, `random()` and `uuid4()`, and `patched()`.

    One per attempt, made by the worker at the claim. Its calls talk to the database through
    `connections`, the worker's pool of one connection per slot: a function's step never
    waits for another's, nor for the worker's loop, which has its own connection.
    """

    may_have_children = True

    def __init__(
        self,
        connections: ConnectionPool,
        task_id: int,
        attempt: int,
        timeout: datetime.timedelta,
        engine: Engine | None = None,
        run_at: datetime.datetime | None = None,
        parent_id: int | None = None,
    ) -> None:
        # Lesson 10: a durable task may be a child, whose end wakes its parent (worker.ending).
        super().__init__(task_id, attempt, timeout, parent_id)
        self._connections = connections
        self._engine = engine  # lesson 07: whose registry says what a child may be
        # Lesson 09: the task's run_at when it was claimed. The engine's clock had reached it:
        # only a queued task is claimed, and whatever queues a task sets a run_at that has
        # come (promote, enqueue, send_event, retry) or leaves an earlier one (a child's end).
        self._run_at = run_at
        self._history: list[TaskEvent] | None = None  # loaded at the first call
        # The place this run has reached in the log: events replayed (or skipped) and appended.
        self._seq = 0
        self._failure: _Failure | None = None
        self._in_step: str | None = None
        # Lesson 11: the asyncio task that runs the async step in progress (astep), if any.
        self._in_step_task: asyncio.Task | None = None
        self._patches: dict[str, bool] = {}  # what patched() answered in this run
        # Set when the run diverged from its history, and never unset: every later call raises
        # it again, and the worker fails the task with it, even if the function caught it.
        self.diverged: NonDeterminismError | None = None
        self.replayed = 0  # for the worker's log: how this attempt went
        self.ran = 0
        self._children: set[int] = set()  # lesson 07: the children this run spawned (or replayed)

    def history(self) -> list[TaskEvent]:
        """What earlier attempts recorded: ONE query per attempt, at its first call.

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
    def step(
        self,
        name: str,
        function: Callable[..., T],
        /,
        *args: Any,
        hash_input: bool = False,
        **kwargs: Any,
    ) -> T:
        """Run `function(*args, **kwargs)` once for this task, or return what it returned before.

        Raises StepError if the step raised or returned something that is not JSON: nothing
        is recorded, so a retry runs the step again, unless the function catches the error and
        takes another step. Raises LeaseLostError, TaskCancelled or TaskTimeout if this attempt
        is over: nothing is recorded either, and the attempt that holds the task now, if any,
        runs the step. Raises NonDeterminismError if the history recorded another call here.

        `hash_input=True` records a hash of the arguments too, and a replay that passes other
        arguments diverges. (So `hash_input` is the step's own option: `function` never gets it.)
        """
        input_hash, event = self._find_step(name, args, kwargs, hash_input)
        if event is not None:  # replay: the step is in the log, do not run it
            return cast(T, self._replayed_step(event))
        seq, started = self._start_step(name)
        try:
            result, cause = function(*args, **kwargs), None
        except TaskStopped:
            raise  # not the step's failure: the attempt ended while the step ran
        except Exception as err:
            result, cause = None, err
        finally:
            self._in_step = None
        return cast(T, self._end_step(seq, name, input_hash, started, result, cause))

    async def astep(
        self,
        name: str,
        function: Callable[..., Awaitable[T]],
        /,
        *args: Any,
        hash_input: bool = False,
        **kwargs: Any,
    ) -> T:
        """step() for an `async def` function (lesson 11): the same log, the same rules; awaited.

        The log's own reads and writes are short blocking calls, as in step(). Two steps of one
        task cannot run at once (asyncio.gather): the log is a sequence, and the second one is
        refused (RuntimeError); spawn children for parallel work.
        """
        if self._in_step is not None and not self._nested():
            raise RuntimeError(
                f"step {name!r} started while step {self._in_step!r} runs: a durable task's"
                " steps run one at a time, in the order of its log (spawn children to run"
                " work in parallel)"
            )
        input_hash, event = self._find_step(name, args, kwargs, hash_input)
        if event is not None:
            return cast(T, self._replayed_step(event))
        seq, started = self._start_step(name)
        self._in_step_task = asyncio.current_task()
        try:
            result, cause = await function(*args, **kwargs), None
        except TaskStopped:
            raise
        except Exception as err:
            result, cause = None, err
        finally:
            self._in_step = self._in_step_task = None
        return cast(T, self._end_step(seq, name, input_hash, started, result, cause))

    def step_call(
        self, name: str, function: Callable[..., T], args: tuple, kwargs: dict, hash_input: bool
    ) -> T:
        """What a call of an `@engine.step` function is in a durable task (lesson 11): a step;
        or, inside another step, a plain call: part of that step, whose result the log holds
        (nested, the log would have two places for one call)."""
        if self._nested():
            return function(*args, **kwargs)
        return self.step(name, function, *args, hash_input=hash_input, **kwargs)

    async def astep_call(
        self,
        name: str,
        function: Callable[..., Awaitable[T]],
        args: tuple,
        kwargs: dict,
        hash_input: bool,
    ) -> T:
        """step_call() for an `async def` function."""
        if self._nested():
            return await function(*args, **kwargs)
        return await self.astep(name, function, *args, hash_input=hash_input, **kwargs)

    def _nested(self) -> bool:
        """Whether this call comes from inside the step that runs now: the same thread, and
        for an async step, the same asyncio task. Not a call from another task running beside
        it (asyncio.gather): that one is a second step at once, which step() refuses."""
        if self._in_step is None:
            return False
        return self._in_step_task is None or self._in_step_task is current_asyncio_task()

    def _find_step(
        self, name: str, args: tuple, kwargs: dict, hash_input: bool
    ) -> tuple[str | None, TaskEvent | None]:
        """The step's input hash (if asked for), and its event if the history has it."""
        check_call_name("a step", name)
        input_hash = hash_arguments(name, args, kwargs) if hash_input else None
        return input_hash, self._replay(Call("step", name, input_hash))

    def _replayed_step(self, event: TaskEvent) -> Any:
        self.replayed += 1
        if event.kind == EventKind.STEP_FAILED:
            raise StepError(event.name, event.error or "")
        return event.result  # what the function returned then, through JSON

    def _start_step(self, name: str) -> tuple[int, float]:
        """A step about to run: its place in the log, and when it started."""
        self.check()  # the attempt is over (cancelled, timed out, lease lost): do not start
        self.ran += 1
        self._seq += 1
        self._in_step = name
        return self._seq, time.monotonic()

    def _end_step(
        self,
        seq: int,
        name: str,
        input_hash: str | None,
        started: float,
        result: Any,
        cause: Exception | None,
    ) -> Any:
        """Append what the step returned; or raise StepError with what it raised."""
        error = None if cause is None else describe_error(cause)
        if cause is None:
            try:
                check_json(result)
            except Exception as err:
                problem = describe_json_error(err)
                cause, error = err, f"returned a value that is not JSON-serializable: {problem}"
        duration = datetime.timedelta(seconds=time.monotonic() - started)
        if error is None:
            return self._append(
                seq, EventKind.STEP_COMPLETED, name, input_hash, result, None, duration
            )
        # Not recorded: if the failure ends the attempt, the retry runs the step again.
        self._failure = _Failure(seq, name, input_hash, error, duration)
        raise StepError(name, error) from cause

    # endregion

    # region: replay
    def _replay(
        self, call: Call, explain: Callable[[TaskEvent], str] | None = None
    ) -> TaskEvent | None:
        """The event the history recorded for `call`; None past its end: the call runs.

        Raises NonDeterminismError if the history recorded another call at this place, with
        what `explain` adds to its message.
        """
        event = self._next_event(call)
        if event is None:
            return None
        if not call.matches(event):
            detail = "" if explain is None else explain(event)
            self.diverged = NonDeterminismError(self.task_id, event, call, detail)
            raise self.diverged
        self._seq += 1
        return event

    # endregion

    # region: next_event
    def _next_event(self, call: Call) -> TaskEvent | None:
        """Where every call starts: the checks, then the history's event at this place, if any."""
        if self._in_step is not None:
            # The outer step's result would be replayed without running it, so the inner
            # call's event would never be asked for, and the next call would get it instead.
            raise RuntimeError(
                f"{call.describe()} called inside step {self._in_step!r}: steps cannot nest"
            )
        if self.diverged is not None:
            raise self.diverged  # a run that diverged cannot go on, whatever the function does
        history = self.history()
        if self._failure is not None:
            # The function caught the last step's StepError and carried on: the path it is
            # taking now depends on that failure, so the failure becomes history first.
            f, self._failure = self._failure, None
            self._append(f.seq, EventKind.STEP_FAILED, f.name, f.input_hash, None, f.error,
                         f.duration)  # fmt: skip
        while self._seq < len(history):
            event = history[self._seq]
            # A patch marker that the code does not ask for here is passed over: that is how
            # a patch is retired (see patched()). Any other event is this call's to match.
            if event.kind != EventKind.PATCH_APPLIED or call == Call("patch", event.name):
                return event
            self._seq += 1
        return None

    # endregion

    # region: finish
    def finish(self) -> None:
        """Called by the worker once the function has returned: did it make every recorded call?

        A history with events left over was recorded by code that did more than this code
        does (a step was removed, or the code decided differently): NonDeterminismError.
        """
        if self.diverged is not None:
            raise self.diverged
        left = [e for e in self.history()[self._seq :] if e.kind != EventKind.PATCH_APPLIED]
        if left:
            self.diverged = NonDeterminismError(self.task_id, left[0], None)
            raise self.diverged

    # endregion

    # region: now
    def now(self) -> datetime.datetime:
        """The time (UTC), read once and recorded: every replay of this call gets that moment.

        The worker's clock, not the database's: a value the function computes with, like any
        other input. What matters is that a replay sees the same one.
        """
        now = self._value("now", lambda: datetime.datetime.now(datetime.UTC).isoformat())
        return datetime.datetime.fromisoformat(now)

    # endregion

    def random(self) -> float:
        """A random float in [0, 1), drawn once and recorded."""
        return self._value("random", random.random)

    def uuid4(self) -> uuid.UUID:
        """A random UUID, drawn once and recorded."""
        return uuid.UUID(self._value("uuid4", lambda: str(uuid.uuid4())))

    # region: value
    def _value(self, name: str, read: Callable[[], Any]) -> Any:
        """A tiny step that cannot fail: one append, or the recorded value on a replay."""
        event = self._replay(Call("value", name))
        if event is not None:
            self.replayed += 1
            return event.result  # what the function returned then, through JSON
        self.check()
        self._seq += 1
        return self._append(self._seq, EventKind.VALUE_RECORDED, name, None, read(), None, NO_TIME)

    # endregion

    # region: patched
    def patched(self, patch: str) -> bool:
        """True: take the new path. False: this task's history was recorded without the patch.

        How to change a function while tasks are in flight:

            if ctx.patched("fraud-check"):
                ctx.step("fraud_check", check_fraud, order)   # the new code

        - past the end of the history (a new task, or one that had not come this far): True,
          and a marker is appended, so that the replays of this run say True too;
        - the history holds this patch's marker here: True;
        - it holds anything else here: it was recorded by code without the patch, which went
          on to its next call: False (the old path), and the event is left for that call.
        One answer per run: asking again returns it. Once no task recorded without the patch is
        left, delete the old path and the call: a marker that nothing asks for is passed over.
        """
        check_call_name("a patch", patch)
        if patch in self._patches:
            return self._patches[patch]
        event = self._next_event(Call("patch", patch))
        if event is None:
            self.check()
            self._seq += 1
            self._append(self._seq, EventKind.PATCH_APPLIED, patch, None, None, None, NO_TIME)
            applied = True
        elif event.kind == EventKind.PATCH_APPLIED:  # this patch's marker (see _next_event)
            self._seq += 1
            self.replayed += 1
            applied = True
        else:
            applied = False
        self._patches[patch] = applied
        return applied

    # endregion

    # region: spawn
    def spawn(self, name: str, input: Any = None, **options: Any) -> ChildHandle:
        """Start task `name` as a child of this task; return its handle at once.

        The child runs on any worker, like any task, with its own retries (`options` override
        its registered TaskOptions). Replays of this call return the same child: its spawn is
        an event, and the child's row and the event are written by ONE transaction. A crash
        between the two INSERTs rolls both back: there is never a child the log does not know.
        The child's input is part of the spawn's identity (a hash of it is recorded): a replay
        that would spawn it with another input diverges, rather than reuse the old child.

        Lesson 10: a child may be a durable task too (a child workflow), with a log, steps,
        sleeps and children of its own: a tree. A cancel, the close policy and the locking rule
        walk the whole tree (LockTasks, LockFamily, close_tree).
        """
        engine = self._engine
        if engine is None or name not in engine.registry:
            known = ", ".join(sorted(engine.registry)) if engine else "none"
            raise UnknownTaskError(f"no task named {name!r} is registered (known: {known})")
        try:
            check_json(input)
        except (TypeError, ValueError) as err:
            message = f"input of child {name!r} is not JSON-serializable: {err}"
            raise TaskInputError(message) from err
        chosen = with_options(engine.options[name], options)

        call = Call("spawn", name, hash_arguments(name, (input,), {}))
        event = self._replay(call, explain=lambda event: self._other_input(event, name, input))
        if event is not None:  # replay: the child exists; this is its handle again
            self.replayed += 1
            assert event.child_id is not None  # the constraint child_events_name_their_child
            self._children.add(event.child_id)
            return ChildHandle(event.child_id, name)
        self.check()
        self.ran += 1
        self._seq += 1
        seq = self._seq
        started = time.monotonic()

        def spawn_child(conn: psycopg.Connection, retried: bool) -> int | None:
            queries = Querier(conn)
            if retried:  # the last try's connection broke: maybe after its commit
                event = queries.get_event(task_id=self.task_id, seq=seq, attempt=self.attempt)
                if event is not None:
                    return event.child_id
            with conn.transaction():
                child_id = queries.spawn_task(
                    parent_id=self.task_id, attempt=self.attempt, name=name, input=input,
                    priority=chosen.priority, max_attempts=chosen.max_attempts,
                    backoff_base=seconds(chosen.backoff), backoff_cap=seconds(chosen.backoff_cap),
                    timeout=seconds(chosen.timeout),
                )  # fmt: skip
                if child_id is None:  # fenced out, like an append: nothing written
                    return None
                crash_point("spawn")  # the tests kill the worker here, between the two INSERTs
                duration = datetime.timedelta(seconds=time.monotonic() - started)
                queries.append_event(
                    task_id=self.task_id, attempt=self.attempt, seq=seq,
                    kind=EventKind.CHILD_SPAWNED, name=name, input_hash=call.input_hash,
                    result=None, error=None, child_id=child_id, duration=duration,
                )  # fmt: skip
            # (The append cannot be fenced out: the spawn's FOR SHARE holds the row, and now()
            # is the transaction's start for both statements.)
            return child_id

        child_id = self._database(spawn_child)
        if child_id is None:
            raise self._lost(seq, name)
        self._children.add(child_id)
        return ChildHandle(child_id, name)

    def _other_input(self, event: TaskEvent, name: str, input: Any) -> str:
        """When a spawn diverged on its input alone, both inputs: the history's is the child's."""
        if event.kind != EventKind.CHILD_SPAWNED or event.name != name or event.child_id is None:
            return ""
        child_id = event.child_id
        child = self._database(lambda conn, retried: Querier(conn).get_task(id=child_id))
        recorded = "(deleted)" if child is None else short_json(child.input)
        return (
            f": the child it spawned then, task {child_id}, has input {recorded};"
            f" the code now passes {short_json(input)}"
        )

    # endregion

    def wait(self, handle: ChildHandle) -> Any:
        """The child's output, once it has finished; ChildTaskError if it failed or was cancelled.

        `wait_all([handle])[0]`: one event, and a suspension while the child is unfinished.
        """
        return self.wait_all([handle])[0]

    # region: wait
    def wait_all(self, handles: Iterable[ChildHandle]) -> list[Any]:
        """The outputs of these children, in order, once ALL of them have finished.

        Until then the task suspends: TaskSuspended ends this attempt, and the task runs again
        when the last of them finishes. Then every outcome is appended to the log (one event
        per child, one statement for all), and ChildTaskError is raised for the first child,
        in `handles` order, that failed or was cancelled. Replays read the same outcomes.
        """
        handles = list(handles)
        for handle in handles:
            if not isinstance(handle, ChildHandle) or handle.task_id not in self._children:
                raise ValueError(f"{handle!r} is not a child this task spawned")
        outcomes: list[Any] = []
        for handle in handles:  # replay: the outcomes that are in the log
            event = self._replay(Call("wait", handle.name))
            if event is None:
                break
            # Two children of one name are told apart by id: waiting for them in another order
            # (a deploy, or handles kept in a set) must not hand each the other's result.
            if event.child_id != handle.task_id:
                self.diverged = NonDeterminismError(
                    self.task_id,
                    event,
                    Call("wait", handle.name),
                    f" (the history waited for task {event.child_id} here, the code for task"
                    f" {handle.task_id})",
                )
                raise self.diverged
            self.replayed += 1
            outcomes.append(event)
        waiting = [handle.task_id for handle in handles[len(outcomes) :]]
        if waiting:
            self.check()
            self.ran += 1
            rows = self._await(self._seq + 1, waiting)
            self._seq += len(rows)
            outcomes += rows
        for handle, outcome in zip(handles, outcomes, strict=True):
            if outcome.kind == EventKind.CHILD_FAILED:
                raise ChildTaskError(handle, outcome.error or "")
        return [outcome.result for outcome in outcomes]

    # endregion

    # region: await
    def _await(self, seq: int, children: list[int]) -> Sequence[RecordChildOutcomesRow | TaskEvent]:
        """Append the children's outcomes as events seq, seq + 1...; or suspend, and raise."""
        while True:
            outcomes, suspended = self._database(
                lambda conn, retried: self._record_or_suspend(conn, retried, seq, children)
            )
            if outcomes:
                return outcomes
            if suspended:
                reason = TaskSuspended(
                    f"suspended, waiting for {len(children)}"
                    f" {'child' if len(children) == 1 else 'children'}"
                )
                self.stop(reason)
                raise reason
            # Every child had finished by the time we held the lock: record them, go on.

    def _record_or_suspend(
        self, conn: psycopg.Connection, retried: bool, seq: int, children: list[int]
    ) -> tuple[Sequence[RecordChildOutcomesRow | TaskEvent], bool]:
        """(the outcomes appended, False) if every child has finished; ([], True) if this
        attempt suspended; ([], False) if every child finished while we took the lock."""
        queries = Querier(conn)
        if retried:  # the last try's connection broke: maybe after its commit
            recorded = queries.list_events_from(task_id=self.task_id, attempt=self.attempt, seq=seq)
            if recorded:
                return recorded, False
            task = queries.get_task(id=self.task_id)
            if task and task.status == TaskStatus.SUSPENDED and task.attempts == self.attempt:
                return [], True
        rows = queries.record_child_outcomes(
            task_id=self.task_id, attempt=self.attempt, seq=seq, children=children
        )
        if rows:
            return rows, False
        # Some child is unfinished (or we lost the task). Lock our row, then check again in a
        # new statement, and suspend only if a child is STILL unfinished: the race with a child
        # that finishes right now is settled by that lock.
        with conn.transaction():
            if queries.lock_running_task(id=self.task_id, attempt=self.attempt) is None:
                raise self._lost(seq, "wait")
            suspended = queries.suspend_task(
                id=self.task_id, attempt=self.attempt, children=children
            )
        return [], suspended is not None

    # endregion

    # region: sleep
    def sleep_for(self, name: str, seconds: float) -> None:
        """Sleep `seconds`, durably: the attempt ends; the task runs again once they have passed.

        Not TaskContext.sleep(seconds), which waits in this process, holding its slot: this one
        records when the sleep ends (on the database's clock) and suspends (TaskSuspended), so
        that a sleep of a week holds no worker, no slot, no lease and no connection. The task is
        claimed again at that time, by any worker; its replay of this call returns at once.
        `name` identifies the sleep in the log, as a step's does.
        """
        check_seconds(f"sleep {name!r}: seconds", seconds, positive=False)
        self._sleep(name, after=datetime.timedelta(seconds=seconds), at=None)

    def sleep_until(self, name: str, when: datetime.datetime) -> None:
        """Sleep until `when` (a datetime with a time zone), durably: as sleep_for()."""
        if not isinstance(when, datetime.datetime) or when.utcoffset() is None:
            raise ValueError(f"sleep {name!r}: when must be a datetime with a time zone")
        self._sleep(name, after=None, at=when)

    def _sleep(
        self, name: str, after: datetime.timedelta | None, at: datetime.datetime | None
    ) -> None:
        check_call_name("a sleep", name)
        event = self._replay(Call("sleep", name))
        if event is not None:
            self.replayed += 1
            wakes_at = datetime.datetime.fromisoformat(event.result)
            # Over, if the history goes on past it, or if the task was claimed at its end or
            # later (a sleeper woken on time: its run_at IS its end). Only otherwise (a
            # sleeper cancelled and retried, say) is the database asked.
            if self._seq < len(self.history()) or (self._run_at and wakes_at <= self._run_at):
                return
        else:
            self.check()
            self.ran += 1
            self._seq += 1
            deadline = self._deadline(self._seq, EventKind.SLEEP_STARTED, name, after, at)
            assert deadline is not None  # `after` or `at` (the constraint sleeps_have_an_end)
            wakes_at = deadline
            crash_point("sleep")  # the tests kill the worker here: recorded, not suspended
        # Recorded, then suspended: two transactions. A crash between them leaves the sleep in
        # the log, and the retry that comes when the lease runs out sleeps what is left of it.
        if self._suspend_until(self._seq, name, wakes_at):
            reason = TaskSuspended(f"sleeping until {wakes_at:%Y-%m-%d %H:%M:%S} UTC ({name!r})")
            self.stop(reason)
            raise reason

    def _suspend_until(self, seq: int, name: str, until: datetime.datetime) -> bool:
        """Suspend this attempt until `until`: True; False if that time has come already."""

        def suspend(conn: psycopg.Connection, retried: bool) -> bool:
            queries = Querier(conn)
            if retried:  # the last try's connection broke: maybe after its commit
                task = queries.get_task(id=self.task_id)
                if task and task.status == TaskStatus.SCHEDULED and task.attempts == self.attempt:
                    return True
            # The row locked first, so that "no row" below means "the time has come", never
            # "another attempt holds the task now": that one must not go on past the sleep.
            with conn.transaction():
                if queries.lock_running_task(id=self.task_id, attempt=self.attempt) is None:
                    raise self._lost(seq, name)
                suspended = queries.suspend_until(
                    id=self.task_id, attempt=self.attempt, until=until, awaiting_event=None
                )
            return suspended is not None

        return self._database(suspend)

    # endregion

    # region: deadline
    def _deadline(
        self,
        seq: int,
        kind: EventKind,
        name: str,
        after: datetime.timedelta | None,
        at: datetime.datetime | None,
    ) -> datetime.datetime | None:
        """Append a sleep_started or event_awaited event: the time it ends, on the database's
        clock (`at`, or `after` from now; neither: never, None). One statement, fenced."""

        def append(conn: psycopg.Connection, retried: bool) -> Any:
            queries = Querier(conn)
            if retried:  # the last try's connection broke: maybe after its commit
                event = queries.get_event(task_id=self.task_id, seq=seq, attempt=self.attempt)
                if event is not None:
                    return event
            return queries.append_deadline(
                task_id=self.task_id, attempt=self.attempt, seq=seq, kind=kind, name=name,
                at=at, after=after,
            )  # fmt: skip

        row = self._database(append)
        if row is None:
            raise self._lost(seq, name)
        return None if row.result is None else datetime.datetime.fromisoformat(row.result)

    # endregion

    # region: wait_for_event
    def wait_for_event(self, name: str, timeout: float | None = None) -> Any:
        """The payload of the event `name` (engine.send_event), once it has been sent.

        If it was sent already, at once. Otherwise the attempt suspends until it is sent, or
        until `timeout` seconds have passed (None: no timeout): then EventTimeout. Either way,
        the outcome is recorded, so that every replay returns the same payload, or raises the
        same EventTimeout, whatever has been sent since. Two events: the wait (event_awaited,
        with its deadline, so that a replay waits only what is left) and its outcome.
        """
        check_call_name("an event", name)
        if timeout is not None:
            check_seconds(f"event {name!r}: timeout", timeout, positive=False)
        awaited = self._replay(Call("event", name))
        if awaited is not None:
            self.replayed += 1
            deadline = (
                None if awaited.result is None else datetime.datetime.fromisoformat(awaited.result)
            )
        else:
            self.check()
            self.ran += 1
            self._seq += 1
            after = None if timeout is None else datetime.timedelta(seconds=timeout)
            deadline = self._deadline(self._seq, EventKind.EVENT_AWAITED, name, after, None)
        outcome: RecordEventOutcomeRow | TaskEvent | None = self._replay(
            Call("event outcome", name)
        )
        if outcome is not None:
            self.replayed += 1
        else:
            self.check()
            outcome = self._receive(self._seq + 1, name, deadline)
            self._seq += 1
        if outcome.kind == EventKind.EVENT_TIMED_OUT:
            raise EventTimeout(name)
        return outcome.result

    # endregion

    # region: receive
    def _receive(
        self, seq: int, name: str, deadline: datetime.datetime | None
    ) -> RecordEventOutcomeRow | TaskEvent:
        """Append the wait's outcome as event `seq`, if it has one; or suspend, and raise."""
        while True:
            outcome, suspended = self._database(
                lambda conn, retried: self._receive_or_suspend(conn, retried, seq, name, deadline)
            )
            if outcome is not None:
                return outcome
            if suspended:
                until = "" if deadline is None else f" until {deadline:%Y-%m-%d %H:%M:%S} UTC"
                reason = TaskSuspended(f"waiting for event {name!r}{until}")
                self.stop(reason)
                raise reason
            # The deadline came while we held the locks: record the timeout, go on.

    def _receive_or_suspend(
        self,
        conn: psycopg.Connection,
        retried: bool,
        seq: int,
        name: str,
        deadline: datetime.datetime | None,
    ) -> tuple[RecordEventOutcomeRow | TaskEvent | None, bool]:
        """(the outcome appended, False); (None, True) if this attempt suspended; (None, False)
        if the deadline came while we took the locks."""
        queries = Querier(conn)
        if retried:  # the last try's connection broke: maybe after its commit
            event = queries.get_event(task_id=self.task_id, seq=seq, attempt=self.attempt)
            if event is not None:
                return event, False
            task = queries.get_task(id=self.task_id)
            waiting = (TaskStatus.SCHEDULED, TaskStatus.SUSPENDED)
            if task and task.status in waiting and task.attempts == self.attempt:
                return None, True
        outcome = queries.record_event_outcome(
            task_id=self.task_id, attempt=self.attempt, seq=seq, name=name, deadline=deadline
        )
        if outcome is not None:  # sent already, or timed out: no lock needed
            return outcome, False
        # Not yet. Lock the event's name, as a send does, and our row; then look again, in a
        # NEW statement, and suspend only if the event is STILL not there. A send that
        # committed before we got the lock is seen by that look; a send that comes after
        # waits for our commit, and then finds this task waiting, and queues it. Without the
        # name's lock, a send could commit between our look and our suspension, find nobody
        # waiting, and the task would sleep until its timeout: a lost wake-up.
        with conn.transaction():
            queries.lock_event_name(name=name)
            if queries.lock_running_task(id=self.task_id, attempt=self.attempt) is None:
                raise self._lost(seq, name)
            outcome = queries.record_event_outcome(
                task_id=self.task_id, attempt=self.attempt, seq=seq, name=name, deadline=deadline
            )
            if outcome is not None:
                return outcome, False
            suspended = queries.suspend_until(
                id=self.task_id, attempt=self.attempt, until=deadline, awaiting_event=name
            )
        return None, suspended is not None

    # endregion

    def _lost(self, seq: int, name: str) -> TaskStopped:
        """Why the spawn or the wait could not be recorded: the attempt's end (cancelled, timed
        out) if the worker already knows it, else a LeaseLostError, as _append raises."""
        lost = self.reason or LeaseLostError(
            f"task {self.task_id}: attempt {self.attempt} no longer holds the task"
            f" (lease expired, cancelled or timed out): event {seq} ({name!r}) not recorded"
        )
        self.stop(lost)
        return lost

    # region: append
    def _append(
        self,
        seq: int,
        kind: EventKind,
        name: str,
        input_hash: str | None,
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
                input_hash=input_hash, result=result, error=error, child_id=None,
                duration=duration,
            )  # fmt: skip

        row = self._database(append)
        if row is None:
            # Fenced out: the database ended this attempt (a timeout or a cancel, which the
            # heartbeat may already have told us about), or its lease ran out, and another
            # worker may be running the task. Whatever this step did, the log did not take it.
            lost = self.reason or LeaseLostError(
                f"task {self.task_id}: attempt {self.attempt} no longer holds the task"
                f" (lease expired, cancelled or timed out): event {seq} ({name!r}) not recorded"
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

    # region: hooks
    def returned(self, output: Any) -> Outcome:
        """The function returned: did it make every call its history holds? (finish())"""
        try:
            self.finish()
        except Exception as err:  # NonDeterminismError, or the attempt ended meanwhile
            return self.raised(err)
        return self._unless_diverged(super().returned(output))

    def raised(self, err: BaseException) -> Outcome:
        return self._unless_diverged(super().raised(err))

    def _unless_diverged(self, outcome: Outcome) -> Outcome:
        """However the function ended (it may have caught NonDeterminismError, and returned or
        raised another), a run that diverged from its history fails with that reason, and
        for good: the same code would diverge again, the same way, on every retry. And a run
        that suspended has nothing to record: the database has it already."""
        if isinstance(self.reason, TaskSuspended):
            return Outcome(suspended=True)
        if self.diverged is None:
            return outcome
        return Outcome(error=describe_error(self.diverged), retryable=False)

    def report(self) -> str | None:
        """For the worker's log: how much of the function's work the log saved (a retry), and
        whether the attempt suspended."""
        said = []
        if self.replayed:
            said.append(f"{self.replayed} events replayed from the log, {self.ran} run")
        if isinstance(self.reason, TaskSuspended):
            said.append(str(self.reason))
        return "; ".join(said) or None

    # endregion


def short_json(value: Any, limit: int = 200) -> str:
    """`value` as JSON for a message, cut to `limit` characters."""
    text = json.dumps(value, sort_keys=True, ensure_ascii=False)
    return text if len(text) <= limit else text[:limit] + "..."


def check_call_name(what: str, name: object) -> None:
    """Raise ValueError unless `name` is a non-empty string the log can store."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"{what} needs a name, a non-empty string, not {name!r}")
    try:
        check_text(name)
    except ValueError as err:
        raise ValueError(f"{what} named {name!r} cannot be stored: {err}") from None
