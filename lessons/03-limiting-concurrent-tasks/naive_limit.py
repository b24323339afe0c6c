"""The failure before the fix: two claims that let a key run more tasks than its limit.

Run it (after `source .venv/bin/activate` at the repository root):

    cd lessons/03-limiting-concurrent-tasks && python naive_limit.py

Tenant acme may run 2 tasks at once. Two claimers, A and B, each with free slots, claim acme's
tasks at the same moment, in three ways. The script drives A and B step by step on two
connections, in the order that breaks the first two ways, so every run prints the same thing:

1. count acme's running tasks, then claim that many fewer than the limit, with SKIP LOCKED on
   the task rows: A and B both count 0, both claim 2; acme runs 4.
2. lock acme's key row, count and claim, all in ONE statement: B waits for A's lock, as it
   should, but counts from a snapshot taken before it waited; acme runs 4.
3. lock acme's key row, then count and claim in a NEW statement (this lesson's claim): B counts
   A's 2 running tasks and claims none; acme runs 2.
"""

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
from db.queries import Querier
from engine import Engine
from hardway.postgres import describe, lesson_database

LESSON_DIR = Path(__file__).resolve().parent
KEY = "acme"
LIMIT = 2
TASKS = 6

# The SQL is written here, not in sql/queries.sql: these are claims the engine must never use,
# and the generated Querier should not offer them.
# region: count_then_claim
COUNT_RUNNING = "SELECT count(*) FROM tasks WHERE concurrency_key = %s AND status = 'running'"
CLAIM_UP_TO = """
UPDATE tasks SET status = 'running', worker = %s, started_at = clock_timestamp()
WHERE id IN (
    SELECT id FROM tasks WHERE concurrency_key = %s AND status = 'queued'
    ORDER BY id LIMIT %s
    FOR UPDATE SKIP LOCKED
)
RETURNING id
"""
# endregion

# region: one_statement
LOCK_COUNT_AND_CLAIM = """
WITH locked AS (
    -- Waits while another claimer holds the key (no SKIP LOCKED: wait our turn).
    SELECT max_running FROM concurrency_keys WHERE key = %(key)s FOR NO KEY UPDATE
),
running AS (
    SELECT count(*) AS n FROM tasks WHERE concurrency_key = %(key)s AND status = 'running'
),
picked AS MATERIALIZED (
    SELECT id FROM tasks WHERE concurrency_key = %(key)s AND status = 'queued'
    ORDER BY id
    LIMIT greatest(0, (SELECT max_running FROM locked) - (SELECT n FROM running))
    FOR UPDATE SKIP LOCKED
)
UPDATE tasks SET status = 'running', worker = %(worker)s, started_at = clock_timestamp()
WHERE id IN (SELECT id FROM picked)
RETURNING id
"""
# endregion

# Statement 1 of this lesson's claim, except that it waits for the lock instead of skipping the
# key: the same timeline as 2, so that the only difference is the new statement.
LOCK_KEY = "SELECT key FROM concurrency_keys WHERE key = %s FOR NO KEY UPDATE"


def count_then_claim(a: psycopg.Connection, b: psycopg.Connection, say=print) -> int:
    """Way 1. Each claimer counts, then claims `LIMIT - count`. Returns how many run at the end."""
    counted = {}
    for name, conn in (("A", a), ("B", b)):
        [(counted[name],)] = conn.execute(COUNT_RUNNING, (KEY,)).fetchall()
        say(f"   {name} counts {counted[name]} running")
    for name, conn in (("A", a), ("B", b)):
        ids = sorted(
            row[0] for row in conn.execute(CLAIM_UP_TO, (name, KEY, LIMIT - counted[name]))
        )
        conn.commit()
        say(f"   {name} claims {describe_ids(ids)} and commits")
    return running(a)


def one_statement(a: psycopg.Connection, b: psycopg.Connection, say=print) -> int:
    """Way 2. Lock, count and claim in one statement; B's statement waits for A's lock."""
    ids = claim_in_one_statement(a, "A")
    say(f"   A locks {KEY}, claims {describe_ids(ids)}, and has not committed yet")
    with ThreadPoolExecutor(1) as background:
        b_claim = background.submit(claim_in_one_statement, b, "B")
        wait_for_lock_wait(a, b.info.backend_pid)
        say(f"   B runs the same statement: it waits for A's lock on {KEY}")
        a.commit()
        say("   A commits")
        ids = b_claim.result(timeout=30)
    b.commit()
    say(f"   B claims {describe_ids(ids)} and commits")
    return running(a)


def lock_then_new_statement(a: psycopg.Connection, b: psycopg.Connection, say=print) -> int:
    """Way 3. Lock the key, then count and claim with the engine's own ClaimKeyTasks query."""
    ids = lock_and_claim(a, "A")
    say(f"   A locks {KEY}, claims {describe_ids(ids)}, and has not committed yet")
    with ThreadPoolExecutor(1) as background:
        b_claim = background.submit(lock_and_claim, b, "B")
        wait_for_lock_wait(a, b.info.backend_pid)
        say(f"   B locks {KEY}: it waits for A's lock")
        a.commit()
        say("   A commits")
        ids = b_claim.result(timeout=30)
    b.commit()
    say(f"   B gets the lock, counts in a new statement, claims {describe_ids(ids)} and commits")
    return running(a)


def claim_in_one_statement(conn: psycopg.Connection, worker: str) -> list[int]:
    rows = conn.execute(LOCK_COUNT_AND_CLAIM, {"key": KEY, "worker": worker})
    return sorted(row[0] for row in rows)


def lock_and_claim(conn: psycopg.Connection, worker: str) -> list[int]:
    conn.execute(LOCK_KEY, (KEY,))  # statement 1
    tasks = Querier(conn).claim_key_tasks(  # statement 2: a new snapshot
        key=KEY, worker=worker, task_names=["report"], max_tasks=TASKS
    )
    return sorted(task.id for task in tasks)


def running(conn: psycopg.Connection) -> int:
    [(count,)] = conn.execute(COUNT_RUNNING, (KEY,)).fetchall()
    conn.commit()
    return count


def describe_ids(ids: list[int]) -> str:
    return "tasks " + ", ".join(map(str, ids)) if ids else "nothing"


def wait_for_lock_wait(conn: psycopg.Connection, pid: int, timeout: float = 30) -> None:
    """Return once the backend `pid` is waiting for a lock, as pg_stat_activity shows it."""
    deadline = time.monotonic() + timeout
    query = "SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s"
    while conn.execute(query, (pid,)).fetchall() != [("Lock",)]:
        if time.monotonic() > deadline:
            raise TimeoutError(f"backend {pid} did not wait for a lock within {timeout} s")
        time.sleep(0.01)


def fresh_tasks(engine: Engine) -> None:
    """Empty the queue, then enqueue TASKS of acme's tasks, numbered from 1 again."""
    with engine.pool.connection() as conn:
        conn.execute("TRUNCATE tasks RESTART IDENTITY")
    for n in range(TASKS):
        engine.enqueue("report", n, concurrency_key=KEY, max_running=LIMIT)


def main() -> None:
    url = lesson_database(LESSON_DIR)
    print(describe(url))
    ways = [
        ("count running, then claim (SKIP LOCKED on the tasks)", count_then_claim),
        ("lock the key, count and claim, in one statement", one_statement),
        ("lock the key, then count and claim in a new statement", lock_then_new_statement),
    ]
    with Engine(url) as engine:
        engine.task("report")(lambda input: input)  # never run here: only claimed
        print(f"{KEY} may run {LIMIT} tasks at once; {TASKS} of its tasks are queued")
        for number, (title, way) in enumerate(ways, 1):
            fresh_tasks(engine)
            print(f"{number}. {title}")
            # Not autocommit: each connection's transaction stays open until we commit it.
            with psycopg.connect(url) as a, psycopg.connect(url) as b:
                count = way(a, b)
            verdict = "over" if count > LIMIT else "within"
            print(f"   {KEY} has {count} tasks running: {verdict} its limit of {LIMIT}")


if __name__ == "__main__":
    main()
