"""The worker: claim a task, run its function, record what happened. Repeat.

Three statements per task, each committed on its own:

1. claim: one UPDATE turns the oldest queued task into a running one, owned by this worker;
2. run the function, outside any transaction (it may take minutes; a transaction held open that
   long would keep the row locked and hold back vacuum for the whole database);
3. record: one UPDATE writes the output (completed) or the error (failed).
"""

from __future__ import annotations

import logging
import threading

import psycopg
from db.models import Task
from db.queries import Querier
from engine import Engine, describe_error, json_problem

log = logging.getLogger(__name__)

# What the database refuses to store, once check_json has passed: a number too large for it,
# a value over its size limits.
REFUSED = (psycopg.DataError, psycopg.errors.ProgramLimitExceeded)


class Worker:
    """Runs the tasks of one Engine's registry, one at a time, on its own database connection.

    Run several Workers (threads, processes or machines) against the same database: the claim
    guarantees that each task is handed to exactly one of them.
    """

    def __init__(self, engine: Engine, name: str = "worker", poll_interval: float = 0.5) -> None:
        # Written so that NaN fails it too: every comparison with NaN is false.
        if isinstance(poll_interval, bool) or not (
            isinstance(poll_interval, int | float) and 0 < poll_interval <= 3600
        ):
            raise ValueError(
                f"poll_interval must be more than 0 and at most 3600 seconds, got {poll_interval!r}"
            )
        self.engine = engine
        self.name = name
        self.poll_interval = poll_interval

    def connect(self) -> psycopg.Connection:
        """The worker's own connection, in autocommit mode: each statement commits at once.

        Its own, not one borrowed from the Engine's pool per task: a worker uses it all the time.
        application_name puts the worker's name in pg_stat_activity, so
        `SELECT application_name, state, query FROM pg_stat_activity` shows who is doing what.
        """
        return psycopg.connect(
            self.engine.database_url, autocommit=True, application_name=self.name
        )

    def run(self, stop: threading.Event) -> None:
        """Claim and run tasks until `stop` is set; when the queue is empty, poll every so often.

        Polling is the simplest way to hear about new tasks; LISTEN/NOTIFY comes later.
        `stop.wait(...)` rather than `time.sleep(...)`: it returns at once when stop is set.
        """
        with self.connect() as conn:
            while not stop.is_set():
                if not self.run_one(conn):
                    stop.wait(self.poll_interval)

    def run_until_idle(self) -> int:
        """Claim and run tasks until none is left that this worker can run; return how many ran.

        "None left" means none queued: other workers may still be running theirs.
        """
        ran = 0
        with self.connect() as conn:
            while self.run_one(conn):
                ran += 1
        return ran

    def run_one(self, conn: psycopg.Connection) -> bool:
        """Claim one task, run it and record the result. False if there was nothing to claim."""
        task = self.claim(conn)
        if task is None:
            return False
        self._execute(conn, task)
        return True

    # region: claim
    def claim(self, conn: psycopg.Connection) -> Task | None:
        """Atomically turn the oldest queued task this worker can run into its running task.

        Only names in our registry: a worker from an older deploy leaves tasks it does not know
        queued for a worker that does, instead of claiming them and failing them. (naive_claim.py
        overrides this method with the obvious, broken alternative.)
        """
        return Querier(conn).claim_task(worker=self.name, task_names=list(self.engine.registry))

    # endregion

    # region: execute
    def _execute(self, conn: psycopg.Connection, task: Task) -> None:
        function = self.engine.registry[task.name]  # the claim only returns names we registered
        error = None
        try:
            output = function(task.input)
        # Exception, not BaseException: Ctrl-C (KeyboardInterrupt) stops the worker rather than
        # failing the task, and leaves the task running. Lesson 04 deals with that.
        except Exception as err:
            error = describe_error(err)
        else:
            # Checked before writing, so the reason is ours ("a set is not JSON"), not a driver
            # error that would crash the worker and leave the task running.
            problem = json_problem(output)
            if problem is not None:
                error = f"return value is not JSON-serializable: {problem}"

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
        # running. With our claim, 0 rows cannot happen; with naive_claim.py's, it does: a
        # second worker ran the same task and finished it first. Too late to undo the run.
        if changed == 0:
            log.warning("%s: task %s was no longer running; result dropped", self.name, task.id)

    # endregion
