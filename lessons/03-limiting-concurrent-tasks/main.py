"""Lesson 03: per-key concurrency limits and fair turns, so one noisy tenant cannot starve the rest.

Run it (after `source .venv/bin/activate` at the repository root):

    cd lessons/03-limiting-concurrent-tasks && python main.py
    # or, from the repository root: python lessons/03-limiting-concurrent-tasks/main.py

Tenant acme enqueues 40 reports, then globex and initech enqueue 5 each. Two workers with three
slots each run them. You will see an enqueue mistake refused, then a timeline read back from the
tasks table (started_at, finished_at): how many of each tenant's tasks were running, every 50 ms.
acme never runs more than its limit of 5, globex and initech never more than 2, no worker more
than its 3 slots, and the quiet tenants are done long before acme's backlog is.
Then run `python naive_limit.py` to see two plausible claims break a limit.
"""

import threading
import time
from datetime import datetime, timedelta
from pathlib import Path

from db.models import Task
from db.queries import Querier
from engine import Engine, TaskOptionError
from hardway.postgres import describe, lesson_database
from worker import Worker

LESSON_DIR = Path(__file__).resolve().parent
# (tenant, tasks, max_running): acme is the noisy one, and enqueues first.
TENANTS = [("acme", 40, 5), ("globex", 5, 2), ("initech", 5, 2)]
WORKERS = 2
SLOTS = 3
# How long one report takes: 60 to 140 ms, 100 on average. (Equal durations would make the
# workers move in lockstep waves, which real tasks never do.)
TASK_SECONDS = [0.06, 0.08, 0.1, 0.12, 0.14]
COLUMN = timedelta(milliseconds=50)  # one character of the timeline


def main() -> None:
    # A fresh `lesson_03` database, loaded from sql/schema.sql: every run starts clean.
    url = lesson_database(LESSON_DIR)
    print(describe(url))

    with Engine(url) as engine:

        @engine.task("build_report")
        def build_report(input: dict) -> dict:
            time.sleep(TASK_SECONDS[input["n"] % len(TASK_SECONDS)])  # the report's queries
            return {"report": f"{input['tenant']}-{input['n']}"}

        # region: enqueue
        # A key without a limit is refused at enqueue time, and nothing is written.
        try:
            engine.enqueue("build_report", {"tenant": "acme", "n": 0}, concurrency_key="acme")
        except TaskOptionError as err:
            print(f"refused: {type(err).__name__}: {err}")

        # The tenant id is the concurrency key: each tenant's limit holds across all workers.
        for tenant, count, max_running in TENANTS:
            for n in range(1, count + 1):
                engine.enqueue(
                    "build_report",
                    {"tenant": tenant, "n": n},
                    concurrency_key=tenant,
                    max_running=max_running,
                )
        # endregion
        print(
            "enqueued, in this order: "
            + ", ".join(
                f"{count} tasks for {tenant} (max {limit})" for tenant, count, limit in TENANTS
            )
        )

        # Each worker runs up to SLOTS tasks at once on a thread pool, and claims only for its
        # free slots. A short poll interval: a slot freed by the *other* worker's tenant is
        # only noticed when a worker asks the database again.
        workers = [
            Worker(engine, name=f"worker-{n}", slots=SLOTS, poll_interval=0.02)
            for n in range(1, WORKERS + 1)
        ]
        threads = [threading.Thread(target=w.run_until_idle, name=w.name) for w in workers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

        # Everything below is read back from the database, not from the workers' memory.
        with engine.pool.connection() as conn:
            queries = Querier(conn)
            tasks = queries.list_tasks()
            per_key = {
                row.concurrency_key: row.most_at_once for row in queries.most_running_per_key()
            }
            per_worker = {row.worker: row.most_at_once for row in queries.most_running_per_worker()}

    print(f"{WORKERS} workers with {SLOTS} slots each ran them; tasks running, every 50 ms:")
    print_timeline(tasks)
    print(
        "most running at once: "
        + ", ".join(f"{tenant} {per_key[tenant]} (max {limit})" for tenant, _, limit in TENANTS)
        + "; "
        + ", ".join(f"{w.name} {per_worker[w.name]} ({SLOTS} slots)" for w in workers)
    )
    # Fairness: how far acme's backlog had got when each quiet tenant's last task started.
    noisy = TENANTS[0][0]
    started = [(t.concurrency_key, t.started_at) for t in tasks if t.started_at is not None]
    noisy_starts = sorted(at for key, at in started if key == noisy)
    for tenant, count, _ in TENANTS[1:]:
        last = max(at for key, at in started if key == tenant)
        before = sum(start < last for start in noisy_starts)
        print(
            f"{tenant}'s {count} tasks had all started when {noisy} had started {before}"
            f" of its {len(noisy_starts)}"
        )
    statuses = sorted({t.status for t in tasks})
    print(f"all {len(tasks)} tasks finished: {', '.join(statuses)}")


def print_timeline(tasks: list[Task]) -> None:
    """One row per tenant, one character per COLUMN: how many of its tasks were running then.

    Sampled at the middle of each column, so the rows add up to the `all` row. (The exact
    maxima come from the MostRunningPerKey query, printed below the chart.)
    """
    begin = min(t.started_at for t in tasks if t.started_at)
    end = max(t.finished_at for t in tasks if t.finished_at)
    columns = int((end - begin) / COLUMN) + 1
    moments = [begin + COLUMN * (i + 0.5) for i in range(columns)]
    rows = [(f"{tenant:<8} max {limit}", tenant) for tenant, _, limit in TENANTS]
    for label, tenant in [*rows, (f"{'all':<8} {WORKERS * SLOTS} slots", None)]:
        mine = [t for t in tasks if tenant is None or t.concurrency_key == tenant]
        cells = [running_at(mine, moment) for moment in moments]
        print(f"  {label:<16} |{''.join(str(n) if n else '.' for n in cells)}|")


def running_at(tasks: list[Task], moment: datetime) -> int:
    return sum(
        t.started_at is not None
        and t.finished_at is not None
        and t.started_at <= moment < t.finished_at
        for t in tasks
    )


if __name__ == "__main__":
    main()
