"""A database restart is an outage, not a crash: lesson 04's promise, kept by every later lesson.

One PostgreSQL server owned by this test (never the shared one), one database per lesson from
04 to the latest, and worker PROCESSES for each, running a few hundred tasks. Mid-run the server
crashes and restarts (`pg_ctl restart -m immediate`), then later stops for 10 seconds and starts
again. Every task must complete, no worker process may exit, and the audits must still hold:
no attempt ran twice, no worker ran more tasks at once than its slots, and each durable task
recorded each of its steps once.

One server for all the lessons, so that the 10-second outage is paid once, not once per lesson.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import psycopg
import pytest
from hardway.postgres import recreate_database
from harness import lesson_dir, lesson_env, lessons_from, load_lesson, sql, wait_until
from pgserver import OwnedServer

TASKS = 150  # per lesson
WORKERS, SLOTS = 2, 3  # per lesson
LEASE = 5.0  # seconds: a restart is shorter, the 10-second stop longer

OUTAGE_TASKS = """
import os
import time

from task_context import current_task

AUDIT = os.environ["AUDIT_FILE"]


def audit(line):
    with open(AUDIT, "a") as f:  # one write per line: appends never interleave
        f.write(line + "\\n")


def work(n):
    task = current_task()
    time.sleep(0.02)
    audit(f"{task.task_id} {task.attempt}")
    return n


def durable_work(n):
    task = current_task()
    first = task.step("first", lambda: n + 1)
    time.sleep(0.02)
    second = task.step("second", lambda: first * 2)
    audit(f"{task.task_id} {task.attempt}")
    return second


def register(engine):
    if os.environ["DURABLE"] == "1":
        register = getattr(engine, "durable_task", engine.task)
        register("work", max_attempts=10, backoff=0.05)(durable_work)
    else:
        engine.task("work", max_attempts=10, backoff=0.05)(work)
"""


def lesson_database(server: OwnedServer, lesson, prefix: str) -> tuple[str, str]:
    """A database on `server` with the lesson's schema: (its name, its URL)."""
    dbname = f"{prefix}_{lesson.name[:2]}"
    schema = (lesson_dir(lesson.name) / "sql" / "schema.sql").read_text()
    return dbname, recreate_database(server.url(), dbname, schema)


def start_worker(server: OwnedServer, dbname: str, lesson, *options: str, **env: str):
    """`python worker.py OPTIONS...` of the lesson, on `dbname`; stderr kept for its log."""
    command = [sys.executable, str(lesson_dir(lesson.name) / "worker.py"), *options]
    return subprocess.Popen(
        command,
        env={**lesson_env(server.url(), dbname), **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def check_running(workers: list[tuple[str, subprocess.Popen]]) -> None:
    """Fail, showing its log, if a worker process has exited: none may die of an outage."""
    for lesson_name, process in workers:
        if process.poll() is not None:
            _, log = process.communicate()
            raise AssertionError(f"a worker of {lesson_name} exited ({process.returncode}):\n{log}")


def completed(url: str) -> int:
    try:
        return sql(url, "SELECT count(*) FROM tasks WHERE status = 'completed'")[0][0]
    except psycopg.OperationalError:
        return 0  # the server is down


def test_workers_ride_out_a_crash_restart_and_a_ten_second_outage(tmp_path: Path):
    (tmp_path / "outage_tasks.py").write_text(OUTAGE_TASKS)
    lessons = [load_lesson(name) for name in lessons_from("04")]
    workers: list[tuple[str, subprocess.Popen]] = []
    with OwnedServer() as server:
        urls = {}
        client = None
        # Everything in the try: workers started before a failure are stopped too.
        try:
            for lesson in lessons:
                dbname, urls[lesson.name] = lesson_database(server, lesson, "outage")
                durable = hasattr(lesson, "durable")
                with lesson.engine.Engine(urls[lesson.name]) as engine:
                    register = (
                        getattr(engine, "durable_task", engine.task) if durable else engine.task
                    )
                    register("work")(lambda n: n)
                    engine.enqueue_many("work", range(TASKS))
                for n in range(WORKERS):
                    options = ["--name", f"w{n}", "--tasks", "outage_tasks", "--slots", str(SLOTS)]
                    options += ["--lease", str(LEASE), "--poll-interval", "0.05"]
                    process = start_worker(
                        server,
                        dbname,
                        lesson,
                        *options,
                        PYTHONPATH=str(tmp_path),
                        AUDIT_FILE=str(tmp_path / f"audit_{lesson.name[:2]}"),
                        DURABLE="1" if durable else "0",
                    )
                    workers.append((lesson.name, process))

            def done_everywhere(share: float) -> bool:
                return all(completed(url) >= TASKS * share for url in urls.values())

            def all_connected() -> bool:
                names = [f"w{n}" for n in range(WORKERS)]
                query = (
                    "SELECT count(DISTINCT application_name) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND application_name = ANY(%s)"
                )
                return all(sql(url, query, names)[0][0] == WORKERS for url in urls.values())

            # Every worker past its start-up and connected, before the database goes: a worker that
            # starts while the database is away exits at once with a one-line error, by design, and
            # on a loaded machine the last one may start after the others have done the first share.
            wait_until(all_connected, timeout=60)

            # A client whose pool holds a connection from before the restart.
            client = lessons[0].engine.Engine(urls[lessons[0].name])
            assert client.get(1) is not None
            wait_until(lambda: done_everywhere(0.2), timeout=120)
            server.restart("immediate")  # a crash: every connection breaks, recovery runs
            # Its first call after the restart works: the pool replaces the broken connection.
            assert client.get(1) is not None

            wait_until(lambda: done_everywhere(0.5), timeout=120)
            server.stop()
            for lesson in lessons:
                # A call during the outage fails, soon, with the cause in its message.
                with lesson.engine.Engine(urls[lesson.name], connect_timeout=0.5) as engine:
                    engine.task("work")(lambda n: n)
                    with pytest.raises(
                        lesson.outages.DatabaseUnavailableError, match="database unavailable: "
                    ) as unavailable:
                        engine.enqueue("work", -1)
                    assert "connect" in str(unavailable.value), unavailable.value
            time.sleep(10)  # the outage itself: ten seconds without a database
            check_running(workers)
            server.start()

            wait_until(lambda: done_everywhere(1.0), timeout=120)
            check_running(workers)
        finally:
            if client is not None:
                client.close()
            for _, process in workers:
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
            logs = {}
            for _, process in workers:
                try:
                    _, logs[process.pid] = process.communicate(timeout=60)
                except subprocess.TimeoutExpired:
                    process.kill()
                    _, logs[process.pid] = process.communicate()

        for lesson_name, process in workers:
            log = logs[process.pid]
            assert process.returncode == 0, (lesson_name, log)
            assert "Traceback" not in log, (lesson_name, log)
            assert "database unavailable" in log and "database back after" in log, log
        for lesson in lessons:
            audit_lesson(lesson, urls[lesson.name], tmp_path / f"audit_{lesson.name[:2]}")


def audit_lesson(lesson, url: str, audit_file: Path) -> None:
    """Every task completed; no attempt ran its function twice; slots and steps held."""
    name = lesson.name
    assert sql(url, "SELECT status::text, count(*) FROM tasks GROUP BY 1") == [
        ("completed", TASKS)
    ], name
    # What each function returns for input n: n, or (n + 1) * 2 from its two durable steps.
    expected = "((input::int + 1) * 2)" if hasattr(lesson, "durable") else "input::int"
    wrong = f"SELECT count(*) FROM tasks WHERE output::int <> {expected}"
    assert sql(url, wrong) == [(0,)], name
    ran = Counter(tuple(map(int, line.split())) for line in audit_file.read_text().splitlines())
    twice = [attempt for attempt, times in ran.items() if times > 1]
    assert not twice, (name, twice)
    # The attempt that completed each task is one whose function ran to its end.
    final = set(sql(url, "SELECT id, attempts FROM tasks"))
    assert final <= set(ran), (name, sorted(final - set(ran))[:5])
    # No worker ran more functions at once than its slots: in the table, among the attempts
    # whose function ran (the audit file). Not among all of them: a claim that committed just
    # as the crash came, its answer lost, left its worker holding tasks it never heard of,
    # running in the table and on no slot, until their leases ran out and a claim took them
    # back. Lesson 03's audit (MostRunningPerWorker), without those.
    attempts = sql(
        url, "SELECT task_id, attempt, worker, started_at, finished_at FROM task_attempts"
    )
    changes = sorted(
        (worker, at, change)
        for task_id, attempt, worker, started, finished in attempts
        if (task_id, attempt) in ran
        for at, change in ((started, 1), (finished, -1))
    )
    most: Counter[str] = Counter()
    running_now: Counter[str] = Counter()
    for worker, _, change in changes:  # in time order; at one instant, ends (-1) first
        running_now[worker] += change
        most[worker] = max(most[worker], running_now[worker])
    assert all(n <= SLOTS for n in most.values()), (name, most)
    # No two attempts of one task ever overlapped: each started after the one before ended.
    overlapping = sql(
        url,
        "SELECT count(*) FROM task_attempts AS a JOIN task_attempts AS b"
        " ON a.task_id = b.task_id AND b.attempt = a.attempt + 1"
        " WHERE b.started_at < a.finished_at",
    )
    assert overlapping == [(0,)], name
    if hasattr(lesson, "durable"):
        # Each step of each task in its log once, in order, whatever the attempts.
        steps = sql(
            url,
            "SELECT task_id, array_agg(name ORDER BY seq) FROM task_events GROUP BY task_id",
        )
        assert len(steps) == TASKS and all(names == ["first", "second"] for _, names in steps)


SLOW_TASKS = """
import time


def register(engine):
    engine.task("slow")(lambda seconds: time.sleep(seconds))
"""


def test_sigterm_stops_a_worker_during_an_outage_once_its_leases_have_run_out(tmp_path: Path):
    """A stopping worker waits for the database to record what it holds, but not forever."""
    (tmp_path / "slow_tasks.py").write_text(SLOW_TASKS)
    lessons = [load_lesson(name) for name in lessons_from("04")]
    workers: list[tuple[str, subprocess.Popen]] = []
    with OwnedServer() as server:
        urls = {}
        try:
            # Inside the try: workers started before a failure here are killed too.
            for lesson in lessons:
                dbname, urls[lesson.name] = lesson_database(server, lesson, "stopping")
                with lesson.engine.Engine(urls[lesson.name]) as engine:
                    engine.task("slow")(lambda seconds: None)
                    # Three seconds: every lesson's worker is running its task before the first
                    # task ends, however late the last worker process starts on a loaded
                    # machine.
                    engine.enqueue("slow", 3.0)
                options = ["--name", "w", "--tasks", "slow_tasks", "--lease", "2"]
                process = start_worker(server, dbname, lesson, *options, PYTHONPATH=str(tmp_path))
                workers.append((lesson.name, process))
            running = "SELECT count(*) FROM tasks WHERE status = 'running'"
            wait_until(lambda: all(sql(url, running) == [(1,)] for url in urls.values()))
            server.stop()
            stopped_at = time.monotonic()
            for _, process in workers:
                process.send_signal(signal.SIGTERM)
            logs = {name: process.communicate(timeout=30)[1] for name, process in workers}
            took = time.monotonic() - stopped_at
        finally:
            for _, process in workers:
                if process.poll() is None:
                    process.kill()
                    process.communicate()
    for name, process in workers:
        assert process.returncode == 0, (name, logs[name])
        assert "lease ran out during the outage; result dropped" in logs[name], logs[name]
        assert "Traceback" not in logs[name], logs[name]
    # The task took three seconds, the lease was two: well under ten, on a loaded machine too.
    assert took < 10, took


@pytest.mark.parametrize("lesson_name", lessons_from("04"))
def test_an_idle_worker_waits_quietly_while_the_database_is_away(lesson_name: str):
    """While it cannot connect, a worker tries again after a backoff, and does nothing between
    its tries: no busy loop turning a CPU into heat for the length of the outage."""
    lesson = load_lesson(lesson_name)
    # A server that is not there: the socket directory does not exist, so every connection
    # fails at once, as when the server is down.
    url = "postgresql://postgres@/postgres?host=/nonexistent/hardway-outage&connect_timeout=1"
    with lesson.engine.Engine(url, connect_timeout=1) as engine:
        engine.task("never")(lambda input: None)
        # Polling twice a second: lessons 04-07 wake at each poll, even with no database.
        worker = lesson.worker.Worker(engine, "w", poll_interval=0.5)
        turns = []
        wait = worker._wait

        def counted_wait(*args, **kwargs):
            turns.append(time.monotonic())
            return wait(*args, **kwargs)

        worker._wait = counted_wait
        stop = threading.Event()
        thread = threading.Thread(target=worker.run, args=(stop,))
        thread.start()
        try:
            wait_until(lambda: len(turns) >= 2)
            stop.wait(1.0)  # the outage goes on: a second in which the loop should mostly sleep
            during = [at for at in turns if at >= turns[0] + 0.1]
        finally:
            stop.set()
            thread.join(timeout=10)
    assert not thread.is_alive()
    # One turn per reconnection attempt, whose backoff grows from a fraction of a second: a
    # handful. The busy loop made tens of thousands.
    assert len(during) < 30, len(during)
