"""The failures before the fixes, lessons 05 to 07: each naive script fails as its README says.

Each script runs as a reader runs it, `python naive_x.py` in its lesson directory, on a database
of its own; the test reads its output, then the database it left behind: the `effects` table,
which the task functions write and the engine never reads, and the tasks' rows. (Lessons 02 and
03 test their naive scripts in their own test files.)
"""

from __future__ import annotations

import datetime
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from hardway import postgres
from harness import drop_database, lesson_dir, run_main

XDIST = os.environ.get("PYTEST_XDIST_WORKER", "main")


@contextmanager
def naive_run(
    server: str, lesson: str, script: str
) -> Iterator[tuple[subprocess.CompletedProcess[str], psycopg.Connection]]:
    """Run `script` in `lesson`'s directory; yield its finished process and a connection to the
    database it used, dropped afterwards."""
    dbname = f"naive{lesson[:2]}_{XDIST}"
    try:
        result = run_main(lesson, server, dbname, cwd=lesson_dir(lesson), script=script, timeout=60)
        assert result.returncode == 0, result.stderr
        assert result.stderr == ""
        with psycopg.connect(postgres.database_url(server, dbname), autocommit=True) as conn:
            yield result, conn
    finally:
        drop_database(server, dbname)


def test_naive_restart_charges_the_card_twice(pg_server_url):
    with naive_run(pg_server_url, "05-durable-event-log", "naive_restart.py") as (result, conn):
        lines = result.stdout.splitlines()
        assert lines[-1] == "the card was charged 2 times for order A-1"
        assert "task 1 completed on attempt 2 by worker-B" in lines
        # The world's view: attempt 1 (worker-A's process) reserved and charged, then died;
        # attempt 2 (this script's process) did everything again, from the top.
        effects = conn.execute("SELECT step, pid FROM effects ORDER BY at").fetchall()
        by_process: dict[int, list[str]] = {}
        for step, pid in effects:
            by_process.setdefault(pid, []).append(step)
        assert list(by_process.values()) == [
            ["reserve", "reserve", "reserve", "charge"],
            ["reserve", "reserve", "reserve", "charge", "ship", "email"],
        ]
        attempts = conn.execute(
            "SELECT attempt, worker, status::text, error FROM task_attempts ORDER BY attempt"
        ).fetchall()
        assert attempts == [
            (1, "worker-A", "failed", "lease expired (worker presumed dead)"),
            (2, "worker-B", "completed", None),
        ]
        # Nothing logged: the function called its steps directly.
        assert conn.execute("SELECT count(*) FROM task_events").fetchone() == (0,)


def test_naive_replay_hands_the_charge_a_reservation(pg_server_url):
    lesson = "06-tracking-non-determinism"
    with naive_run(pg_server_url, lesson, "naive_replay.py") as (result, conn):
        lines = result.stdout.splitlines()
        assert lines[-1] == "order A-1 shipped, no error, and the card was charged 0 times"
        # What the unchecked replay handed version 2's first three calls: version 1's events.
        recorded = "recorded by step 'reserve'"
        assert [line for line in lines if " gets event " in line] == [
            f'  step \'charge\' gets event 1, {recorded}: {{"item": "book", "price": 12}}',
            f'  step \'reserve\' gets event 2, {recorded}: {{"item": "lamp", "price": 30}}',
            f'  step \'reserve\' gets event 3, {recorded}: {{"item": "mug", "price": 8}}',
        ]
        # The task completed, and its output is the book's reservation where the payment was.
        [(status, output)] = conn.execute("SELECT status::text, output FROM tasks").fetchall()
        assert status == "completed"
        assert output == {"order": "A-1", "item": "book", "price": 12, "tracking": "track-A-1"}
        # The world's view: no charge at all, the mug reserved twice, the order shipped.
        effects = conn.execute("SELECT step, detail FROM effects ORDER BY at").fetchall()
        assert [step for step, _ in effects].count("charge") == 0
        assert effects.count(("reserve", "mug")) == 2
        assert ("ship", "book, lamp, mug") in effects
        # Version 2's own steps, appended after version 1's three reservations.
        events = conn.execute("SELECT seq, attempt, name FROM task_events ORDER BY seq").fetchall()
        assert events == [
            (1, 1, "reserve"),
            (2, 1, "reserve"),
            (3, 1, "reserve"),
            (4, 2, "reserve"),
            (5, 2, "ship"),
            (6, 2, "email"),
        ]


def test_naive_wait_deadlocks_until_its_timeout(pg_server_url):
    with naive_run(pg_server_url, "07-durable-tasks", "naive_wait.py") as (result, conn):
        lines = result.stdout.splitlines()
        assert lines[-1] == (
            "deadlock until the timeout: task 1 held the only slot for 2 s,"
            " waiting for tools that needed that slot"
        )
        tasks = conn.execute(
            "SELECT id, name, status::text, error, started_at, finished_at FROM tasks ORDER BY id"
        ).fetchall()
        (_, name, status, error, agent_started, agent_finished), *tools = tasks
        assert (name, status) == ("research_and_wait", "failed")
        assert error == "TimeoutError: task 2 is still queued after 2s"
        # The agent held the slot for the whole timeout, and no tool started until it let go.
        assert agent_finished - agent_started >= datetime.timedelta(seconds=2)
        assert [(name, status) for _, name, status, *_ in tools] == [
            ("weather", "completed"),
            ("find_parks", "completed"),
            ("read_reviews", "completed"),
        ]
        assert all(started > agent_finished for *_, started, _ in tools)
        assert "task 1 failed: TimeoutError: task 2 is still queued after 2s" in lines
        assert sum(line.endswith("it started after task 1 had failed") for line in lines) == 3
