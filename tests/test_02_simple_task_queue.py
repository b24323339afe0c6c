"""Lesson 02: a task queue whose workers claim with FOR UPDATE SKIP LOCKED run each task once.

The exactly-once claim is audited twice: from the tasks table, and from a log the task
function writes itself (an audit table in the same database), because a task that ran twice
looks perfectly normal in the tasks table (naive_claim.py shows exactly that).

These promises are kept by lesson 02 and by every later lesson: each test of the queue runs
against lessons 02 to the latest (the `lesson` fixture), since a lesson is a complete snapshot
of the engine. The tests of lesson 02's own scripts (naive_claim.py, main.py) run once.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import Counter

import psycopg
import pytest
from hardway import postgres
from harness import (
    add_finished_tasks,
    drop_database,
    import_lesson,
    lesson_dir,
    lessons_from,
    load_lesson,
    once,
    run_main,
    running,
    status_counts,
    wait_until,
)
from psycopg_pool import ConnectionPool

FIRST = "02-simple-task-queue"
XDIST = os.environ.get("PYTEST_XDIST_WORKER", "main")
# A claim that waited for a row lock instead of skipping the row fails with this, at once.
NEVER_WAIT = "SET lock_timeout = '2s'"


@pytest.fixture(params=lessons_from("02"), scope="module")
def lesson(request):
    return load_lesson(request.param)


@pytest.fixture(scope="module")
def lesson_02():
    """Lesson 02's own modules, with its naive_claim.py: for the tests of its scripts."""
    return import_lesson(FIRST, "engine", "naive_claim")


def claim_one(lesson, worker, conn):
    """The task one claim hands `worker`, or None. Lesson 02's claim takes one task; from
    lesson 03 on, `claim(conn, max_tasks)` returns a list."""
    if lesson.name == FIRST:
        return worker.claim(conn)
    claimed = worker.claim(conn, 1)
    return claimed[0] if claimed else None


def run_workers(workers) -> None:
    """Run each worker's run_until_idle in a thread of its own; all connect, then start together.

    The barrier (in `connect`, which run_until_idle calls first) makes every worker claim from
    the first task on: otherwise the first to connect could drain a small queue alone, and
    there would be no race to test.
    """
    barrier = threading.Barrier(len(workers))
    errors: list[BaseException] = []

    def work(worker) -> None:
        connect = worker.connect

        def connect_then_wait():
            conn = connect()
            barrier.wait(timeout=30)
            return conn

        worker.connect = connect_then_wait
        try:
            worker.run_until_idle()
        except BaseException as err:  # reported by the main thread, not lost in a thread
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=work, args=(w,), name=w.name) for w in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
        assert not thread.is_alive(), f"{thread.name} did not finish"
    assert not errors, errors


# --- the claim ---------------------------------------------------------------------------------


def test_many_workers_run_every_task_exactly_once(lesson, url, engine):
    workers_count, tasks_count = 8, 300
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE audit (n int NOT NULL, ran_by text NOT NULL)")

    # The function's own side effect: one audit row per call, naming the worker whose thread
    # ran it (lesson 02: the worker's own thread, "w3"; from lesson 03 on: its pool's, "w3_0").
    with ConnectionPool(url, min_size=2, max_size=8, kwargs={"autocommit": True}) as audit:

        @engine.task("double")
        def double(input):
            with audit.connection() as conn:
                conn.execute(
                    "INSERT INTO audit (n, ran_by) VALUES (%s, %s)",
                    (input["n"], threading.current_thread().name.split("_")[0]),
                )
            return input["n"] * 2

        ids = [engine.enqueue("double", {"n": n}) for n in range(tasks_count)]
        run_workers([lesson.worker.Worker(engine, name=f"w{i}") for i in range(workers_count)])

    with psycopg.connect(url) as conn:
        tasks = conn.execute(
            "SELECT id, input, status::text, output, worker, started_at <= finished_at"
            " FROM tasks ORDER BY id"
        ).fetchall()
        runs = conn.execute("SELECT n, ran_by FROM audit").fetchall()

    # From the tasks table: every task completed once, with its own output.
    assert [t[0] for t in tasks] == ids
    assert {t[2] for t in tasks} == {"completed"}
    assert all(t[3] == t[1]["n"] * 2 and t[5] for t in tasks)
    # From the function's log: exactly one call per task, made by the worker that claimed it.
    calls = Counter(n for n, _ in runs)
    assert len(runs) == tasks_count
    assert sorted(calls) == list(range(tasks_count)) and set(calls.values()) == {1}
    assert dict(runs) == {t[1]["n"]: t[4] for t in tasks}
    # The work really was shared: this was a race, not one worker doing everything.
    assert len({t[4] for t in tasks}) > 1


def test_claim_skips_a_locked_task_instead_of_waiting(lesson, url, engine):
    engine.task("noop")(lambda input: None)
    first, second = engine.enqueue("noop"), engine.enqueue("noop")
    worker = lesson.worker.Worker(engine, name="w")
    with psycopg.connect(url) as holder, worker.connect() as conn:
        # Another transaction holds the oldest task's row lock, as a claimer mid-claim would.
        holder.execute("SELECT id FROM tasks WHERE id = %s FOR UPDATE", (first,))
        conn.execute(NEVER_WAIT)  # a claim without SKIP LOCKED fails here, instead of hanging
        claimed = claim_one(lesson, worker, conn)
        assert claimed is not None and claimed.id == second
        assert claimed.status == lesson.db_models.TaskStatus.RUNNING and claimed.worker == "w"
        assert claim_one(lesson, worker, conn) is None  # the locked one is skipped, not handed out
        holder.rollback()
        assert claim_one(lesson, worker, conn).id == first


def test_claim_finds_queued_tasks_through_the_partial_index(lesson, url, engine):
    engine.task("noop")(lambda input: None)
    with psycopg.connect(url, autocommit=True) as conn:
        # 20,000 finished tasks and a few queued ones: the claim must not read the finished.
        add_finished_tasks(conn, 20_000)
        conn.execute("INSERT INTO tasks (name, input) VALUES ('noop', 'null'), ('noop', 'null')")
        conn.execute("ANALYZE tasks")
        # The claim of queued tasks: lesson 02's ClaimTask; from lesson 03 on, the tasks without
        # a concurrency key (all of these) are ClaimUnkeyedTasks'. The generated statement as it
        # is, $1 placeholders and all (PostgreSQL 16+), without its `-- name:` line.
        claim = getattr(lesson.db_queries, "CLAIM_TASK", None)
        claim = claim or lesson.db_queries.CLAIM_UNKEYED_TASKS
        rows = conn.execute("EXPLAIN (GENERIC_PLAN) " + claim.split("\n", 1)[1])
        plan = "\n".join(row[0] for row in rows)
    assert "tasks_queued" in plan, plan
    assert "Seq Scan on tasks" not in plan, plan


# --- running and recording ---------------------------------------------------------------------


def test_a_function_that_raises_leaves_its_task_failed_with_the_error(lesson, engine):
    @engine.task("explode", **once(lesson))
    def explode(input):
        raise ValueError(f"cannot handle {input!r}")

    engine.task("fine")(lambda input: "ok")
    bad = engine.enqueue("explode", [1, 2])
    good = engine.enqueue("fine")
    assert lesson.worker.Worker(engine, name="w").run_until_idle() == 2

    task = engine.get(bad)
    assert task.status == lesson.db_models.TaskStatus.FAILED
    assert task.error == "ValueError: cannot handle [1, 2]"
    assert task.output is None and task.finished_at >= task.started_at
    # The worker went on to the next task.
    assert engine.get(good).status == lesson.db_models.TaskStatus.COMPLETED
    assert engine.get(good).output == "ok"


def test_an_error_message_with_a_nul_character_is_recorded_escaped(lesson, engine):
    @engine.task("binary", **once(lesson))
    def binary(input):
        raise ValueError("bad byte \x00 here")

    task_id = engine.enqueue("binary")
    lesson.worker.Worker(engine).run_until_idle()  # PostgreSQL refuses NUL in text: no crash
    assert engine.get(task_id).error == "ValueError: bad byte \\x00 here"


def test_an_exception_without_a_message_is_recorded_by_its_type(lesson, engine):
    @engine.task("bare", **once(lesson))
    def bare(input):
        raise KeyError

    task_id = engine.enqueue("bare")
    lesson.worker.Worker(engine).run_until_idle()
    assert engine.get(task_id).error == "KeyError"


# What a task returns that cannot be stored as JSON, and the reason its task fails with.
NOT_JSON_RETURNS = [
    ({1, 2}, "Object of type set is not JSON serializable"),
    (math.nan, "Out of range float values are not JSON compliant"),
    ({"bytes": ["a\x00b"]}, "it contains a NUL character (\\x00), which PostgreSQL cannot store"),
]


def test_a_non_json_return_value_fails_the_task_with_a_clear_reason(lesson, engine):
    # One task per value, all in one run (and one database): the worker goes on after each.
    ids = []
    for n, (returned, _) in enumerate(NOT_JSON_RETURNS):
        engine.task(f"odd{n}", **once(lesson))(lambda input, returned=returned: returned)
        ids.append(engine.enqueue(f"odd{n}"))
    lesson.worker.Worker(engine).run_until_idle()
    for task_id, (_, reason) in zip(ids, NOT_JSON_RETURNS, strict=True):
        task = engine.get(task_id)
        assert task.status == lesson.db_models.TaskStatus.FAILED, reason
        assert task.error == f"return value is not JSON-serializable: {reason}"


def test_input_and_output_round_trip_as_json(lesson, engine):
    engine.task("echo")(lambda input: {"got": input})
    engine.task("nothing")(lambda input: None)
    inputs = [None, 0, "text", [1, "two", None], {"nested": {"list": [1.5, True]}}]
    ids = [engine.enqueue("echo", value) for value in inputs]
    nothing = engine.enqueue("nothing", {"a": 1})
    lesson.worker.Worker(engine).run_until_idle()
    for task_id, value in zip(ids, inputs, strict=True):
        task = engine.get(task_id)
        assert (task.status, task.input, task.output) == ("completed", value, {"got": value})
    assert engine.get(nothing).status == lesson.db_models.TaskStatus.COMPLETED
    assert engine.get(nothing).output is None
    assert engine.get(10_000) is None


# --- enqueue and registry errors ---------------------------------------------------------------


def test_enqueue_refuses_an_unknown_name_and_writes_nothing(lesson, url, engine):
    engine.task("b_task")(lambda input: None)
    engine.task("a_task")(lambda input: None)
    with pytest.raises(lesson.engine.UnknownTaskError) as caught:
        engine.enqueue("c_task", {})
    assert str(caught.value) == "no task named 'c_task' is registered (registered: a_task, b_task)"
    assert isinstance(caught.value, LookupError)
    assert status_counts(url) == {}


def test_enqueue_refuses_input_that_is_not_json_and_writes_nothing(lesson, url, engine):
    engine.task("t")(lambda input: None)
    for bad_input, reason in [
        ({"tags": {"a"}}, "Object of type set is not JSON serializable"),
        (object(), "Object of type object is not JSON serializable"),
        ([math.inf], "Out of range float values are not JSON compliant"),
        ({"a\x00b": 1}, "it contains a NUL character (\\x00), which PostgreSQL cannot store"),
    ]:
        with pytest.raises(lesson.engine.TaskInputError) as caught:
            engine.enqueue("t", bad_input)
        assert str(caught.value) == f"input of task 't' is not JSON-serializable: {reason}"
        assert isinstance(caught.value, ValueError)
    assert status_counts(url) == {}


def test_a_name_can_be_registered_only_once(engine):
    engine.task("t")(lambda input: None)
    with pytest.raises(ValueError, match="a task named 't' is already registered"):
        engine.task("t")(lambda input: None)


def test_a_worker_leaves_tasks_it_does_not_know_queued(lesson, url):
    Engine, Worker = lesson.engine.Engine, lesson.worker.Worker
    # The new deploy knows "old" and "new"; a worker still running the old code knows only "old".
    with Engine(url) as new_deploy, Engine(url) as old_deploy:
        new_deploy.task("old")(lambda input: "by new")
        new_deploy.task("new")(lambda input: "by new")
        old_deploy.task("old")(lambda input: "by old")
        new_task, old_task = new_deploy.enqueue("new"), new_deploy.enqueue("old")

        assert Worker(old_deploy, name="old").run_until_idle() == 1
        assert new_deploy.get(old_task).output == "by old"
        assert new_deploy.get(new_task).status == lesson.db_models.TaskStatus.QUEUED

        assert Worker(new_deploy, name="new").run_until_idle() == 1
        assert new_deploy.get(new_task).output == "by new"


def test_run_picks_up_new_tasks_until_stopped(lesson, engine):
    engine.task("t")(lambda input: input)
    completed = lesson.db_models.TaskStatus.COMPLETED
    with running(lesson.worker.Worker(engine, poll_interval=0.05)):
        # Enqueued while the worker is already polling an empty queue.
        ids = [engine.enqueue("t", n) for n in range(3)]
        wait_until(lambda: all(engine.get(i).status == completed for i in ids))
    assert [engine.get(i).output for i in ids] == [0, 1, 2]


# --- the failure before the fix: lesson 02's naive_claim.py ------------------------------------


def test_the_naive_claim_really_runs_tasks_twice(lesson_02, lesson_db):
    url = lesson_db(FIRST)
    calls: list[int] = []
    with lesson_02.engine.Engine(url) as engine:

        @engine.task("t")
        def t(input):
            calls.append(input)
            time.sleep(lesson_02.naive_claim.TASK_DURATION)  # as in the demo: longer than the gap
            return input

        for n in range(3):
            engine.enqueue("t", n)
        run_workers([lesson_02.naive_claim.NaiveWorker(engine, name=f"w{i}") for i in range(4)])

    # The tasks table looks exactly as healthy as with the real claim...
    assert status_counts(url) == {"completed": 3}
    # ...but the function ran more often than there were tasks.
    assert len(calls) > 3 and max(Counter(calls).values()) > 1


def test_naive_claim_py_shows_the_double_runs(pg_server_url):
    dbname = f"t02_naive_{XDIST}"
    result = run_main(FIRST, pg_server_url, dbname, cwd=lesson_dir(FIRST), script="naive_claim.py")
    drop_database(pg_server_url, dbname)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "from the database: 0 queued, 0 running, 5 completed, 0 failed" in lines
    ran_twice = int(lines[-1].split()[0])
    assert lines[-1] == f"{ran_twice} of 5 tasks ran more than once" and ran_twice >= 1
    assert "result dropped" in result.stderr


# --- lesson 02's main.py, as a reader runs it --------------------------------------------------


def test_main_runs_every_task_once_from_anywhere_and_reruns(pg_server_url):
    dbname = f"t02_main_{XDIST}"
    try:
        for cwd in (None, lesson_dir(FIRST)):
            result = run_main(FIRST, pg_server_url, dbname, cwd=cwd)
            assert result.returncode == 0, result.stderr
            assert result.stderr == ""
            lines = result.stdout.splitlines()
            assert lines[0].startswith(f"database {dbname} on ")
            assert lines[1] == (
                "refused: UnknownTaskError: no task named 'send_sms' is registered"
                " (registered: send_welcome_email)"
            )
            assert lines[2] == (
                "refused: TaskInputError: input of task 'send_welcome_email' is not"
                " JSON-serializable: Object of type set is not JSON serializable"
            )
            assert lines[3] == "enqueued 40 tasks, ids 1 to 40"
            assert lines[4] == "4 workers ran them:"
            # Who ran what: four workers, and between them every task exactly once.
            assert all(
                line.startswith(f"  worker-{n} ran ") for n, line in enumerate(lines[5:9], 1)
            )
            ran = [
                (int(task), f"worker-{n}")
                for n, line in enumerate(lines[5:9], 1)
                for task in line.split(": ")[1].split()
            ]
            assert sorted(task for task, _ in ran) == list(range(1, 41))
            assert lines[9:] == [
                "task 13 failed: ValueError: not an email address: 'user13.example.com'",
                "from the database: 0 queued, 0 running, 39 completed, 1 failed",
                "from the function's own log: 40 calls for 40 tasks, no task ran twice",
            ]
            # The demo's database (re-created by each run) says the same, and more than the
            # report prints: each task ended with its own user's outcome, on the worker listed.
            # ("No task ran twice" is the demo's in-memory log: the table cannot show it.)
            rows = query_database(
                pg_server_url,
                dbname,
                "SELECT id, input, status::text, output, error, worker,"
                " started_at <= finished_at FROM tasks ORDER BY id",
            )
            assert {row[0]: row[5] for row in rows} == dict(ran)
            for task_id, input, status, output, error, _, in_order in rows:
                assert input["user"] == task_id and in_order
                if task_id == 13:
                    assert (status, output) == ("failed", None)
                    assert error == "ValueError: not an email address: 'user13.example.com'"
                else:
                    assert (status, error) == ("completed", None)
                    assert output == {"message_id": f"<welcome-{task_id}@example.com>"}
    finally:
        drop_database(pg_server_url, dbname)


def query_database(server: str, dbname: str, query: str) -> list[tuple]:
    with psycopg.connect(postgres.database_url(server, dbname)) as conn:
        return conn.execute(query).fetchall()
