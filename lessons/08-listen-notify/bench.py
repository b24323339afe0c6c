"""How fast is this queue? Enqueue, burn-down and pickup latency, on this machine.

Run it (after `source .venv/bin/activate` at the repository root; about two minutes):

    cd lessons/08-listen-notify && python bench.py
    python bench.py --tasks 2000     # quicker, noisier

It uses a database of its own (`lesson_08_bench`) on the same server as main.py, and prints
the machine (CPU, cores, PostgreSQL version) and a table:

- enqueue: tasks per second, one `engine.enqueue()` per task, then `engine.enqueue_many()` in
  batches of 1,000;
- burn-down: N no-op tasks, drained by W worker PROCESSES (`python worker.py --tasks bench`)
  with S slots each; a claim takes up to S tasks. The tasks are enqueued once every worker
  listens, all in one transaction: its one notification starts them all. Measured on the
  database clock, from the first claim to the last completion; the median of three rounds;
- the same, 1 worker x 10 slots, with 5,000 and with 40,000 tasks: the tables grow during each
  round, and the rate must not fall with their size ("Stale plans", docs/performance.md);
- pickup latency: how long a task waits between its INSERT and its claim by an idle worker
  (created_at to started_at, both from the database clock): one that listens (lesson 08), and
  one that polls every P seconds (lesson 07's way, `Worker(listen=False)`);
- the thundering herd: the same with 1 and with 8 idle worker processes, which every
  notification wakes; and what it costs, in transactions per task, from the database's
  statistics (pg_stat_database: the workers' claims, wins and losses, and completions);
- NOTIFY's lock: single-row enqueues per second from 1 and from 8 clients, with the trigger
  that notifies, and with it disabled;
- durable steps: a function of ten no-op steps, one at a time in one worker. On its first
  attempt each step is one fenced INSERT and its commit; the function then fails, and attempt 2
  replays the ten steps from one history query. The median time per step, for each attempt.
- children (lesson 07): a durable task spawns 100 no-op children and waits for all of them, on
  one worker with 10 slots: the median time per spawn (one transaction: the child's INSERT
  and its event's), and from the parent's INSERT to its completion (the database clock).

This file is also the task module of those worker processes: `register()` below.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, LiteralString

import psycopg
from durable import current_durable_task
from engine import Engine
from hardway.postgres import recreate_database, server_url
from worker import Worker

LESSON_DIR = Path(__file__).resolve().parent
DBNAME = "lesson_08_bench"


def scalar(conn: psycopg.Connection, query: LiteralString) -> Any:
    """The one value that `query` returns (a count, a setting)."""
    row = conn.execute(query).fetchone()
    assert row is not None, query
    return row[0]


def noop(input: object) -> None:
    return None


def register(engine: Engine) -> None:
    """The tasks of the benchmark's worker processes (`python worker.py --tasks bench`)."""
    engine.task("noop")(noop)
    engine.durable_task("ten_steps", backoff=0.01)(ten_steps)
    engine.durable_task("fan_out")(fan_out)


step_timings: list[tuple[int, float]] = []  # (attempt, seconds per step), one per attempt


def ten_steps(input: object) -> None:
    ctx = current_durable_task()
    started = time.perf_counter()
    for i in range(10):
        ctx.step("noop", noop, i)
    step_timings.append((ctx.attempt, (time.perf_counter() - started) / 10))
    if ctx.attempt == 1:
        raise RuntimeError("fail after ten steps, so that attempt 2 replays them")


spawn_timings: list[float] = []  # seconds per spawn, one per first run of fan_out


def fan_out(n: int) -> None:
    ctx = current_durable_task()
    started = time.perf_counter()
    handles = [ctx.spawn("noop", i) for i in range(n)]
    if ctx.attempt == 1:  # the resumed run replays the spawns: not what is measured
        spawn_timings.append((time.perf_counter() - started) / n)
    ctx.wait_all(handles)


def machine(url: str) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    with psycopg.connect(url) as conn:
        version = scalar(conn, "SHOW server_version")
        fsync = scalar(conn, "SHOW fsync")
        sync = scalar(conn, "SHOW synchronous_commit")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"machine: {cpu}, {os.cpu_count()} cores (load average {load});"
        f" PostgreSQL {version} (fsync {fsync},"
        f" synchronous_commit {sync}); Python {platform.python_version()},"
        f" psycopg {psycopg.__version__}"
    )


def bench_commit(url: str, n: int = 1000) -> float:
    """The yardstick: single-row INSERTs, each its own transaction, per second (1 client).

    Every enqueue, claim and completion ends in a commit, and a commit waits for the disk: how
    fast this machine commits right now says more about the numbers below than its CPU does.
    """
    with psycopg.connect(url, autocommit=True) as conn:
        # A real table: a TEMP table's rows are not written to the WAL, so no wait for the disk.
        conn.execute("CREATE TABLE yardstick (n int)")
        started = time.perf_counter()
        for i in range(n):
            conn.execute("INSERT INTO yardstick VALUES (%s)", (i,))
        rate = n / (time.perf_counter() - started)
        conn.execute("DROP TABLE yardstick")
        return rate


def fresh(url: str) -> None:
    """An empty queue, so that every round starts alike (dead rows would slow the next one)."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "TRUNCATE tasks, task_attempts, task_events, operator_actions, concurrency_keys"
        )


def bench_enqueue(engine: Engine, single: int = 2000, batched: int = 20_000) -> tuple[float, float]:
    """(tasks/s one at a time, tasks/s in batches of 1,000)."""
    started = time.perf_counter()
    for i in range(single):
        engine.enqueue("noop", i)
    one_by_one = single / (time.perf_counter() - started)
    started = time.perf_counter()
    for first in range(0, batched, 1000):
        engine.enqueue_many("noop", range(first, first + 1000))
    return one_by_one, batched / (time.perf_counter() - started)


def start_workers(
    count: int, slots: int, poll: float, listen: bool = True
) -> list[subprocess.Popen]:
    env = dict(os.environ, LESSON_DBNAME=DBNAME)
    return [
        subprocess.Popen(
            [sys.executable, str(LESSON_DIR / "worker.py"), "--tasks", "bench"]
            + ["--name", f"bench-{i}", "--slots", str(slots), "--poll-interval", str(poll)]
            + ([] if listen else ["--no-listen"]),
            env=env,
            stderr=subprocess.DEVNULL,
        )
        for i in range(count)
    ]


def stop_workers(workers: list[subprocess.Popen]) -> None:
    for process in workers:
        process.terminate()
    for process in workers:
        process.wait(timeout=60)


def bench_burn_down(
    engine: Engine, url: str, n: int, workers: int, slots: int, rounds: int = 3
) -> float:
    """Tasks/s, the median of `rounds` rounds: n queued no-ops drained by `workers` processes."""
    # The lesson's default poll: a notification starts the burn-down.
    processes = start_workers(workers, slots, poll=5.0)
    rates = []
    try:
        for _ in range(rounds):
            fresh(url)
            listening(url, expected=workers)
            # All of them in one transaction: one commit, one notification, and every worker
            # starts at once.
            engine.enqueue_many("noop", range(n))
            with psycopg.connect(url, autocommit=True) as conn:
                done = "SELECT count(*) FROM tasks WHERE status = 'completed'"
                while scalar(conn, done) < n:
                    time.sleep(0.1)
                seconds = scalar(
                    conn,
                    "SELECT extract(epoch FROM max(finished_at) - min(started_at))::float8"
                    " FROM tasks",
                )
            rates.append(n / seconds)
    finally:
        stop_workers(processes)
    return statistics.median(rates)


def bench_latency(
    engine: Engine, url: str, poll: float, samples: int, listen: bool = True
) -> tuple[float, float]:
    """(p50, p99) milliseconds from INSERT to claim, for an idle worker: listening for
    notifications (its safety poll every `poll` s), or, with listen=False, polling every `poll` s.
    """
    fresh(url)
    stop = threading.Event()
    worker = Worker(engine, name="latency", poll_interval=poll, listen=listen)
    thread = threading.Thread(target=worker.run, args=(stop,))
    thread.start()
    try:
        listening(url, expected=1 if listen else 0)
        ids = []
        for _ in range(samples):
            # Arrive at a random point of the poll cycle (of a tenth of a second, listening).
            time.sleep(random.uniform(0, 0.1 if listen else 2 * poll))
            ids.append(engine.enqueue("noop"))
            engine.wait(ids[-1])
    finally:
        stop.set()
        thread.join()
    return pickup_quantiles(url)


def listening(url: str, expected: int) -> None:
    """Wait until `expected` listeners have sent their LISTEN: none of the samples may be
    enqueued before a worker can hear of it."""
    query = (
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = current_database() AND query LIKE 'LISTEN%%'"
    )
    with psycopg.connect(url, autocommit=True) as conn:
        while scalar(conn, query) < expected:
            time.sleep(0.01)


def pickup_quantiles(url: str) -> tuple[float, float]:
    """(p50, p99) milliseconds from created_at to started_at, over every task."""
    with psycopg.connect(url) as conn:
        waits = [
            row[0]
            for row in conn.execute(
                "SELECT extract(epoch FROM started_at - created_at)::float8 * 1000 FROM tasks"
            )
        ]
    quantiles = statistics.quantiles(waits, n=100, method="inclusive")
    return quantiles[49], quantiles[98]


def transactions(url: str) -> int:
    """Transactions committed in the database so far, as its statistics say. A session
    reports its counts at most once a second, and one that has gone idle may wait up to
    10 seconds before it does: wait 11 s before reading."""
    time.sleep(11)
    with psycopg.connect(url, autocommit=True) as conn:
        return scalar(
            conn, "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
        )


def bench_herd(url: str, workers: int, samples: int = 100) -> tuple[float, float, float]:
    """(p50 ms, p99 ms, worker transactions per task) with `workers` idle listening worker
    PROCESSES: every notification wakes all of them, one claims the task, and the others'
    claims find nothing (SKIP LOCKED). Tasks enqueued one at a time, every 10-30 ms."""
    fresh(url)
    processes = start_workers(workers, slots=1, poll=5.0)
    try:
        listening(url, expected=workers)
        before = transactions(url)
        with psycopg.connect(url, autocommit=True) as client:
            for i in range(samples):
                time.sleep(random.uniform(0.01, 0.03))
                client.execute(
                    "INSERT INTO tasks (name, input) VALUES ('noop', %s::jsonb)", (str(i),)
                )
            done = "SELECT count(*) FROM tasks WHERE status = 'completed'"
            while scalar(client, done) < samples:
                time.sleep(0.05)
        after = transactions(url)
    finally:
        stop_workers(processes)
    # Ours: one per INSERT, the count queries, and the reading of the statistics.
    client_side = samples + 2 * math.ceil(samples / 20) + 10
    worker_side = max(0, after - before - client_side)
    return (*pickup_quantiles(url), worker_side / samples)


def insert_for(url: str, seconds: float) -> int:
    """Single-row INSERTs, each its own transaction, for `seconds`; how many."""
    inserted = 0
    deadline = time.monotonic() + seconds
    with psycopg.connect(url, autocommit=True) as conn:
        while time.monotonic() < deadline:
            conn.execute("INSERT INTO tasks (name, input) VALUES ('noop', '1')")
            inserted += 1
    return inserted


def bench_notify_lock(url: str, clients: int, seconds: float = 3.0) -> tuple[float, float]:
    """Single-row enqueues per second from `clients` threads, each on its own connection:
    (with the notifying trigger, without it). NOTIFY serializes commits: the commit of a
    transaction that notified takes a lock that every other such commit waits for."""
    rates = []
    for trigger in ("ENABLE", "DISABLE"):
        fresh(url)
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute(f"ALTER TABLE tasks {trigger} TRIGGER tasks_notify_enqueued")
        with ThreadPoolExecutor(clients) as pool:
            inserted = pool.map(lambda _: insert_for(url, seconds), range(clients))
        rates.append(sum(inserted) / seconds)
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute("ALTER TABLE tasks ENABLE TRIGGER tasks_notify_enqueued")
    return rates[0], rates[1]


def bench_steps(engine: Engine, url: str, tasks: int = 200) -> tuple[float, float]:
    """Median seconds per durable step: (first run, replayed), over `tasks` functions."""
    fresh(url)
    step_timings.clear()
    stop = threading.Event()
    worker = Worker(engine, name="steps", poll_interval=0.01)
    thread = threading.Thread(target=worker.run, args=(stop,))
    thread.start()
    try:
        for task_id in engine.enqueue_many("ten_steps", range(tasks)):
            engine.wait(task_id)
    finally:
        stop.set()
        thread.join()
    first = statistics.median(t for attempt, t in step_timings if attempt == 1)
    return first, statistics.median(t for attempt, t in step_timings if attempt == 2)


def bench_children(engine: Engine, url: str, rounds: int = 9) -> tuple[float, float]:
    """Median (seconds per spawn, seconds from enqueue to fan-in) of a 100-child fan-out."""
    fresh(url)
    spawn_timings.clear()
    stop = threading.Event()
    worker = Worker(engine, name="children", slots=10, poll_interval=0.01)
    thread = threading.Thread(target=worker.run, args=(stop,))
    thread.start()
    try:
        ids = []
        for _ in range(rounds):
            ids.append(engine.enqueue("fan_out", 100))
            engine.wait(ids[-1])
    finally:
        stop.set()
        thread.join()
    with psycopg.connect(url) as conn:
        totals = [
            row[0]
            for row in conn.execute(
                "SELECT extract(epoch FROM finished_at - created_at)::float8 FROM tasks"
                " WHERE id = ANY(%s)",
                (ids,),
            )
        ]
    return statistics.median(spawn_timings), statistics.median(totals)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10_000, help="tasks per burn-down round")
    args = parser.parse_args()
    url = recreate_database(server_url(), DBNAME, (LESSON_DIR / "sql/schema.sql").read_text())
    print(machine(url))
    rows = []
    with Engine(url) as engine:
        register(engine)
        commits = bench_commit(url)
        rows.append(("yardstick: INSERT + commit, 1 client", f"{commits:,.0f} commits/s"))
        single, batched = bench_enqueue(engine)
        rows.append(("enqueue, one task per call (1 client)", f"{single:,.0f} tasks/s"))
        rows.append(("enqueue_many, 1,000 per call (1 client)", f"{batched:,.0f} tasks/s"))
        for workers, slots in [(1, 10), (1, 100), (2, 100), (4, 50)]:
            rate = bench_burn_down(engine, url, args.tasks, workers, slots)
            rows.append(
                (
                    f"burn-down {args.tasks:,} no-ops, {workers} worker(s) x {slots} slots",
                    f"{rate:,.0f} tasks/s",
                )
            )
        # Every round starts from empty tables, which grow as it runs: the rate at 40,000 tasks
        # must stay close to the rate at 5,000, whatever the planner thought of them at first.
        for tasks in (5_000, 40_000):
            rate = bench_burn_down(engine, url, tasks, 1, 10)
            rows.append(
                (f"burn-down {tasks:,} no-ops, 1 worker x 10 slots", f"{rate:,.0f} tasks/s")
            )
        p50, p99 = bench_latency(engine, url, 5.0, samples=100)
        rows.append(
            ("pickup latency, notified (idle worker)", f"p50 {p50:.1f} ms, p99 {p99:.1f} ms")
        )
        for poll in (0.5, 0.05):
            p50, p99 = bench_latency(engine, url, poll, samples=40, listen=False)
            rows.append(
                (f"pickup latency, polling every {poll:g} s", f"p50 {p50:.0f} ms, p99 {p99:.0f} ms")
            )
        for workers in (1, 8):
            p50, p99, per_task = bench_herd(url, workers)
            rows.append(
                (
                    f"{workers} idle worker(s), one task at a time",
                    f"p50 {p50:.1f} ms, p99 {p99:.1f} ms, {per_task:.1f} transactions per task",
                )
            )
        for clients in (1, 8):
            notified, silent = bench_notify_lock(url, clients)
            rows.append(
                (
                    f"INSERT + commit, {clients} client(s): with NOTIFY / without",
                    f"{notified:,.0f} / {silent:,.0f} tasks/s",
                )
            )
        first, replayed = bench_steps(engine, url)
        rows.append(("durable step, first run (1 worker, 1 slot)", f"{first * 1000:.2f} ms"))
        rows.append(("durable step, replayed", f"{replayed * 1000:.3f} ms"))
        spawn, total = bench_children(engine, url)
        rows.append(("child spawn (child + event, one commit)", f"{spawn * 1000:.2f} ms"))
        rows.append(("100 children, spawned and waited for, 1 x 10", f"{total * 1000:.0f} ms"))
    width = max(len(what) for what, _ in rows)
    for what, result in rows:
        print(f"  {what:<{width}}  {result}")


if __name__ == "__main__":
    main()
