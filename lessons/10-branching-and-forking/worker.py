"""The worker: claim tasks for its free slots, run their functions, record what happened. Repeat.

A worker has `slots`: it runs at most that many tasks at once, on a pool of that many threads,
and claims only as many tasks as it has slots free. One loop thread does all the database work
on the worker's one connection, in four stages, turn after turn:

1. record: one statement writes the outputs of all the tasks finished since the last turn
   (completed), one per error (the task is retried after a backoff, or fails for good), all
   fenced by the attempt number: a worker that lost its lease can no longer write. (Lesson 08:
   the plain completions ride with the claim of stage 3, in its transaction: one commit per
   turn instead of two.)
2. keep leases: every lease/3 seconds, one statement extends the leases of all the tasks it
   runs, and learns which it no longer owns (cancelled, or taken over); attempts that overran
   their timeout are failed;
3. claim: one transaction makes due scheduled tasks queued, fails the attempts whose lease ran
   out (their worker died), then turns up to `free slots` queued tasks into running ones, each
   with a new attempt and a lease, serving concurrency keys in turn and never starting more of
   a key's tasks than its limit allows; the thread pool runs their functions, outside any
   transaction;
4. wait until a task finishes, a notification says a task is ready (lesson 08: listener.py),
   a heartbeat or a timeout is due, the alarm rings (a scheduled task's run_at, a lease that
   runs out), or the safety poll interval passes.

A durable task's function gets a durable context (durable.py): its steps are appended to the
task's event log, on connections of their own, and a retry replays them from there, checking
that the code still asks for what the log holds. A run that diverged from its log fails for
good. A regular task's function gets lesson 04's context: no log, it just runs.

A durable task that waits for unfinished children suspends itself (durable.py): its function
returns early, and its slot is free. The worker records nothing for it. A child's end is
recorded together with its parent's wake-up, in one transaction that locks both rows, parent
first (the locking rule, queries.sql): the last awaited child to finish queues its parent
again, and any worker claims it and replays it. And a parent's end, with its children's: a
parent that completes, fails for good or is cancelled cancels its unfinished children.

Nothing a task does can stop the loop: whatever its function returns or raises becomes an
outcome the database can store (_execute). Nor can an outage: when the connection breaks, the
tasks in hand run on, their outcomes wait, and the loop reconnects with backoff (outages.py).

Run it as a process of its own (to kill it): `python worker.py --name worker-A` (see main()).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Collection, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
from db.models import Task, TaskStatus
from db.queries import Querier
from durable import DurableContext
from engine import CONNECTION_OPTIONS, Engine, close_tree, describe_error
from listener import Listener
from outages import Backoff, is_outage, reason
from psycopg_pool import ConnectionPool
from task_context import (
    LeaseLostError,
    Outcome,
    TaskCancelled,
    TaskContext,
    TaskStopped,
    TaskTimeout,
    run_in_context,
)

log = logging.getLogger(__name__)

# How long the loop waits, once a task has finished, for more to finish before it records them
# and claims again. Nothing for a task that takes seconds; for tasks of a few microseconds, it
# is the difference between one turn of the loop per task and one per slot-full.
LINGER = 0.002  # seconds

# What the database refuses to store, as opposed to an outage: a value over its size limits
# ("total size of jsonb array elements exceeds the maximum"), say.
REFUSED = (psycopg.DataError, psycopg.errors.ProgramLimitExceeded)


Finished = tuple[Task, TaskContext, Outcome]

# region: loop_connection
# The loop's own connection keeps one generic plan per statement, where the engine's other
# connections plan every run (CONNECTION_OPTIONS, and "Stale plans" in docs/performance.md): its
# few statements run up to a thousand times a second, and planning them was a sixth of a turn.
# A generic plan is made once, for the tables as they were then, and a plan that reads a whole
# table, chosen while it held fifty rows, would go on reading it at a million. With sequential
# scans off, the planner reads a whole table only where no index can serve, and every statement
# of the loop finds its rows through an index. (A test grows the tables under a cached plan.)
LOOP_CONNECTION_OPTIONS: dict[str, Any] = {
    **CONNECTION_OPTIONS,
    "options": "-c plan_cache_mode=auto -c enable_seqscan=off",
}
# endregion


class Worker:
    """Runs the tasks of one Engine's registry, up to `slots` at a time, on its own connection.

    Run several Workers (threads, processes or machines) against the same database: the claim
    hands each task to one of them at a time, no concurrency key ever has more than its
    `max_running` tasks running, and the lease hands a task to another worker if its own dies.

    It hears of new tasks from its Listener (lesson 08), the moment they are committed, and asks
    the database itself only when its alarm rings (the next scheduled task's run_at, the next
    lease to run out: NextDue) or every `poll_interval` seconds, the safety net for whatever
    no notification announced. `listen_url` is where the listener connects, if not where the
    engine does: a direct URL, when the engine goes through a transaction-mode pooler. And
    `listen=False` makes it poll only, as in lesson 07 (main.py compares the two).

    `task_names` narrows what it runs to some of the registry's tasks: a worker pool of its own
    for some tasks (machines with a GPU, say), or, in main.py, a worker for the agent and
    another for its tools. Every registered task, by default.

    `slots=1` by default: without the argument a worker behaves as in lesson 02, one task at a
    time. How many to give it depends on the tasks (threads suit tasks that wait on I/O), so
    the caller says.

    `lease` (seconds) is how long the other workers wait before they decide that a worker which
    has stopped heartbeating is dead, and take its tasks over. Too long, and a crashed worker's
    tasks wait that long; too short, and a worker that is only slow (a long GC pause, a
    saturated machine) loses tasks it is still running.
    """

    def __init__(
        self,
        engine: Engine,
        name: str = "worker",
        slots: int = 1,
        poll_interval: float = 5.0,
        *,
        lease: float = 30.0,
        chores_limit: int = 100,
        listen: bool = True,
        listen_url: str | None = None,
        task_names: Collection[str] | None = None,
    ) -> None:
        check_count("slots", slots)
        check_seconds("lease", lease, 86400)
        check_seconds("poll_interval", poll_interval, 3600)
        check_count("chores_limit", chores_limit)
        self.engine = engine
        self.name = name
        if task_names is not None and (unknown := set(task_names) - set(engine.registry)):
            raise ValueError(f"task_names: not registered: {', '.join(sorted(unknown))}")
        self._task_names = None if task_names is None else list(task_names)
        self.slots = slots
        self.poll_interval = poll_interval
        self.lease = lease
        # A third of the lease: two heartbeats in a row may fail (a slow query, a network
        # blip) before the lease runs out and another worker takes the task over.
        self.heartbeat_interval = lease / 3
        # How many tasks one claim promotes, and reclaims, at most: a claim stays short even
        # when ten thousand tasks come due at once, or after a crash of many workers.
        self.chores_limit = chores_limit
        self.listen = listen
        self.listen_url = listen_url or engine.database_url
        # time.monotonic() of the next chores: the first claim does them; then the next safety
        # poll, or the alarm (NextDue), whichever comes first.
        self._chores_due = 0.0
        # Set by a notification, a task that finished, or `stop`: the loop takes a turn.
        self._wake = threading.Event()
        # Whether the last claim filled all the slots it asked for, more than one: then more is
        # probably queued (claim()).
        self._backlog = False
        self._next_beat = 0.0  # time.monotonic() of the next heartbeat
        self._conn: psycopg.Connection | None = None  # None: not connected (yet, or any more)
        self._backoff = Backoff()
        self._reconnect_at = 0.0  # time.monotonic() of the next attempt to connect
        self._down_since: float | None = None  # when the outage began, if we are in one

    @property
    def task_names(self) -> list[str]:
        """The names this worker claims: read at each claim, so that tasks registered after
        the Worker was made are run too."""
        return list(self.engine.registry) if self._task_names is None else self._task_names

    def connect(self) -> psycopg.Connection:
        """The worker's own connection, in autocommit mode: each statement commits at once.

        Its own, not one borrowed from the Engine's pool per task: a worker uses it all the time.
        One, however many slots: only the loop thread talks to the database; the pool threads
        only run functions. application_name puts the worker's name in pg_stat_activity, so
        `SELECT application_name, state, query FROM pg_stat_activity` shows who is doing what.
        """
        return psycopg.connect(
            self.engine.database_url, application_name=self.name, **LOOP_CONNECTION_OPTIONS
        )

    def run(self, stop: threading.Event) -> None:
        """Claim and run tasks until `stop` is set, then finish (and record) those in hand."""
        self._loop(stop, until_idle=False)

    def run_until_idle(self) -> int:
        """Claim and run tasks until none is left that this worker can run; return how many ran.

        "None left" means none queued: other workers may still be running theirs. A queued task
        whose key is at its limit is not "none left": the worker waits for the key to free up.
        Nor is a task waiting for its run_at (a retry's backoff, a scheduled task): it waits.
        """
        return self._loop(threading.Event(), until_idle=True)

    # region: loop
    def _loop(self, stop: threading.Event, until_idle: bool) -> int:
        """The four stages (see the module's docstring), until stopped or, if asked, idle."""
        ran = 0
        running: dict[Future[Outcome], tuple[Task, TaskContext]] = {}
        # Ended, not recorded yet: outcomes wait here while the database is away.
        finished: list[Finished] = []

        def wake_on_stop() -> None:
            # threading.Event cannot wait for two events at once: this thread turns `stop` into
            # a wake-up, so that a worker told to stop does not sleep on until its next poll.
            stop.wait()
            self._wake.set()

        threading.Thread(target=wake_on_stop, name=f"{self.name}-stop", daemon=True).start()
        listener = Listener(self.listen_url, self.name, self.task_names, self._wake, stop)
        if self.listen:
            listener.start()
        with (
            ThreadPoolExecutor(self.slots, thread_name_prefix=self.name) as pool,
            self.step_connections() as steps,
        ):
            try:
                while running or finished or not stop.is_set():
                    done = [future for future in running if future.done()]
                    finished += [(*running.pop(future), future.result()) for future in done]
                    ran += len(done)
                    conn = self._connection()
                    if conn is None:  # the database is away: only the tasks in hand go on
                        self._drop_unrecordable(finished)
                    else:
                        try:
                            claiming = not stop.is_set() and len(running) < self.slots
                            self._record_finished(conn, finished, claiming)
                            self._keep_leases(conn, [c for _, c in running.values()])
                            claimed = (
                                self._claim(conn, pool, steps, running, finished)
                                if claiming
                                else []
                            )
                            if until_idle and not running and not claimed:
                                if not Querier(conn).queued_task_exists(task_names=self.task_names):
                                    break
                        except psycopg.OperationalError as err:
                            if not is_outage(err):
                                raise
                            self._lost(err)
                    self._wait(running, not stop.is_set() and len(running) < self.slots)
            finally:
                self._disconnect()
                # The listener (and wake_on_stop) end with `stop`: run_until_idle's own, or
                # the caller's when the loop failed.
                stop.set()
                if self.listen:
                    listener.join()
        return ran

    # endregion

    # region: stages
    # region: record_finished
    def _record_finished(
        self, conn: psycopg.Connection, finished: list[Finished], claiming: bool
    ) -> None:
        """Stage 1: record the outcomes of the tasks that finished, and forget them; all but the
        plain completions (rides()) when a claim follows: those ride with it, in its transaction.

        A slot is free again only once its task's outcome is written, so the table never shows
        this worker running more than `slots` tasks at once (the tests audit exactly that).
        """
        self._record_safely(conn, [item for item in finished if not (claiming and rides(item))])
        finished[:] = [item for item in finished if claiming and rides(item)]

    def _record_safely(self, conn: psycopg.Connection, results: list[Finished]) -> None:
        """Record these outcomes, in one go if the database accepts every value in them."""
        if not results:
            return
        try:
            self._record(conn, results)
        except REFUSED:
            # One value the database will not store must not cost the others their outcome:
            # one by one, then; the one refused fails, and says why.
            for task, context, outcome in results:
                try:
                    self._record(conn, [(task, context, outcome)])
                except REFUSED as err:
                    error = f"return value could not be stored: {describe_error(err)}"
                    self._record(conn, [(task, context, Outcome(error=error))])

    # endregion

    def _keep_leases(self, conn: psycopg.Connection, contexts: list[TaskContext]) -> None:
        """Stage 2: fail the attempts that overran their timeout; heartbeat, when one is due."""
        self._enforce_timeouts(conn, contexts)
        if time.monotonic() >= self._next_beat:
            self._heartbeat(conn, contexts)
            self._next_beat = time.monotonic() + self.heartbeat_interval

    def _claim(
        self,
        conn: psycopg.Connection,
        pool: ThreadPoolExecutor,
        steps: ConnectionPool,
        running: dict[Future[Outcome], tuple[Task, TaskContext]],
        riders: list[Finished],
    ) -> list[Task]:
        """Stage 3: record the riders and claim tasks for the free slots, in one transaction,
        and start running them on the pool.

        Riders are plain completions (rides()): a commit waits for the disk, and this makes
        one commit per turn instead of two. If the database refuses one of their outputs, the
        transaction is lost with it: they are recorded the slow way (stage 1's, one by one if
        need be), and the claim goes on without them.
        """
        free = self.slots - len(running)
        claimed_at = time.monotonic()
        try:
            claimed = self.claim(conn, free, riders)
        except REFUSED:
            self._record_safely(conn, riders)
            claimed = self.claim(conn, free)
        riders.clear()
        for task in claimed:
            context = self.context(task, steps)
            context.lease_deadline = claimed_at + self.lease
            future = pool.submit(self._execute, task, context)
            future.add_done_callback(lambda _: self._wake.set())  # a slot is free: a turn
            running[future] = (task, context)
        return claimed

    def _wait(
        self, running: dict[Future[Outcome], tuple[Task, TaskContext]], claiming: bool
    ) -> None:
        """Stage 4: until woken (one of our tasks finished, a notification came, or `stop` was
        set), or the next thing is due: a heartbeat, a timeout, a reconnection, or, when the
        worker can claim (a free slot, not stopping), the chores (the alarm, or the safety
        poll). Not the chores otherwise: they are part of the claim, and a worker that waited
        for chores it cannot do yet would wake at once, again and again, until a slot frees."""
        now = time.monotonic()
        if self._conn is None:
            # Heartbeats, timeouts and the chores need the database: only the next reconnection
            # is due. (Counting the chores, due since before the outage, would make this wait
            # return at once, turn after turn: a busy loop for as long as the outage lasts.)
            due = [self._reconnect_at]
        else:
            due = [self._chores_due] if claiming else []
        if self._conn is not None and running:
            due.append(self._next_beat)
            due += [context.deadline for _, context in running.values() if not context.stopped]
        if not running:
            self._next_beat = now + self.heartbeat_interval  # nothing to heartbeat for
        # Nothing due: stopping, with nothing in hand; the loop ends without waiting.
        self._wake.wait(max(0.0, min(due) - now) if due else 0.0)
        # Cleared before the next turn's claim, not after it: a notification that comes during
        # the claim sets it again, and the next wait returns at once.
        self._wake.clear()
        done = [future for future in running if future.done()]
        if done and len(done) < len(running):
            # Linger a moment for the others: short tasks finish in bursts, and recording
            # ten in one turn costs what recording one does.
            wait(running, timeout=LINGER)

    # endregion

    def context(self, task: Task, steps: ConnectionPool) -> TaskContext:
        """What the task's function will see of its attempt, through current_task(). A durable
        task's context keeps its log (durable.py): steps, spawns and waits, appended and
        replayed. A regular task's is lesson 04's: no log, it just runs."""
        if task.name in self.engine.durable:
            return DurableContext(
                steps, task.id, task.attempts, task.timeout, self.engine, run_at=task.run_at,
                parent_id=task.parent_id,
            )  # fmt: skip
        return TaskContext(task.id, task.attempts, task.timeout, task.parent_id)

    def step_connections(self) -> ConnectionPool:
        """Connections for the functions' steps (durable.py): one per slot at most, on demand.

        Not the loop's connection: the functions run on the pool threads while the loop claims
        and heartbeats, and a connection runs one statement at a time. One per slot, so that a
        step never waits for a connection; none opened for tasks that take no steps.
        """
        return ConnectionPool(
            self.engine.database_url,
            min_size=0,
            max_size=self.slots,
            kwargs={**CONNECTION_OPTIONS, "application_name": f"{self.name}-steps"},
            open=True,
        )

    # region: outage
    def _connection(self) -> psycopg.Connection | None:
        """The loop's connection; a new one if it was lost and a new attempt is due; None while
        the database is away."""
        if self._conn is not None:
            return self._conn
        if time.monotonic() < self._reconnect_at:
            return None
        try:
            self._conn = self.connect()
        except psycopg.OperationalError as err:
            if not is_outage(err):
                raise
            self._lost(err)
            return None
        if self._down_since is not None:
            away = time.monotonic() - self._down_since
            log.warning("%s: database back after %.1fs; resuming", self.name, away)
        self._down_since = None
        self._backoff.reset()
        return self._conn

    def _lost(self, err: psycopg.OperationalError) -> None:
        """The database is unreachable: one line in the log, and a reconnection, later."""
        self._disconnect()
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.warning(
                "%s: database unavailable (%s); the tasks in hand go on, reconnecting",
                *(self.name, reason(err)),
            )
        self._reconnect_at = time.monotonic() + self._backoff.next_delay()

    def _disconnect(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _drop_unrecordable(self, finished: list[Finished]) -> None:
        """Forget the outcomes whose lease ran out while the database was away.

        They can no longer be recorded: the fence would refuse them, and the task is another
        worker's to retry (or this one's, as a new attempt). So a worker stopped during an
        outage waits for the database no longer than its leases.
        """
        now = time.monotonic()
        for task, context, _ in finished:
            if context.lease_deadline <= now:
                log.warning(
                    "%s: task %s attempt %s: the lease ran out during the outage; result dropped",
                    *(self.name, task.id, task.attempts),
                )
        finished[:] = [item for item in finished if item[1].lease_deadline > now]

    # endregion

    # region: claim
    def claim(
        self, conn: psycopg.Connection, max_tasks: int, riders: Sequence[Finished] = ()
    ) -> list[Task]:
        """Claim up to `max_tasks` queued tasks this worker can run: keys take turns, limits hold.

        One transaction: a key row locked in it stays locked until the tasks claimed under it
        are committed as running. It starts by recording the riders' outputs (lesson 08: the
        plain completions, which commit with it), then two chores, each bounded to a few tasks:

        - promote: scheduled tasks whose run_at has come become queued (claimable);
        - reclaim: running tasks whose lease ran out have their attempt failed, and are retried
          or failed for good. This is the only place that happens, so there is no reaper process
          to deploy, watch and forget: as long as any worker claims, abandoned tasks come back.

        Then, for each key in turn, two statements:

        1. lock the key row that has waited longest (FOR NO KEY UPDATE SKIP LOCKED);
        2. in a NEW statement, count the key's running tasks and claim at most the difference.

        Statement 2 must be a new statement. Under READ COMMITTED every statement reads a
        snapshot taken when it starts. Statement 2 starts after we hold the lock, and every
        earlier claimer of this key held the same lock until it committed, so its claims are in
        our snapshot. Counting inside statement 1 would read a snapshot taken before the lock
        was granted, and could miss the claims of the claimer that just released it.

        Tasks without a key come last, with whatever slots the keys left.

        Lesson 08: all that, only when it is needed. While there is a backlog (the last claim
        filled all the slots it asked for, more than one) and no chores are due, one statement
        tries first
        (RecordAndClaimUnkeyed): it records the riders and claims tasks without a key, unless a
        task with a key is waiting. A backlog without keys is served that way, one round trip
        and one commit per turn, where the full claim takes five round trips. It claims
        nothing when the keys need serving first, or nothing is queued: then the full claim,
        which also sets the alarm. Without a backlog (a worker woken for one task, or at the
        end of a burst), the full claim at once: a try that found nothing would cost a second
        transaction. (One slot filled says nothing of a backlog: a worker with one slot always
        makes the full claim.)
        """
        if self._backlog and time.monotonic() < self._chores_due:
            claimed = self._claim_unkeyed_at_once(conn, max_tasks, riders)
            self._backlog = len(claimed) == max_tasks > 1
            if claimed:
                return claimed
            riders = ()  # recorded
        queries = Querier(conn)
        names = self.task_names
        lease = datetime.timedelta(seconds=self.lease)
        claimed = []
        tried: list[str] = []  # keys already served (and still locked by us) in this claim
        failed: list[int] = []  # tasks the reclaim failed for good
        swept = False  # whether the chores ran, and the sweep for orphans is due
        with conn.transaction():
            if riders:
                # First: a key's tasks that end here make room for the claim below.
                self._write(conn, list(riders))
            # The chores, when due: when the alarm rings (NextDue, below), or at the safety poll.
            # Not every turn: a busy worker turns its loop a thousand times a second, and neither
            # chore needs to run that often.
            if time.monotonic() >= self._chores_due:
                self._chores_due = time.monotonic() + self.poll_interval
                swept = True
                promoted = queries.promote_due_tasks(max_tasks=self.chores_limit)
                reclaimed = queries.reclaim_expired_leases(max_tasks=self.chores_limit)
                if self.chores_limit in (promoted, len(reclaimed)):
                    # A full batch: more may be due (ten thousand tasks scheduled for one
                    # instant): the chores again next turn, not at the next poll.
                    self._chores_due = time.monotonic()
                for row in reclaimed:
                    then = "retry scheduled" if row.status == TaskStatus.SCHEDULED else "failed"
                    log.warning(
                        "%s: task %s attempt %s on %s: lease expired (worker presumed dead); %s",
                        *(self.name, row.id, row.attempts, row.worker, then),
                    )
                failed = [row.id for row in reclaimed if row.status == TaskStatus.FAILED]
                # A child that failed for good there wakes its parent. The reclaim locked the
                # parents' rows (or skipped the child); this is a new statement.
                parents = [r.parent_id for r in reclaimed if r.status == TaskStatus.FAILED]
                if parents := [parent for parent in parents if parent is not None]:
                    queries.wake_parents(ids=parents)
            while len(claimed) < max_tasks:
                key = queries.lock_next_key(tried=tried, task_names=names)
                if key is None:
                    break
                tried.append(key)
                claimed += queries.claim_key_tasks(
                    key=key,
                    worker=self.name,
                    task_names=names,
                    max_tasks=max_tasks - len(claimed),
                    lease=lease,
                )
            if len(claimed) < max_tasks:
                claimed += queries.claim_unkeyed_tasks(
                    worker=self.name,
                    task_names=names,
                    max_tasks=max_tasks - len(claimed),
                    lease=lease,
                )
            if len(claimed) < max_tasks:
                # Slots left over: set the alarm for the next task that no notification will
                # announce. (Full, the worker claims again as soon as a slot frees anyway.)
                due_in = queries.next_due(task_names=names)
                if due_in is not None:
                    self._chores_due = min(self._chores_due, time.monotonic() + max(0.0, due_in))
        if failed:
            # And a parent that failed for good there cancels its unfinished children (the
            # close policy). After the claim, in a transaction of its own: the reclaim takes its
            # rows in lease order, never waiting (SKIP LOCKED), and must go on never waiting;
            # this statement may wait for a child's lock, holding no other lock. (Lesson 10:
            # the whole tree below them, locked first, in id order: LockTasks.)
            with conn.transaction():
                queries.lock_tasks(ids=failed, families=failed)
                self._closed(close_tree(queries, failed))
        if swept:
            # And the children that a worker which died right there, between the reclaim and
            # the close, left running for a parent that has ended: a sweep, a few at a time,
            # never waiting (CloseOrphans), with the chores.
            self._closed(queries.close_orphans(max_tasks=self.chores_limit))
        self._backlog = len(claimed) == max_tasks > 1
        return claimed

    # endregion

    def _claim_unkeyed_at_once(
        self, conn: psycopg.Connection, max_tasks: int, riders: Sequence[Finished]
    ) -> list[Task]:
        """Record the riders and claim tasks without a key, in one statement (see claim())."""
        rows = Querier(conn).record_and_claim_unkeyed(
            done=[{"id": t.id, "attempt": t.attempts, "output": o.output} for t, _, o in riders],
            worker=self.name,
            task_names=self.task_names,
            max_tasks=max_tasks,
            lease=datetime.timedelta(seconds=self.lease),
        )
        recorded = {row.id for row in rows if row.status == TaskStatus.COMPLETED}
        self._dropped([(task, context) for task, context, _ in riders if task.id not in recorded])
        # The claimed rows have a Task's columns, in a row type of their own (sqlc's).
        return [Task(**vars(row)) for row in rows if row.status == TaskStatus.RUNNING]

    # region: heartbeat
    def _heartbeat(self, conn: psycopg.Connection, contexts: list[TaskContext]) -> None:
        """Extend the leases of every attempt still on, with ONE statement, however many.

        An attempt the database did not extend is no longer ours: it was cancelled, or our
        lease ran out and another worker took it over. Its function is told, through its
        context; whatever it returns will be refused by the fence in CompleteTasks.
        """
        live = [context for context in contexts if not context.stopped]
        if not live:
            return
        sent_at = time.monotonic()
        kept = Querier(conn).extend_leases(
            lease=datetime.timedelta(seconds=self.lease),
            ids=[context.task_id for context in live],
            attempts=[context.attempt for context in live],
        )
        for context in live:
            if context.task_id in kept:
                context.lease_deadline = sent_at + self.lease
            else:
                context.stop(self._why_lost(conn, context))

    # endregion

    # region: timeouts
    def _enforce_timeouts(self, conn: psycopg.Connection, contexts: list[TaskContext]) -> None:
        """Fail the attempts that overran their timeout, at once.

        At once, rather than when the function returns: a hung call would otherwise keep its
        task (and, through heartbeats, its lease) forever. The thread goes on running it, since
        Python cannot kill a thread, until the function checks its context or returns.
        """
        now = time.monotonic()
        for context in contexts:
            if context.stopped or now < context.deadline:
                continue
            limit = context.timeout.total_seconds()
            timeout = TaskTimeout(f"attempt exceeded its timeout of {limit:g}s")
            with self.ending(conn, [context]):
                failed = Querier(conn).fail_attempt(
                    retryable=True,
                    error=describe_error(timeout),
                    id=context.task_id,
                    attempt=context.attempt,
                )
            context.stop(timeout if failed else self._why_lost(conn, context))

    # endregion

    def _why_lost(self, conn: psycopg.Connection, context: TaskContext) -> TaskStopped:
        """Cancelled, or taken over? One more query, on this rare path only."""
        task = Querier(conn).get_task(id=context.task_id)
        if task is not None and task.status == TaskStatus.CANCELLED:
            return TaskCancelled(f"task {context.task_id} was cancelled")
        return LeaseLostError(
            f"task {context.task_id}: attempt {context.attempt} lost its lease"
            " (another worker took the task over)"
        )

    # region: execute
    def _execute(self, task: Task, context: TaskContext) -> Outcome:
        """Run the task's function (on a pool thread) and say how it ended. Never raises.

        Whatever the function returns or raises becomes an outcome the database can store: an
        output, or an error as text (describe_error). A worker that let one task's exception
        or return value escape would die with every other task it holds, and so would the next
        worker to claim the same task: one poison task could take down the fleet.
        """
        function = self.engine.registry[task.name]  # the claim only returns names we run
        try:
            output = run_in_context(context, function, task.input)
        # BaseException, not only Exception: a task that calls sys.exit() fails, and the worker
        # goes on. (Ctrl-C never lands here: Python runs signal handlers on the main thread.)
        except BaseException as err:
            outcome = context.raised(err)
        else:
            outcome = context.returned(output)
        report = context.report()
        if report is not None:
            log.info("%s: task %s attempt %s: %s", self.name, task.id, task.attempts, report)
        return outcome

    # endregion

    # region: record
    def _record(self, conn: psycopg.Connection, results: list[Finished]) -> None:
        """Write finished tasks' outcomes (on the loop thread, which owns the connection).

        All the completions with one statement: with many slots and short tasks, dozens finish
        between two turns of the loop, and one commit for all of them instead of one each is
        most of this worker's speed. Failures one by one: each has its retry to schedule.
        A suspended task has nothing to record; a child's end is recorded with its parent's
        wake-up, and a parent's with its children's (ending()).
        """
        results = [result for result in results if not result[2].suspended]
        with self.ending(conn, [context for _, context, _ in results]):
            self._write(conn, results)

    def _write(self, conn: psycopg.Connection, results: list[Finished]) -> None:
        completed = [
            (task, context, outcome.output)
            for task, context, outcome in results
            if outcome.error is None
        ]
        lost = []
        if completed:
            recorded = set(
                Querier(conn).complete_tasks(
                    done=[
                        {"id": task.id, "attempt": task.attempts, "output": output}
                        for task, _, output in completed
                    ]
                )
            )
            lost += [(task, context) for task, context, _ in completed if task.id not in recorded]
        for task, context, outcome in results:
            if outcome.error is not None:
                try:
                    self.fail(conn, task, outcome.error, retryable=outcome.retryable)
                except LeaseLostError:
                    lost.append((task, context))
        self._dropped(lost)

    def _dropped(self, lost: list[tuple[Task, TaskContext]]) -> None:
        for task, context in lost:
            # Too late to undo the run, but its result does not overwrite the current attempt's.
            # Cancelled and timed-out attempts end here as expected; a lease taken over means
            # this worker stalled for longer than the lease, which deserves a warning.
            reason = context.reason or self._no_longer_current(task)
            level = logging.WARNING if isinstance(reason, LeaseLostError) else logging.INFO
            log.log(level, "%s: %s; result dropped", self.name, reason)

    # endregion

    # region: ending
    @contextmanager
    def ending(self, conn: psycopg.Connection, contexts: list[TaskContext]) -> Iterator[None]:
        """End these attempts (the with block); wake their parents; close their children.

        If any is a child, or a durable task (which may have children): one transaction,
        which locks the tasks, their parents and their unfinished children in id order,
        parents first (the locking rule, queries.sql), then ends the attempts, then, in new
        statements, queues each suspended parent whose awaited children have all finished now,
        and cancels the unfinished children of each task that has finished now (the close
        policy, CloseChildren). All of
        it commits together: a worker that dies in between leaves none of it, never a finished
        child with its parent asleep, nor a finished parent with its children running. Regular
        tasks without a parent skip all that: lesson 04's one statement, as before.
        """
        parents = sorted({c.parent_id for c in contexts if c.parent_id is not None})
        families = [c.task_id for c in contexts if c.may_have_children]
        if not parents and not families:
            yield
            return
        with conn.transaction():
            queries = Querier(conn)
            queries.lock_tasks(
                ids=sorted({*parents, *(c.task_id for c in contexts)}), families=families
            )
            yield
            woken = queries.wake_parents(ids=parents) if parents else []
            closed = close_tree(queries, families)
        for parent in woken:
            log.info("%s: task %s: its children have finished; queued to resume", self.name, parent)
        self._closed(closed)

    def _closed(self, children: list[int]) -> None:
        if children:
            log.info(
                "%s: tasks %s cancelled: their parent has finished",
                *(self.name, ", ".join(map(str, children))),
            )

    # endregion

    def complete(self, conn: psycopg.Connection, task: Task, output: Any) -> None:
        """Record one output; LeaseLostError if this attempt is no longer the task's current one."""
        done = [{"id": task.id, "attempt": task.attempts, "output": output}]
        if not Querier(conn).complete_tasks(done=done):
            raise self._no_longer_current(task)

    def fail(
        self, conn: psycopg.Connection, task: Task, error: str, retryable: bool = True
    ) -> None:
        """Record the error: the task waits out a backoff and is retried, or fails for good."""
        result = Querier(conn).fail_attempt(
            retryable=retryable, error=error, id=task.id, attempt=task.attempts
        )
        if result is None:
            raise self._no_longer_current(task)
        if result.status == TaskStatus.SCHEDULED:
            log.info(
                "%s: task %s attempt %s: %s; retry in %.2fs",
                *(self.name, task.id, task.attempts, error, result.retry_in.total_seconds()),
            )
        elif not retryable:
            log.warning(
                "%s: task %s attempt %s: %s; failed for good: the error is not retryable",
                *(self.name, task.id, task.attempts, error),
            )

    @staticmethod
    def _no_longer_current(task: Task) -> LeaseLostError:
        return LeaseLostError(
            f"task {task.id}: attempt {task.attempts} is no longer current"
            " (cancelled, timed out, taken over by another worker, or recorded already, just"
            " before a connection broke)"
        )


def rides(finished: Finished) -> bool:
    """Whether a finished task's outcome can be recorded in the claim's transaction: a plain
    completion, one statement (CompleteTasks). Not an error (its retry to schedule, one by one),
    a suspension (nothing to record), a child or a durable task: their ends lock their families
    first (ending()), in transactions of their own."""
    _, context, outcome = finished
    return (
        outcome.error is None
        and not outcome.suspended
        and context.parent_id is None
        and not context.may_have_children
    )


def check_count(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_seconds(name: str, value: object, most: float) -> None:
    # `0 < value` also refuses NaN: every comparison with NaN is false.
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= most:
        raise ValueError(f"{name} must be more than 0 and at most {most:g} seconds, got {value!r}")


# --- a worker process ----------------------------------------------------------------------------

LESSON_DIR = Path(__file__).resolve().parent


def lesson_database_url() -> str:
    """The lesson's database as main.py created it (here never re-created: it holds the queue).

    On DATABASE_URL's server or the embedded one, as for main.py; LESSON_DBNAME picks another
    database on it (the tests use that).
    """
    from hardway.postgres import DatabaseUnavailable, database_url, lesson_dbname, server_url

    dbname = os.environ.get("LESSON_DBNAME") or lesson_dbname(LESSON_DIR.name)
    try:
        url = database_url(server_url(), dbname)
        psycopg.connect(url).close()
    except DatabaseUnavailable as err:
        raise SystemExit(f"error: {err}") from None
    except psycopg.OperationalError as err:
        reason = str(err).strip().splitlines()[-1]
        raise SystemExit(
            f"error: cannot connect to database {dbname} ({reason});"
            " run `python main.py` once to create it"
        ) from None
    return url


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run a worker until SIGTERM or Ctrl-C.")
    parser.add_argument("--name", default=f"worker-{os.getpid()}")
    parser.add_argument("--tasks", default="demo_tasks", help="module with register(engine)")
    parser.add_argument("--slots", type=int, default=1)
    parser.add_argument("--lease", type=float, default=30.0, help="seconds")
    parser.add_argument("--poll-interval", type=float, default=5.0, help="seconds")
    parser.add_argument(
        "--no-listen", action="store_true", help="poll only, as in lesson 07 (no LISTEN)"
    )
    parser.add_argument(
        "--listen-url", help="where to LISTEN, if not DATABASE_URL's server (past a pooler)"
    )
    args = parser.parse_args(argv)
    try:
        tasks = importlib.import_module(args.tasks)
    except ModuleNotFoundError as err:
        if err.name != args.tasks:
            raise  # the module exists, and it is one of its imports that is missing
        parser.error(f"--tasks: no module named {args.tasks!r} beside worker.py")
    # This worker's own log at INFO (retries, reclaimed leases); other libraries' at WARNING.
    logging.basicConfig(format="%(message)s")
    log.setLevel(logging.INFO)

    stop = threading.Event()

    def request_stop(signum: int, frame: object) -> None:
        # SIGTERM (what `kill`, systemd and Kubernetes send) or Ctrl-C: stop claiming, finish
        # the tasks in hand, exit. A second one: exit now, and let the leases run out. SIGKILL
        # (`kill -9`) cannot be caught at all: that is what leases are for.
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        print(
            f"{args.name}: stopping: no more claims, finishing the tasks in hand"
            " (send it again to stop at once)",
            file=sys.stderr,
        )

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    with Engine(lesson_database_url()) as engine:
        tasks.register(engine)
        try:
            worker = Worker(
                engine,
                args.name,
                args.slots,
                args.poll_interval,
                lease=args.lease,
                listen=not args.no_listen,
                listen_url=args.listen_url,
            )
        except ValueError as err:  # --lease nan, --slots 0...
            parser.error(str(err).replace("poll_interval", "poll-interval"))
        print(
            f"{worker.name} (pid {os.getpid()}) runs {', '.join(engine.registry)}", file=sys.stderr
        )
        # The loop runs on a thread of its own, and the main thread only waits for it. Python
        # runs signal handlers on the main thread: were the loop there, the handler could
        # interrupt it inside stop.wait(), holding the lock that stop.set() needs: a deadlock.
        failed: list[BaseException] = []

        def run() -> None:
            try:
                worker.run(stop)
            except BaseException as err:  # the traceback is printed; the exit status says so
                failed.append(err)
                raise

        loop = threading.Thread(target=run, name=worker.name, daemon=True)
        loop.start()
        try:
            while loop.is_alive():
                loop.join(0.5)
        except KeyboardInterrupt:
            # os._exit, not sys.exit: a normal exit waits for the threads that still run task
            # functions (Python joins a thread pool's threads at exit), maybe for minutes.
            # "At once" skips that, and every other clean-up: the leases are what clean up.
            print(f"{worker.name}: stopped at once; its leases will run out", file=sys.stderr)
            sys.stderr.flush()
            os._exit(1)
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
