"""Lesson 04: attempts, retries with backoff, leases, heartbeats, fencing, timeouts, scheduling,
priorities, cancellation, batch claims, partial indexes and retention.

Crashes are real: worker PROCESSES (`python worker.py`) are killed with SIGKILL. Exactly-once
claims are audited from the database and from a log the task functions write themselves.
"""

from __future__ import annotations

import datetime
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from contextlib import contextmanager
from itertools import pairwise

import psycopg
import pytest
from harness import import_lesson, lesson_dir, lesson_env, run_main, running, wait_until
from psycopg import conninfo
from psycopg_pool import ConnectionPool

LESSON = "04-task-queue-improvements"
L = import_lesson(
    LESSON, "engine", "worker", "task_context", "demo_tasks", "db.models", "db.queries"
)
Engine, Worker = L.engine.Engine, L.worker.Worker
TaskStatus, AttemptStatus = L.db_models.TaskStatus, L.db_models.AttemptStatus
TaskOptionError = L.engine.TaskOptionError
current_task = L.task_context.current_task
LeaseLostError, TaskCancelled = L.task_context.LeaseLostError, L.task_context.TaskCancelled
TaskTimeout = L.task_context.TaskTimeout
XDIST = os.environ.get("PYTEST_XDIST_WORKER", "main")
LEASE_EXPIRED = "lease expired (worker presumed dead)"


@pytest.fixture
def url(lesson_db) -> str:
    return lesson_db(LESSON)


@pytest.fixture
def engine(url):
    with Engine(url) as engine:
        yield engine


def sql(url: str, query: str, *params):
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else cur.rowcount


def seconds(delta: datetime.timedelta) -> float:
    return delta.total_seconds()


# --- retries -----------------------------------------------------------------------------------


def test_a_flaky_task_succeeds_on_attempt_3_and_keeps_every_error(engine):
    @engine.task("flaky", max_attempts=5, backoff=0.05)
    def flaky(input):
        attempt = current_task().attempt
        if attempt < 3:
            raise ConnectionError(f"down (attempt {attempt})")
        return {"ok": attempt}

    task_id = engine.enqueue("flaky")
    assert Worker(engine, poll_interval=0.01).run_until_idle() == 3  # waits out the backoffs

    task = engine.get(task_id)
    assert (task.status, task.output, task.attempts, task.error) == (
        "completed",
        {"ok": 3},
        3,
        None,
    )
    attempts = engine.attempts(task_id)
    assert [(a.attempt, a.status, a.error) for a in attempts] == [
        (1, AttemptStatus.FAILED, "ConnectionError: down (attempt 1)"),
        (2, AttemptStatus.FAILED, "ConnectionError: down (attempt 2)"),
        (3, AttemptStatus.COMPLETED, None),
    ]
    # The backoff, seen in the attempts: each retry started at least half its nominal delay
    # (base 50 ms, then 100 ms) after the previous attempt failed.
    gaps = [seconds(b.started_at - a.finished_at) for a, b in pairwise(attempts)]
    assert gaps[0] >= 0.025 and gaps[1] >= 0.05, gaps


def test_max_attempts_ends_in_failure_with_every_attempt_recorded(engine):
    @engine.task("broken", max_attempts=3, backoff=0.01)
    def broken(input):
        raise ValueError(f"bad input, attempt {current_task().attempt}")

    task_id = engine.enqueue("broken")
    assert Worker(engine, poll_interval=0.01).run_until_idle() == 3
    task = engine.get(task_id)
    assert task.status == TaskStatus.FAILED and task.attempts == 3
    assert task.error == "ValueError: bad input, attempt 3"  # the last attempt's error...
    assert [a.error for a in engine.attempts(task_id)] == [  # ...and every attempt's
        f"ValueError: bad input, attempt {n}" for n in (1, 2, 3)
    ]


def test_backoff_doubles_with_jitter_and_is_capped(url):
    # The rule itself, sampled in the database: delay n is in [d/2, d] with
    # d = min(cap, base * 2^(n-1)); base 1 s, cap 10 s.
    rows = sql(
        url,
        "SELECT n, extract(epoch FROM retry_delay(n, '1 second', '10 seconds'))::float8"
        " FROM generate_series(1, 8) AS n, generate_series(1, 200)",
    )
    by_attempt: dict[int, list[float]] = {}
    for n, delay in rows:
        by_attempt.setdefault(n, []).append(delay)
    for n, delays in by_attempt.items():
        nominal = min(10.0, 2.0 ** (n - 1))
        assert nominal / 2 <= min(delays) and max(delays) <= nominal, (n, min(delays), max(delays))
        assert max(delays) - min(delays) > nominal / 4  # jitter really spreads them
    means = [sum(d) / len(d) for _, d in sorted(by_attempt.items())]
    assert means[0] < means[1] < means[2] < means[3] < means[4]  # 1, 2, 4, 8, then capped
    assert all(m < 10 for m in means[4:])
    # A huge attempt number does not overflow: it is capped like any other.
    assert sql(url, "SELECT retry_delay(100000, '1 hour', '1 day') <= '1 day'") == [(True,)]


def test_a_failed_attempt_schedules_the_retry_on_the_database_clock(engine, url):
    engine.task("fails", max_attempts=2, backoff=20, backoff_cap=20)(lambda input: 1 / 0)
    task_id = engine.enqueue("fails")
    worker = Worker(engine)
    with worker.connect() as conn:
        [task] = worker.claim(conn, 1)
        worker.fail(conn, task, "ZeroDivisionError: division by zero")
        # The retry waits 10 to 20 s (20 s, jittered), from the moment the attempt failed.
        [(status, wait)] = sql(
            url,
            "SELECT t.status::text, extract(epoch FROM t.run_at - a.finished_at)::float8"
            " FROM tasks t JOIN task_attempts a ON a.task_id = t.id WHERE t.id = %s",
            task_id,
        )
        assert status == "scheduled" and 10 <= wait <= 20
        assert worker.claim(conn, 1) == []  # not due yet


# --- leases, heartbeats, fencing ---------------------------------------------------------------


def test_an_expired_lease_is_reclaimed_by_the_next_claim_as_a_failed_attempt(engine, url):
    engine.task("t", backoff=0.01)(lambda input: input)
    task_id = engine.enqueue("t", 1)
    dead, alive = Worker(engine, name="dead", lease=0.2), Worker(engine, name="alive")
    with dead.connect() as conn:
        [task] = dead.claim(conn, 1)  # and then it never heartbeats: as if it had died
    assert task.attempts == 1 and task.lease_expires_at is not None
    wait_until(lambda: sql(url, "SELECT lease_expires_at < now() FROM tasks")[0][0], timeout=30)

    assert alive.run_until_idle() == 1
    task = engine.get(task_id)
    assert (task.status, task.worker, task.attempts, task.output) == ("completed", "alive", 2, 1)
    assert [(a.worker, a.status, a.error) for a in engine.attempts(task_id)] == [
        ("dead", AttemptStatus.FAILED, LEASE_EXPIRED),
        ("alive", AttemptStatus.COMPLETED, None),
    ]


def test_reclaiming_is_bounded_per_claim(engine, url):
    engine.task("t")(lambda input: input)
    engine.enqueue_many("t", range(5))
    with Worker(engine, name="dead", slots=5, lease=0.1).connect() as conn:
        assert len(Worker(engine, name="dead", slots=5, lease=0.1).claim(conn, 5)) == 5
    wait_until(lambda: sql(url, "SELECT bool_and(lease_expires_at < now()) FROM tasks")[0][0])
    queries = L.db_queries.Querier
    with psycopg.connect(url, autocommit=True) as conn:
        assert len(queries(conn).reclaim_expired_leases(max_tasks=2)) == 2
        assert len(queries(conn).reclaim_expired_leases(max_tasks=2)) == 2
        assert len(queries(conn).reclaim_expired_leases(max_tasks=2)) == 1
        assert queries(conn).reclaim_expired_leases(max_tasks=2) == []


def test_a_stale_workers_writes_are_rejected_and_it_is_told(engine, url):
    engine.task("t", backoff=0.01)(lambda input: input)
    task_id = engine.enqueue("t", "x")
    stale, fresh = Worker(engine, name="stale", lease=0.2), Worker(engine, name="fresh")
    with stale.connect() as stale_conn, fresh.connect() as fresh_conn:
        [old] = stale.claim(stale_conn, 1)
        # The stale worker pauses (a GC pause, a frozen VM) past its lease; another takes over.
        new = wait_until(lambda: fresh.claim(fresh_conn, 1), timeout=30)[0]
        assert (new.id, new.attempts, new.worker) == (task_id, 2, "fresh")

        # The stale worker wakes up and reports: every write is refused, and it is told.
        with pytest.raises(LeaseLostError):
            stale.complete(stale_conn, old, "stale result")
        with pytest.raises(LeaseLostError):
            stale.fail(stale_conn, old, "RuntimeError: stale")
        queries = L.db_queries.Querier(stale_conn)
        lease = datetime.timedelta(seconds=30)
        assert queries.extend_leases(lease=lease, ids=[old.id], attempts=[old.attempts]) == []
        task = engine.get(task_id)
        assert (task.status, task.attempts, task.worker) == ("running", 2, "fresh")

        fresh.complete(fresh_conn, new, "fresh result")
    assert engine.get(task_id).output == "fresh result"
    assert [a.status for a in engine.attempts(task_id)] == ["failed", "completed"]


def test_a_worker_that_lost_its_lease_finds_out_at_its_next_heartbeat(engine, url):
    seen: list[str] = []
    release = threading.Event()

    @engine.task("long", backoff=0.01)
    def long(input):
        task = current_task()
        try:
            for _ in range(600):
                task.sleep(0.05)
        except LeaseLostError as err:
            seen.append(f"{task.attempt}: {type(err).__name__}")
            release.wait(30)  # keep the slot busy, so that this worker cannot claim it again
            raise
        return task.attempt

    task_id = engine.enqueue("long")
    with running(Worker(engine, name="first", lease=0.6, poll_interval=0.05)):
        wait_until(lambda: engine.get(task_id).status == TaskStatus.RUNNING)
        # Expire its lease behind its back, as a long stall would, and let another worker in.
        sql(url, "UPDATE tasks SET lease_expires_at = now() - interval '1 second'")
        second = Worker(engine, name="second", lease=30)
        with second.connect() as conn:
            [task] = wait_until(lambda: second.claim(conn, 1), timeout=30)
            # The first worker's next heartbeat finds the lease gone and stops its function.
            wait_until(lambda: seen, timeout=10)
            assert seen == ["1: LeaseLostError"]
            second.complete(conn, task, "by second")
        release.set()
    task = engine.get(task_id)
    assert (task.status, task.output, task.worker) == ("completed", "by second", "second")


def test_a_long_task_that_heartbeats_is_never_run_twice(engine, url):
    # Tasks that run more than twice as long as the lease, three workers competing for them:
    # the heartbeats keep every lease alive, so no task is ever reclaimed or run again.
    lease, duration, tasks = 1.2, 3.0, 4
    calls: list[tuple[int, str]] = []

    @engine.task("long")
    def long(input):
        calls.append((input, threading.current_thread().name))
        current_task().sleep(duration)
        return input

    engine.enqueue_many("long", range(tasks))
    workers = [
        Worker(engine, name=f"w{i}", slots=2, lease=lease, poll_interval=0.05) for i in range(3)
    ]
    with running(*workers):
        done = "SELECT count(*) = %s FROM tasks WHERE status = 'completed'"
        wait_until(lambda: sql(url, done, tasks)[0][0], timeout=60)
    assert sorted(n for n, _ in calls) == list(range(tasks))  # each function called once
    rows = sql(url, "SELECT status::text, attempts, count(*) FROM tasks GROUP BY 1, 2")
    assert rows == [("completed", 1, tasks)]
    assert sql(url, "SELECT count(*) FROM task_attempts") == [(tasks,)]
    # The leases really were extended, long past the first one.
    [(longest,)] = sql(url, "SELECT max(finished_at - started_at) FROM task_attempts")
    assert seconds(longest) >= duration > 2 * lease


# --- worker processes, killed for real ---------------------------------------------------------


def start_worker(server: str, url: str, name: str, lease: float) -> subprocess.Popen:
    """`python worker.py` on the test's database, as a reader would run it."""
    dbname = conninfo.conninfo_to_dict(url)["dbname"]
    command = [sys.executable, str(lesson_dir(LESSON) / "worker.py"), "--name", name]
    command += ["--lease", str(lease), "--poll-interval", "0.05"]
    return subprocess.Popen(
        command,
        env=lesson_env(server, dbname),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


@contextmanager
def processes():
    started: list[subprocess.Popen] = []
    try:
        yield started
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
            process.communicate(timeout=30)


def test_a_worker_killed_with_sigkill_has_its_task_finished_by_another(engine, url, pg_server_url):
    lease = 1.5
    L.demo_tasks.register(engine)
    task_id = engine.enqueue("resize_video", {"video": "v.mp4", "seconds": 1.5})
    with processes() as started:
        started.append(a := start_worker(pg_server_url, url, "A", lease))
        wait_until(lambda: engine.get(task_id).worker == "A", timeout=60)
        started.append(b := start_worker(pg_server_url, url, "B", lease))  # idle, polling
        b_is_up = "SELECT 1 FROM pg_stat_activity WHERE application_name = 'B'"
        wait_until(lambda: sql(url, b_is_up), timeout=60)
        a.send_signal(signal.SIGKILL)
        assert a.wait(timeout=30) == -signal.SIGKILL
        [(killed_at,)] = sql(url, "SELECT now()")

        task = engine.wait(task_id, timeout=60)
        b.terminate()  # SIGTERM: a clean exit
        assert b.wait(timeout=30) == 0
    assert (task.status, task.worker, task.output) == (
        "completed",
        "B",
        {"resized": "v.mp4", "attempt": 2},
    )
    first, second = engine.attempts(task_id)
    assert (first.worker, first.status, first.error) == ("A", "failed", LEASE_EXPIRED)
    assert (second.worker, second.status) == ("B", "completed")
    # B took over within the lease (plus a margin for polling and a loaded machine) of the kill.
    assert seconds(first.finished_at - killed_at) <= lease + 2.0
    assert second.started_at >= first.finished_at


def test_max_attempts_stops_a_task_that_kills_every_worker_running_it(engine, url, pg_server_url):
    L.demo_tasks.register(engine)  # crash_worker: max_attempts=3, and SIGKILLs its own process
    task_id = engine.enqueue("crash_worker")
    deaths = 0
    with processes() as started:
        # Start workers one after another: each claims the task and dies with it, until a claim
        # finds the last attempt's lease expired and fails the task for good.
        while engine.get(task_id).status != TaskStatus.FAILED:
            if not started or started[-1].poll() is not None:
                started.append(start_worker(pg_server_url, url, f"w{len(started) + 1}", 0.5))
            time.sleep(0.05)
            assert len(started) <= 5, "the crash loop did not stop"
        deaths = sum(p.poll() == -signal.SIGKILL for p in started)
    task = engine.get(task_id)
    assert (task.status, task.attempts, task.error) == ("failed", 3, LEASE_EXPIRED)
    attempts = engine.attempts(task_id)
    assert [(a.attempt, a.status, a.error) for a in attempts] == [
        (n, AttemptStatus.FAILED, LEASE_EXPIRED) for n in (1, 2, 3)
    ]
    assert [a.worker for a in attempts] == ["w1", "w2", "w3"] and deaths == 3


# --- timeouts ----------------------------------------------------------------------------------


def test_a_timeout_fails_the_attempt_and_stops_a_function_that_checks(engine):
    seen: list[str] = []

    @engine.task("slow", max_attempts=1, timeout=0.3)
    def slow(input):
        try:
            current_task().sleep(30)
        except TaskTimeout as err:
            seen.append(str(err))
            raise

    task_id = engine.enqueue("slow")
    started = time.monotonic()
    Worker(engine, poll_interval=0.05).run_until_idle()
    assert time.monotonic() - started < 10  # not 30
    task = engine.get(task_id)
    assert task.status == TaskStatus.FAILED
    assert task.error == "TaskTimeout: attempt exceeded its timeout of 0.3s"
    assert seen == ["attempt exceeded its timeout of 0.3s"]


def test_a_timeout_is_enforced_even_if_the_function_never_checks(engine):
    @engine.task("stubborn", max_attempts=2, timeout=0.3, backoff=0.01)
    def stubborn(input):
        if current_task().attempt == 1:
            time.sleep(2)  # ignores its context; the thread cannot be interrupted
            return "too late"
        return "in time"

    task_id = engine.enqueue("stubborn")
    with running(Worker(engine, slots=2, poll_interval=0.05)):
        task = engine.wait(task_id, timeout=30)
        # Attempt 1 was failed at its deadline, and attempt 2 ran while attempt 1's thread
        # still slept: the task did not wait for the hung call.
        assert task.output == "in time"
        first, second = engine.attempts(task_id)
        assert first.error == "TaskTimeout: attempt exceeded its timeout of 0.3s"
        assert seconds(first.finished_at - first.started_at) < 1.5
        time.sleep(2.5)  # let attempt 1's thread return: its late result must be dropped
    assert engine.get(task_id).output == "in time"


# --- scheduling, priorities, batches -----------------------------------------------------------


def test_a_scheduled_task_does_not_run_before_its_time(engine, url):
    engine.task("t")(lambda input: input)
    later = engine.enqueue("t", "later", delay=1.0)
    past = engine.enqueue("t", "past", run_at=datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC))
    worker = Worker(engine)
    with worker.connect() as conn:
        assert [t.id for t in worker.claim(conn, 10)] == [past]
    assert Worker(engine, poll_interval=0.02).run_until_idle() == 1
    task = engine.get(later)
    assert task.status == TaskStatus.COMPLETED
    assert seconds(task.started_at - task.created_at) >= 1.0  # both from the database clock


def test_higher_priority_runs_first_then_the_oldest(engine):
    engine.task("t")(lambda input: input)
    ids = [engine.enqueue("t", p, priority=p) for p in (0, 10, 5, 10, -1)]
    worker = Worker(engine)
    with worker.connect() as conn:
        order = [worker.claim(conn, 1)[0].id for _ in ids]
    assert order == [ids[1], ids[3], ids[2], ids[0], ids[4]]


def test_one_claim_takes_a_whole_batch_and_enqueue_many_one_statement(engine, url):
    engine.task("t")(lambda input: input)
    ids = engine.enqueue_many("t", [{"n": n} for n in range(50)])
    assert ids == list(range(ids[0], ids[0] + 50))  # in input order
    assert [engine.get(i).input for i in (ids[0], ids[-1])] == [{"n": 0}, {"n": 49}]
    worker = Worker(engine, name="w", slots=20, lease=30)
    with worker.connect() as conn:
        claimed = worker.claim(conn, 20)
    assert sorted(t.id for t in claimed) == ids[:20]
    assert {(t.status, t.attempts, t.worker) for t in claimed} == {("running", 1, "w")}
    assert sql(url, "SELECT count(*) FROM task_attempts WHERE status = 'running'") == [(20,)]
    [(lease,)] = sql(
        url, "SELECT min(lease_expires_at - now()) FROM tasks WHERE status = 'running'"
    )
    assert 25 <= seconds(lease) <= 30


def test_many_workers_with_retries_and_keys_run_each_attempt_once(engine, url):
    # Four workers with three slots each, 150 tasks, a third of which fail their first attempt,
    # half of them under a key limited to 2: audited from the tasks' own log and the database.
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE audit (n int NOT NULL, attempt int NOT NULL)")
    with ConnectionPool(url, min_size=2, max_size=12, kwargs={"autocommit": True}) as audit:

        @engine.task("work", backoff=0.01)
        def work(input):
            attempt = current_task().attempt
            with audit.connection() as conn:
                conn.execute("INSERT INTO audit VALUES (%s, %s)", (input, attempt))
            time.sleep(0.005)
            if input % 3 == 0 and attempt == 1:
                raise RuntimeError("first attempt fails")
            return input

        engine.enqueue_many("work", range(0, 150, 2), concurrency_key="acme", max_running=2)
        engine.enqueue_many("work", range(1, 150, 2))
        workers = [Worker(engine, name=f"w{i}", slots=3, poll_interval=0.01) for i in range(4)]
        threads = [threading.Thread(target=w.run_until_idle) for w in workers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    calls = Counter(sql(url, "SELECT n, attempt FROM audit"))
    assert set(calls.values()) == {1}  # no attempt ran twice
    assert sorted(calls) == sorted(
        (n, a) for n in range(150) for a in ((1, 2) if n % 3 == 0 else (1,))
    )
    assert sql(url, "SELECT status::text, count(*) FROM tasks GROUP BY 1") == [("completed", 150)]
    assert sql(url, "SELECT count(*) FROM tasks WHERE output::int <> (input::int)") == [(0,)]
    with psycopg.connect(url, autocommit=True) as conn:
        queries = L.db_queries.Querier(conn)
        per_key = {row.concurrency_key: row.most_at_once for row in queries.most_running_per_key()}
        per_worker = [row.most_at_once for row in queries.most_running_per_worker()]
    assert per_key["acme"] <= 2 and max(per_worker) <= 3


# --- cancellation ------------------------------------------------------------------------------


def test_cancelling_a_queued_task_means_it_never_runs(engine):
    calls = []
    engine.task("t")(calls.append)
    task_id = engine.enqueue("t", "x")
    assert engine.cancel(task_id) is True
    assert engine.cancel(task_id) is False  # already cancelled
    assert Worker(engine).run_until_idle() == 0 and calls == []
    task = engine.get(task_id)
    assert (task.status, task.attempts) == ("cancelled", 0) and task.finished_at is not None
    with pytest.raises(L.engine.TaskNotFoundError, match="no task with id 999999"):
        engine.cancel(999999)


def test_cancelling_a_finished_task_changes_nothing(engine):
    engine.task("t")(lambda input: "done")
    task_id = engine.enqueue("t")
    Worker(engine).run_until_idle()
    assert engine.cancel(task_id) is False
    assert (engine.get(task_id).status, engine.get(task_id).output) == ("completed", "done")


def test_cancelling_a_running_task_stops_it_at_the_next_heartbeat(engine):
    seen: list[str] = []

    @engine.task("long")
    def long(input):
        task = current_task()
        try:
            for _ in range(600):
                task.sleep(0.05)
        except TaskCancelled as err:
            seen.append(str(err))
            raise
        return "finished"

    task_id = engine.enqueue("long")
    lease = 0.9
    with running(Worker(engine, lease=lease, poll_interval=0.05)):
        wait_until(lambda: engine.get(task_id).status == TaskStatus.RUNNING)
        assert engine.cancel(task_id) is True
        cancelled_at = time.monotonic()
        # In the database, at once: the task and its attempt are cancelled.
        assert engine.get(task_id).status == TaskStatus.CANCELLED
        assert [a.status for a in engine.attempts(task_id)] == ["cancelled"]
        # In the function, at the worker's next heartbeat (lease / 3), plus a margin.
        wait_until(lambda: seen, timeout=10)
        assert time.monotonic() - cancelled_at < lease / 3 + 2.0
    assert seen == [f"task {task_id} was cancelled"]
    task = engine.get(task_id)
    assert (task.status, task.output, task.attempts) == ("cancelled", None, 1)  # not retried


# --- indexes and retention ---------------------------------------------------------------------


def explain(conn: psycopg.Connection, query: str, params: list) -> str:
    with psycopg.RawCursor(conn) as cur:
        cur.execute("EXPLAIN " + query, params)
        return "\n".join(row[0] for row in cur.fetchall())


def test_claims_use_the_partial_indexes_however_many_tasks_finished(engine, url):
    engine.task("t")(lambda input: None)
    # A backlog: 5,000 queued tasks with a key and 5,000 without, and two scheduled for later.
    engine.enqueue_many("t", range(5000), concurrency_key="acme", max_running=2)
    engine.enqueue_many("t", range(5000))
    engine.enqueue_many("t", [1, 2], delay=60)
    worker = Worker(engine, name="w", slots=100)
    with worker.connect() as conn:
        assert len(worker.claim(conn, 100)) == 100  # and 100 running, under their leases
    with psycopg.connect(url, autocommit=True) as conn:
        # And 50,000 finished tasks, with their attempts.
        conn.execute(
            "WITH t AS (INSERT INTO tasks (name, input, status, worker, started_at, finished_at,"
            " attempts, output) SELECT 't', 'null', 'completed', 'w', now(), now(), 1, 'null'"
            " FROM generate_series(1, 50000) RETURNING id)"
            " INSERT INTO task_attempts (task_id, attempt, worker, status, started_at, finished_at)"
            " SELECT id, 1, 'w', 'completed', now(), now() FROM t"
        )
        conn.execute("ANALYZE")
        q = L.db_queries
        lease = datetime.timedelta(seconds=30)
        plans = {
            "unkeyed": explain(conn, q.CLAIM_UNKEYED_TASKS, ["w", lease, ["t"], 10]),
            "keyed": explain(conn, q.CLAIM_KEY_TASKS, ["w", lease, "acme", ["t"], 10]),
            "reclaim": explain(conn, q.RECLAIM_EXPIRED_LEASES, [10]),
            "promote": explain(conn, q.PROMOTE_DUE_TASKS, [10]),
            "lock_key": explain(conn, q.LOCK_NEXT_KEY, [[], ["t"]]),
        }
    assert "tasks_queued" in plans["unkeyed"], plans["unkeyed"]
    assert "tasks_queued" in plans["keyed"], plans["keyed"]
    assert "tasks_leased" in plans["reclaim"], plans["reclaim"]
    assert "tasks_scheduled" in plans["promote"], plans["promote"]
    assert "tasks_queued" in plans["lock_key"], plans["lock_key"]
    for name, plan in plans.items():
        assert "Seq Scan on tasks" not in plan, (name, plan)
    # The claims read the backlog in claim order, and only its first entries: no sort.
    assert "Sort" not in plans["unkeyed"] and "Sort" not in plans["keyed"], plans


def test_cleanup_deletes_old_finished_tasks_with_their_attempts_in_batches(engine, url):
    engine.task("t")(lambda input: input)
    ids = engine.enqueue_many("t", range(6))
    Worker(engine, slots=6).run_until_idle()
    queued = engine.enqueue("t", "still queued")
    # Four of the six finished "two days ago"; two just now.
    sql(url, "UPDATE tasks SET finished_at = now() - interval '2 days' WHERE id = ANY(%s)", ids[:4])
    assert engine.cleanup(older_than=86400, batch=3) == 4
    remaining = [row[0] for row in sql(url, "SELECT id FROM tasks ORDER BY id")]
    assert remaining == [*ids[4:], queued]
    assert sql(url, "SELECT count(*) FROM task_attempts WHERE task_id = ANY(%s)", ids[:4]) == [(0,)]
    assert engine.cleanup(older_than=86400) == 0
    assert engine.cleanup(older_than=0) == 2  # unfinished tasks are never deleted
    assert engine.get(queued).status == TaskStatus.QUEUED


# --- mistakes ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_attempts": 0}, "max_attempts must be an integer from 1 to 1000, got 0"),
        ({"max_attempts": True}, "max_attempts must be an integer from 1 to 1000, got True"),
        ({"priority": "high"}, "priority must be an integer"),
        ({"timeout": 0}, "timeout must be a number of seconds, at least 0.001, got 0"),
        ({"timeout": float("nan")}, "timeout must be a number of seconds, at least 0.001, got nan"),
        ({"backoff": 10, "backoff_cap": 1}, "backoff_cap (1) must be at least backoff (10)"),
        ({"delay": -1}, "delay must be a number of seconds, 0 or more, got -1"),
        ({"retries": 3}, "unknown task option 'retries' (options: priority, max_attempts"),
        ({"run_at": datetime.datetime(2030, 1, 1)}, "run_at must be a timezone-aware datetime"),
        (
            {"run_at": datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC), "delay": 5},
            "give delay or run_at, not both",
        ),
    ],
)
def test_bad_options_are_refused_at_enqueue_and_nothing_is_written(engine, url, options, message):
    engine.task("t")(lambda input: input)
    with pytest.raises(TaskOptionError) as raised:
        engine.enqueue("t", **options)
    assert str(raised.value).startswith(message), str(raised.value)
    assert sql(url, "SELECT count(*) FROM tasks") == [(0,)]


def test_bad_defaults_are_refused_at_registration(engine):
    with pytest.raises(TaskOptionError, match="max_attempts must be an integer"):
        engine.task("t", max_attempts=-1)


def test_current_task_outside_a_task_is_a_clear_error():
    with pytest.raises(RuntimeError, match="outside a running task"):
        current_task()


# --- main.py, as a reader runs it --------------------------------------------------------------


def test_main_shows_retries_a_killed_worker_scheduling_and_cancellation(pg_server_url):
    dbname = f"t04_main_{XDIST}"
    try:
        result = run_main(LESSON, pg_server_url, dbname, timeout=120)
    finally:
        with psycopg.connect(pg_server_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    out = result.stdout
    lines = out.splitlines()
    assert lines[0].startswith(f"database {dbname} ")
    # 1. retries
    assert "  task 1 completed on attempt 3: {'attempt': 3, 'charged': 42}" in lines
    error = "ConnectionError: payment service unavailable (attempt 1)"
    assert f"    attempt 1 on worker-1: failed: {error}" in lines
    assert sum("; retry in " in line for line in lines) == 2
    # 2. the kill
    assert any(line.startswith("  task 2 was running on worker-A (pid ") for line in lines)
    assert any(line.startswith("  task 2 completed by worker-B, ") for line in lines)
    assert f"    attempt 1 on worker-A: failed: {LEASE_EXPIRED}" in lines
    assert any(
        line.startswith("    attempt 2 on worker-B, ") and line.endswith(": completed")
        for line in lines
    )
    assert "worker-B: task 2 attempt 1 on worker-A: " + LEASE_EXPIRED + "; retry scheduled" in out
    # 3. scheduling and priorities
    assert "  worker-1 ran them in this order: 5, 6, 4, 3" in lines
    waited = next(line for line in lines if line.startswith("  task 3 started "))
    assert float(waited.split()[3].rstrip("s")) >= 2.0
    # 4. cancellation
    assert "  cancelled task 7, scheduled for later: cancelled, never run" in lines
    assert "  cancelled task 8 while running: cancelled at once" in lines
    assert "    attempt 1 on worker-1: cancelled" in lines
    assert lines[-1] == (
        "from the database: 0 scheduled, 0 queued, 0 running, 6 completed, 0 failed, 2 cancelled"
    )
