"""Lesson 04's promises: attempts, retries with backoff, leases, heartbeats, fencing, timeouts,
scheduling, priorities, cancellation, batch claims, partial indexes and retention.

Each test runs against every lesson from 04 to the latest (the `lesson` fixture): a lesson is a
complete snapshot of the engine, so it must keep every promise of the lessons before it. (In
05 and 06 every task is durable, in 07 `engine.task` registers a regular one: these promises
hold for both kinds.) Only main.py's test is about lesson 04 alone: it runs that lesson's demo.

Crashes are real: worker PROCESSES (`python lessons/<lesson>/worker.py`) are killed with
SIGKILL. Exactly-once claims are audited from the database and from a log the task functions
write themselves.
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
from pathlib import Path

import psycopg
import pytest
from hardway.postgres import database_url
from harness import (
    drop_database,
    lesson_dir,
    lesson_env,
    lessons_from,
    load_lesson,
    raises,
    run_main,
    running,
    sql,
    wait_until,
)
from psycopg import conninfo
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

XDIST = os.environ.get("PYTEST_XDIST_WORKER", "main")
LEASE_EXPIRED = "lease expired (worker presumed dead)"


@pytest.fixture(params=lessons_from("04"), scope="module")
def lesson(request):
    return load_lesson(request.param)


def seconds(delta: datetime.timedelta) -> float:
    return delta.total_seconds()


def attempts_of(engine, task_id: int) -> list[tuple]:
    """Every attempt of the task: (number, worker, status, error)."""
    return [(a.attempt, a.worker, a.status, a.error) for a in engine.attempts(task_id)]


# --- retries -----------------------------------------------------------------------------------


def test_a_flaky_task_succeeds_on_attempt_3_and_keeps_every_error(lesson, engine):
    @engine.task("flaky", max_attempts=5, backoff=0.05)
    def flaky(input):
        attempt = lesson.task_context.current_task().attempt
        if attempt < 3:
            raise ConnectionError(f"down (attempt {attempt})")
        return {"ok": attempt}

    task_id = engine.enqueue("flaky")
    worker = lesson.worker.Worker(engine, poll_interval=0.01)
    assert worker.run_until_idle() == 3  # waits out the backoffs

    task = engine.get(task_id)
    assert (task.status, task.output, task.attempts, task.error) == (
        "completed",
        {"ok": 3},
        3,
        None,
    )
    attempts = engine.attempts(task_id)
    assert [(a.attempt, a.status, a.error) for a in attempts] == [
        (1, "failed", "ConnectionError: down (attempt 1)"),
        (2, "failed", "ConnectionError: down (attempt 2)"),
        (3, "completed", None),
    ]
    # The backoff, seen in the attempts: each retry started at least half its nominal delay
    # (base 50 ms, then 100 ms) after the previous attempt failed.
    gaps = [seconds(b.started_at - a.finished_at) for a, b in pairwise(attempts)]
    assert gaps[0] >= 0.025 and gaps[1] >= 0.05, gaps


def test_max_attempts_ends_in_failure_with_every_attempt_recorded(lesson, engine):
    @engine.task("broken", max_attempts=3, backoff=0.01)
    def broken(input):
        raise ValueError(f"bad input, attempt {lesson.task_context.current_task().attempt}")

    task_id = engine.enqueue("broken")
    assert lesson.worker.Worker(engine, poll_interval=0.01).run_until_idle() == 3
    task = engine.get(task_id)
    assert task.status == "failed" and task.attempts == 3
    assert task.error == "ValueError: bad input, attempt 3"  # the last attempt's error...
    assert [a.error for a in engine.attempts(task_id)] == [  # ...and every attempt's
        f"ValueError: bad input, attempt {n}" for n in (1, 2, 3)
    ]


def test_backoff_doubles_with_jitter_and_is_capped(lesson, url):
    # The rule itself, sampled in the database (retry_delay, in every lesson's schema): delay n
    # is in [d/2, d] with d = min(cap, base * 2^(n-1)); base 1 s, cap 10 s.
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


def test_a_failed_attempt_waits_out_its_backoff_on_the_database_clock(lesson, engine, url):
    # An attempt fails in two ways: its function raises, or its worker dies (its lease runs
    # out). Either way the retry waits 30 to 60 s (a backoff of 60 s, jittered), counted on
    # the database's clock from the moment the attempt failed, and a claim now does not take it.
    Worker = lesson.worker.Worker
    backoff = {"max_attempts": 2, "backoff": 60, "backoff_cap": 60}
    engine.task("abandoned", **backoff)(lambda input: input)
    engine.task("fails", **backoff)(raises(ZeroDivisionError("division by zero")))
    abandoned = engine.enqueue("abandoned")
    dead = Worker(engine, name="dead", lease=0.1)
    with dead.connect() as conn:
        dead.claim(conn, 1)  # and then it never heartbeats: as if it had died
    fails = engine.enqueue("fails")
    with running(Worker(engine, name="w", poll_interval=0.02)):
        failed = "SELECT count(*) FROM task_attempts WHERE attempt = 1 AND status = 'failed'"
        wait_until(lambda: sql(url, failed) == [(2,)], timeout=30)
    rows = sql(
        url,
        "SELECT t.id, t.status::text, t.attempts, a.error,"
        " extract(epoch FROM t.run_at - a.finished_at)::float8,"
        " extract(epoch FROM t.run_at - now())::float8"
        " FROM tasks t JOIN task_attempts a ON a.task_id = t.id AND a.attempt = 1",
    )
    errors = {abandoned: LEASE_EXPIRED, fails: "ZeroDivisionError: division by zero"}
    assert len(rows) == 2
    for task_id, status, attempts, error, wait, left in rows:
        waits_out_its_backoff = 30 <= wait <= 60 and left > 20
        expected = ("scheduled", 1, errors[task_id], True)
        assert (status, attempts, error, waits_out_its_backoff) == expected, (task_id, wait, left)
    fresh = Worker(engine, name="fresh")
    with fresh.connect() as conn:
        assert fresh.claim(conn, 10) == []  # its first claim promotes the due tasks: none
    assert sql(url, "SELECT DISTINCT status::text FROM tasks") == [("scheduled",)]


# --- leases, heartbeats, fencing ---------------------------------------------------------------


def test_an_expired_lease_is_reclaimed_by_the_next_claim_as_a_failed_attempt(lesson, engine, url):
    Worker = lesson.worker.Worker
    engine.task("t", backoff=0.01)(lambda input: input)
    task_id = engine.enqueue("t", 1)
    dead = Worker(engine, name="dead", lease=0.2)
    alive = Worker(engine, name="alive", poll_interval=0.02)
    with dead.connect() as conn:
        [task] = dead.claim(conn, 1)  # and then it never heartbeats: as if it had died
    assert task.attempts == 1 and task.lease_expires_at is not None
    wait_until(lambda: sql(url, "SELECT lease_expires_at < now() FROM tasks")[0][0], timeout=30)

    assert alive.run_until_idle() == 1
    task = engine.get(task_id)
    assert (task.status, task.worker, task.attempts, task.output) == ("completed", "alive", 2, 1)
    assert attempts_of(engine, task_id) == [
        (1, "dead", "failed", LEASE_EXPIRED),
        (2, "alive", "completed", None),
    ]


def test_reclaiming_is_bounded_per_claim(lesson, engine, url):
    engine.task("t")(lambda input: input)
    engine.enqueue_many("t", range(5))
    dead = lesson.worker.Worker(engine, name="dead", slots=5, lease=0.1)
    with dead.connect() as conn:
        assert len(dead.claim(conn, 5)) == 5
    wait_until(lambda: sql(url, "SELECT bool_and(lease_expires_at < now()) FROM tasks")[0][0])
    with psycopg.connect(url, autocommit=True) as conn:
        queries = lesson.db_queries.Querier(conn)
        assert len(queries.reclaim_expired_leases(max_tasks=2)) == 2
        assert len(queries.reclaim_expired_leases(max_tasks=2)) == 2
        assert len(queries.reclaim_expired_leases(max_tasks=2)) == 1
        assert queries.reclaim_expired_leases(max_tasks=2) == []


def test_a_stale_workers_writes_are_rejected_and_it_is_told(lesson, engine, url):
    # The fence is the attempt number. When the stale worker reports, the task is `running`
    # again, under the attempt of the worker that took it over: only the attempt each write
    # names tells the two apart, in the completion query as in the failure query.
    Worker, LeaseLostError = lesson.worker.Worker, lesson.task_context.LeaseLostError
    engine.task("t", backoff=0.01)(lambda input: input)
    task_id = engine.enqueue("t", "x")
    stale = Worker(engine, name="stale", lease=0.2)
    fresh = Worker(engine, name="fresh", poll_interval=0.02)
    taken_over = [(1, "stale", "failed", LEASE_EXPIRED), (2, "fresh", "running", None)]
    with stale.connect() as stale_conn, fresh.connect() as fresh_conn:
        [old] = stale.claim(stale_conn, 1)
        # The stale worker pauses (a GC pause, a frozen VM) past its lease; another takes over.
        new = wait_until(lambda: fresh.claim(fresh_conn, 1), timeout=30)[0]
        assert (new.id, new.attempts, new.worker) == (task_id, 2, "fresh")
        assert attempts_of(engine, task_id) == taken_over

        # The stale worker wakes up and reports: every write is refused, and it is told.
        with pytest.raises(LeaseLostError):
            stale.complete(stale_conn, old, "stale result")
        with pytest.raises(LeaseLostError):
            stale.fail(stale_conn, old, "RuntimeError: stale")
        queries = lesson.db_queries.Querier(stale_conn)
        lease = datetime.timedelta(seconds=30)
        assert queries.extend_leases(lease=lease, ids=[old.id], attempts=[old.attempts]) == []
        # The new attempt is as it was: still running, nothing written over it.
        task = engine.get(task_id)
        assert (task.status, task.attempts, task.worker, task.output, task.error) == (
            *("running", 2, "fresh"),
            *(None, None),
        )
        assert attempts_of(engine, task_id) == taken_over

        fresh.complete(fresh_conn, new, "fresh result")
        with pytest.raises(LeaseLostError):  # and once it has finished, still refused
            stale.complete(stale_conn, old, "stale result")
    assert engine.get(task_id).output == "fresh result"
    assert attempts_of(engine, task_id) == [
        (1, "stale", "failed", LEASE_EXPIRED),
        (2, "fresh", "completed", None),
    ]


def test_a_worker_that_lost_its_lease_finds_out_at_its_next_heartbeat(lesson, engine, url):
    LeaseLostError = lesson.task_context.LeaseLostError
    seen: list[str] = []
    release = threading.Event()

    @engine.task("long", backoff=0.01)
    def long(input):
        task = lesson.task_context.current_task()
        try:
            for _ in range(600):
                task.sleep(0.05)
        except LeaseLostError as err:
            seen.append(f"{task.attempt}: {type(err).__name__}")
            release.wait(30)  # keep the slot busy, so that this worker cannot claim it again
            raise
        return task.attempt

    task_id = engine.enqueue("long")
    first = lesson.worker.Worker(engine, name="first", lease=0.6, poll_interval=0.05)
    with running(first):
        wait_until(lambda: engine.get(task_id).status == "running")
        # Expire its lease behind its back, as a long stall would, and let another worker in.
        sql(url, "UPDATE tasks SET lease_expires_at = now() - interval '1 second'")
        second = lesson.worker.Worker(engine, name="second", lease=30)
        with second.connect() as conn:
            [task] = wait_until(lambda: second.claim(conn, 1), timeout=30)
            # The first worker's next heartbeat finds the lease gone and stops its function.
            wait_until(lambda: seen, timeout=10)
            assert seen == ["1: LeaseLostError"]
            second.complete(conn, task, "by second")
        release.set()
    task = engine.get(task_id)
    assert (task.status, task.output, task.worker) == ("completed", "by second", "second")


def test_a_long_task_that_heartbeats_is_never_run_twice(lesson, engine, url):
    # Tasks that run more than twice as long as the lease, three workers competing for them:
    # the heartbeats keep every lease alive (its end moves forward, in the database), so no
    # task is ever reclaimed or run again. A lease of 2 s (a heartbeat every 0.67 s): a loaded
    # 2-core machine has held a worker's loop up for most of a second.
    lease, duration, tasks = 2.0, 4.5, 4
    calls: list[int] = []

    @engine.task("long")
    def long(input):
        calls.append(input)
        lesson.task_context.current_task().sleep(duration)
        return input

    engine.enqueue_many("long", range(tasks))
    workers = [
        lesson.worker.Worker(engine, name=f"w{i}", slots=2, lease=lease, poll_interval=0.05)
        for i in range(3)
    ]
    with running(*workers):
        # Each running task's lease now ends later than its claim made it end: extended.
        extended = (
            "SELECT count(*) FILTER (WHERE lease_expires_at > started_at + %s) = %s"
            " FROM tasks WHERE status = 'running'"
        )
        past_first_lease = datetime.timedelta(seconds=1.5 * lease)
        wait_until(lambda: sql(url, extended, past_first_lease, tasks)[0][0], timeout=duration)
        done = "SELECT count(*) = %s FROM tasks WHERE status = 'completed'"
        wait_until(lambda: sql(url, done, tasks)[0][0], timeout=60)
    assert sorted(calls) == list(range(tasks))  # each function called once
    rows = sql(url, "SELECT status::text, attempts, count(*) FROM tasks GROUP BY 1, 2")
    assert rows == [("completed", 1, tasks)]
    assert sql(url, "SELECT count(*) FROM task_attempts") == [(tasks,)]
    [(longest,)] = sql(url, "SELECT max(finished_at - started_at) FROM task_attempts")
    assert seconds(longest) >= duration > 2 * lease


# --- worker processes, killed for real ---------------------------------------------------------

# The tasks a worker PROCESS runs in these tests (`--tasks process_tasks`): their names and
# functions only; the options (max_attempts, backoff) come with each enqueue, in the task's row.
PROCESS_TASKS = """
import os
import signal

from task_context import current_task


def resize_video(input):
    # The first attempt works for input["seconds"], long enough to be killed half-way whenever
    # the test gets to it; a retry for input["retry_seconds"].
    task = current_task()
    work = input["seconds"] if task.attempt == 1 else input["retry_seconds"]
    for _ in range(round(work * 10)):
        task.sleep(0.1)  # the work; ends early, raising, if the attempt is stopped
    return {"resized": input["video"], "attempt": task.attempt}


def crash_worker(input):
    # A poison task: it kills the process running it, every time (a segfault, the OOM killer).
    os.kill(os.getpid(), signal.SIGKILL)


def register(engine):
    engine.task("resize_video")(resize_video)
    engine.task("crash_worker")(crash_worker)
"""


def in_worker_processes_only(input: object) -> None:
    raise AssertionError("these tasks run in worker processes, never in the test's")


@pytest.fixture
def process_tasks(engine, tmp_path: Path) -> Path:
    """The directory of the tasks module for worker processes; the same names on `engine`."""
    (tmp_path / "process_tasks.py").write_text(PROCESS_TASKS)
    engine.task("resize_video")(in_worker_processes_only)
    engine.task("crash_worker")(in_worker_processes_only)
    return tmp_path


def start_worker(lesson, server: str, url: str, tasks: Path, name: str, lease: float):
    """`python lessons/<lesson>/worker.py --tasks process_tasks` on the test's database."""
    dbname = conninfo.conninfo_to_dict(url)["dbname"]
    command = [sys.executable, str(lesson_dir(lesson.name) / "worker.py"), "--name", name]
    command += ["--tasks", "process_tasks", "--lease", str(lease), "--poll-interval", "0.05"]
    return subprocess.Popen(
        command,
        env={**lesson_env(server, dbname), "PYTHONPATH": str(tasks)},
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


def test_a_worker_killed_with_sigkill_has_its_task_finished_by_another(
    lesson, engine, url, pg_server_url, process_tasks
):
    lease = 1.0
    video = {"video": "v.mp4", "seconds": 60, "retry_seconds": 0.3}
    task_id = engine.enqueue("resize_video", video, backoff=0.2)
    with processes() as started:
        started.append(a := start_worker(lesson, pg_server_url, url, process_tasks, "A", lease))
        wait_until(lambda: engine.get(task_id).worker == "A", timeout=60)
        # B: idle, polling.
        started.append(b := start_worker(lesson, pg_server_url, url, process_tasks, "B", lease))
        b_is_up = (
            "SELECT 1 FROM pg_stat_activity"
            " WHERE application_name = 'B' AND datname = current_database()"
        )
        wait_until(lambda: sql(url, b_is_up), timeout=60)
        a.send_signal(signal.SIGKILL)
        assert a.wait(timeout=30) == -signal.SIGKILL
        [(killed_at,)] = sql(url, "SELECT now()")

        task = engine.wait(task_id, timeout=60)
        b.terminate()  # SIGTERM: a clean exit
        assert b.wait(timeout=30) == 0, b.stderr.read()
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


def test_max_attempts_stops_a_task_that_kills_every_worker_running_it(
    lesson, engine, url, pg_server_url, process_tasks
):
    task_id = engine.enqueue("crash_worker", max_attempts=3, backoff=0.1)
    deaths = 0
    with processes() as started:
        # Start workers one after another: each claims the task and dies with it, until a claim
        # finds the last attempt's lease expired and fails the task for good.
        while engine.get(task_id).status != "failed":
            if not started or started[-1].poll() is not None:
                name = f"w{len(started) + 1}"
                started.append(start_worker(lesson, pg_server_url, url, process_tasks, name, 0.5))
            time.sleep(0.05)
            assert len(started) <= 5, "the crash loop did not stop"
        deaths = sum(p.poll() == -signal.SIGKILL for p in started)
    task = engine.get(task_id)
    assert (task.status, task.attempts, task.error) == ("failed", 3, LEASE_EXPIRED)
    attempts = engine.attempts(task_id)
    assert [(a.attempt, a.status, a.error) for a in attempts] == [
        (n, "failed", LEASE_EXPIRED) for n in (1, 2, 3)
    ]
    assert [a.worker for a in attempts] == ["w1", "w2", "w3"] and deaths == 3


# --- timeouts ----------------------------------------------------------------------------------


def test_a_timeout_fails_the_attempt_and_stops_a_function_that_checks(lesson, engine):
    TaskTimeout = lesson.task_context.TaskTimeout
    seen: list[str] = []

    @engine.task("slow", max_attempts=1, timeout=0.3)
    def slow(input):
        try:
            lesson.task_context.current_task().sleep(30)
        except TaskTimeout as err:
            seen.append(str(err))
            raise

    task_id = engine.enqueue("slow")
    started = time.monotonic()
    lesson.worker.Worker(engine, poll_interval=0.05).run_until_idle()
    assert time.monotonic() - started < 10  # not 30
    task = engine.get(task_id)
    assert task.status == "failed"
    assert task.error == "TaskTimeout: attempt exceeded its timeout of 0.3s"
    assert seen == ["attempt exceeded its timeout of 0.3s"]


def test_a_timeout_is_enforced_even_if_the_function_never_checks(lesson, engine):
    release, returned = threading.Event(), threading.Event()

    @engine.task("stubborn", max_attempts=2, timeout=0.3, backoff=0.01)
    def stubborn(input):
        if lesson.task_context.current_task().attempt == 1:
            release.wait(30)  # a call that hangs, ignoring its context: no thread can stop it
            returned.set()
            return "too late"
        return "in time"

    task_id = engine.enqueue("stubborn")
    with running(lesson.worker.Worker(engine, slots=2, poll_interval=0.05)):
        task = engine.wait(task_id, timeout=30)
        # Attempt 1 was failed at its deadline, and attempt 2 ran while attempt 1's call still
        # hung: the task did not wait for it.
        assert task.output == "in time" and not returned.is_set()
        first, second = engine.attempts(task_id)
        assert first.error == "TaskTimeout: attempt exceeded its timeout of 0.3s"
        assert seconds(first.finished_at - first.started_at) < 5
        # The hung call returns at last, while the worker still runs: its result is dropped.
        release.set()
        assert returned.wait(10)
    # (The worker stopped only once it had dealt with the late result: the tasks in hand.)
    assert engine.get(task_id).output == "in time"


# --- scheduling, priorities, batches -----------------------------------------------------------


def test_a_scheduled_task_does_not_run_before_its_time(lesson, engine, url):
    Worker = lesson.worker.Worker
    engine.task("t")(lambda input: input)
    later = engine.enqueue("t", "later", delay=0.5)
    past = engine.enqueue("t", "past", run_at=datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC))
    worker = Worker(engine)
    with worker.connect() as conn:
        assert [t.id for t in worker.claim(conn, 10)] == [past]
    assert Worker(engine, poll_interval=0.02).run_until_idle() == 1
    task = engine.get(later)
    assert task.status == "completed"
    assert seconds(task.started_at - task.created_at) >= 0.5  # both from the database clock


def test_higher_priority_runs_first_then_the_oldest(lesson, engine):
    engine.task("t")(lambda input: input)
    ids = [engine.enqueue("t", p, priority=p) for p in (0, 10, 5, 10, -1)]
    worker = lesson.worker.Worker(engine)
    with worker.connect() as conn:
        order = [worker.claim(conn, 1)[0].id for _ in ids]
    assert order == [ids[1], ids[3], ids[2], ids[0], ids[4]]


def test_one_claim_takes_a_whole_batch_and_enqueue_many_one_statement(lesson, engine, url):
    engine.task("t")(lambda input: input)
    ids = engine.enqueue_many("t", [{"n": n} for n in range(50)])
    assert ids == list(range(ids[0], ids[0] + 50))  # in input order
    assert [engine.get(i).input for i in (ids[0], ids[-1])] == [{"n": 0}, {"n": 49}]
    worker = lesson.worker.Worker(engine, name="w", slots=20, lease=30)
    with worker.connect() as conn:
        claimed = worker.claim(conn, 20)
    assert sorted(t.id for t in claimed) == ids[:20]
    assert {(t.status, t.attempts, t.worker) for t in claimed} == {("running", 1, "w")}
    assert sql(url, "SELECT count(*) FROM task_attempts WHERE status = 'running'") == [(20,)]
    [(lease,)] = sql(
        url, "SELECT min(lease_expires_at - now()) FROM tasks WHERE status = 'running'"
    )
    assert 25 <= seconds(lease) <= 30


def test_many_workers_with_retries_and_keys_run_each_attempt_once(lesson, engine, url):
    # Four workers with three slots each, 150 tasks, a third of which fail their first attempt,
    # half of them under a key limited to 2: audited from the tasks' own log and the database.
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE audit (n int NOT NULL, attempt int NOT NULL)")
    with ConnectionPool(url, min_size=2, max_size=12, kwargs={"autocommit": True}) as audit:

        @engine.task("work", backoff=0.01)
        def work(input):
            attempt = lesson.task_context.current_task().attempt
            with audit.connection() as conn:
                conn.execute("INSERT INTO audit VALUES (%s, %s)", (input, attempt))
            time.sleep(0.005)
            if input % 3 == 0 and attempt == 1:
                raise RuntimeError("first attempt fails")
            return input

        engine.enqueue_many("work", range(0, 150, 2), concurrency_key="acme", max_running=2)
        engine.enqueue_many("work", range(1, 150, 2))
        workers = [
            lesson.worker.Worker(engine, name=f"w{i}", slots=3, poll_interval=0.01)
            for i in range(4)
        ]
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
        queries = lesson.db_queries.Querier(conn)
        per_key = {row.concurrency_key: row.most_at_once for row in queries.most_running_per_key()}
        per_worker = [row.most_at_once for row in queries.most_running_per_worker()]
    assert per_key["acme"] <= 2 and max(per_worker) <= 3


# --- cancellation ------------------------------------------------------------------------------


def test_cancelling_a_queued_task_means_it_never_runs(lesson, engine):
    calls = []
    engine.task("t")(calls.append)
    task_id = engine.enqueue("t", "x")
    assert engine.cancel(task_id) is True
    assert engine.cancel(task_id) is False  # already cancelled
    assert lesson.worker.Worker(engine).run_until_idle() == 0 and calls == []
    task = engine.get(task_id)
    assert (task.status, task.attempts) == ("cancelled", 0) and task.finished_at is not None
    with pytest.raises(lesson.engine.TaskNotFoundError, match="no task with id 999999"):
        engine.cancel(999999)


def test_cancelling_a_finished_task_changes_nothing(lesson, engine):
    engine.task("t")(lambda input: "done")
    task_id = engine.enqueue("t")
    lesson.worker.Worker(engine).run_until_idle()
    assert engine.cancel(task_id) is False
    assert (engine.get(task_id).status, engine.get(task_id).output) == ("completed", "done")


def test_cancelling_a_running_task_stops_it_at_the_next_heartbeat(lesson, engine):
    TaskCancelled = lesson.task_context.TaskCancelled
    seen: list[str] = []

    @engine.task("long")
    def long(input):
        task = lesson.task_context.current_task()
        try:
            for _ in range(600):
                task.sleep(0.05)
        except TaskCancelled as err:
            seen.append(str(err))
            raise
        return "finished"

    task_id = engine.enqueue("long")
    lease = 0.9
    with running(lesson.worker.Worker(engine, lease=lease, poll_interval=0.05)):
        wait_until(lambda: engine.get(task_id).status == "running")
        assert engine.cancel(task_id) is True
        cancelled_at = time.monotonic()
        # In the database, at once: the task and its attempt are cancelled.
        assert engine.get(task_id).status == "cancelled"
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


def test_claims_use_the_partial_indexes_however_many_tasks_finished(lesson, engine, url):
    engine.task("t")(lambda input: None)
    # A backlog: 5,000 queued tasks with a key and 5,000 without, and two scheduled for later.
    engine.enqueue_many("t", range(5000), concurrency_key="acme", max_running=2)
    engine.enqueue_many("t", range(5000))
    engine.enqueue_many("t", [1, 2], delay=60)
    worker = lesson.worker.Worker(engine, name="w", slots=100)
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
        q = lesson.db_queries
        lease = datetime.timedelta(seconds=30)
        plans = {
            "unkeyed": explain(conn, q.CLAIM_UNKEYED_TASKS, ["w", lease, ["t"], 10]),
            "keyed": explain(conn, q.CLAIM_KEY_TASKS, ["w", lease, "acme", ["t"], 10]),
            "reclaim": explain(conn, q.RECLAIM_EXPIRED_LEASES, [10]),
            "promote": explain(conn, q.PROMOTE_DUE_TASKS, [10]),
            "lock_key": explain(conn, q.LOCK_NEXT_KEY, [[], ["t"]]),
        }
    # The same partial indexes in every lesson's schema (tasks_queued, tasks_leased,
    # tasks_scheduled).
    assert "tasks_queued" in plans["unkeyed"], plans["unkeyed"]
    assert "tasks_queued" in plans["keyed"], plans["keyed"]
    assert "tasks_leased" in plans["reclaim"], plans["reclaim"]
    assert "tasks_scheduled" in plans["promote"], plans["promote"]
    assert "tasks_queued" in plans["lock_key"], plans["lock_key"]
    for name, plan in plans.items():
        assert "Seq Scan on tasks" not in plan, (name, plan)
    # The claims read the backlog in claim order, and only its first entries: no sort.
    assert "Sort" not in plans["unkeyed"] and "Sort" not in plans["keyed"], plans


def test_cleanup_deletes_old_finished_tasks_with_their_attempts_in_batches(lesson, engine, url):
    engine.task("t")(lambda input: input)
    ids = engine.enqueue_many("t", range(6))
    lesson.worker.Worker(engine, slots=6).run_until_idle()
    queued = engine.enqueue("t", "still queued")
    # Four of the six finished "two days ago"; two just now.
    sql(url, "UPDATE tasks SET finished_at = now() - interval '2 days' WHERE id = ANY(%s)", ids[:4])
    assert engine.cleanup(older_than=86400, batch=3) == 4
    remaining = [row[0] for row in sql(url, "SELECT id FROM tasks ORDER BY id")]
    assert remaining == [*ids[4:], queued]
    assert sql(url, "SELECT count(*) FROM task_attempts WHERE task_id = ANY(%s)", ids[:4]) == [(0,)]
    assert engine.cleanup(older_than=86400) == 0
    assert engine.cleanup(older_than=0) == 2  # unfinished tasks are never deleted
    assert engine.get(queued).status == "queued"


def test_cleanup_never_deletes_an_unfinished_task_however_old(lesson, engine, url):
    # Every kind of unfinished task, created a month ago: queued (behind a full key), scheduled
    # (for later, and for a retry), running, and in lesson 07 a parent suspended while its
    # child runs. Retention deletes only the finished tasks older than its cutoff.
    release = threading.Event()
    engine.task("t")(lambda input: input)
    engine.task("blocks")(lambda input: release.wait(30))
    engine.task("fails", backoff=3600, backoff_cap=3600)(raises(RuntimeError("not now")))
    old_done, new_done = engine.enqueue_many("t", ["old", "new"])
    engine.enqueue("blocks", concurrency_key="k", max_running=1)
    engine.enqueue("t", "queued behind blocks", concurrency_key="k", max_running=1)
    engine.enqueue("t", "later", delay=3600)
    engine.enqueue("fails")
    expected = {"completed": 2, "running": 1, "queued": 1, "scheduled": 2}
    if hasattr(engine, "children"):  # lesson 07 on: a durable parent, suspended on its child

        @engine.durable_task("parent")
        def parent(input):
            task = lesson.durable.current_durable_task()
            return task.wait(task.spawn("blocks"))

        engine.enqueue("parent")
        expected |= {"running": 2, "suspended": 1}

    def statuses() -> dict[str, int]:
        return dict(sql(url, "SELECT status::text, count(*) FROM tasks GROUP BY 1"))

    with running(lesson.worker.Worker(engine, slots=4, poll_interval=0.02)):
        try:
            wait_until(lambda: statuses() == expected, timeout=30)
            unfinished = sql(url, "SELECT id, status::text FROM tasks WHERE finished_at IS NULL")
            sql(url, "UPDATE tasks SET created_at = now() - interval '30 days'")
            old = "UPDATE tasks SET finished_at = now() - interval '2 days' WHERE id = %s"
            sql(url, old, old_done)

            assert engine.cleanup(older_than=86400, batch=1) == 1
            assert engine.get(old_done) is None
            assert engine.cleanup(older_than=0) == 1
            assert engine.get(new_done) is None
            remaining = sql(url, "SELECT id, status::text FROM tasks")
            assert sorted(remaining) == sorted(unfinished)
        finally:
            release.set()  # the running tasks end, and the worker can stop


# --- mistakes ----------------------------------------------------------------------------------


# Each bad option (or pair of options), and the start of the error it must get.
BAD_OPTIONS = [
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
]


def test_bad_options_are_refused_at_enqueue_and_nothing_is_written(lesson, engine, url):
    # All the cases on one database (one per case would cost a database each, per lesson).
    engine.task("t")(lambda input: input)
    for options, message in BAD_OPTIONS:
        with pytest.raises(lesson.engine.TaskOptionError) as raised:
            engine.enqueue("t", **options)
        assert str(raised.value).startswith(message), (options, str(raised.value))
    assert sql(url, "SELECT count(*) FROM tasks") == [(0,)]


def test_bad_defaults_are_refused_at_registration(lesson, engine):
    with pytest.raises(lesson.engine.TaskOptionError, match="max_attempts must be an integer"):
        engine.task("t", max_attempts=-1)


def test_current_task_outside_a_task_is_a_clear_error(lesson):
    with pytest.raises(RuntimeError, match="outside a running task"):
        lesson.task_context.current_task()


# --- main.py, as a reader runs it --------------------------------------------------------------

MAIN_LESSON = "04-task-queue-improvements"


# Lesson 04 alone: its own demo. (Later lessons' main.py tell other stories.)
def test_main_shows_retries_a_killed_worker_scheduling_and_cancellation(pg_server_url):
    dbname = f"t04_main_{XDIST}"
    try:
        result = run_main(MAIN_LESSON, pg_server_url, dbname, timeout=120)
        # What the demo left in its database, where its output alone does not prove a claim.
        if result.returncode == 0:
            tasks, attempts = recorded_by_main(database_url(pg_server_url, dbname))
    finally:
        drop_database(pg_server_url, dbname)
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
    # Each retry waited out its backoff, which doubled: at least 150 ms (half of 300 ms, the
    # jitter), then at least 300 ms.
    first, second, third = attempts[1]
    gaps = [
        seconds(b["started_at"] - a["finished_at"]) for a, b in [(first, second), (second, third)]
    ]
    assert gaps[0] >= 0.15 and gaps[1] >= 0.3, gaps

    # 2. the kill
    assert any(line.startswith("  task 2 was running on worker-A (pid ") for line in lines)
    assert any(line.startswith("  task 2 completed by worker-B, ") for line in lines)
    assert f"    attempt 1 on worker-A: failed: {LEASE_EXPIRED}" in lines
    assert any(
        line.startswith("    attempt 2 on worker-B, ") and line.endswith(": completed")
        for line in lines
    )
    assert "worker-B: task 2 attempt 1 on worker-A: " + LEASE_EXPIRED + "; retry scheduled" in out
    assert tasks[2]["output"] == {"resized": "cat.mp4", "attempt": 2}
    # Worker-A's attempt ended only once its lease (2 s from its last heartbeat) had run out,
    # and worker-B's began after it: the task never ran on both at once.
    killed, resumed = attempts[2]
    assert seconds(killed["finished_at"] - killed["started_at"]) >= 2.0
    assert resumed["started_at"] >= killed["finished_at"]

    # 3. scheduling and priorities
    assert "  worker-1 ran them in this order: 5, 6, 4, 3" in lines
    waited = next(line for line in lines if line.startswith("  task 3 started "))
    assert float(waited.split()[3].rstrip("s")) >= 2.0
    # run_at is 2 s after the enqueue on the database's clock, and the task did not start before.
    assert seconds(tasks[3]["run_at"] - tasks[3]["created_at"]) == 2.0
    assert tasks[3]["started_at"] >= tasks[3]["run_at"]

    # 4. cancellation
    assert "  cancelled task 7, scheduled for later: cancelled, never run" in lines
    assert "  cancelled task 8 while running: cancelled at once" in lines
    assert "    attempt 1 on worker-1: cancelled" in lines
    # Task 7 never started; task 8's function stopped before its end (no output), within a
    # heartbeat (667 ms, plus a margin for a loaded machine), and was not retried.
    assert (tasks[7]["attempts"], tasks[7]["started_at"], attempts[7]) == (0, None, [])
    assert (tasks[8]["status"], tasks[8]["attempts"], tasks[8]["output"]) == ("cancelled", 1, None)
    stopped = next(line for line in lines if line.startswith("  its function stopped "))
    assert float(stopped.split()[3].rstrip("s")) < 0.667 + 2.0, stopped
    assert lines[-1] == (
        "from the database: 0 scheduled, 0 queued, 0 running, 6 completed, 0 failed, 2 cancelled"
    )


def recorded_by_main(url: str) -> tuple[dict[int, dict], dict[int, list[dict]]]:
    """The demo's tasks by id, and each task's attempts, first to last, as rows (dicts)."""
    with psycopg.connect(url, row_factory=dict_row) as conn:
        tasks = {row["id"]: row for row in conn.execute("SELECT * FROM tasks")}
        attempts: dict[int, list[dict]] = {task_id: [] for task_id in tasks}
        for row in conn.execute("SELECT * FROM task_attempts ORDER BY task_id, attempt"):
            attempts[row["task_id"]].append(row)
    return tasks, attempts
