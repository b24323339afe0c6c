"""Lesson 02: a task queue in one PostgreSQL table, and workers that never run a task twice.

Run it (after `source .venv/bin/activate` at the repository root):

    cd lessons/02-simple-task-queue && python main.py
    # or, from the repository root: python lessons/02-simple-task-queue/main.py

You will see two enqueue mistakes refused, a batch of tasks enqueued, four worker threads
claiming them with FOR UPDATE SKIP LOCKED, which worker ran which task (read back from the
database), and a summary: every task finished once, one of them failed with its error.
Then run `python naive_claim.py` to see the same workers run tasks twice without the lock.
"""

import threading
import time
from pathlib import Path

from db.models import TaskStatus
from db.queries import Querier
from engine import Engine, TaskInputError, UnknownTaskError
from hardway.postgres import describe, lesson_database
from worker import Worker

LESSON_DIR = Path(__file__).resolve().parent
TASKS = 40
WORKERS = 4
# User 13 signed up with a typo in their address: their task will fail.
BAD_ADDRESS_USER = 13


def main() -> None:
    # A fresh `lesson_02` database, loaded from sql/schema.sql: every run starts clean.
    url = lesson_database(LESSON_DIR)
    print(describe(url))

    with Engine(url) as engine:
        # The functions' own log, kept apart from the queue: one entry per call, whoever made
        # it. (A list, because append is atomic between threads.) The tasks table says who
        # claimed a task; only this log could show a task that ran twice.
        calls: list[int] = []

        # region: task
        @engine.task("send_welcome_email")
        def send_welcome_email(input: dict) -> dict:
            calls.append(input["user"])  # the function's own log, to check "exactly once"
            if "@" not in input["email"]:
                raise ValueError(f"not an email address: {input['email']!r}")
            time.sleep(0.01)  # the mail server's round trip
            return {"message_id": f"<welcome-{input['user']}@example.com>"}

        # endregion

        # region: enqueue
        # Mistakes are refused at enqueue time, in the caller's process, and nothing is written.
        for name, input in [
            ("send_sms", {"user": 1}),  # no function is registered under this name
            ("send_welcome_email", {"user": 1, "tags": {"new"}}),  # a set is not JSON
        ]:
            try:
                engine.enqueue(name, input)
            except (UnknownTaskError, TaskInputError) as err:
                print(f"refused: {type(err).__name__}: {err}")

        ids = []
        for user in range(1, TASKS + 1):
            at = "." if user == BAD_ADDRESS_USER else "@"
            email = f"user{user}{at}example.com"
            ids.append(engine.enqueue("send_welcome_email", {"user": user, "email": email}))
        print(f"enqueued {len(ids)} tasks, ids {ids[0]} to {ids[-1]}")
        # endregion

        # region: workers
        # Threads, not processes: each worker has its own connection, so PostgreSQL sees four
        # independent clients either way, and the claim is just as contested. Threads let one
        # process print one report and keep `calls` in memory. The GIL is no obstacle here:
        # the workers spend their time waiting on the database and the mail server.
        workers = [Worker(engine, name=f"worker-{n}") for n in range(1, WORKERS + 1)]
        threads = [threading.Thread(target=w.run_until_idle, name=w.name) for w in workers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        # endregion

        # The report: who ran what, and how every task ended, read back from the database...
        with engine.pool.connection() as conn:
            queries = Querier(conn)
            tasks = queries.list_tasks()
            counts = {status: 0 for status in TaskStatus}
            for row in queries.count_tasks_by_status():
                counts[row.status] = row.tasks

        print(f"{WORKERS} workers ran them:")
        for worker in workers:
            mine = [task.id for task in tasks if task.worker == worker.name]
            print(f"  {worker.name} ran {len(mine)} tasks: {' '.join(map(str, mine))}")
        for task in tasks:
            if task.status == TaskStatus.FAILED:
                print(f"task {task.id} failed: {task.error}")
        print("from the database: " + ", ".join(f"{n} {status}" for status, n in counts.items()))

        # ...and how often the function was called for each task, from its own log.
        twice = sorted({user for user in calls if calls.count(user) > 1})
        print(
            f"from the function's own log: {len(calls)} calls for {len(set(calls))} tasks, "
            + (f"ran more than once: {twice}" if twice else "no task ran twice")
        )


if __name__ == "__main__":
    main()
