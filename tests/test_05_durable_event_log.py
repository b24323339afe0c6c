"""Lesson 05: durable functions. Steps are logged under the lease; a retry replays the log.

Promises kept by lesson 05 and every later lesson (the `lesson` fixture runs each test against
each of them; in lesson 07 these are durable tasks, `engine.durable_task`).

"Ran once" is never taken from the log alone: the step functions write their side effects to a
table of their own (`effects`), and the tests compare what happened with what was recorded.
The oracle test kills real worker processes with SIGKILL and compares the resumed result with
an uninterrupted run; the fencing tests pause a function while its lease is lost, or while
another transaction is ending its attempt, and check that nothing it appends lands.
"""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import threading
from collections import Counter

import psycopg
import pytest
from harness import (
    drop_database,
    durable_task,
    finish,
    lesson_dir,
    lesson_env,
    lessons_from,
    load_lesson,
    run_main,
    running,
    sql,
    wait_until,
)
from psycopg import conninfo

LESSON_05 = "05-durable-event-log"
XDIST = os.environ.get("PYTEST_XDIST_WORKER", "main")

# The outside world, for the steps to change (the lessons' demo_tasks.EFFECTS_TABLE).
EFFECTS_TABLE = """
CREATE TABLE effects (
    task_id bigint  NOT NULL,
    step    text    NOT NULL,
    detail  text    NOT NULL,
    pid     integer NOT NULL,
    at      timestamptz NOT NULL DEFAULT clock_timestamp()
)
"""


@pytest.fixture(params=lessons_from("05"), scope="module")
def lesson(request):
    return load_lesson(request.param)


# A test of what lesson 05 alone does (its main.py, or what lesson 06 changed on purpose) runs
# against lesson 05 only: this overrides the `lesson` fixture's parameters for that test.
only_lesson_05 = pytest.mark.parametrize("lesson", [LESSON_05], indirect=True)


@pytest.fixture
def url(lesson, lesson_db) -> str:
    """A fresh database of the lesson under test, with the effects table next to the engine's."""
    url = lesson_db(lesson.name)
    sql(url, EFFECTS_TABLE)
    return url


@pytest.fixture
def effect(url, current_durable_task):
    """effect(step, detail): a step's side effect, in the effects table (any thread may call)."""

    def effect(step: str, detail: str = "") -> None:
        sql(
            url,
            "INSERT INTO effects (task_id, step, detail, pid) VALUES (%s, %s, %s, %s)",
            current_durable_task().task_id, step, detail, os.getpid(),
        )  # fmt: skip

    return effect


def effects(url: str, task_id: int | None = None) -> list[tuple]:
    rows = sql(url, "SELECT task_id, step, detail, pid FROM effects ORDER BY at")
    return [row for row in rows if task_id is None or row[0] == task_id]


def log_of(engine, task_id: int) -> list[tuple]:
    """(seq, attempt, kind, name, result, error) of every event of the task."""
    return [(e.seq, e.attempt, e.kind, e.name, e.result, e.error) for e in engine.events(task_id)]


def lease_has_expired(url: str, task_id: int) -> bool:
    return sql(url, "SELECT lease_expires_at < now() FROM tasks WHERE id = %s", task_id)[0][0]


# --- replay: retry keeps history ---------------------------------------------------------------


def test_a_retry_replays_recorded_steps_and_runs_the_rest(
    lesson, url, engine, current_durable_task, effect
):
    calls = Counter()

    def work(name: str, value: int) -> int:
        calls[name] += 1
        effect(name)
        if name == "three" and current_durable_task().attempt < 3:
            raise ConnectionError(f"down on attempt {current_durable_task().attempt}")
        return value * 10

    @durable_task(engine, "job", max_attempts=3, backoff=0.01)
    def job(input):
        ctx = current_durable_task()
        return [ctx.step(name, work, name, n) for n, name in enumerate(["one", "two", "three"])]

    (task,) = finish(lesson, engine, engine.enqueue("job"))
    assert (task.status, task.attempts, task.output) == ("completed", 3, [0, 10, 20])
    # Steps one and two ran once, in attempt 1; attempts 2 and 3 got their results from the
    # log, without running them (a replay that ran them again would count 3 here).
    assert calls == {"one": 1, "two": 1, "three": 3}
    assert Counter(step for _, step, _, _ in effects(url, task.id)) == calls
    assert log_of(engine, task.id) == [
        (1, 1, "step_completed", "one", 0, None),
        (2, 1, "step_completed", "two", 10, None),
        (3, 3, "step_completed", "three", 20, None),
    ]
    attempts = engine.attempts(task.id)
    assert [a.error for a in attempts] == [
        "StepError: step 'three' failed: ConnectionError: down on attempt 1",
        "StepError: step 'three' failed: ConnectionError: down on attempt 2",
        None,
    ]


def test_history_is_loaded_once_per_attempt_and_each_step_is_one_statement(
    lesson, engine, current_durable_task, monkeypatch
):
    Querier = lesson.db_queries.Querier
    counts = Counter()
    for method in ("load_history", "append_event"):
        original = getattr(Querier, method)

        def counted(self, *args, _original=original, _method=method, **kwargs):
            counts[(_method, current_durable_task().attempt)] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(Querier, method, counted)

    @durable_task(engine, "job", backoff=0.01)
    def job(input):
        ctx = current_durable_task()
        for n in range(5):
            ctx.step(f"s{n}", lambda n=n: n)
            if n == 2 and ctx.attempt == 1:
                raise RuntimeError("crash after three steps")
        return "done"

    @durable_task(engine, "plain")
    def plain(input):
        return "no steps"

    task, other = finish(lesson, engine, engine.enqueue("job"), engine.enqueue("plain"))
    assert task.attempts == 2 and other.output == "no steps"
    # Attempt 1: nothing to load (a first attempt has no history), one append per step.
    # Attempt 2: ONE load for the three recorded steps, one append per new step.
    assert counts == {("append_event", 1): 3, ("load_history", 2): 1, ("append_event", 2): 2}


def test_repeated_step_names_are_told_apart_by_position(lesson, engine, current_durable_task):
    calls = []

    def fetch(page: int) -> dict:
        calls.append(page)
        return {"page": page, "rows": page * 100}

    @durable_task(engine, "job", backoff=0.01)
    def job(input):
        ctx = current_durable_task()
        pages = [ctx.step("fetch", fetch, page) for page in (1, 2, 3)]
        if ctx.attempt == 1:
            raise RuntimeError("crash after the three fetches")
        # A fourth "fetch" in attempt 2: a new position, so it runs.
        pages.append(ctx.step("fetch", fetch, 4))
        return [p["rows"] for p in pages]

    (task,) = finish(lesson, engine, engine.enqueue("job"))
    # Each replayed "fetch" got its own page back, in order, and none ran twice.
    assert task.output == [100, 200, 300, 400]
    assert calls == [1, 2, 3, 4]
    assert [(seq, attempt, name) for seq, attempt, _, name, _, _ in log_of(engine, task.id)] == [
        (1, 1, "fetch"),
        (2, 1, "fetch"),
        (3, 1, "fetch"),
        (4, 2, "fetch"),
    ]


def test_a_step_returns_what_the_log_holds_on_its_first_run_too(
    lesson, engine, current_durable_task
):
    seen = []

    @durable_task(engine, "job", backoff=0.01)
    def job(input):
        ctx = current_durable_task()
        # A tuple: JSON has none. Returned as the log will replay it: a list.
        value = ctx.step("shape", lambda: {"pair": (1, 2), "three": 3})
        seen.append((ctx.attempt, value))
        if ctx.attempt == 1:
            raise RuntimeError("retry, to see the replay")
        return value

    finish(lesson, engine, engine.enqueue("job"))
    assert seen == [(1, {"pair": [1, 2], "three": 3}), (2, {"pair": [1, 2], "three": 3})]


# Lesson 05 only: from lesson 06 on, a replay checks each step's name against its history, and
# this changed function diverges (NonDeterminismError, test_06_tracking_non_determinism.py)
# instead of misreading its history.
@only_lesson_05
def test_a_changed_function_misreads_its_history(lesson, engine, current_durable_task):
    """What this lesson does not catch (lesson 06 does): the log is read by position alone."""
    deployed = {"version": 1}

    @durable_task(engine, "job", backoff=0.01)
    def job(input):
        ctx = current_durable_task()
        if deployed["version"] == 1:
            ctx.step("fetch_user", lambda: {"name": "ada"})
            deployed["version"] = 2  # a deploy, between attempt 1 and its retry
            raise RuntimeError("crash")
        # Version 2 takes a new step first: it is handed the user that step 1 recorded.
        rate = ctx.step("fetch_rate", lambda: 1.25)
        user = ctx.step("fetch_user", lambda: {"name": "ada"})
        return {"rate": rate, "user": user}

    (task,) = finish(lesson, engine, engine.enqueue("job"))
    assert task.status == "completed"
    assert task.output == {"rate": {"name": "ada"}, "user": {"name": "ada"}}
    assert [(e[0], e[3]) for e in log_of(engine, task.id)] == [(1, "fetch_user"), (2, "fetch_user")]


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("returned", "reason"),
    [
        ({"a", "b"}, "Object of type set is not JSON serializable"),
        (math.nan, "Out of range float values are not JSON compliant"),
        (object(), "Object of type object is not JSON serializable"),
        ("a\x00b", "it contains a NUL character (\\x00), which PostgreSQL cannot store"),
    ],
)
def test_a_step_result_that_is_not_json_is_refused_naming_the_step(
    lesson, engine, current_durable_task, returned, reason
):
    StepError = lesson.durable.StepError
    caught = []

    @durable_task(engine, "job", max_attempts=1)
    def job(input):
        ctx = current_durable_task()
        ctx.step("fine", lambda: "ok")
        try:
            ctx.step("odd", lambda: returned)
        except StepError as err:
            caught.append(err)
            raise

    (task,) = finish(lesson, engine, engine.enqueue("job"))
    message = f"step 'odd' failed: returned a value that is not JSON-serializable: {reason}"
    assert str(caught[0]) == message and caught[0].step == "odd"
    assert isinstance(caught[0].__cause__, TypeError | ValueError)
    assert (task.status, task.error) == ("failed", f"StepError: {message}")
    # Nothing was recorded for it: the log holds the step before, only.
    assert [event[3] for event in log_of(engine, task.id)] == ["fine"]


def test_a_step_that_raises_is_not_recorded_and_runs_again_on_the_retry(
    lesson, url, engine, current_durable_task, effect
):
    calls = Counter()

    def charge() -> str:
        calls["charge"] += 1
        if current_durable_task().attempt == 1:
            raise ConnectionError("payment service unavailable")
        effect("charge")
        return "paid"

    @durable_task(engine, "job", backoff=0.01)
    def job(input):
        ctx = current_durable_task()
        ctx.step("reserve", lambda: calls.update(["reserve"]) or "reserved")
        return ctx.step("charge", charge)

    (task,) = finish(lesson, engine, engine.enqueue("job"))
    assert (task.status, task.attempts, task.output) == ("completed", 2, "paid")
    assert calls == {"reserve": 1, "charge": 2}
    assert [step for _, step, _, _ in effects(url, task.id)] == ["charge"]
    # The failure left no event: the retry ran the step again, and only its success is history.
    assert [(e[0], e[1], e[2], e[3]) for e in log_of(engine, task.id)] == [
        (1, 1, "step_completed", "reserve"),
        (2, 2, "step_completed", "charge"),
    ]
    assert engine.attempts(task.id)[0].error == (
        "StepError: step 'charge' failed: ConnectionError: payment service unavailable"
    )


def test_a_caught_step_error_becomes_history_and_replays_as_the_same_error(
    lesson, engine, current_durable_task
):
    StepError = lesson.durable.StepError
    calls = Counter()
    caught: list[tuple[int, Exception]] = []

    def charge() -> str:
        calls["charge"] += 1
        raise ValueError("card declined")

    def notify(reason: str) -> str:
        calls["notify"] += 1
        return f"told the customer: {reason}"

    @durable_task(engine, "job", backoff=0.01)
    def job(input):
        ctx = current_durable_task()
        try:
            outcome = ctx.step("charge", charge)
        except StepError as err:
            # The function handles the failure and goes another way: that path must replay.
            caught.append((ctx.attempt, err))
            outcome = ctx.step("notify", notify, err.error)
        if ctx.attempt == 1:
            raise RuntimeError("crash after handling the decline")
        return outcome

    (task,) = finish(lesson, engine, engine.enqueue("job"))
    assert task.output == "told the customer: ValueError: card declined"
    # The decline was recorded when the function carried on past it, and attempt 2 got it
    # back from the log, as the same StepError, without charging again.
    assert calls == {"charge": 1, "notify": 1}
    assert [(attempt, str(err)) for attempt, err in caught] == [
        (1, "step 'charge' failed: ValueError: card declined"),
        (2, "step 'charge' failed: ValueError: card declined"),
    ]
    assert isinstance(caught[0][1].__cause__, ValueError) and caught[1][1].__cause__ is None
    assert log_of(engine, task.id) == [
        (1, 1, "step_failed", "charge", None, "ValueError: card declined"),
        (2, 1, "step_completed", "notify", "told the customer: ValueError: card declined", None),
    ]


def test_step_misuse_is_refused(lesson, engine, current_durable_task):
    StepError = lesson.durable.StepError
    errors = []

    @durable_task(engine, "job", max_attempts=1)
    def job(input):
        ctx = current_durable_task()
        for name in ("", 7):
            try:
                ctx.step(name, lambda: None)
            except ValueError as err:
                errors.append(str(err))
        try:
            ctx.step("outer", lambda: ctx.step("inner", lambda: 1))
        except StepError as err:
            errors.append(str(err))
        return ctx.step("after", lambda: "still fine")

    (task,) = finish(lesson, engine, engine.enqueue("job"))
    assert errors == [
        "a step needs a name, a non-empty string, not ''",
        "a step needs a name, a non-empty string, not 7",
        "step 'outer' failed: RuntimeError: step 'inner' called inside step 'outer':"
        " steps cannot nest",
    ]
    # The nesting failure was caught and the function went on: it is history, then "after".
    assert [(e[0], e[2], e[3]) for e in log_of(engine, task.id)] == [
        (1, "step_failed", "outer"),
        (2, "step_completed", "after"),
    ]
    assert task.output == "still fine"


def test_the_log_is_append_only_and_goes_with_its_task(lesson, url, engine, current_durable_task):
    durable_task(engine, "job")(lambda input: current_durable_task().step("one", lambda: 1))
    (task,) = finish(lesson, engine, engine.enqueue("job"))
    with pytest.raises(psycopg.errors.RaiseException, match="append-only: UPDATE refused"):
        sql(url, "UPDATE task_events SET result = '2'")
    assert engine.events(task.id)[0].result == 1
    # The retention query deletes finished tasks, and their attempts and events with them.
    assert engine.cleanup(older_than=0) == 1
    assert engine.events(task.id) == []


# --- fencing: a zombie cannot write ------------------------------------------------------------

ZOMBIE_LEASE = 0.5  # seconds: short, so that the test waits little for it to run out


@pytest.mark.parametrize("taken_over", [True, False], ids=["taken-over", "expired"])
def test_a_zombie_cannot_append_after_losing_its_lease(
    lesson, url, engine, current_durable_task, effect, taken_over
):
    """A worker stalls in a step past its lease. Taken over: it wakes while another worker runs
    attempt 2 (paused in the same step, before its append: only the attempt in the append's
    fence stops the zombie). Expired: nobody took over (only the lease in the fence stops it)."""
    Worker, LeaseLostError = lesson.worker.Worker, lesson.task_context.LeaseLostError
    zombie_paused, release_zombie = threading.Event(), threading.Event()
    rescuer_paused, release_rescuer = threading.Event(), threading.Event()
    raised: list[tuple[int, BaseException]] = []

    def two() -> str:
        attempt = current_durable_task().attempt
        if attempt == 1:
            zombie_paused.set()
            release_zombie.wait(60)  # a stall longer than the lease: GC, swap, a stopped VM
        elif taken_over:
            rescuer_paused.set()
            release_rescuer.wait(60)
        effect("two", f"attempt {attempt}")
        return "two"

    @durable_task(engine, "job", backoff=0.01)
    def job(input):
        ctx = current_durable_task()
        ctx.step("one", lambda: "one")
        try:
            ctx.step("two", two)
        except BaseException as err:
            raised.append((ctx.attempt, err))
            raise
        ctx.step("three", lambda: "three")
        return "done"

    task_id = engine.enqueue("job")
    zombie = Worker(engine, "zombie", poll_interval=0.02, lease=ZOMBIE_LEASE)
    zombie.heartbeat_interval = 3600  # its heartbeats stop, as in a stalled process
    zombie_thread = threading.Thread(target=zombie.run_until_idle)
    rescuer_thread = threading.Thread(target=Worker(engine, "rescuer", lease=30).run_until_idle)
    zombie_thread.start()
    try:
        assert zombie_paused.wait(30)
        wait_until(lambda: lease_has_expired(url, task_id), timeout=30)
        if taken_over:
            # Another worker reclaims the task, and runs attempt 2 into step two.
            rescuer_thread.start()
            assert rescuer_paused.wait(30)
        else:
            # Healthy again: its heartbeats resume, for the retry it will run itself.
            zombie.heartbeat_interval = ZOMBIE_LEASE / 3
        release_zombie.set()
        zombie_thread.join(timeout=60)  # its append refused (the rescuer still in step two)
    finally:
        release_zombie.set()
        release_rescuer.set()
        for thread in (zombie_thread, rescuer_thread):
            if thread.ident is not None:  # started
                thread.join(timeout=60)
    assert not zombie_thread.is_alive() and not rescuer_thread.is_alive()

    # The zombie's step ran (its side effect happened), but its append was refused.
    (attempt, err), *_ = raised
    assert attempt == 1 and isinstance(err, LeaseLostError), raised
    # "step 2" in lesson 05, "event 2" from lesson 06 on (values and patches are events too).
    assert re.fullmatch(
        rf"task {task_id}: attempt 1 no longer holds the task \(lease expired, cancelled or"
        r" timed out\): (step|event) 2 \('two'\) not recorded",
        str(err),
    ), str(err)
    assert [e[:2] for e in log_of(engine, task_id)] == [(1, 1), (2, 2), (3, 2)]
    assert sorted(e[2] for e in effects(url, task_id)) == ["attempt 1", "attempt 2"]
    task = engine.wait(task_id)
    assert (task.status, task.attempts, task.output) == ("completed", 2, "done")
    first, second = engine.attempts(task_id)
    assert first.worker == "zombie"
    if taken_over:
        assert second.worker == "rescuer"
        assert first.error == "lease expired (worker presumed dead)"
    else:
        # Nobody had taken over: the zombie itself failed its attempt with the reason, and
        # (healthy again) ran the retry.
        assert second.worker == "zombie"
        assert first.error == f"LeaseLostError: {err}"


@pytest.mark.parametrize("ending", ["commit", "rollback"])
def test_an_append_waits_for_a_concurrent_end_of_its_attempt(
    lesson, url, engine, current_durable_task, ending
):
    """Deterministic race: a cancel holds the task's row lock while the step appends."""
    LeaseLostError = lesson.task_context.LeaseLostError
    paused, release = threading.Event(), threading.Event()
    raised = []

    def two() -> str:
        paused.set()
        release.wait(60)
        return "two"

    @durable_task(engine, "job", max_attempts=1)
    def job(input):
        ctx = current_durable_task()
        ctx.step("one", lambda: "one")
        try:
            ctx.step("two", two)
        except BaseException as err:
            raised.append(err)
            raise
        return "done"

    task_id = engine.enqueue("job")
    thread = threading.Thread(target=lesson.worker.Worker(engine, "w", lease=30).run_until_idle)
    thread.start()
    try:
        assert paused.wait(30)
        with psycopg.connect(url) as holder:
            holder.execute("SET lock_timeout = '30s'")
            # CancelTask, in a transaction left open: it holds the row lock, uncommitted.
            assert lesson.db_queries.Querier(holder).cancel_task(id=task_id) is not None
            release.set()
            # The step's append now waits for that lock (it would not, without FOR SHARE).
            wait_until(lambda: append_is_blocked(url), timeout=30)
            holder.commit() if ending == "commit" else holder.rollback()
    finally:
        release.set()
        thread.join(timeout=60)
    assert not thread.is_alive()

    task = engine.get(task_id)
    if ending == "commit":
        # The append re-read the row after the cancel committed, and wrote nothing.
        assert task.status == "cancelled"
        assert [e[3] for e in log_of(engine, task_id)] == ["one"]
        assert isinstance(raised[0], LeaseLostError)
    else:
        assert (task.status, task.output) == ("completed", "done")
        assert [e[3] for e in log_of(engine, task_id)] == ["one", "two"]
        assert raised == []


def append_is_blocked(url: str) -> bool:
    with psycopg.connect(url) as conn:
        blocked = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'w-steps'"
            " AND wait_event_type = 'Lock' AND query LIKE '%INSERT INTO task_events%'"
            # This test's database only: the other test processes run workers named w too.
            " AND datname = current_database()"
        ).fetchone()[0]
    return blocked == 1


# --- under concurrency --------------------------------------------------------------------------


def test_concurrent_workers_record_each_step_once(
    lesson, url, engine, current_durable_task, effect
):
    tasks_count, steps = 40, 4

    def work(n: int, step: int) -> int:
        effect(f"s{step}", str(n))
        # Step 3 of every even task fails on its first attempt.
        if step == 3 and n % 2 == 0 and current_durable_task().attempt == 1:
            raise ConnectionError("flaky")
        return n * 10 + step

    @durable_task(engine, "job", backoff=0.01)
    def job(input):
        ctx = current_durable_task()
        return sum(ctx.step(f"s{s}", work, input, s) for s in range(1, steps + 1))

    ids = [engine.enqueue("job", n) for n in range(tasks_count)]
    Worker = lesson.worker.Worker
    workers = [Worker(engine, f"w{i}", slots=2, poll_interval=0.02, lease=30) for i in range(4)]
    with running(*workers):
        done = [engine.wait(task_id, timeout=60) for task_id in ids]

    events = sql(
        url, "SELECT task_id, seq, attempt, name, result FROM task_events ORDER BY task_id, seq"
    )
    assert all(t.status == "completed" for t in done)
    assert [t.output for t in done] == [n * 40 + 10 for n in range(tasks_count)]
    assert len({t.worker for t in done}) > 1  # the work was shared
    for n, task in enumerate(done):
        mine = [e for e in events if e[0] == task.id]
        # Every step once, in order; the even tasks' steps 1-2 from attempt 1, 3-4 from 2.
        assert [e[1] for e in mine] == [1, 2, 3, 4]
        assert [e[3] for e in mine] == ["s1", "s2", "s3", "s4"]
        assert [e[2] for e in mine] == ([1, 1, 2, 2] if n % 2 == 0 else [1, 1, 1, 1])
        assert task.attempts == (2 if n % 2 == 0 else 1)
    # The side effects: one per recorded step, plus the failed first tries of step 3.
    happened = Counter((step, int(detail)) for _, step, detail, _ in effects(url))
    for n in range(tasks_count):
        assert [happened[(f"s{s}", n)] for s in (1, 2, 3, 4)] == [1, 1, 2 - n % 2, 1]


# --- the oracle: kill -9 in the middle, resume elsewhere, same result --------------------------

ORACLE_TASKS = '''
"""A durable pipeline for the oracle test: each step folds its index into a running value."""
import os
import time

from durable import current_durable_task

STEPS = 6
_pool = None


def mix(value: int, index: int, stall_at: int | None) -> int:
    task = current_durable_task()
    if task.attempt == 1 and index == stall_at:
        time.sleep(600)  # stalls here until killed: the kill never lands after the effect
    with _pool.connection() as conn:
        conn.execute(
            "INSERT INTO effects (task_id, step, detail, pid) VALUES (%s, %s, %s, %s)",
            (task.task_id, "mix", str(index), os.getpid()),
        )
    return (value * 31 + index * 7) % 1000003


def pipeline(input: dict) -> dict:
    ctx = current_durable_task()
    value = input["seed"]
    trail = []
    for index in range(1, STEPS + 1):
        value = ctx.step("mix", mix, value, index, input.get("stall_at"))
        trail.append(value)
    return {"value": value, "trail": trail}


def register(engine):
    global _pool
    _pool = engine.pool
    # Lesson 07 has two kinds of task: this one is durable. In 05 and 06 every task is.
    getattr(engine, "durable_task", engine.task)("pipeline", backoff=0.05)(pipeline)
'''

# Each run takes about two seconds (two worker processes start, a lease runs out). Lesson 05,
# where the log begins, is killed before the first step, in the middle and at the last; later
# lessons in the middle only (steps 1-3 replayed, 4-6 run), which proves their worker.py keeps
# the promise without tripling the time.
ORACLE_CASES = [
    pytest.param(name, stall_at, id=f"{name}-stall-at-{stall_at}")
    for name in lessons_from("05")
    for stall_at in ((1, 4, 6) if name == LESSON_05 else (4,))
]


@pytest.mark.parametrize(("lesson", "stall_at"), ORACLE_CASES, indirect=["lesson"])
def test_oracle_killed_and_resumed_equals_uninterrupted(
    lesson, url, engine, pg_server_url, tmp_path, stall_at
):
    dbname = conninfo.conninfo_to_dict(url)["dbname"]
    (tmp_path / "oracle_tasks.py").write_text(ORACLE_TASKS)
    env = dict(lesson_env(pg_server_url, dbname), PYTHONPATH=str(tmp_path))

    def worker_process(name: str) -> subprocess.Popen:
        # The worker.py of the lesson under test, as a reader would start it.
        command = [sys.executable, str(lesson_dir(lesson.name) / "worker.py"), "--name", name]
        command += ["--tasks", "oracle_tasks", "--lease", "1", "--poll-interval", "0.05"]
        return subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)

    # The test process only enqueues: the functions run in the worker processes.
    durable_task(engine, "pipeline")(lambda input: None)
    task_id = engine.enqueue("pipeline", {"seed": 42, "stall_at": stall_at})
    first = worker_process("worker-A")
    try:
        # Steps before `stall_at` are recorded; step `stall_at` is stuck in worker-A.
        wait_until(
            lambda: (
                engine.get(task_id).status == "running"
                and len(engine.events(task_id)) == stall_at - 1
            ),
            timeout=60,
        )
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=30)
    assert first.returncode == -signal.SIGKILL

    # The reference: the same input, run without interruption (by worker-B too).
    reference = engine.enqueue("pipeline", {"seed": 42})
    second = worker_process("worker-B")
    try:
        expected = engine.wait(reference, timeout=60)
        task = engine.wait(task_id, timeout=60)
    finally:
        second.terminate()
        second.communicate(timeout=30)
    log = log_of(engine, task_id)
    reference_log = log_of(engine, reference)

    # Same result as the uninterrupted run, and the same log apart from who recorded what.
    assert (task.status, task.attempts) == ("completed", 2)
    assert task.output == expected.output
    assert [e[2:] for e in log] == [e[2:] for e in reference_log]
    assert [e[1] for e in log] == [1] * (stall_at - 1) + [2] * (6 - stall_at + 1)
    # Each step's side effect happened exactly once: the recorded ones by worker-A, the rest
    # by worker-B, none twice.
    done = effects(url, task_id)
    assert sorted(int(detail) for _, _, detail, _ in done) == [1, 2, 3, 4, 5, 6]
    pids = {int(detail): pid for _, _, detail, pid in done}
    assert {pids[i] for i in range(1, stall_at)} <= {first.pid}
    assert {pids[i] for i in range(stall_at, 7)} == {second.pid}


# --- main.py, as a reader runs it --------------------------------------------------------------


def test_main_survives_kill_9_and_reruns(pg_server_url):
    """Lesson 05's own demo (later lessons have their own main.py)."""
    dbname = f"t05_main_{XDIST}"
    demo_url = conninfo.make_conninfo(pg_server_url, dbname=dbname)
    try:
        for cwd in (None, lesson_dir(LESSON_05)):
            result = run_main(LESSON_05, pg_server_url, dbname, cwd=cwd)
            assert result.returncode == 0, result.stdout + result.stderr
            assert result.stderr == ""
            out = result.stdout
            lines = out.splitlines()
            assert lines[0].startswith(f"database {dbname} on ")
            outputs = [line for line in lines if " completed on attempt " in line and "{" in line]
            assert len(outputs) == 2 and len({line.split(": ", 1)[1] for line in outputs}) == 1
            assert (
                "  killed worker-A (pid " in out
                and "in step 4 (charge): 3 events in the log" in out
            )
            assert "  task 2 completed on attempt 2 by worker-B" in lines
            assert (
                "    attempt 1 on worker-A: failed: lease expired (worker presumed dead)" in lines
            )
            assert "    worker-B: task 2 attempt 2: 3 steps replayed from the log, 3 run" in lines
            assert "  same output as the uninterrupted task 1: yes" in lines
            assert "  worker-1: task 3 attempt 2: 3 steps replayed from the log, 3 run" in lines
            assert (
                "  task 2: reserve, reserve, reserve by worker-A; charge, ship, email by worker-B"
                in lines
            )
            assert (
                "  18 side effects for 18 recorded steps: each recorded step ran exactly once"
                in lines
            )
            assert lines[-1].startswith("from the database: ")
            counts = dict(
                reversed(part.split(" ")) for part in lines[-1].split(": ", 1)[1].split(", ")
            )
            assert counts.pop("completed") == "3" and set(counts.values()) == {"0"}
            check_main_side_effects(demo_url, out)
    finally:
        drop_database(pg_server_url, dbname)


def check_main_side_effects(demo_url: str, out: str) -> None:
    """What the demo claims, read from its database rather than from its report: every
    recorded step happened once (the effects table), the killed worker's three reservations
    by worker-A and the rest by worker-B, and the resumed task's output the reference's."""
    worker_a = int(re.search(r"killed worker-A \(pid (\d+)\)", out)[1])
    worker_b = int(re.search(r"started worker-B \(pid (\d+)\)", out)[1])
    effects_by_task = sql(demo_url, "SELECT task_id, step, pid FROM effects ORDER BY at")
    recorded = sql(demo_url, "SELECT task_id, name FROM task_events WHERE kind = 'step_completed'")
    assert Counter((t, step) for t, step, _ in effects_by_task) == Counter(map(tuple, recorded))
    assert len(recorded) == 18  # three tasks of six steps
    assert [(step, pid) for t, step, pid in effects_by_task if t == 2] == [
        ("reserve", worker_a), ("reserve", worker_a), ("reserve", worker_a),
        ("charge", worker_b), ("ship", worker_b), ("email", worker_b),
    ]  # fmt: skip
    outputs = dict(sql(demo_url, "SELECT id, output FROM tasks WHERE id IN (1, 2)"))
    assert outputs[1] is not None and outputs[2] == outputs[1]
