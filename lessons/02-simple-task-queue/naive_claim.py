"""The failure before the fix: claiming a task with a SELECT, then an UPDATE, and no lock.

Run it (after `source .venv/bin/activate` at the repository root):

    cd lessons/02-simple-task-queue && python naive_claim.py

The same engine, tasks and workers as main.py, except for one method: the claim. Here each
worker asks "which task is next?" and then, in a second statement, "that one is mine now":

    SELECT id FROM tasks WHERE status = 'queued' ORDER BY id LIMIT 1;
    UPDATE tasks SET status = 'running', ... WHERE id = $1;

Between the two, every other worker asks the same question and gets the same answer. You will
see the tasks table report every task completed, exactly as main.py's does, while the task
function's own log shows most users receiving their welcome email several times.
"""

import logging
import threading
import time
from pathlib import Path

import psycopg
from db.models import Task, TaskStatus
from db.queries import Querier
from engine import Engine
from hardway.postgres import describe, lesson_database
from psycopg.rows import class_row
from worker import Worker

LESSON_DIR = Path(__file__).resolve().parent
TASKS = 5
WORKERS = 4
# The gap between SELECT and UPDATE. A busy server has one anyway: a network round trip, the OS
# running another process, a garbage collection pause. We make it 100 ms so that the race shows
# on every run instead of once a week in production.
GAP = 0.1
# Each task takes longer than the gap, so the other workers' UPDATEs land while the first run
# is still going: a valid row, so nothing complains. (An UPDATE landing after the task finished
# would make a running task with a finish time, which the table's CHECK constraints refuse;
# NaiveWorker.claim then tries again.)
TASK_DURATION = 0.2

# The SQL is written here, not in sql/queries.sql: this is the claim the engine must never use,
# and the generated Querier should not offer it.
# region: naive
NEXT_QUEUED = """
SELECT id FROM tasks
WHERE status = 'queued' AND name = ANY (%s)
ORDER BY id
LIMIT 1
"""
MARK_RUNNING = """
UPDATE tasks SET status = 'running', worker = %s, started_at = now()
WHERE id = %s
RETURNING *
"""


class NaiveWorker(Worker):
    """A Worker whose claim is two statements with nothing to stop two workers in between."""

    def claim(self, conn: psycopg.Connection) -> Task | None:
        row = conn.execute(NEXT_QUEUED, (list(self.engine.registry),)).fetchone()
        if row is None:
            return None
        time.sleep(GAP)  # meanwhile, the other workers SELECT the same id
        try:
            with conn.cursor(row_factory=class_row(Task)) as cur:
                return cur.execute(MARK_RUNNING, (self.name, row[0])).fetchone()
        except psycopg.errors.CheckViolation:
            # The task finished while we slept, and "running, with a finish time" is a row the
            # table refuses. Constraints catch this late case; the early one, where the task is
            # still running, is a valid row, and the task runs twice.
            return self.claim(conn)


# endregion


def main() -> None:
    url = lesson_database(LESSON_DIR)
    print(describe(url))
    # Worker logs a warning when its result finds the task already finished by another worker.
    logging.basicConfig(format="  %(message)s")

    with Engine(url) as engine:
        calls: list[int] = []  # the function's own log, as in main.py

        @engine.task("send_welcome_email")
        def send_welcome_email(input: dict) -> dict:
            calls.append(input["user"])
            time.sleep(TASK_DURATION)
            return {"message_id": f"<welcome-{input['user']}@example.com>"}

        for user in range(1, TASKS + 1):
            engine.enqueue("send_welcome_email", {"user": user, "email": f"user{user}@example.com"})
        print(f"enqueued {TASKS} tasks; {WORKERS} workers claim with SELECT, then UPDATE")

        workers = [NaiveWorker(engine, name=f"worker-{n}") for n in range(1, WORKERS + 1)]
        threads = [threading.Thread(target=w.run_until_idle, name=w.name) for w in workers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

        with engine.pool.connection() as conn:
            counts = {row.status: row.tasks for row in Querier(conn).count_tasks_by_status()}
        print(
            "from the database: "
            + ", ".join(f"{counts.get(status, 0)} {status}" for status in TaskStatus)
        )
        twice = sorted(user for user in set(calls) if calls.count(user) > 1)
        print(f"from the function's own log: {len(calls)} calls for {len(set(calls))} tasks")
        for user in twice:
            print(f"  user {user} got {calls.count(user)} welcome emails")
        print(f"{len(twice)} of {TASKS} tasks ran more than once")


if __name__ == "__main__":
    main()
