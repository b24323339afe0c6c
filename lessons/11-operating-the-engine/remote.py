"""The worker protocol, the server's side: tasks whose function runs in another program, in any
language, that asks for work over HTTP. api.py has the routes; this module has no HTTP in it.

An HTTP worker does, one request at a time, what worker.py's loop does:

    claim      a task of the declared names it runs, or nothing within `wait` seconds
    heartbeat  keep the attempt's lease; learn that it is over (cancelled, taken over)
    steps      a durable task's step, appended to its event log (or answered from it)
    complete   the output
    fail       the error: the task is retried after a backoff, or fails for good

Each request after the claim names its attempt, and goes through the statements the Python
worker uses, fenced the same way: an attempt that is over changes nothing, and its worker learns
why (AttemptOverError, which the API answers with 409). An attempt's end goes through
Worker.ending, so that the close policy and the parents' wake-ups are the Python worker's own.

What the server does for an HTTP worker, which a Python worker does for itself:
- the claim: Worker.claim itself (HttpWorker, below), chores, keys, limits and all;
- the wait for work: a claim that finds nothing waits for the Listener (lesson 08) to hear of
  a task, and claims again at once; it holds no connection while it waits;
- timeouts: an attempt that has overrun its task's timeout is failed at its next request.
"""

from __future__ import annotations

import dataclasses
import datetime
import threading
import time
from collections.abc import Sequence
from typing import Any

import psycopg
from db.models import EventKind, Task, TaskEvent, TaskStatus
from db.queries import Querier
from durable import Call, NonDeterminismError
from engine import (
    MAX_ERROR_LENGTH,
    MAX_RUNNING_LIMIT,
    Engine,
    TaskInputError,
    TaskNotFoundError,
    TaskOptionError,
    check_int,
    check_name,
    check_seconds,
    describe_error,
    is_task_id,
    json_problem,
    storable_text,
)
from listener import Listener
from metrics import ATTEMPTS, RESULTS_DROPPED, observe_claimed
from task_context import TaskTimeout
from worker import Worker
from worker import check_seconds as check_worker_seconds

# The longest a claim may wait for work. A long poll that waits longer gains nothing (the worker
# asks again at once) and holds a server thread longer; and some proxies cut a request that has
# been silent for a minute.
MAX_WAIT = 60.0  # seconds

# The lease a heartbeat asks for when it names none: Worker's default, as for the claim.
DEFAULT_LEASE = 30.0  # seconds

STEP_KINDS = (EventKind.STEP_COMPLETED, EventKind.STEP_FAILED)


def check_lease(lease: object) -> None:
    """Worker's own check of a lease (more than 0 seconds, at most a day), as the engine's
    TaskOptionError."""
    try:
        check_worker_seconds("lease", lease, 86400)
    except ValueError as err:
        raise TaskOptionError(str(err)) from None


class AttemptOverError(Exception):
    """The attempt an HTTP worker names is no longer its task's current one, or has ended: it
    was cancelled, timed out, failed, completed, or taken over after its lease ran out. The
    message says which. Nothing was written."""


class HttpWorker(Worker):
    """A Worker that runs no function: Worker.claim and Worker.ending, for an HTTP worker.

    A subclass rather than a claim of its own: Worker.claim is the most careful function of the
    engine (the chores, the keys' turns and limits, the alarm), and a task must be claimed for an
    HTTP worker exactly as for a Python one. What differs is which names it claims: the
    declared tasks the HTTP worker asked for. Worker's own `task_names` argument refuses them,
    since they are not in the registry (no function here can run them): hence the property.
    """

    def __init__(
        self,
        engine: Engine,
        name: str,
        task_names: Sequence[str] = (),
        lease: float = DEFAULT_LEASE,
        chores_due: float = 0.0,
    ) -> None:
        super().__init__(engine, name, lease=lease, listen=False)
        self.declared_names = list(task_names)
        # When the chores are due (time.monotonic()): the API's, shared by every claim it
        # serves (RemoteWorkers), as a Python worker's belong to its loop. A claimer of its own
        # per request would do them at every claim: five round trips more for each task.
        self._chores_due = chores_due

    @property
    def task_names(self) -> list[str]:
        return self.declared_names

    @property
    def alarm(self) -> float:
        """When (time.monotonic()) to claim again though no notification came: the run_at of a
        scheduled task, or the end of a lease, that the last claim found due next (NextDue);
        at the latest, the safety poll."""
        return self._chores_due


@dataclasses.dataclass(frozen=True)
class Step:
    """A step event, as an HTTP worker sees it: where it is, what it was, how it ended."""

    seq: int
    kind: EventKind  # step_completed or step_failed
    name: str
    result: Any  # what the step returned, as the log holds it (JSON)
    error: str | None  # what it raised, for step_failed

    @classmethod
    def of(cls, event: TaskEvent) -> Step:
        return cls(event.seq, event.kind, event.name, event.result, event.error)


@dataclasses.dataclass(frozen=True)
class Claimed:
    """What a claim hands an HTTP worker: the task (its attempt is `task.attempts`), and for a
    durable task the history its earlier attempts recorded, to replay."""

    task: Task
    durable: bool
    history: list[Step]


class RemoteWorkers:
    """The server's side of every HTTP worker: one per API process. start() before the first
    claim (it starts the Listener), close() at the end."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.waiting = 0  # claims waiting for work now: HTTP workers with nothing to do
        # When the chores are due next (time.monotonic()), for every claim (HttpWorker).
        self._chores_due = 0.0
        # The Listener sets `_heard`, an Event, as it does for a worker's loop: one waiter. Here
        # any number of claims wait at once, and each must hear it: the relay thread turns
        # every set into a ring of the bell (`_rings`, under `_bell`), which wakes them all.
        self._heard = threading.Event()
        self._stopping = threading.Event()
        self._bell = threading.Condition()
        self._rings = 0
        # The names declared now: declare them before the API starts (api.main does).
        self._listener = Listener(
            engine.database_url, "api", engine.declared, self._heard, self._stopping
        )
        self._relay_thread = threading.Thread(target=self._relay, name="api-relay", daemon=True)

    def start(self) -> None:
        self._listener.start()
        self._relay_thread.start()

    def stop(self) -> None:
        """Answer every waiting claim now, and every later one after a single try: nothing to
        claim. Called as the server begins to stop, so that it need not wait for them."""
        self._stopping.set()
        self._ring()
        self._heard.set()  # the relay thread's turn to see `_stopping`

    def close(self) -> None:
        self.stop()
        self._relay_thread.join()
        self._listener.join()

    def _relay(self) -> None:
        while not self._stopping.is_set():
            self._heard.wait()
            self._heard.clear()
            self._ring()

    def _ring(self) -> None:
        with self._bell:
            self._rings += 1
            self._bell.notify_all()

    # region: claim
    def claim(
        self, worker: str, task_names: Sequence[str], wait: float, lease: float
    ) -> Claimed | None:
        """A task for `worker`, of one of `task_names` (declared ones), with a lease of `lease`
        seconds; None if there was none to claim within `wait` seconds.

        The long poll: a claim that finds nothing waits until the bell rings (a task of some
        declared name became claimable), or its alarm (a scheduled task comes due, a lease
        runs out), then claims again; until `wait` has passed. A task enqueued while it waits is
        claimed within milliseconds, and an idle HTTP worker costs the database nothing: no
        connection held, no query sent, between the bells.
        """
        check_name("worker", worker)
        if not task_names:
            raise TaskOptionError("task_names is empty: name the declared tasks this worker runs")
        for name in task_names:
            if name not in self.engine.declared:
                declared = ", ".join(sorted(self.engine.declared)) or "none"
                raise TaskOptionError(
                    f"{name!r} is not a declared task (declared: {declared}): HTTP workers"
                    " claim only the tasks declared with engine.declare_task()"
                )
        # `0 <= wait` also refuses NaN: every comparison with NaN is false.
        if isinstance(wait, bool) or not isinstance(wait, int | float) or not 0 <= wait <= MAX_WAIT:
            raise TaskOptionError(f"wait must be a number of seconds from 0 to {MAX_WAIT:g}")
        check_lease(lease)
        claimer = HttpWorker(self.engine, worker, task_names, lease, self._chores_due)
        deadline = time.monotonic() + wait
        while True:
            # Read before the claim, so that a ring during the claim is not missed: the wait
            # below then returns at once.
            with self._bell:
                rings = self._rings
            claimed = self._claim_once(claimer)
            if claimed is not None:
                return claimed
            now = time.monotonic()
            if now >= deadline or self._stopping.is_set():
                return None
            self._wait(rings, timeout=min(deadline, claimer.alarm) - now)

    def _wait(self, rings: int, timeout: float) -> None:
        """Until the bell rings again (it had rung `rings` times), or `timeout` seconds pass."""
        with self._bell:
            self.waiting += 1
            try:
                self._bell.wait_for(lambda: self._rings != rings, timeout)
            finally:
                self.waiting -= 1

    def _claim_once(self, claimer: HttpWorker) -> Claimed | None:
        """One claim, on a connection borrowed for it alone. Its first does the chores, as a
        Python worker's first claim does: promote due tasks, take back expired leases."""
        with self.engine.connection() as conn:
            started = time.monotonic()
            claimed = claimer.claim(conn, 1)
            # When this claim says the chores are due next (it did them, or its alarm is set):
            # for the next claims too. Two claims at once may both do them: harmless, bounded.
            self._chores_due = claimer.alarm
            observe_claimed(claimed, time.monotonic() - started)
            if not claimed:
                return None
            task = claimed[0]
            durable = task.name in self.engine.durable
            history = Querier(conn).load_whole_history(task_id=task.id) if durable else []
        return Claimed(task, durable, [Step.of(event) for event in history])

    # endregion

    # region: attempt
    def heartbeat(self, task_id: int, attempt: int, lease: float = DEFAULT_LEASE) -> None:
        """Extend the attempt's lease to `lease` seconds from now (ExtendLeases, as a Python
        worker's heartbeat). AttemptOverError if it is over: the worker should stop."""
        check_lease(lease)
        with self.engine.connection() as conn:
            self._current(conn, task_id, attempt)
            kept = Querier(conn).extend_leases(
                lease=datetime.timedelta(seconds=lease), ids=[task_id], attempts=[attempt]
            )
            if not kept:
                raise AttemptOverError(self._why_over(conn, task_id, attempt))

    def complete(self, task_id: int, attempt: int, output: Any) -> None:
        """Record the attempt's output (CompleteTasks, fenced by the attempt)."""
        problem = json_problem(output)
        if problem is not None:
            raise TaskInputError(f"output of task {task_id} is not JSON-serializable: {problem}")
        with self.engine.connection() as conn:
            task = self._current(conn, task_id, attempt)
            worker = HttpWorker(self.engine, task.worker or "api")
            with worker.ending(conn, [worker.context(task, self.engine.pool)]):
                done = [{"id": task_id, "attempt": attempt, "output": output}]
                recorded = Querier(conn).complete_tasks(done=done)
            if not recorded:
                RESULTS_DROPPED.labels(task.name).inc()
                raise AttemptOverError(self._why_over(conn, task_id, attempt))
        ATTEMPTS.labels(task.name, "completed").inc()

    def fail(self, task_id: int, attempt: int, error: str, retryable: bool = True) -> TaskStatus:
        """Record the attempt's error (FailAttempt); the task's status after it: scheduled (to
        be retried after a backoff) or failed (for good: no attempts left, or not retryable).

        The error is the worker's text, made storable as the Python worker makes its own:
        NUL characters escaped, cut to MAX_ERROR_LENGTH.
        """
        with self.engine.connection() as conn:
            task = self._current(conn, task_id, attempt)
            status = self._end(conn, task, storable_text(error, MAX_ERROR_LENGTH), retryable)
            if status is None:
                RESULTS_DROPPED.labels(task.name).inc()
                raise AttemptOverError(self._why_over(conn, task_id, attempt))
        return status

    def history(self, task_id: int, attempt: int) -> list[Step]:
        """The task's current history, this attempt's own events included: for a worker that
        lost track of where it was (it restarted, keeping the attempt)."""
        with self.engine.connection() as conn:
            self._current(conn, task_id, attempt)
            history = Querier(conn).load_whole_history(task_id=task_id)
        return [Step.of(event) for event in history]

    # endregion

    # region: step
    def append_step(
        self,
        task_id: int,
        attempt: int,
        seq: int,
        name: str,
        output: Any = None,
        error: str | None = None,
        duration: float = 0.0,
    ) -> Step:
        """Append event `seq` to a durable task's history: a step that returned `output`, or,
        with `error`, a step that failed (the worker caught it and went on: a replay must take
        the same path). Returns the event as the log holds it: what the worker must use, since
        a replay will get exactly that.

        Fenced as DurableContext's appends are: by the attempt, still running, still leased.
        If the history holds event `seq` already, it is answered, not appended again: the
        worker's repeat of a request whose answer it lost, or a replay that asks rather than
        reads its history. Unless it records another call: the worker's code has diverged from
        its history (NonDeterminismError), and the task fails for good, as in Python.
        """
        check_int("seq", seq, 1, MAX_RUNNING_LIMIT)
        check_name("a step's name", name)
        check_seconds("duration", duration, positive=False)
        if error is None:
            problem = json_problem(output)
            if problem is not None:
                raise TaskInputError(f"output of step {name!r} is not JSON-serializable: {problem}")
        else:
            error = storable_text(error, MAX_ERROR_LENGTH)
        with self.engine.connection() as conn:
            task = self._current(conn, task_id, attempt)
            if task.name not in self.engine.durable:
                raise TaskOptionError(
                    f"task {task_id} ({task.name!r}) is a regular task: it has no history to"
                    " record steps in (declare it with durable=True)"
                )
            queries = Querier(conn)
            history = {event.seq: event for event in queries.load_whole_history(task_id=task_id)}
            if seq in history:
                return self._recorded(conn, task, history[seq], name)
            if seq != len(history) + 1:
                raise TaskOptionError(
                    f"task {task_id}'s history holds {len(history)} events: its next step is"
                    f" event {len(history) + 1}, not {seq}"
                )
            kind = EventKind.STEP_COMPLETED if error is None else EventKind.STEP_FAILED
            try:
                row = queries.append_event(
                    task_id=task_id, attempt=attempt, seq=seq, kind=kind, name=name,
                    input_hash=None, result=output if error is None else None, error=error,
                    child_id=None, duration=datetime.timedelta(seconds=duration),
                )  # fmt: skip
            except psycopg.errors.UniqueViolation:
                # Two requests of this attempt appended event `seq` at the same moment (the
                # worker sent it twice, at once): the other one won, and this one is a repeat.
                event = queries.get_event(task_id=task_id, seq=seq, attempt=attempt)
                if event is None:
                    raise AttemptOverError(self._why_over(conn, task_id, attempt)) from None
                return self._recorded(conn, task, event, name)
            if row is None:
                raise AttemptOverError(self._why_over(conn, task_id, attempt))
        return Step(seq, kind, name, row.result, error)

    def _recorded(self, conn: psycopg.Connection, task: Task, event: TaskEvent, name: str) -> Step:
        """The step event the history holds at this place, if it is the step asked for."""
        if event.kind in STEP_KINDS and event.name == name:
            return Step.of(event)
        diverged = NonDeterminismError(task.id, event, Call("step", name))
        self._end(conn, task, describe_error(diverged), retryable=False)
        raise AttemptOverError(
            f"{diverged}; the task has failed for good (replay it, from an empty history, once"
            " the worker's code and the history agree)"
        )

    # endregion

    # region: fence
    def _current(self, conn: psycopg.Connection, task_id: int, attempt: int) -> Task:
        """The task, if `attempt` is its current attempt and still running: every request after
        the claim starts here. AttemptOverError if it is not, saying why; and if it has overrun
        the task's timeout, the attempt is failed first, as worker.py's _enforce_timeouts does.
        """
        queries = Querier(conn)
        task = queries.get_task(id=task_id) if is_task_id(task_id) else None
        if task is None:
            raise TaskNotFoundError(f"no task with id {task_id}")
        if task.name not in self.engine.declared:
            raise TaskOptionError(
                f"task {task_id} ({task.name!r}) is not declared for HTTP workers here"
                " (engine.declare_task)"
            )
        if not 1 <= attempt <= task.attempts:
            raise TaskNotFoundError(
                f"task {task_id} has no attempt {attempt} (it has had {task.attempts})"
            )
        if task.attempts != attempt or task.status != TaskStatus.RUNNING:
            raise AttemptOverError(self._why_over(conn, task_id, attempt))
        assert task.started_at is not None  # a running task has started
        # started_at is the database's clock at the claim, and now() this machine's: two clocks,
        # which the Python worker avoids (a monotonic deadline, in its memory). Here the attempt
        # outlives any memory of this process (the API restarts; another API process answers
        # the next request), and clocks kept by NTP agree to milliseconds: nothing next to a
        # timeout of minutes.
        if datetime.datetime.now(datetime.UTC) - task.started_at > task.timeout:
            limit = task.timeout.total_seconds()
            timeout = TaskTimeout(f"attempt exceeded its timeout of {limit:g}s")
            status = self._end(conn, task, describe_error(timeout), retryable=True)
            if status is None:
                raise AttemptOverError(self._why_over(conn, task_id, attempt))
            then = "retry scheduled" if status == TaskStatus.SCHEDULED else "failed for good"
            raise AttemptOverError(f"task {task_id}: attempt {attempt}: {timeout}; {then}")
        return task

    def _end(
        self, conn: psycopg.Connection, task: Task, error: str, retryable: bool
    ) -> TaskStatus | None:
        """Fail the task's current attempt (FailAttempt, inside Worker.ending); the task's new
        status, or None if the attempt had ended already."""
        worker = HttpWorker(self.engine, task.worker or "api")
        # Worker.context: what ending() needs to know of the attempt, its parent and whether it
        # may have children. (Its pool would serve a Python function's steps: unused here.)
        with worker.ending(conn, [worker.context(task, self.engine.pool)]):
            failed = Querier(conn).fail_attempt(
                retryable=retryable, error=error, id=task.id, attempt=task.attempts
            )
        if failed is None:
            return None
        ATTEMPTS.labels(task.name, "failed").inc()
        return failed.status

    def _why_over(self, conn: psycopg.Connection, task_id: int, attempt: int) -> str:
        """Why `attempt` can write no more, in one sentence, from the rows as they are now."""
        queries = Querier(conn)
        task = queries.get_task(id=task_id)
        if task is None:
            return f"task {task_id} no longer exists"
        if task.status == TaskStatus.CANCELLED:
            return f"task {task_id} was cancelled"
        ended = {a.attempt: a for a in queries.list_attempts(task_id=task_id)}[attempt]
        how = f"{ended.status}: {ended.error}" if ended.error else str(ended.status)
        why = f"attempt {attempt} of task {task_id} has ended ({how})"
        if task.attempts > attempt:
            why += f"; the task is on attempt {task.attempts} now"
        return why

    # endregion
