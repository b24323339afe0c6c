"""What a durable sleep and an event cost, on this machine: going to sleep, sleeping, waking up.

Run it (after `source .venv/bin/activate` at the repository root; about two minutes):

    cd lessons/10-branching-and-forking && python bench.py
    python bench.py --quick           # fewer tasks and shorter windows: quicker, noisier

It uses a database of its own (`lesson_10_bench`) on the same server as main.py, and prints
the machine (CPU, cores, PostgreSQL version) and a table. The workers are PROCESSES
(`python worker.py --tasks bench`, this file being their task module: `register()` below),
1 worker x 20 slots unless a row says otherwise; every time is from the database clock.

- yardstick: single-row INSERTs, each its own commit, per second: a sleep is two commits;
- going to sleep: N durable tasks that each call ctx.sleep_for("nap", 3600), enqueued in one
  statement once the worker listens: tasks per second from the first claim to the last
  suspension (task_attempts: the first started_at, the last finished_at), and transactions
  committed per task (pg_stat_database): each sleep's deadline and its suspension, a commit
  each, and a share of the claims, which take several tasks at a time;
- idle cost: transactions per second committed while the worker is idle, with no sleepers and
  then with those N asleep for an hour. A sleeper is a row with a run_at, which no worker holds
  and no query visits until it is due: the two rates should be the same, next to nothing (the
  safety poll, every 5 s);
- waking on time: 1,000 tasks that each ctx.sleep_until("alarm", T), one shared instant T a few
  seconds ahead, all asleep before it comes: how long after T each task's next attempt starts
  (the median, the 99th percentile and the last), with 1 and with 2 workers x 20 slots. The
  worker's alarm rings at T (NextDue); each claim then promotes a bounded batch of sleepers,
  and each wake-up is a replay: the history read, the sleep found over (the task was claimed
  for its end: no query), the completion;
- event round trip: a task waiting for an event (no timeout: suspended), and the benchmark's
  engine.send_event(); from the event's sent_at to the start of the task's next attempt, one
  sample at a time, with the worker idle;
- durable sleep, first run: how long ctx.sleep_for() takes before the attempt ends, timed in
  the function, on a worker thread of this process with 1 slot: the deadline appended to the
  log (AppendDeadline), then the attempt suspended (SuspendUntil), a commit each.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, LiteralString

import psycopg
from durable import current_durable_task
from engine import Engine
from hardway.postgres import recreate_database, server_url
from worker import Worker

LESSON_DIR = Path(__file__).resolve().parent
DBNAME = "lesson_10_bench"
SLOTS = 20
NAP = 3600  # seconds: the sleepers of the first rows sleep through the whole benchmark


def scalar(conn: psycopg.Connection, query: LiteralString, params: Any = None) -> Any:
    """The one value that `query` returns (a count, a setting)."""
    row = conn.execute(query, params).fetchone()
    assert row is not None, query
    return row[0]


# region: tasks
def register(engine: Engine) -> None:
    """The tasks of the benchmark's worker processes (`python worker.py --tasks bench`)."""
    engine.durable_task("nap")(nap)
    engine.durable_task("alarm")(alarm)
    engine.durable_task("await_event")(await_event)
    engine.durable_task("timed_nap")(timed_nap)


def nap(input: object) -> None:
    current_durable_task().sleep_for("nap", NAP)


def alarm(when: str) -> None:
    current_durable_task().sleep_until("alarm", datetime.datetime.fromisoformat(when))


def await_event(name: str) -> Any:
    return current_durable_task().wait_for_event(name)


sleep_timings: list[float] = []  # seconds in ctx.sleep_for(), one per first attempt


def timed_nap(input: object) -> None:
    ctx = current_durable_task()
    started = time.perf_counter()
    try:
        ctx.sleep_for("nap", NAP)
    finally:
        # sleep_for() ends the attempt by raising TaskSuspended: timed on its way out.
        if ctx.attempt == 1:
            sleep_timings.append(time.perf_counter() - started)


# endregion


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

    Going to sleep is two commits (the deadline, the suspension), and a commit waits for the
    disk: how fast this machine commits right now says more about the rows below than its CPU.
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
    """Empty tables, so that every row starts alike."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "TRUNCATE tasks, task_attempts, task_events, operator_actions, concurrency_keys,"
            " sent_events"
        )


# region: workers
def start_workers(count: int, slots: int = SLOTS, poll: float = 5.0) -> list[subprocess.Popen]:
    env = dict(os.environ, LESSON_DBNAME=DBNAME)
    return [
        subprocess.Popen(
            [sys.executable, str(LESSON_DIR / "worker.py"), "--tasks", "bench"]
            + ["--name", f"bench-{i}", "--slots", str(slots), "--poll-interval", str(poll)],
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


def listening(url: str, expected: int) -> None:
    """Wait until `expected` listeners have sent their LISTEN: no task may be enqueued before a
    worker can hear of it."""
    query = (
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = current_database() AND query LIKE 'LISTEN%%'"
    )
    with psycopg.connect(url, autocommit=True) as conn:
        while scalar(conn, query) < expected:
            time.sleep(0.01)


# endregion


def wait_for(conn: psycopg.Connection, query: LiteralString, n: int, timeout: float = 300) -> int:
    """Poll until `query` counts `n`, every 0.1 s; return how many polls (each a transaction)."""
    deadline = time.monotonic() + timeout
    polls = 1
    while scalar(conn, query) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"still fewer than {n} after {timeout:g}s: {query}")
        time.sleep(0.1)
        polls += 1
    return polls


# A session reports its statistics when it goes idle, but not more than once a second: one that
# reported less than a second ago holds the next ones back, for up to 10 s of idleness
# (PostgreSQL's PGSTAT_IDLE_INTERVAL), or until it ends. After a burst of work, the counts arrive
# up to 10 s late: a reading must wait that long to see all of them.
SETTLE = 11.0  # seconds


def transactions(server: str, settle: float = 1.5) -> int:
    """Transactions committed in the benchmark's database so far, as its statistics say, once
    the other sessions have had `settle` seconds to report theirs.

    Read from the server's maintenance database, so that reading them adds none to the count.
    """
    time.sleep(settle)
    with psycopg.connect(server, autocommit=True) as conn:
        return scalar(
            conn, "SELECT xact_commit FROM pg_stat_database WHERE datname = %s", (DBNAME,)
        )


def idle_rate(url: str, server: str, seconds: float) -> float:
    """Transactions per second committed in the database over `seconds`, all of them by the
    idle workers (this process commits none meanwhile). Call it once their counts are in.
    A multiple of their poll interval: the count is then the same from one run to the next."""
    with psycopg.connect(url, autocommit=True) as conn:
        # Vacuumed and analyzed now, so that autovacuum finds nothing to do during the window.
        # (Its counts are in when its session ends.)
        conn.execute("VACUUM ANALYZE tasks, task_attempts, task_events")
    before = transactions(server)
    started = time.monotonic()
    # The idle worker reports each poll's commit at once: its last report was 5 s before.
    after = transactions(server, settle=seconds)
    return (after - before) / (time.monotonic() - started)


def quantiles(values: list[float]) -> tuple[float, float]:
    """(p50, p99)."""
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return cuts[49], cuts[98]


def bench_going_to_sleep(
    engine: Engine, url: str, server: str, n: int, window: float
) -> tuple[float, float, float, float]:
    """(tasks/s, transactions per task, idle transactions/s with 0 and with n sleepers)."""
    fresh(url)
    processes = start_workers(1)
    try:
        listening(url, expected=1)
        time.sleep(SETTLE)  # until the worker's first turns are counted
        idle_empty = idle_rate(url, server, window)
        before = transactions(server)
        with psycopg.connect(url, autocommit=True) as conn:
            engine.enqueue_many("nap", range(n))
            asleep = "SELECT count(*) FROM task_attempts WHERE status = 'suspended'"
            polls = wait_for(conn, asleep, n)
            seconds = scalar(
                conn,
                "SELECT extract(epoch FROM max(finished_at) - min(started_at))::float8"
                " FROM task_attempts",
            )
        # Ours, in the benchmark's database: the enqueue, the polling connection's start, its
        # polls and the query above. (And the idle worker's one or two polls: a rounding error.)
        after = transactions(server, settle=SETTLE) - (polls + 3)
        idle_asleep = idle_rate(url, server, window)
    finally:
        stop_workers(processes)
    return n / seconds, (after - before) / n, idle_empty, idle_asleep


def bench_wake(
    engine: Engine, url: str, workers: int, n: int, lead: float
) -> tuple[float, float, float, int]:
    """(p50, p99, last) milliseconds from the shared wake-up time to each task's next attempt,
    and how many of the n were asleep before that time came (all of them, or the lead was too
    short for this machine)."""
    fresh(url)
    processes = start_workers(workers)
    try:
        listening(url, expected=workers)
        with psycopg.connect(url, autocommit=True) as conn:
            # On the engine's clock, which the sleep's deadline is compared with.
            wake_at = scalar(conn, "SELECT clock_now()") + datetime.timedelta(seconds=lead)
            engine.enqueue_many("alarm", [wake_at.isoformat()] * n)
            # Every first attempt over: asleep, or completed if T came before it slept.
            first_ends = (
                "SELECT count(*) FROM task_attempts WHERE attempt = 1 AND finished_at IS NOT NULL"
            )
            wait_for(conn, first_ends, n)
            asleep = scalar(
                conn,
                "SELECT count(*) FROM task_attempts"
                " WHERE attempt = 1 AND status = 'suspended' AND finished_at < %s",
                (wake_at,),
            )
            wait_for(conn, "SELECT count(*) FROM tasks WHERE status = 'completed'", n)
            delays = [
                row[0]
                for row in conn.execute(
                    "SELECT extract(epoch FROM started_at - %s)::float8 * 1000"
                    " FROM task_attempts WHERE attempt = 2",
                    (wake_at,),
                )
            ]
    finally:
        stop_workers(processes)
    return (*quantiles(delays), max(delays), asleep)


def bench_event_round_trip(engine: Engine, url: str, samples: int) -> tuple[float, float]:
    """(p50, p99) milliseconds from an event's sent_at to the start of its waiter's next
    attempt, one waiter at a time, with the worker idle."""
    fresh(url)
    processes = start_workers(1)
    try:
        listening(url, expected=1)
        with psycopg.connect(url, autocommit=True) as conn:
            for i in range(samples):
                task_id = engine.enqueue("await_event", f"ping-{i}")
                suspended = "SELECT count(*) FROM tasks WHERE id = %s AND status = 'suspended'"
                while not scalar(conn, suspended, (task_id,)):
                    time.sleep(0.005)
                # Time for the worker to finish its turn, and wait: idle when the event comes.
                time.sleep(random.uniform(0.02, 0.04))
                sent = engine.send_event(f"ping-{i}", i)
                assert sent.woken == [task_id], sent
                engine.wait(task_id)
            round_trips = [
                row[0]
                for row in conn.execute(
                    "SELECT extract(epoch FROM a.started_at - e.sent_at)::float8 * 1000"
                    " FROM task_attempts AS a"
                    " JOIN tasks AS t ON t.id = a.task_id"
                    " JOIN sent_events AS e ON e.name = t.input #>> '{}'"
                    " WHERE a.attempt = 2"
                )
            ]
    finally:
        stop_workers(processes)
    return quantiles(round_trips)


def bench_sleep_call(engine: Engine, url: str, tasks: int) -> float:
    """Median seconds in ctx.sleep_for() on a first run, 1 worker thread, 1 slot."""
    fresh(url)
    sleep_timings.clear()
    stop = threading.Event()
    worker = Worker(engine, name="naps", poll_interval=5.0)
    thread = threading.Thread(target=worker.run, args=(stop,))
    thread.start()
    try:
        listening(url, expected=1)
        engine.enqueue_many("timed_nap", range(tasks))
        with psycopg.connect(url, autocommit=True) as conn:
            wait_for(conn, "SELECT count(*) FROM tasks WHERE status = 'scheduled'", tasks)
    finally:
        stop.set()
        thread.join()
    return statistics.median(sleep_timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer tasks, shorter windows")
    parser.add_argument("--tasks", type=int, help="sleepers (default 10,000; 2,000 --quick)")
    args = parser.parse_args()
    sleepers = args.tasks or (2_000 if args.quick else 10_000)
    alarms = 300 if args.quick else 1_000
    window = 5.0 if args.quick else 10.0  # seconds of idle worker measured, each time
    lead = 4.0 if args.quick else 6.0  # seconds from the enqueue of the alarms to their time
    samples = 40 if args.quick else 100
    server = server_url()
    url = recreate_database(server, DBNAME, (LESSON_DIR / "sql/schema.sql").read_text())
    print(machine(url))
    rows = []
    with Engine(url) as engine:
        register(engine)
        commits = bench_commit(url)
        rows.append(("yardstick: INSERT + commit, 1 client", f"{commits:,.0f} commits/s"))
        rate, per_task, idle_empty, idle_asleep = bench_going_to_sleep(
            engine, url, server, sleepers, window
        )
        rows.append(
            (
                f"going to sleep: {sleepers:,} x sleep_for(1 h), 1 x {SLOTS}",
                f"{rate:,.0f} tasks/s, {per_task:.1f} transactions per task",
            )
        )
        rows.append(
            (
                f"idle worker, 0 sleepers / {sleepers:,} sleepers",
                f"{idle_empty:.2f} / {idle_asleep:.2f} transactions/s",
            )
        )
        for workers in (1, 2):
            p50, p99, last, asleep = bench_wake(engine, url, workers, alarms, lead)
            late = "" if asleep == alarms else f" (only {asleep:,} asleep before it: too late)"
            rows.append(
                (
                    f"waking on time: {alarms:,} x sleep_until(T), {workers} x {SLOTS}",
                    f"after T: p50 {p50:.0f} ms, p99 {p99:.0f} ms, last {last:.0f} ms{late}",
                )
            )
        p50, p99 = bench_event_round_trip(engine, url, samples)
        rows.append(
            ("event round trip: sent_at to next attempt", f"p50 {p50:.1f} ms, p99 {p99:.1f} ms")
        )
        sleep_call = bench_sleep_call(engine, url, tasks=200)
        rows.append(("durable sleep, first run (1 worker, 1 slot)", f"{sleep_call * 1000:.2f} ms"))
    width = max(len(what) for what, _ in rows)
    for what, result in rows:
        print(f"  {what:<{width}}  {result}")


if __name__ == "__main__":
    main()
