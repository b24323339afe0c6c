"""The worker: claim tasks for its free slots, run their functions, record what happened. Repeat.

A worker has `slots`: it runs at most that many tasks at once, on a pool of that many threads,
and claims only as many tasks as it has slots free. One loop thread does all the database work
on the worker's one connection:

1. record: one UPDATE per finished task writes the output (completed) or the error (failed);
2. claim: one transaction turns up to `free slots` queued tasks into running ones, serving
   concurrency keys in turn and never starting more of a key's tasks than its limit allows;
3. hand the claimed tasks to the thread pool, which runs their functions outside any
   transaction; then wait until a task finishes (or a poll interval passes) and go to 1.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

import psycopg
from db.models import Task
from db.queries import Querier
from engine import Engine, describe_error, json_problem

log = logging.getLogger(__name__)

# What the database refuses to store, once check_json has passed: a number too large for it,
# a value over its size limits.
REFUSED = (psycopg.DataError, psycopg.errors.ProgramLimitExceeded)


class Worker:
    """Runs the tasks of one Engine's registry, up to `slots` at a time, on its own connection.

    Run several Workers (threads, processes or machines) against the same database: the claim
    guarantees that each task is handed to exactly one of them, and that no concurrency key ever
    has more than its `max_running` tasks running, whichever workers run them.

    `slots=1` by default: without the argument a worker behaves as in lesson 02, one task at a
    time. How many to give it depends on the tasks (threads suit tasks that wait on I/O), so
    the caller says.
    """

    def __init__(
        self, engine: Engine, name: str = "worker", slots: int = 1, poll_interval: float = 0.5
    ) -> None:
        if not isinstance(slots, int) or isinstance(slots, bool) or slots < 1:
            raise ValueError(f"slots must be a positive integer, got {slots!r}")
        # Written so that NaN fails it too: every comparison with NaN is false.
        if isinstance(poll_interval, bool) or not (
            isinstance(poll_interval, int | float) and 0 < poll_interval <= 3600
        ):
            raise ValueError(
                f"poll_interval must be more than 0 and at most 3600 seconds, got {poll_interval!r}"
            )
        self.engine = engine
        self.name = name
        self.slots = slots
        self.poll_interval = poll_interval

    def connect(self) -> psycopg.Connection:
        """The worker's own connection, in autocommit mode: each statement commits at once.

        Its own, not one borrowed from the Engine's pool per task: a worker uses it all the time.
        One, however many slots: only the loop thread talks to the database; the pool threads
        only run functions. application_name puts the worker's name in pg_stat_activity, so
        `SELECT application_name, state, query FROM pg_stat_activity` shows who is doing what.
        """
        return psycopg.connect(
            self.engine.database_url, autocommit=True, application_name=self.name
        )

    def run(self, stop: threading.Event) -> None:
        """Claim and run tasks until `stop` is set, then finish (and record) those in hand.

        Polling is the simplest way to hear about new tasks; LISTEN/NOTIFY comes later.
        """
        self._loop(stop, until_idle=False)

    def run_until_idle(self) -> int:
        """Claim and run tasks until none is left that this worker can run; return how many ran.

        "None left" means none queued: other workers may still be running theirs. A queued task
        whose key is at its limit is not "none left": the worker waits for the key to free up.
        """
        return self._loop(threading.Event(), until_idle=True)

    # region: loop
    def _loop(self, stop: threading.Event, until_idle: bool) -> int:
        ran = 0
        running: dict[Future, Task] = {}
        with (
            self.connect() as conn,
            ThreadPoolExecutor(self.slots, thread_name_prefix=self.name) as pool,
        ):
            while running or not stop.is_set():
                # Record finished tasks before claiming: a slot is free again only once its
                # task's finish time is written, so the table never shows this worker running
                # more than `slots` tasks at once (the tests audit exactly that).
                for future in [f for f in running if f.done()]:
                    output, error = future.result()
                    self._record(conn, running.pop(future), output, error)
                    ran += 1
                claimed = []
                free = self.slots - len(running)
                if free and not stop.is_set():
                    claimed = self.claim(conn, free)
                    for task in claimed:
                        running[pool.submit(self._execute, task)] = task
                if until_idle and not running and not claimed:
                    if not Querier(conn).queued_task_exists(task_names=list(self.engine.registry)):
                        break
                # Wake up as soon as one of our tasks finishes (its slot is free again), or
                # after the poll interval: new tasks, or room under a key's limit made by
                # another worker, are only seen by asking the database again.
                if running:
                    wait(running, timeout=self.poll_interval, return_when=FIRST_COMPLETED)
                else:
                    stop.wait(self.poll_interval)
        return ran

    # endregion

    # region: claim
    def claim(self, conn: psycopg.Connection, max_tasks: int) -> list[Task]:
        """Claim up to `max_tasks` queued tasks this worker can run: keys take turns, limits hold.

        One transaction: a key row locked in it stays locked until the tasks claimed under it
        are committed as running. For each key in turn, two statements:

        1. lock the key row that has waited longest (FOR NO KEY UPDATE SKIP LOCKED);
        2. in a NEW statement, count the key's running tasks and claim at most the difference.

        Statement 2 must be a new statement. Under READ COMMITTED every statement reads a
        snapshot taken when it starts. Statement 2 starts after we hold the lock, and every
        earlier claimer of this key held the same lock until it committed, so its claims are in
        our snapshot. Counting inside statement 1 would read a snapshot taken before the lock
        was granted, and could miss the claims of the claimer that just released it.

        Tasks without a key come last, with whatever slots the keys left.
        """
        queries = Querier(conn)
        names = list(self.engine.registry)
        claimed: list[Task] = []
        tried: list[str] = []  # keys already served (and still locked by us) in this claim
        with conn.transaction():
            while len(claimed) < max_tasks:
                key = queries.lock_next_key(tried=tried, task_names=names)
                if key is None:
                    break
                tried.append(key)
                claimed += queries.claim_key_tasks(
                    key=key, worker=self.name, task_names=names, max_tasks=max_tasks - len(claimed)
                )
            if len(claimed) < max_tasks:
                claimed += queries.claim_unkeyed_tasks(
                    worker=self.name, task_names=names, max_tasks=max_tasks - len(claimed)
                )
        return claimed

    # endregion

    # region: execute
    def _execute(self, task: Task) -> tuple[Any, str | None]:
        """Run the task's function (on a pool thread); return (output, None) or (None, error)."""
        function = self.engine.registry[task.name]  # the claim only returns names we registered
        try:
            output = function(task.input)
        # Exception, not BaseException: Ctrl-C (KeyboardInterrupt) stops the worker rather than
        # failing the task, and leaves the task running. Lesson 04 deals with that.
        except Exception as err:
            return None, describe_error(err)
        # Checked before writing, so the reason is ours ("a set is not JSON"), not a driver
        # error that would crash the worker and leave the task running.
        problem = json_problem(output)
        if problem is not None:
            return None, f"return value is not JSON-serializable: {problem}"
        return output, None

    def _record(self, conn: psycopg.Connection, task: Task, output: Any, error: str | None) -> None:
        """Write a finished task's outcome (on the loop thread, which owns the connection)."""
        queries = Querier(conn)
        if error is None:
            try:
                changed = queries.complete_task(id=task.id, output=output)
            # JSON the database still refuses (a number too large for it): the task fails.
            except REFUSED as err:
                error = f"return value could not be stored: {describe_error(err)}"
        if error is not None:
            changed = queries.fail_task(id=task.id, error=error)
        # `AND status = 'running'` in both queries: a result only lands on a task that is still
        # running. With our claim, 0 rows cannot happen (lesson 02's naive claim showed when it
        # does); a warning rather than silence, in case someone changed the row by hand.
        if changed == 0:
            log.warning("%s: task %s was no longer running; result dropped", self.name, task.id)

    # endregion
