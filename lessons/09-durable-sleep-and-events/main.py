"""Lesson 08: LISTEN/NOTIFY. Workers hear of new work the moment it is committed.

Run it (after `source .venv/bin/activate` at the repository root):

    cd lessons/08-listen-notify && python main.py
    # or, from the repository root: python lessons/08-listen-notify/main.py

You will see, in about ten seconds, the same demo run twice, on two workers, one for lesson
07's agent and one for its tools: first polling every 50 ms, as lesson 07's fastest worker did
(`Worker(listen=False)`), then listening for notifications, with a safety poll every 5 seconds
(`Worker()`, this lesson):

1. pickup: 20 tasks enqueued one by one at random moments, and how long each waited between
   its INSERT and its claim (p50 and p99, from the database's clock);
2. idle cost: how many times per second the worker claims (one transaction of three to five
   statements each time) while there is nothing to do;
3. the agent waiting for its tools (child tasks, run by the other worker): how long after its
   last child ended it was running again.

Then 4. what a listener hears, on a connection of its own that ran `LISTEN task_ready`: nothing
before a commit, nothing after a rollback, and one notification for 1,000 tasks enqueued at once.
"""

import random
import statistics
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import demo_tasks
import psycopg
from db.models import Task
from engine import Engine
from hardway.postgres import describe, lesson_database
from worker import Finished, Worker

LESSON_DIR = Path(__file__).resolve().parent
SAMPLES = 20


TOOLS = ["weather", "find_parks", "read_reviews"]


class CountedWorker(Worker):
    """A Worker that counts its claims: the idle cost, measured."""

    claims = 0

    def claim(
        self, conn: psycopg.Connection, max_tasks: int, riders: Sequence[Finished] = ()
    ) -> list[Task]:
        self.claims += 1
        return super().claim(conn, max_tasks, riders)


def main() -> None:
    # A fresh `lesson_08` database, loaded from sql/schema.sql: every run starts clean.
    url = lesson_database(LESSON_DIR)
    print(describe(url))
    with Engine(url) as engine:
        with engine.pool.connection() as conn:
            conn.execute(demo_tasks.EFFECTS_TABLE)  # the agent's tools write there
        demo_tasks.register(engine)
        engine.task("noop")(lambda input: None)
        results = []
        for mode, poll_interval, listen in [
            ("polling every 50 ms (lesson 07)", 0.05, False),
            ("notifications (this lesson)", 5.0, True),
        ]:
            print(f"{mode}:")
            agents, tools = (
                CountedWorker(engine, name, 4, poll_interval, listen=listen, task_names=names)
                for name, names in [("agents", ["research", "noop"]), ("tools", TOOLS)]
            )
            results.append(demo(engine, agents, tools))
        (polled_p50, polled_claims), (notified_p50, notified_claims) = results
        print(
            f"notifications vs polling: pickup p50 {polled_p50 / notified_p50:.0f}x faster;"
            f" idle, {notified_claims:.1f} claims/s instead of {polled_claims:.1f} claims/s"
        )
        what_a_listener_hears(engine)


def demo(engine: Engine, agents: CountedWorker, tools: CountedWorker) -> tuple[float, float]:
    """Parts 1-3 on these workers: (pickup p50 in ms, idle claims per second)."""
    stop = threading.Event()
    threads = [threading.Thread(target=w.run, args=(stop,)) for w in (agents, tools)]
    for thread in threads:
        thread.start()
    try:
        p50, p99 = pickup(engine)
        print(f"  1. pickup of {SAMPLES} tasks: p50 {p50:.1f} ms, p99 {p99:.1f} ms")
        before = agents.claims
        time.sleep(2.0)
        rate = (agents.claims - before) / 2.0
        print(f"  2. idle for 2 s: {rate:.1f} claims/s")
        print(f"  3. the agent resumed {resumed_after(engine):.1f} ms after its last tool ended")
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    return p50, rate


# region: pickup
def pickup(engine: Engine) -> tuple[float, float]:
    """Enqueue tasks one by one, at random moments; (p50, p99) of created_at -> started_at."""
    ids = []
    for i in range(SAMPLES):
        time.sleep(random.uniform(0, 0.1))  # arrive anywhere in the poll cycle
        ids.append(engine.enqueue("noop", i))
        engine.wait(ids[-1])
    with engine.pool.connection() as conn:
        waits = [
            row[0]
            for row in conn.execute(
                "SELECT extract(epoch FROM started_at - created_at)::float8 * 1000"
                " FROM tasks WHERE id = ANY(%s)",
                (ids,),
            )
        ]
    quantiles = statistics.quantiles(waits, n=100, method="inclusive")
    return quantiles[49], quantiles[98]


# endregion


def resumed_after(engine: Engine) -> float:
    """Run the agent (research, demo_tasks.py), and return the milliseconds between its last
    child's end and the start of its next attempt: the wake-up, the claim, and nothing else.
    Its tools run on the other worker, so the agent's worker hears of it from the database."""
    question = "Where should we picnic in Edinburgh?"
    agent = engine.enqueue("research", {"question": question, "review_seconds": 0.2})
    engine.wait(agent, timeout=60)
    with engine.pool.connection() as conn:
        row = conn.execute(
            "SELECT extract(epoch FROM (SELECT started_at FROM task_attempts"
            "   WHERE task_id = %(agent)s AND attempt = 2)"
            " - (SELECT max(finished_at) FROM tasks WHERE parent_id = %(agent)s))::float8 * 1000",
            {"agent": agent},
        ).fetchone()
    assert row is not None
    return row[0]


# region: hears
def what_a_listener_hears(engine: Engine) -> None:
    print("4. what a listener hears (LISTEN task_ready, on a connection of its own)")
    insert = "INSERT INTO tasks (name, input) VALUES ('noop', '1')"
    with (
        psycopg.connect(engine.database_url, autocommit=True) as listener,
        psycopg.connect(engine.database_url) as client,
    ):
        listener.execute("LISTEN task_ready")
        client.execute(insert)
        print(f"  INSERT, not committed yet: heard {heard(listener)}")
        client.commit()
        print(f"  COMMIT: heard {heard(listener)}")
        client.execute(insert)
        client.rollback()
        print(f"  INSERT, then ROLLBACK: heard {heard(listener)}")
        engine.enqueue_many("noop", range(1000))
        print(f"  enqueue_many of 1,000 noop tasks, one transaction: heard {heard(listener)}")


def heard(listener: psycopg.Connection) -> str:
    """What `listener` hears within 0.2 s. (The tests prove the silences without a timeout.)"""
    payloads = [repr(n.payload) for n in listener.notifies(timeout=0.2)]
    return ", ".join(payloads) or "nothing"


# endregion


if __name__ == "__main__":
    main()
