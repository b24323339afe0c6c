"""Lesson 07: durable tasks that spawn regular tasks as children and suspend while they wait,
kept by lesson 07 and every later lesson.

The wake-up race is tested deterministically: a connection of the test holds the parent's row
lock while the parent's suspension and the child's completion line up behind it, watched in
pg_stat_activity, and then lets them through in a chosen order. The crash between a child's
INSERT and its spawn event is a real one: the worker process kills itself there with SIGKILL.
"Ran once" is never taken from the logs alone: the children count their own runs, and the
demo's tools write their side effects to a table of their own.

Each test runs against every lesson from 07 to the latest (the `lesson` fixture), except those
of lesson 07's own scripts (inspect_task.py, main.py): a later lesson has its own.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import psycopg
import pytest
from hardway import postgres
from harness import (
    drop_database,
    import_lesson,
    lesson_dir,
    lesson_env,
    lessons_from,
    load_lesson,
    run_main,
    running,
    sql,
    statuses,
    wait_until,
    worker,
)
from psycopg import conninfo

LESSON = "07-durable-tasks"
XDIST = os.environ.get("PYTEST_XDIST_WORKER", "main")


@pytest.fixture(params=lessons_from("07"), scope="module")
def lesson(request):
    return load_lesson(request.param)


def spawn_events(url: str, parent: int) -> list[int]:
    rows = sql(
        url,
        "SELECT child_id FROM task_events WHERE task_id = %s AND kind = 'child_spawned'"
        " ORDER BY replay, seq",
        parent,
    )
    return [child for (child,) in rows]


# --- suspend and resume ------------------------------------------------------------------------


def test_a_parent_waiting_for_its_child_completes_on_a_single_slot(lesson, url, engine):
    current_task = lesson.task_context.current_task
    runs = Counter()

    @engine.task("add_one")
    def add_one(n):
        runs["add_one"] += 1
        return n + 1

    @engine.durable_task("parent")
    def parent(n):
        ctx = current_task()
        return ctx.wait(ctx.spawn("add_one", n)) * 10

    task_id = engine.enqueue("parent", 4)
    # ONE slot: the parent must give it up while it waits, or its child never runs.
    with running(worker(lesson, engine, slots=1)):
        task = engine.wait(task_id, timeout=30)
    assert (task.status, task.output, task.suspensions) == ("completed", 50, 1)
    assert statuses(engine.attempts(task_id)) == ["suspended", "completed"]
    (child,) = engine.children(task_id)
    assert (child.status, child.output, child.parent_id) == ("completed", 5, task_id)
    assert runs == {"add_one": 1}
    # The audit: never two tasks running at once on the one slot, from the attempts' times.
    with psycopg.connect(url) as conn:
        (most,) = lesson.db_queries.Querier(conn).most_running_per_worker()
    assert most.most_at_once == 1
    # Retention: the child goes with its parent (one task deleted, its child with it).
    assert engine.cleanup(older_than=0) == 1
    assert engine.get(task_id) is None and engine.get(child.id) is None


def test_fan_out_50_children_and_fan_in(lesson, url, engine):
    current_task = lesson.task_context.current_task
    runs = Counter()

    @engine.task("square")
    def square(n):
        runs[n] += 1
        time.sleep(0.02)
        return n * n

    @engine.durable_task("fan_out")
    def fan_out(n):
        ctx = current_task()
        handles = [ctx.spawn("square", i) for i in range(n)]
        return sum(ctx.wait_all(handles))

    task_id = engine.enqueue("fan_out", 50)
    workers = [worker(lesson, engine, f"w{i}", slots=4, lease=30) for i in range(3)]
    with running(*workers):
        task = engine.wait(task_id, timeout=60)
    assert (task.status, task.output) == ("completed", sum(i * i for i in range(50)))
    children = engine.children(task_id)
    assert [c.input for c in children] == list(range(50))
    assert all(c.status == "completed" and c.attempts == 1 for c in children)
    assert runs == {i: 1 for i in range(50)}
    assert len({c.worker for c in children}) > 1  # the children were shared out
    # The log: 50 spawns, then 50 outcomes, in spawn order, whatever order they finished in.
    events = engine.events(task_id)
    assert [(e.seq, e.kind) for e in events] == [
        *((n, "child_spawned") for n in range(1, 51)),
        *((n, "child_completed") for n in range(51, 101)),
    ]
    assert [e.child_id for e in events[50:]] == [c.id for c in children]
    assert [e.result for e in events[50:]] == [i * i for i in range(50)]
    # Woken once, when the LAST child had finished: not once per child.
    attempts = engine.attempts(task_id)
    assert statuses(attempts) == ["suspended", "completed"]
    assert attempts[1].started_at >= max(c.finished_at for c in children)
    with psycopg.connect(url) as conn:
        most = lesson.db_queries.Querier(conn).most_running_per_worker()
    assert all(row.most_at_once <= 4 for row in most)


def test_a_suspension_is_not_a_try(lesson, engine):
    """Waiting is not failing: a parent allowed two tries that suspends once, then fails once,
    has a try left. (Counted as a try, its suspension would have used up the first.)"""
    current_task = lesson.task_context.current_task
    model_calls = Counter()
    engine.task("add_one")(lambda n: n + 1)

    def summarise(found: int) -> int:
        model_calls["summarise"] += 1
        if model_calls["summarise"] == 1:
            raise ConnectionError("the model is down")
        return found * 10

    @engine.durable_task("parent", max_attempts=2, backoff=0.01)
    def parent(n):
        ctx = current_task()
        found = ctx.wait(ctx.spawn("add_one", n))
        return ctx.step("summarise", summarise, found)

    task_id = engine.enqueue("parent", 4)
    # ONE slot: the child cannot run before the parent has suspended, so it always does.
    with running(worker(lesson, engine, slots=1)):
        task = engine.wait(task_id, timeout=30)
    assert (task.status, task.output, task.error) == ("completed", 50, None)
    assert statuses(engine.attempts(task_id)) == ["suspended", "failed", "completed"]
    assert (task.attempts, task.suspensions, model_calls["summarise"]) == (3, 1, 2)


def test_a_suspended_task_does_not_count_against_its_concurrency_key(lesson, engine):
    current_task = lesson.task_context.current_task
    release = threading.Event()

    @engine.task("slow")
    def slow(input):
        release.wait(60)
        return "slow"

    @engine.task("other")
    def other(input):
        return "other"

    @engine.durable_task("parent")
    def parent(input):
        ctx = current_task()
        return ctx.wait(ctx.spawn("slow"))

    first = engine.enqueue("parent", concurrency_key="k", max_running=1)
    second = engine.enqueue("other", concurrency_key="k", max_running=1)
    with running(worker(lesson, engine, slots=3)):
        # The key allows one running task. The parent takes it, then suspends: the key's
        # place is free again, and the other task of the key runs while the parent waits.
        assert engine.wait(second, timeout=30).status == "completed"
        assert engine.get(first).status == "suspended"
        release.set()
        assert engine.wait(first, timeout=30).output == "slow"


def test_a_child_that_fails_raises_child_task_error_in_the_parent_on_every_replay(lesson, engine):
    current_task = lesson.task_context.current_task
    caught = []

    @engine.task("flaky", max_attempts=2, backoff=0.01)
    def flaky(input):
        raise ValueError(f"broken on attempt {current_task().attempt}")

    @engine.durable_task("parent", backoff=0.01)
    def parent(input):
        ctx = current_task()
        child = ctx.spawn("flaky")
        try:
            ctx.wait(child)
        except lesson.durable.ChildTaskError as err:
            caught.append((ctx.attempt, str(err)))
            ctx.step("apologise", lambda: "sorry")
        if ctx.attempt == 2:
            raise RuntimeError("crash after handling the failure")
        return "handled"

    task_id = engine.enqueue("parent")
    with running(worker(lesson, engine, slots=2)):
        task = engine.wait(task_id, timeout=30)
    (child,) = engine.children(task_id)
    message = f"child task {child.id} ('flaky') failed: ValueError: broken on attempt 2"
    # Attempt 1 suspended; attempt 2 recorded the failure and crashed; attempt 3 replayed it.
    assert caught == [(2, message), (3, message)]
    assert (task.status, task.output, task.attempts) == ("completed", "handled", 3)
    assert [(e.kind, e.error) for e in engine.events(task_id)] == [
        ("child_spawned", None),
        ("child_failed", "ValueError: broken on attempt 2"),
        ("step_completed", None),
    ]
    assert child.attempts == 2  # the child's own retries, not the parent's


def test_spawn_and_wait_misuse_is_refused_with_clear_errors(lesson, engine):
    current_task = lesson.task_context.current_task
    errors = []

    @engine.task("tool")
    def tool(input):
        return input

    @engine.durable_task("other")
    def other(input):
        return None

    @engine.durable_task("parent", max_attempts=1)
    def parent(input):
        ctx = current_task()
        for name, value in (("nope", None), ("other", None), ("tool", {1, 2})):
            try:
                ctx.spawn(name, value)
            except (LookupError, ValueError) as err:
                errors.append((ctx.attempt, f"{type(err).__name__}: {err}"))
        try:
            ctx.wait(lesson.durable.ChildHandle(12345, "tool"))
        except ValueError as err:
            errors.append((ctx.attempt, str(err)))
        return ctx.wait(ctx.spawn("tool", "fine"))

    task_id = engine.enqueue("parent")
    with running(worker(lesson, engine, slots=2)):
        task = engine.wait(task_id, timeout=30)
    if lesson.name >= "10":  # lesson 10 lets durable tasks have durable children
        unknown = [
            "UnknownTaskError: no task named 'nope' is registered (known: other, parent, tool)"
        ]
    else:
        unknown = [
            "UnknownTaskError: no task named 'nope' is registered (regular: tool)",
            "ValueError: 'other' is a durable task: children are regular tasks",
        ]
    refused = [
        *unknown,
        "TaskInputError: input of child 'tool' is not JSON-serializable:"
        " Object of type set is not JSON serializable",
        "ChildHandle(task_id=12345, name='tool') is not a child this task spawned",
    ]
    # Refused on both runs: the second, after the suspension, runs the same code again.
    assert errors == [(1, error) for error in refused] + [(2, error) for error in refused]
    assert (task.status, task.output) == ("completed", "fine")
    # The refused spawns wrote nothing (lesson 10: 'other' is a child too, spawned once).
    assert len(engine.children(task_id)) == (2 if lesson.name >= "10" else 1)


def test_a_replay_that_spawns_another_child_diverges(lesson, engine):
    current_task = lesson.task_context.current_task
    deployed = {"tool": "search"}

    for name in ("search", "browse"):
        engine.task(name)(lambda input: "done")

    @engine.durable_task("parent", backoff=0.01)
    def parent(input):
        ctx = current_task()
        ctx.spawn(deployed["tool"])
        if ctx.attempt == 1:
            deployed["tool"] = "browse"  # a deploy, between the attempt and its retry
            raise RuntimeError("crash")
        return "done"

    task_id = engine.enqueue("parent")
    with running(worker(lesson, engine, slots=2)):
        task = engine.wait(task_id, timeout=30)
    assert task.status == "failed" and task.attempts == 2
    assert "NonDeterminismError" in task.error
    assert "expected ctx.spawn() of a 'search' child" in task.error
    assert "but the code asked for ctx.spawn() of a 'browse' child" in task.error
    assert "has input" not in task.error  # other names: the inputs are not the difference
    assert [c.name for c in engine.children(task_id)] == ["search"]  # no second child


def test_nul_characters_fail_their_own_task_and_never_the_worker(lesson, engine):
    """PostgreSQL refuses NUL in text and jsonb: a result or error quoting binary data fails
    its own task with a clear reason (or is escaped) while the worker's other tasks finish."""
    engine.task("ok")(lambda input: "fine")
    engine.task("nul_output", max_attempts=1)(lambda input: {"raw": "a\x00b"})

    def nul_error(input):
        raise ValueError("bad byte \x00 here")

    engine.task("nul_error", max_attempts=1)(nul_error)
    ids = [engine.enqueue(name) for name in ("ok", "nul_output", "nul_error", "ok")]
    with running(worker(lesson, engine, slots=4)):
        tasks = [engine.wait(task_id, timeout=30) for task_id in ids]
    assert [t.status for t in tasks] == ["completed", "failed", "failed", "completed"]
    assert tasks[1].error.endswith(
        "it contains a NUL character (\\x00), which PostgreSQL cannot store"
    )
    assert tasks[2].error == "ValueError: bad byte \\x00 here"
    assert [t.attempts for t in tasks] == [1, 1, 1, 1]  # no worker died, nothing ran twice


def test_waiting_for_same_named_children_in_another_order_diverges(lesson, engine):
    """Children of one name are told apart by id on replay, not matched by name alone."""
    current_task = lesson.task_context.current_task
    swapped = {"order": False}
    engine.task("double")(lambda n: 2 * n)

    @engine.durable_task("parent", backoff=0.01)
    def parent(input):
        ctx = current_task()
        a, b = ctx.spawn("double", 1), ctx.spawn("double", 2)
        results = ctx.wait_all([b, a] if swapped["order"] else [a, b])
        if not swapped["order"]:
            swapped["order"] = True  # a deploy, between the attempt and its retry
            raise RuntimeError("crash")
        return results

    task_id = engine.enqueue("parent")
    with running(worker(lesson, engine, slots=3)):
        task = engine.wait(task_id, timeout=30)
    assert task.status == "failed", task.output  # not [4, 2]: the other child's results
    assert "NonDeterminismError" in task.error
    children = [c.id for c in engine.children(task_id)]
    assert f"the history waited for task {children[0]} here, the code for task {children[1]}" in (
        task.error
    )


# --- the wake-up race, deterministically ------------------------------------------------------


def blocked(url: str, application: str, query: str) -> bool:
    """Whether a session of `application` waits for a lock in a statement like `query`."""
    rows = sql(
        url,
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
        " AND wait_event_type = 'Lock' AND query LIKE %s AND datname = current_database()",
        application,
        f"%{query}%",
    )
    return rows[0][0] == 1


@pytest.mark.parametrize("first", ["suspension", "completion", "suspension-uncommitted"])
def test_a_child_ending_while_its_parent_suspends_always_wakes_it(
    lesson, url, engine, monkeypatch, first
):
    """The suspension and the child's end both lock the parent's row. The test lines them up
    behind a lock it holds itself (or pauses the suspension before its commit), watches them
    wait in pg_stat_activity, and lets go: every order ends with the parent completed."""
    current_task = lesson.task_context.current_task
    parent_ready, parent_go, child_go = threading.Event(), threading.Event(), threading.Event()
    decided, commit = threading.Event(), threading.Event()

    @engine.task("child")
    def child(input):
        child_go.wait(60)
        return "child done"

    @engine.durable_task("parent")
    def parent(input):
        ctx = current_task()
        handle = ctx.spawn("child")
        if ctx.attempt == 1:
            parent_ready.set()
            parent_go.wait(60)
        return ctx.wait(handle)

    suspend_task = lesson.db_queries.Querier.suspend_task

    def suspend_then_pause(self, **kwargs):
        row = suspend_task(self, **kwargs)  # decided, the row locked, not committed yet
        decided.set()
        commit.wait(60)
        return row

    if first == "suspension-uncommitted":
        monkeypatch.setattr(lesson.db_queries.Querier, "suspend_task", suspend_then_pause)

    task_id = engine.enqueue("parent")
    with running(worker(lesson, engine, "w", slots=2, lease=30)):
        assert parent_ready.wait(30)
        (child_task,) = engine.children(task_id)
        wait_until(lambda: engine.get(child_task.id).status == "running")
        if first == "suspension-uncommitted":
            # The suspension has checked (the child is running) and holds the parent's row.
            # The child's end must wait for its commit; reading the row without the lock, it
            # would see the parent running, wake no one, and leave it suspended forever.
            parent_go.set()
            assert decided.wait(30)
            child_go.set()
            # (Or, if the child's end did not wait, the child completed: the bug this catches.)
            wait_until(
                lambda: (
                    blocked(url, "w", "LockTasks")
                    or engine.get(child_task.id).status == "completed"
                ),
                timeout=30,
            )
            commit.set()
        else:
            with psycopg.connect(url) as holder:
                # FOR SHARE: the parent's spawn and outcome reads (FOR SHARE too) pass; the
                # locks of the suspension (LockRunningTask) and the child's end (LockTasks) wait.
                holder.execute("SELECT 1 FROM tasks WHERE id = %s FOR SHARE", (task_id,))
                if first == "suspension":
                    parent_go.set()
                    wait_until(lambda: blocked(url, "w-steps", "LockRunningTask"), timeout=30)
                    child_go.set()
                    wait_until(lambda: blocked(url, "w", "LockTasks"), timeout=30)
                else:
                    child_go.set()
                    wait_until(lambda: blocked(url, "w", "LockTasks"), timeout=30)
                    parent_go.set()
                    wait_until(
                        lambda: (
                            blocked(url, "w-steps", "RecordChildOutcomes")
                            or blocked(url, "w-steps", "LockRunningTask")
                        ),
                        timeout=30,
                    )
                holder.rollback()  # let go: the one that asked first gets the lock first
        task = engine.wait(task_id, timeout=30)

    assert (task.status, task.output) == ("completed", "child done")
    if first == "completion":
        # The child's end committed first; the suspension, checking in a new statement once
        # it held the lock, saw it finished, did not suspend, and went on in the same attempt.
        assert statuses(engine.attempts(task_id)) == ["completed"]
    else:
        # It suspended (the child had not finished when it held the lock); the child's end,
        # which waited for that lock, found it suspended and woke it.
        assert statuses(engine.attempts(task_id)) == ["suspended", "completed"]
    assert engine.get(child_task.id).attempts == 1


# --- spawning is idempotent: a real crash between the child's INSERT and its event -----------

CRASH_TASKS = '''
"""Tasks for the crash test: a durable task that plans, then spawns three children."""
from task_context import current_task


def double(n):
    return n * 2


def gather(input):
    ctx = current_task()
    ctx.step("plan", lambda: [0, 1, 2])
    handles = [ctx.spawn("double", n) for n in (0, 1, 2)]
    return ctx.wait_all(handles)


def register(engine):
    engine.task("double")(double)
    engine.durable_task("gather", backoff=0.05)(gather)
'''


def test_a_crash_between_the_child_and_its_spawn_event_leaves_neither(
    lesson, engine, url, pg_server_url, tmp_path
):
    dbname = conninfo.conninfo_to_dict(url)["dbname"]
    (tmp_path / "crash_tasks.py").write_text(CRASH_TASKS)
    env = dict(lesson_env(pg_server_url, dbname), PYTHONPATH=str(tmp_path))

    def worker_process(name: str, **extra_env: str) -> subprocess.Popen:
        command = [sys.executable, str(lesson_dir(lesson.name) / "worker.py"), "--name", name]
        command += ["--tasks", "crash_tasks", "--lease", "2", "--poll-interval", "0.05"]
        command += ["--slots", "2"]
        return subprocess.Popen(
            command, env={**env, **extra_env}, stderr=subprocess.PIPE, text=True
        )

    engine.task("double")(lambda n: None)  # the test process only enqueues
    engine.durable_task("gather")(lambda input: None)
    task_id = engine.enqueue("gather")
    # worker-A kills itself at its first spawn, after the child's INSERT, before the event's:
    # in the middle of the transaction.
    first = worker_process("worker-A", DURABLE_CRASH_AT="spawn")
    first.communicate(timeout=60)
    assert first.returncode == -signal.SIGKILL
    # What it left: the plan, and no child. The INSERT did happen: it used up an id.
    assert [e.name for e in engine.events(task_id)] == ["plan"]
    assert engine.children(task_id) == []
    assert engine.get(task_id).status == "running"  # until its lease runs out

    second = worker_process("worker-B")
    try:
        task = engine.wait(task_id, timeout=60)
    finally:
        second.terminate()
        second.communicate(timeout=30)
    children = engine.children(task_id)
    assert (task.status, task.output) == ("completed", [0, 2, 4])
    # Three children, one per spawn event, and the first one's id is not task_id + 1: that id
    # went to the INSERT that worker-A's death rolled back.
    assert [c.input for c in children] == [0, 1, 2]
    assert spawn_events(url, task_id) == [c.id for c in children]
    assert children[0].id == task_id + 2
    assert all(c.status == "completed" and c.attempts == 1 for c in children)
    assert statuses(engine.attempts(task_id)) == ["failed", "suspended", "completed"]


# --- operator actions: retry keeps the children, replay spawns new ones, cancel propagates ----


def test_retry_keeps_the_children_and_replay_spawns_new_ones(lesson, url, engine):
    current_task = lesson.task_context.current_task
    runs = Counter()
    model = {"up": False}

    @engine.task("tool")
    def tool(n):
        runs[n] += 1
        return n * 10

    def summarise(results: list) -> int:
        if not model["up"]:
            raise ConnectionError("the model is down")
        return sum(results)

    @engine.durable_task("agent", max_attempts=1)
    def agent(input):
        ctx = current_task()
        results = ctx.wait_all([ctx.spawn("tool", n) for n in (1, 2)])
        return ctx.step("summarise", summarise, results)

    task_id = engine.enqueue("agent")
    with running(worker(lesson, engine, slots=2)):
        failed = engine.wait(task_id, timeout=30)
        assert failed.status == "failed"  # one try: the suspension did not count
        error = "StepError: step 'summarise' failed: ConnectionError: the model is down"
        assert failed.error == error
        assert (runs, len(engine.children(task_id))) == ({1: 1, 2: 1}, 2)

        model["up"] = True
        engine.retry(task_id)
        retried = engine.wait(task_id, timeout=30)
        # The log was kept: the spawns and the waits replayed, no tool ran again.
        assert (retried.status, retried.output) == ("completed", 30)
        assert (runs, len(engine.children(task_id))) == ({1: 1, 2: 1}, 2)

        engine.replay(task_id)
        replayed = engine.wait(task_id, timeout=30)
        # A new history: two new children, and every tool ran again, once.
        assert (replayed.status, replayed.output) == ("completed", 30)
        children = engine.children(task_id)
        assert (runs, len(children)) == ({1: 2, 2: 2}, 4)

    histories = Counter((e.replay, e.kind) for e in engine.events(task_id))
    for history in (0, 1):
        assert histories[(history, "child_spawned")] == 2
        assert histories[(history, "child_completed")] == 2
    assert spawn_events(url, task_id) == [c.id for c in children]
    assert statuses(engine.attempts(task_id)) == [
        "suspended", "failed",  # the first run
        "completed",  # the retry
        "suspended", "completed",  # the replay
    ]  # fmt: skip


def test_cancelling_a_parent_cancels_its_unfinished_children(lesson, url, engine):
    current_task = lesson.task_context.current_task
    stopped = []

    @engine.task("quick")
    def quick(input):
        return "quick"

    @engine.task("flaky", backoff=60)
    def flaky(input):
        raise ConnectionError("down")  # then waits a minute for its retry: scheduled

    @engine.task("blocker")
    def blocker(input):
        try:
            current_task().sleep(60)  # wakes up, and raises, when its attempt is stopped
        except lesson.task_context.TaskCancelled as err:
            stopped.append(str(err))
            raise

    @engine.task("later")
    def later(input):
        return "later"

    @engine.durable_task("parent")
    def parent(input):
        ctx = current_task()
        ctx.wait(ctx.spawn("quick"))
        ctx.wait_all([ctx.spawn(name) for name in ("flaky", "blocker", "later")])

    task_id = engine.enqueue("parent")
    # One slot: after quick, flaky runs and fails, blocker runs and blocks, later stays queued.
    with running(worker(lesson, engine, slots=1, lease=3)):
        wait_until(
            lambda: (
                statuses(engine.children(task_id))
                == ["completed", "scheduled", "running", "queued"]
            ),
            timeout=30,
        )
        assert engine.get(task_id).status == "suspended"
        # Retention leaves a finished child alone while its parent has not finished.
        assert engine.cleanup(older_than=0) == 0
        assert engine.cancel(task_id) is True
        assert engine.cancel(task_id) is False  # finished already
        # The blocker's worker learns at its next heartbeat (every second here), and stops it.
        wait_until(lambda: stopped, timeout=30)

    assert engine.get(task_id).status == "cancelled"
    children = engine.children(task_id)
    assert statuses(children) == ["completed", "cancelled", "cancelled", "cancelled"]
    assert stopped == [f"task {children[2].id} was cancelled"]
    assert statuses(engine.attempts(children[2].id)) == ["cancelled"]
    assert engine.attempts(children[3].id) == []  # never ran


def test_cancelling_a_child_wakes_its_parent_with_child_task_error(lesson, engine):
    current_task = lesson.task_context.current_task

    @engine.task("slow")
    def slow(input):
        current_task().sleep(60)

    @engine.durable_task("parent")
    def parent(input):
        ctx = current_task()
        try:
            return ctx.wait(ctx.spawn("slow"))
        except lesson.durable.ChildTaskError as err:
            return f"gave up: {err.error}"

    task_id = engine.enqueue("parent")
    with running(worker(lesson, engine, slots=2, lease=3)):
        wait_until(lambda: engine.get(task_id).status == "suspended", timeout=30)
        (child,) = engine.children(task_id)
        wait_until(lambda: engine.get(child.id).status == "running", timeout=30)
        assert engine.cancel(child.id) is True
        task = engine.wait(task_id, timeout=30)
    assert (task.status, task.output) == ("completed", "gave up: cancelled")
    assert engine.get(child.id).status == "cancelled"


# --- under concurrency: cancels, completions and heartbeats never deadlock --------------------


def test_concurrent_parents_children_and_cancels_audited(lesson, url, engine):
    current_task = lesson.task_context.current_task
    parents, per_parent = 12, 4

    @engine.task("work")
    def work(n):
        current_task().sleep(0.01 * (n % 5))
        return n

    @engine.durable_task("parent")
    def parent(n):
        ctx = current_task()
        return sum(ctx.wait_all([ctx.spawn("work", n * 10 + i) for i in range(per_parent)]))

    ids = [engine.enqueue("parent", n) for n in range(parents)]
    workers = [worker(lesson, engine, f"w{i}", slots=3, lease=5) for i in range(3)]
    with running(*workers):
        for n, task_id in enumerate(ids):
            if n % 3 == 0:  # cancel a third of them, as soon as they have children
                wait_until(lambda task_id=task_id: engine.children(task_id), timeout=30)
                engine.cancel(task_id)
        done = [engine.wait(task_id, timeout=60) for task_id in ids]
        # A cancelled running child stops at its worker's next heartbeat.
        wait_until(lambda: not sql(url, "SELECT 1 FROM tasks WHERE finished_at IS NULL"))

    for n, task in enumerate(done):
        children = engine.children(task.id)
        assert spawn_events(url, task.id) == [c.id for c in children]
        if n % 3 == 0:
            assert task.status == "cancelled"
            assert set(statuses(children)) <= {"completed", "cancelled"}
        else:
            assert (task.status, len(children)) == ("completed", per_parent)
            assert task.output == sum(n * 10 + i for i in range(per_parent))
    with psycopg.connect(url) as conn:
        most = lesson.db_queries.Querier(conn).most_running_per_worker()
    assert all(row.most_at_once <= 3 for row in most)


# --- lesson 07's own scripts: inspect_task.py and main.py -------------------------------------
# Single-lesson: what they print is lesson 07's story; a later lesson's scripts tell its own.


def lesson_07_with_inspect_task():
    """Lesson 07's engine and inspect_task.py, from one import, so that their classes match."""
    return import_lesson(LESSON, "engine", "worker", "task_context", "inspect_task")


def test_describe_prints_the_timeline_with_children(lesson_db):
    lesson = lesson_07_with_inspect_task()
    current_task = lesson.task_context.current_task
    with lesson.engine.Engine(lesson_db(LESSON)) as engine:

        @engine.task("lookup", max_attempts=2, backoff=0.01)
        def lookup(word):
            if word == "flaky" and current_task().attempt == 1:
                raise ConnectionError("dictionary offline")
            return len(word)

        @engine.durable_task("count")
        def count(words):
            ctx = current_task()
            words = ctx.step("split", str.split, words)
            return sum(ctx.wait_all([ctx.spawn("lookup", word) for word in words]))

        task_id = engine.enqueue("count", "durable flaky")
        with running(worker(lesson, engine, slots=1)):
            engine.wait(task_id, timeout=30)
        describe = lesson.inspect_task.describe
        text = re.sub(r"\+\d+\.\d{3}s", "+T", describe(engine, task_id))
        child = describe(engine, task_id + 2).splitlines()
    assert text.splitlines() == [
        f"task {task_id} count (durable task): completed on attempt 2 by w: 12",
        '  input: "durable flaky"',
        "  +T  attempt 1 started on w",
        '  +T     1 step split: ["durable", "flaky"]',
        f"  +T     2 spawned task {task_id + 1} lookup",
        f"  +T     3 spawned task {task_id + 2} lookup",
        "  +T  attempt 1 suspended",
        "  +T  attempt 2 started on w",
        f"  +T     4 waited: task {task_id + 1} lookup completed: 7",
        f"  +T     5 waited: task {task_id + 2} lookup completed: 5",
        "  +T  attempt 2 completed",
        "  children: 2",
        f"    task {task_id + 1} lookup: completed on attempt 1 by w",
        f"    task {task_id + 2} lookup: completed on attempt 2 by w"
        " (after attempt 1 on w: ConnectionError: dictionary offline)",
    ]
    assert child[:3] == [
        f"task {task_id + 2} lookup (task): completed on attempt 2 by w: 5",
        f"  child of task {task_id}",
        '  input: "flaky"',
    ]


def test_inspect_task_cli_reports_a_missing_task(lesson_db, pg_server_url):
    dbname = conninfo.conninfo_to_dict(lesson_db(LESSON))["dbname"]
    result = subprocess.run(
        [sys.executable, str(lesson_dir(LESSON) / "inspect_task.py"), "999"],
        env=lesson_env(pg_server_url, dbname),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (result.returncode, result.stderr.strip()) == (1, "error: no task with id 999")


def side_effects(url: str) -> dict[int, Counter[str]]:
    """What the demo's model and tools did, per task, as they wrote it in their table."""
    effects: dict[int, Counter[str]] = {}
    for task_id, step in sql(url, "SELECT task_id, step FROM effects"):
        effects.setdefault(task_id, Counter())[step] += 1
    return effects


def test_main_kill_resume_retry_replay_cancel_and_rerun(pg_server_url):
    dbname = f"t07_main_{XDIST}"
    try:
        for cwd in (None, lesson_dir(LESSON)):
            result = run_main(LESSON, pg_server_url, dbname, cwd=cwd)
            assert result.returncode == 0, result.stdout + result.stderr
            assert result.stderr == ""
            lines = result.stdout.splitlines()
            assert lines[0].startswith(f"database {dbname} on ")
            expected = [
                "  task 1 research: suspended; children: weather completed, find_parks"
                " completed, read_reviews running",
                "  agent failed after 2 attempts: StepError: step 'summarise' failed:"
                " ConnectionError: the language model is unavailable",
                '  agent completed on attempt 3: "sunny, 21 C in Edinburgh: go to Holyrood Park"',
                '  agent completed on attempt 5: "sunny, 21 C in Edinburgh: go to Holyrood Park"',
                "  task 8 research: cancelled; children: weather completed, find_parks"
                " completed, read_reviews cancelled",
                "  worker-B: task 4 attempt 1 on worker-A: lease expired (worker presumed dead);"
                " retry scheduled",
                "  worker-B: task 1 attempt 3: 7 events replayed from the log, 1 run",
                "  6 children spawned by 2 histories, 6 tool runs: each child ran once",
            ]
            for line in expected:
                assert line in lines, line
            assert lines[-1] == (
                "from the database: 0 scheduled, 0 queued, 0 running, 0 suspended, 9 completed,"
                " 0 failed, 2 cancelled"
            )
            # What the demo says happened, checked against what did: the tasks it made, and
            # the side effects its model and tools wrote themselves (the effects table), which
            # no log can fake: each history planned once (the resumed, retried and replayed
            # attempts replayed the plan from the log), the model was down once, each child's
            # tool ran once, and the cancelled one's (task 11's) never.
            url = postgres.database_url(pg_server_url, dbname)
            tools = ["weather", "find_parks", "read_reviews"]
            assert sql(url, "SELECT id, name, parent_id FROM tasks ORDER BY id") == [
                (1, "research", None),
                *((id, name, 1) for id, name in zip(range(2, 8), tools * 2, strict=True)),
                (8, "research", None),
                *((id, name, 8) for id, name in zip(range(9, 12), tools, strict=True)),
            ]
            assert side_effects(url) == {
                1: {"plan": 2, "model down": 1, "summarise": 2},
                **{id: {name: 1} for id, name in zip(range(2, 8), tools * 2, strict=True)},
                8: {"plan": 1},
                9: {"weather": 1},
                10: {"find_parks": 1},
            }
    finally:
        drop_database(pg_server_url, dbname)
