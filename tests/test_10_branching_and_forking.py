"""Lesson 10's promises, kept by lesson 10 and every later lesson: forks, history checks, and
durable children.

- a fork at n copies the first n events into a new task, and runs none of their steps again;
  the original keeps its history and output; each knows of the other;
- a fork's children are its own: a child whose outcome the copy holds is copied as it ended, a
  child spawned but not yet awaited at the fork point runs again;
- only a finished task without a parent is forked;
- check_histories replays today's code against recorded histories, writes nothing, runs no
  step, says where a task would diverge, and exits 1 when one would;
- durable tasks spawn durable children, three levels deep; a cancel reaches the grandchildren.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter

import pytest
from hardway import postgres
from harness import (
    drop_database,
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

TABLES = ("tasks", "task_attempts", "task_events", "operator_actions", "sent_events")


@pytest.fixture(params=lessons_from("10"), scope="module")
def lesson(request):
    return load_lesson(request.param)


def five_steps(engine, current_durable_task, runs: Counter, bug: dict) -> None:
    @engine.durable_task("order", max_attempts=1)
    def order(input):
        ctx = current_durable_task()

        def step(name, value):
            runs[name] += 1
            return value

        a = ctx.step("one", step, "one", 1)
        b = ctx.step("two", step, "two", a + 1)
        c = ctx.step("three", step, "three", b + 1)
        d = ctx.step("four", step, "four", c * (100 if bug["on"] else 2))
        return ctx.step("five", step, "five", d + 1)


def counts(url: str) -> dict[str, int]:
    return {table: sql(url, f"SELECT count(*) FROM {table}")[0][0] for table in TABLES}


# --- fork --------------------------------------------------------------------------------


def test_a_fork_at_3_runs_steps_4_and_5_only_and_leaves_the_original_alone(
    lesson, engine, url, current_durable_task
):
    runs: Counter = Counter()
    bug = {"on": True}
    five_steps(engine, current_durable_task, runs, bug)
    with running(worker(lesson, engine)):
        original = engine.enqueue("order")
        assert engine.wait(original, timeout=30).output == 301
        history = [(e.seq, e.name, e.result) for e in engine.events(original)]
        bug["on"] = False  # the fix
        fork = engine.fork(original, at=3)
        done = engine.wait(fork, timeout=30)
    assert (done.status, done.output) == ("completed", 7)
    # Steps 1-3 ran once, for the original; 4 and 5 twice: once each.
    assert runs == {"one": 1, "two": 1, "three": 1, "four": 2, "five": 2}
    # The original: untouched.
    assert [(e.seq, e.name, e.result) for e in engine.events(original)] == history
    assert engine.get(original).output == 301
    # The fork: events 1-3 copied (with the attempt that recorded them), 4-5 its own.
    events = engine.events(fork)
    assert [(e.seq, e.name, e.result) for e in events] == history[:3] + [
        (4, "four", 6), (5, "five", 7)
    ]  # fmt: skip
    assert [e.attempt for e in events] == [1, 1, 1, 2, 2]
    assert statuses(engine.attempts(fork)) == ["completed", "completed"]
    # Lineage, both ways.
    task = engine.get(fork)
    assert (task.forked_from, task.forked_at) == (original, 3)
    assert [f.id for f in engine.forks(original)] == [fork]


def test_fork_before_a_step_name_and_at_0(lesson, engine, url, current_durable_task):
    runs: Counter = Counter()
    five_steps(engine, current_durable_task, runs, {"on": False})
    with running(worker(lesson, engine)):
        original = engine.enqueue("order")
        engine.wait(original, timeout=30)
        named = engine.fork(original, before="four")
        anew = engine.fork(original, at=0)  # a replay into a new task
        engine.wait(named, timeout=30)
        engine.wait(anew, timeout=30)
    assert engine.get(named).forked_at == 3
    assert runs == {"one": 2, "two": 2, "three": 2, "four": 3, "five": 3}
    assert [e.attempt for e in engine.events(anew)] == [1] * 5


def test_only_a_finished_task_without_a_parent_is_forked(lesson, engine, url, current_durable_task):
    errors = lesson.engine
    current_task = lesson.task_context.current_task

    @engine.task("blocker")
    def blocker(input):
        current_task().sleep(60)

    @engine.durable_task("parent")
    def parent(input):
        ctx = current_durable_task()
        ctx.step("one", lambda: 1)
        return ctx.wait(ctx.spawn("blocker"))

    task_id = engine.enqueue("parent")
    # A short lease: heartbeats every half second, so that the blocker learns of the cancel
    # (and its worker can stop) at once, not at the default lease's next heartbeat, 10 s on.
    with running(worker(lesson, engine, slots=2, lease=1.5)):
        wait_until(lambda: engine.get(task_id).status == "suspended")
        before = counts(url)
        with pytest.raises(errors.TaskStateError, match="is suspended: only a finished task"):
            engine.fork(task_id, at=1)
        [child] = engine.children(task_id)
        with pytest.raises(errors.TaskStateError, match=f"fork task {task_id} instead"):
            engine.fork(child.id, at=0)
        engine.cancel(task_id)
    with pytest.raises(errors.TaskOptionError, match="at must be an integer from 0 to 2"):
        engine.fork(task_id, at=3)
    with pytest.raises(errors.TaskOptionError, match="no event named 'six' .its events: one, "):
        engine.fork(task_id, before="six")
    with pytest.raises(errors.TaskOptionError, match="fork needs the fork point"):
        engine.fork(task_id)
    with pytest.raises(errors.TaskNotFoundError):
        engine.fork(999_999, at=0)
    after = counts(url)
    assert after == before  # nothing written by the refusals (the cancel writes no row)


def family(engine, current_durable_task, runs: Counter) -> None:
    """plan (1), spawn A (2), wait A (3), spawn B (4), wait B (5), summary (6)."""

    @engine.task("tool")
    def tool(n):
        runs[n] += 1
        return n * 10

    @engine.durable_task("agent", max_attempts=1)
    def agent(input):
        ctx = current_durable_task()
        ctx.step("plan", lambda: "a then b")
        a = ctx.wait(ctx.spawn("tool", 1))
        b = ctx.wait(ctx.spawn("tool", 2))
        return ctx.step("summary", lambda: a + b)


@pytest.mark.parametrize(
    "at, runs_again, copied_finished",
    [
        (1, {1: 1, 2: 1}, []),  # before the spawns: both children run again, spawned anew
        (2, {1: 1, 2: 1}, []),  # A spawned, not awaited: A's copy runs again, B is spawned
        (3, {2: 1}, [1]),  # A's outcome recorded: A's copy keeps it; B runs again
        (6, {}, [1, 2]),  # every outcome recorded: nothing runs again
    ],
)
def test_a_forks_children_are_its_own(
    lesson, engine, url, current_durable_task, at, runs_again, copied_finished
):
    runs: Counter = Counter()
    family(engine, current_durable_task, runs)
    with running(worker(lesson, engine, slots=2)):
        original = engine.enqueue("agent")
        assert engine.wait(original, timeout=30).output == 30
        originals = [(c.id, c.status, c.output) for c in engine.children(original)]
        runs.clear()
        fork = engine.fork(original, at=at)
        done = engine.wait(fork, timeout=30)
    assert (done.status, done.output) == ("completed", 30)
    assert dict(runs) == runs_again
    children = engine.children(fork)
    assert [c.input for c in children] == [1, 2]
    assert all(c.parent_id == fork and c.status == "completed" for c in children)
    # Copied as they ended: the same outcome, no attempt run for the fork.
    copied = [c.input for c in children if c.attempts and not engine.attempts(c.id)]
    assert copied == copied_finished
    # Every child event of the fork names one of the fork's own children.
    named = {e.child_id for e in engine.events(fork) if e.child_id is not None}
    assert named == {c.id for c in children}
    # The original's children: untouched.
    assert [(c.id, c.status, c.output) for c in engine.children(original)] == originals


def test_inspect_shows_the_lineage_and_diffs_two_histories(
    lesson, engine, url, current_durable_task
):
    runs: Counter = Counter()
    bug = {"on": True}
    five_steps(engine, current_durable_task, runs, bug)
    with running(worker(lesson, engine)):
        original = engine.enqueue("order")
        engine.wait(original, timeout=30)
        bug["on"] = False
        fork = engine.fork(original, at=3)
        engine.wait(fork, timeout=30)
    dbname = conninfo.conninfo_to_dict(url)["dbname"]
    server = url.replace(f"dbname={dbname}", "dbname=postgres")
    shown = run_main(lesson.name, server, dbname, str(fork), script="inspect_task.py")
    assert shown.returncode == 0, shown.stderr
    assert f"  forked from task {original} at event 3" in shown.stdout.splitlines()
    shown = run_main(lesson.name, server, dbname, str(original), script="inspect_task.py")
    assert f"  forked: task {fork}, at event 3" in shown.stdout.splitlines()
    compared = run_main(
        lesson.name, server, dbname, "--diff", str(original), str(fork), script="inspect_task.py"
    )
    assert compared.returncode == 0, compared.stderr
    lines = compared.stdout.splitlines()
    assert lines[1].split() == ["1", "step", "one:", "1", "=", "step", "one:", "1"]
    assert lines[4].strip() == "--- fork point: events 1-3 copied ---"
    assert lines[5].split() == ["4", "step", "four:", "300", "|", "step", "four:", "6"]
    assert lines[-1] == "  they part at event 4"


# --- check_histories ---------------------------------------------------------------------

CHECKED_TASKS = """
import os
from durable import current_durable_task

def order(input):
    ctx = current_durable_task()
    ctx.step("one", lambda: 1)
    ctx.step(os.environ.get("STEP_TWO", "two"), lambda: 2)
    ctx.sleep_for("nap", 3600)
    return ctx.step("three", lambda: 3)

def register(engine):
    engine.durable_task("order")(order)
"""


def check_histories(lesson, url: str, tmp_path, *args: str, **env: str):
    (tmp_path / "checked_tasks.py").write_text(CHECKED_TASKS)
    dbname = conninfo.conninfo_to_dict(url)["dbname"]
    server = url.replace(f"dbname={dbname}", "dbname=postgres")
    command = [sys.executable, str(lesson_dir(lesson.name) / "check_histories.py")]
    return subprocess.run(
        [*command, "--tasks", "checked_tasks", *args],
        env={**lesson_env(server, dbname), "PYTHONPATH": str(tmp_path), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_check_histories_gates_a_change_that_tasks_in_flight_would_not_survive(
    lesson, engine, url, tmp_path, current_durable_task
):
    @engine.durable_task("order")
    def order(input):  # CHECKED_TASKS's order, as first deployed
        ctx = current_durable_task()
        ctx.step("one", lambda: 1)
        ctx.step("two", lambda: 2)
        ctx.sleep_for("nap", 3600)
        return ctx.step("three", lambda: 3)

    task_id = engine.enqueue("order")
    with running(worker(lesson, engine)):
        wait_until(lambda: engine.get(task_id).status == "scheduled")  # asleep, in flight
    before = counts(url)
    same = check_histories(lesson, url, tmp_path)
    assert same.returncode == 0, same.stderr
    assert same.stdout.splitlines() == [
        f"task {task_id} order: matches its history (3 events; next, the sleep 'nap')",
        "1 tasks checked: 1 match, 0 would fail",
    ]
    renamed = check_histories(lesson, url, tmp_path, STEP_TWO="two, renamed")
    assert renamed.returncode == 1
    assert renamed.stdout.splitlines()[0] == (
        f"task {task_id} order: diverges at event 2: expected step 'two' (recorded by"
        " attempt 1), but the code asked for step 'two, renamed'"
    )
    # A finished task is checked with --all only; --task-name must name a registered task.
    assert check_histories(lesson, url, tmp_path, "--task-name", "nope").returncode == 2
    assert counts(url) == before  # nothing written
    assert engine.get(task_id).status == "scheduled"


def test_the_check_runs_no_step_and_stops_where_the_history_ends(
    lesson, engine, url, current_durable_task
):
    runs: Counter = Counter()
    bug = {"on": False}
    five_steps(engine, current_durable_task, runs, bug)
    with running(worker(lesson, engine)):
        task_id = engine.enqueue("order")
        engine.wait(task_id, timeout=30)
    check = lesson.check_histories
    runs.clear()
    before = counts(url)
    verdict = check.check(engine, engine.get(task_id))
    assert verdict.detail == "matches its history (5 events; then returns)"
    assert verdict.matches
    bug["on"] = True  # a step's result changes: not a divergence (results are not calls)
    assert check.check(engine, engine.get(task_id)).matches
    assert runs == {}  # no step ran
    assert counts(url) == before


def running_leaves(url: str) -> int:
    query = "SELECT count(*) FROM tasks WHERE status = 'running' AND name = 'leaf'"
    return sql(url, query)[0][0]


# --- durable children --------------------------------------------------------------------


def test_durable_children_three_levels_deep(lesson, engine, url, current_durable_task):
    @engine.task("leaf")
    def leaf(n):
        return n + 1

    @engine.durable_task("middle")
    def middle(n):
        ctx = current_durable_task()
        ctx.step("prepare", lambda: n)
        return ctx.wait(ctx.spawn("leaf", n)) * 10

    @engine.durable_task("root")
    def root(input):
        ctx = current_durable_task()
        return sum(ctx.wait_all([ctx.spawn("middle", n) for n in (1, 2)]))

    task_id = engine.enqueue("root")
    with running(worker(lesson, engine, slots=4)):
        done = engine.wait(task_id, timeout=30)
    assert (done.status, done.output) == ("completed", 50)
    middles = engine.children(task_id)
    assert [m.output for m in middles] == [20, 30]
    leaves = [leaf for m in middles for leaf in engine.children(m.id)]
    assert [leaf.output for leaf in leaves] == [2, 3]
    # Each middle waited for its leaf (suspended, then woken by it, unless the leaf was quicker).
    assert all(statuses(engine.attempts(m.id))[-1] == "completed" for m in middles)
    assert all(leaf.parent_id in {m.id for m in middles} for leaf in leaves)


def test_a_cancel_reaches_the_grandchildren_and_a_retry_brings_the_tree_back(
    lesson, engine, url, current_durable_task
):
    current_task = lesson.task_context.current_task
    release = {"now": False}

    @engine.task("leaf")
    def leaf(n):
        while not release["now"]:
            current_task().sleep(0.02)  # raises once its attempt is cancelled
        return n

    @engine.durable_task("middle")
    def middle(n):
        ctx = current_durable_task()
        return ctx.wait(ctx.spawn("leaf", n))

    @engine.durable_task("root")
    def root(input):
        ctx = current_durable_task()
        return ctx.wait_all([ctx.spawn("middle", n) for n in (1, 2)])

    task_id = engine.enqueue("root")
    with running(worker(lesson, engine, slots=6)):
        wait_until(lambda: running_leaves(url) == 2)  # every task of the tree exists
        assert engine.cancel(task_id)
        wait_until(lambda: running_leaves(url) == 0)
        assert sql(url, "SELECT status::text, count(*) FROM tasks GROUP BY 1") == [("cancelled", 5)]
        release["now"] = True
        engine.retry(task_id)
        done = engine.wait(task_id, timeout=30)
    assert (done.status, done.output) == ("completed", [1, 2])
    assert sql(url, "SELECT status::text, count(*) FROM tasks GROUP BY 1") == [("completed", 5)]


# --- main.py (lesson 10's own) -----------------------------------------------------------

LESSON = "10-branching-and-forking"


def test_main_fixes_a_bug_by_forking_before_it(pg_server_url):
    dbname = f"t10_main_{os.getpid()}"
    try:
        result = run_main(LESSON, pg_server_url, dbname, cwd=lesson_dir(LESSON))
        assert result.returncode == 0, result.stdout + result.stderr
        lines = result.stdout.splitlines()
        assert "  task 1 completed: 'invoiced 8.00' (it should have been 72.00)" in lines
        assert "  task 1 order: matches its history (5 events; then returns)" in lines
        assert "  task 2 completed: 'invoiced 72.00'" in lines
        assert "  they part at event 4" in lines
        assert lines[-1] == "  check_histories.py would exit with status 1: do not deploy"
        url = postgres.database_url(pg_server_url, dbname)
        # What really happened: steps 1 and 3 once (the fork replayed them), two invoices.
        effects = sql(url, "SELECT effect, count(*) FROM shop_effects GROUP BY 1 ORDER BY 1")
        assert effects == [
            ("booked a courier to 1 Main St", 1),
            ("invoice for 72.00 sent to ana@example.com", 1),
            ("invoice for 8.00 sent to ana@example.com", 1),
            ("reserved 2 x kettle", 1),
        ]
        assert sql(url, "SELECT id, forked_from, forked_at FROM tasks ORDER BY id") == [
            (1, None, None), (2, 1, 3)
        ]  # fmt: skip
    finally:
        drop_database(pg_server_url, dbname)


def test_children_left_running_by_a_parent_that_ended_without_closing_them_are_cancelled(
    lesson, engine, url, current_durable_task
):
    """The state a worker leaves when it dies between a reclaim that failed a parent for good
    and the close of its children (two transactions): the parent failed, its tree running.
    The chores' sweep (CloseOrphans) cancels them, a level per sweep."""
    current_task = lesson.task_context.current_task

    @engine.task("blocker")
    def blocker(input):
        current_task().sleep(60)  # raises once its attempt is cancelled

    @engine.durable_task("middle")
    def middle(input):
        ctx = current_durable_task()
        return ctx.wait(ctx.spawn("blocker"))

    @engine.durable_task("root")
    def root(input):
        ctx = current_durable_task()
        return ctx.wait(ctx.spawn("middle"))

    task_id = engine.enqueue("root")
    # A short lease: the blocker hears of its cancel at its next heartbeat, a third of it.
    with running(worker(lesson, engine, slots=3, poll_interval=0.05, lease=1)):
        wait_until(lambda: sql(url, "SELECT count(*) FROM tasks WHERE name = 'blocker'")[0][0])
        wait_until(lambda: statuses(engine.children(task_id)) == ["suspended"])
        sql(
            url,
            "UPDATE tasks SET status = 'failed', error = 'lease expired (worker presumed dead)',"
            " finished_at = now(), waiting_for = NULL WHERE id = %s",
            task_id,
        )
        unfinished = "SELECT count(*) FROM tasks WHERE finished_at IS NULL"
        wait_until(lambda: sql(url, unfinished) == [(0,)])
    rows = sql(url, "SELECT name, status::text FROM tasks ORDER BY id")
    assert rows == [("root", "failed"), ("middle", "cancelled"), ("blocker", "cancelled")]


def test_a_cancel_reaches_durable_children_that_sleep_or_wait_for_an_event(
    lesson, engine, url, current_durable_task
):
    @engine.durable_task("waiter")
    def waiter(input):
        return current_durable_task().wait_for_event("never", timeout=input)

    @engine.durable_task("sleeper")
    def sleeper(input):
        current_durable_task().sleep_for("long", 3600)

    @engine.durable_task("root")
    def root(input):
        ctx = current_durable_task()
        handles = [ctx.spawn("waiter", None), ctx.spawn("waiter", 3600), ctx.spawn("sleeper")]
        return ctx.wait_all(handles)

    task_id = engine.enqueue("root")
    with running(worker(lesson, engine, slots=4)):
        wait_until(
            lambda: statuses(engine.children(task_id)) == ["suspended", "scheduled", "scheduled"]
        )
        assert engine.cancel(task_id)
    children = engine.children(task_id)
    assert [(c.status, c.awaiting_event) for c in children] == [("cancelled", None)] * 3
    assert engine.send_event("never", "late").woken == []
