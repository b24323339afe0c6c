"""Lesson 06: a replay checks that the code still matches its log; retry and replay by hand.

Promises kept by lesson 06 and every later lesson (the `lesson` fixture runs each test against
each of them; in lesson 07 these are durable tasks, `engine.durable_task`).

A "deploy" in these tests is the function changing its code between attempt 1 and attempt 2:
attempt 1 runs version 1 and crashes, so that the task is retried, and the retry runs
version 2 against the history version 1 recorded. Counters in the step functions prove what
ran; the log and the attempts are read back from the database.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import threading
import uuid
from collections import Counter

import psycopg
import pytest
from harness import (
    drop_database,
    durable_task,
    finish,
    lesson_dir,
    lessons_from,
    load_lesson,
    run_main,
    running,
    sql,
    wait_until,
)
from psycopg import conninfo

LESSON_06 = "06-tracking-non-determinism"


@pytest.fixture(params=lessons_from("06"), scope="module")
def lesson(request):
    return load_lesson(request.param)


# A test of what lesson 06 alone does (its main.py, or what lesson 07 changed on purpose) runs
# against lesson 06 only: this overrides the `lesson` fixture's parameters for that test.
only_lesson_06 = pytest.mark.parametrize("lesson", [LESSON_06], indirect=True)


def log_of(engine, task_id: int) -> list[tuple]:
    """(replay, seq, attempt, kind, name) of every event of the task."""
    return [(e.replay, e.seq, e.attempt, e.kind, e.name) for e in engine.events(task_id)]


def sha(*args, **kwargs) -> str:
    """The input hash, computed here independently of durable.py."""
    text = json.dumps([list(args), kwargs], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


# --- mismatches: each kind of change to a function with tasks in flight ----------------------

STEP, VALUE, PATCH = "step_completed", "value_recorded", "patch_applied"


def steps(*names: str, charge: int = 50, hashed: bool = True):
    """A version of a function: these steps in this order ("now": ctx.now()); `charge`'s
    argument is the amount, hashed unless `hashed` is False."""

    def version(ctx, calls: Counter) -> list:
        out = []
        for name in names:
            if name == "now":
                out.append(ctx.now().isoformat())
            elif name == "charge":
                out.append(ctx.step(name, counted(ctx, calls, name), charge, hash_input=hashed))
            else:
                out.append(ctx.step(name, counted(ctx, calls, name)))
        return out

    return version


def counted(ctx, calls: Counter, name: str):
    """A step function that counts its runs in `calls`, by (attempt, name): `ctx` is the
    context of the attempt that takes the step."""

    def run(*args) -> str:
        calls[(ctx.attempt, name)] += 1
        return f"{name} done"

    return run


def deploy(engine, current_durable_task, version_1, version_2, calls: Counter) -> int:
    """A task that runs version 1 on attempt 1, crashes, and runs version 2 from then on."""

    @durable_task(engine, "job", max_attempts=5, backoff=0.01)
    def job(input):
        ctx = current_durable_task()
        if ctx.attempt == 1:
            version_1(ctx, calls)
            raise RuntimeError("crash, then the deploy of version 2")
        return version_2(ctx, calls)

    return engine.enqueue("job")


H50, H55 = sha(50)[:12], sha(55)[:12]


@pytest.mark.parametrize(
    ("version_1", "version_2", "divergence"),
    [
        pytest.param(
            steps("a", "b", "c"), steps("a", "c", "b"),
            "at event 2: expected step 'b' (recorded by attempt 1), but the code asked for step"
            " 'c'",
            id="reordered",
        ),
        pytest.param(
            steps("a", "b", "c"), steps("a", "b2", "c"),
            "at event 2: expected step 'b' (recorded by attempt 1), but the code asked for step"
            " 'b2'",
            id="renamed",
        ),
        pytest.param(
            steps("a", "b", "c"), steps("a", "b"),
            "at event 3: expected step 'c' (recorded by attempt 1), but the function returned",
            id="removed-last",
        ),
        pytest.param(
            steps("a", "b", "c"), steps("a", "c"),
            "at event 2: expected step 'b' (recorded by attempt 1), but the code asked for step"
            " 'c'",
            id="removed-middle",
        ),
        pytest.param(
            steps("a", "b", "c"), steps("a", "x", "b", "c"),
            "at event 2: expected step 'b' (recorded by attempt 1), but the code asked for step"
            " 'x'",
            id="inserted",
        ),
        pytest.param(
            steps("a", "charge", "c"), steps("a", "charge", "c", charge=55),
            f"at event 2: expected step 'charge' with input {H50} (recorded by attempt 1), but"
            f" the code asked for step 'charge' with input {H55}",
            id="different-input",
        ),
        pytest.param(
            steps("a", "now", "b"), steps("a", "b", "now"),
            "at event 2: expected ctx.now() (recorded by attempt 1), but the code asked for step"
            " 'b'",
            id="clock-read-moved",
        ),
    ],
)  # fmt: skip
def test_a_divergence_fails_the_task_for_good_with_a_readable_message(
    lesson, engine, current_durable_task, version_1, version_2, divergence
):
    calls = Counter()
    task_id = deploy(engine, current_durable_task, version_1, version_2, calls)
    (task,) = finish(lesson, engine, task_id)

    message = f"NonDeterminismError: task {task_id} diverged from its history {divergence}"
    # Failed for good on attempt 2, though 5 were allowed: the same code would diverge again.
    assert (task.status, task.attempts, task.error) == ("failed", 2, message)
    assert [(a.attempt, a.error) for a in engine.attempts(task_id)] == [
        (1, "RuntimeError: crash, then the deploy of version 2"),
        (2, message),
    ]
    # Attempt 2 ran nothing: what matched was replayed, and the mismatch stopped it.
    assert not [key for key in calls if key[0] == 2]
    # The history is as attempt 1 left it: nothing of version 2 was appended.
    assert {attempt for _, _, attempt, _, _ in log_of(engine, task_id)} == {1}


def test_without_hash_input_a_changed_argument_replays_the_recorded_result(
    lesson, engine, current_durable_task
):
    """Hashing is opt-in: without it, the identity is the kind and name at each place."""
    calls = Counter()
    task_id = deploy(
        engine,
        current_durable_task,
        steps("a", "charge", hashed=False),
        steps("a", "charge", "c", charge=55, hashed=False),
        calls,
    )
    (task,) = finish(lesson, engine, task_id)
    assert (task.status, task.output) == ("completed", ["a done", "charge done", "c done"])
    assert calls == {(1, "a"): 1, (1, "charge"): 1, (2, "c"): 1}


@pytest.mark.parametrize("hashed_by", ["version 1 only", "version 2 only"])
def test_a_deploy_that_starts_or_stops_hashing_does_not_diverge(
    lesson, engine, current_durable_task, hashed_by
):
    calls = Counter()
    task_id = deploy(
        engine,
        current_durable_task,
        steps("charge", hashed=hashed_by == "version 1 only"),
        steps("charge", "c", hashed=hashed_by == "version 2 only"),
        calls,
    )
    (task,) = finish(lesson, engine, task_id)
    assert task.status == "completed"
    hashes = [e.input_hash for e in engine.events(task_id)]
    assert hashes == ([sha(50), None] if hashed_by == "version 1 only" else [None, None])


def test_hash_input_needs_json_arguments(lesson, engine, current_durable_task):
    @durable_task(engine, "job", max_attempts=1)
    def job(input):
        return current_durable_task().step("charge", lambda amount: amount, {1, 2}, hash_input=True)

    (task,) = finish(lesson, engine, engine.enqueue("job"))
    assert task.error == (
        "TypeError: step 'charge': hash_input=True needs JSON arguments:"
        " Object of type set is not JSON serializable"
    )


def test_a_divergence_is_final_even_if_the_function_catches_it(
    lesson, engine, current_durable_task
):
    NonDeterminismError = lesson.durable.NonDeterminismError
    calls = Counter()
    caught = []

    def version_2(ctx, calls):
        try:
            ctx.step("b", counted(ctx, calls, "b"))  # the history has "a" here
        except NonDeterminismError as err:
            caught.append(err)
        try:
            ctx.step("a", counted(ctx, calls, "a"))  # would match, but the run has diverged
        except NonDeterminismError as err:
            caught.append(err)
        return "pretend all is well"

    task_id = deploy(engine, current_durable_task, steps("a"), version_2, calls)
    (task,) = finish(lesson, engine, task_id)
    assert len(caught) == 2 and caught[0] is caught[1]
    assert (caught[0].seq, caught[0].expected.name, caught[0].actual.name) == (1, "a", "b")
    assert (task.status, task.attempts, task.output) == ("failed", 2, None)
    assert task.error == f"NonDeterminismError: {caught[0]}"
    assert calls == {(1, "a"): 1}


# --- recorded values: ctx.now(), ctx.random(), ctx.uuid4() ------------------------------------


def test_recorded_values_replay_and_values_read_directly_do_not(
    lesson, engine, current_durable_task
):
    seen = {}

    @durable_task(engine, "job", backoff=0.01)
    def job(input):
        ctx = current_durable_task()
        seen[ctx.attempt] = {
            "now": ctx.now(),
            "random": ctx.random(),
            "uuid4": ctx.uuid4(),
            "direct uuid4": uuid.uuid4(),
            "direct now": datetime.datetime.now(datetime.UTC),
        }
        ctx.step("use them", lambda: "used")
        if ctx.attempt == 1:
            raise RuntimeError("crash after reading them")
        # What attempt 2 got, as the task's output: compared below with attempt 1's log.
        return {name: str(seen[2][name]) for name in ("now", "random", "uuid4")}

    (task,) = finish(lesson, engine, engine.enqueue("job"))
    assert (task.status, task.attempts) == ("completed", 2)
    first, second = seen[1], seen[2]
    events = engine.events(task.id)
    assert [(e.seq, e.attempt, e.kind, e.name) for e in events] == [
        (1, 1, VALUE, "now"),
        (2, 1, VALUE, "random"),
        (3, 1, VALUE, "uuid4"),
        (4, 1, STEP, "use them"),
    ]
    # Attempt 1 recorded what it read; attempt 2 was handed those values, not fresh ones.
    recorded = {e.name: e.result for e in events if e.kind == VALUE}
    assert recorded == {
        "now": first["now"].isoformat(),
        "random": first["random"],
        "uuid4": str(first["uuid4"]),
    }
    assert task.output == {
        "now": str(datetime.datetime.fromisoformat(recorded["now"])),
        "random": str(recorded["random"]),
        "uuid4": recorded["uuid4"],
    }
    for name in ("now", "random", "uuid4"):
        assert second[name] == first[name], name
    assert first["now"].tzinfo == datetime.UTC and 0 <= first["random"] < 1
    assert isinstance(first["uuid4"], uuid.UUID) and first["uuid4"].version == 4
    assert second["direct uuid4"] != first["direct uuid4"]
    assert second["direct now"] > first["direct now"]


def test_a_value_cannot_be_read_inside_a_step(lesson, engine, current_durable_task):
    @durable_task(engine, "job", max_attempts=1)
    def job(input):
        ctx = current_durable_task()
        return ctx.step("stamp", lambda: ctx.now().isoformat())

    (task,) = finish(lesson, engine, engine.enqueue("job"))
    assert task.error == (
        "StepError: step 'stamp' failed: RuntimeError: ctx.now() called inside step 'stamp':"
        " steps cannot nest"
    )
    assert engine.events(task.id) == []


# --- patches: changing code while tasks are in flight ------------------------------------------


def test_a_patch_keeps_tasks_in_flight_on_the_old_path_and_new_tasks_on_the_new(
    lesson, engine, current_durable_task
):
    calls = Counter()
    answers = Counter()

    @durable_task(engine, "order", max_attempts=3, backoff=0.01)
    def order(input):
        ctx = current_durable_task()
        # Tasks in flight ran attempt 1 on version 1; their retries, and new tasks, version 2.
        version = 2 if ctx.attempt > 1 or input["new"] else 1
        tag = input["id"]
        ctx.step("reserve", counted(ctx, calls, f"reserve {tag}"))
        if ctx.attempt == 1 and input["crash"] == "before the patch":
            raise RuntimeError("crash")
        if version == 2:
            checked = ctx.patched("fraud-check")
            answers[(tag, ctx.attempt, checked)] += 1
            assert ctx.patched("fraud-check") == checked  # one answer per run, one marker
            if checked:
                ctx.step("fraud_check", counted(ctx, calls, f"fraud_check {tag}"))
        ctx.step("charge", counted(ctx, calls, f"charge {tag}"))
        if ctx.attempt == 1 and input["crash"] == "after the patch":
            raise RuntimeError("crash")
        ctx.step("ship", counted(ctx, calls, f"ship {tag}"))
        return "shipped"

    old = engine.enqueue("order", {"id": "old", "new": False, "crash": "after the patch"})
    early = engine.enqueue("order", {"id": "early", "new": False, "crash": "before the patch"})
    new = engine.enqueue("order", {"id": "new", "new": True, "crash": "after the patch"})
    tasks = finish(lesson, engine, old, early, new)
    assert [(t.status, t.attempts) for t in tasks] == [("completed", 2)] * 3

    # "old" recorded charge where the patch now asks: False, the old path, no fraud check.
    assert [e[4] for e in log_of(engine, old)] == ["reserve", "charge", "ship"]
    # "early" had not come that far on version 1: True, a marker, and the new path.
    assert [(e[2], e[4]) for e in log_of(engine, early)] == [
        (1, "reserve"), (2, "fraud-check"), (2, "fraud_check"), (2, "charge"), (2, "ship")
    ]  # fmt: skip
    # "new" took the new path on attempt 1, and its retry replays the marker: True again.
    assert [(e[2], e[3], e[4]) for e in log_of(engine, new)] == [
        (1, STEP, "reserve"),
        (1, PATCH, "fraud-check"),
        (1, STEP, "fraud_check"),
        (1, STEP, "charge"),
        (2, STEP, "ship"),
    ]
    assert answers == {("old", 2, False): 1, ("early", 2, True): 1, ("new", 1, True): 1,
                       ("new", 2, True): 1}  # fmt: skip
    # Every step ran once: the replays, down either path, ran nothing twice.
    assert set(calls.values()) == {1} and len(calls) == 3 + 4 + 4
    assert (2, "fraud_check early") in calls and (1, "fraud_check new") in calls


def test_a_retired_patch_marker_is_passed_over(lesson, engine, current_durable_task):
    """Step 3 of a patch: once no old task is left, the call goes and the new path stays."""
    calls = Counter()

    def with_patch(ctx, calls):
        ctx.step("a", counted(ctx, calls, "a"))
        if ctx.patched("new-way"):
            ctx.step("b", counted(ctx, calls, "b"))
        if ctx.patched("at-the-end"):
            pass

    def patch_retired(ctx, calls):
        ctx.step("a", counted(ctx, calls, "a"))
        ctx.step("b", counted(ctx, calls, "b"))
        ctx.step("c", counted(ctx, calls, "c"))
        return "done"

    task_id = deploy(engine, current_durable_task, with_patch, patch_retired, calls)
    (task,) = finish(lesson, engine, task_id)
    assert (task.status, task.output) == ("completed", "done")
    assert [(e[1], e[2], e[4]) for e in log_of(engine, task_id)] == [
        (1, 1, "a"), (2, 1, "new-way"), (3, 1, "b"), (4, 1, "at-the-end"), (5, 2, "c")
    ]  # fmt: skip
    assert calls == {(1, "a"): 1, (1, "b"): 1, (2, "c"): 1}


# --- retry and replay, by an operator ----------------------------------------------------------


def test_retry_keeps_the_history_and_replay_starts_a_new_one(lesson, engine, current_durable_task):
    calls = Counter()
    broken = {"c": True}

    def work_on(task: str, name: str) -> str:
        calls[(task, name)] += 1
        if name == "c" and broken["c"]:
            raise ConnectionError("service c is down")
        return name.upper()

    @durable_task(engine, "job", max_attempts=1)
    def job(input):
        ctx = current_durable_task()
        return [ctx.step(name, work_on, input, name) for name in "abc"]

    retried, replayed = engine.enqueue("job", "retried"), engine.enqueue("job", "replayed")
    assert [t.status for t in finish(lesson, engine, retried, replayed)] == ["failed"] * 2
    broken["c"] = False  # the service is back

    error = "StepError: step 'c' failed: ConnectionError: service c is down"
    retry = engine.retry(retried)
    replay = engine.replay(replayed, attempts=2)
    # The audit: what each task was like, and the history kept or set aside.
    assert (retry.task_id, retry.action, retry.status, retry.error) == (
        retried, "retry", "failed", error
    )  # fmt: skip
    assert (retry.attempts, retry.replay, retry.events) == (1, 0, 2)
    assert (replay.action, replay.attempts, replay.replay, replay.events) == (
        "replay", 1, 0, 2
    )  # fmt: skip
    assert engine.actions(retried) == [retry] and engine.actions(replayed) == [replay]
    assert engine.get(retried).max_attempts == 2 and engine.get(replayed).max_attempts == 3

    done = finish(lesson, engine, retried, replayed)
    assert [(t.status, t.attempts, t.output) for t in done] == [
        ("completed", 2, ["A", "B", "C"])
    ] * 2
    assert [t.replays for t in done] == [0, 1]
    # Retry: a and b replayed from the log, only c ran again. Replay: every step ran again.
    assert {name: calls[("retried", name)] for name in "abc"} == {"a": 1, "b": 1, "c": 2}
    assert {name: calls[("replayed", name)] for name in "abc"} == {"a": 2, "b": 2, "c": 2}
    assert [e[:3] + (e[4],) for e in log_of(engine, retried)] == [
        (0, 1, 1, "a"), (0, 2, 1, "b"), (0, 3, 2, "c")
    ]  # fmt: skip
    # The replayed task's first history is still there, set aside (replay 0), and unread.
    assert [e[:3] + (e[4],) for e in log_of(engine, replayed)] == [
        (0, 1, 1, "a"), (0, 2, 1, "b"), (1, 1, 2, "a"), (1, 2, 2, "b"), (1, 3, 2, "c")
    ]  # fmt: skip


def test_after_a_rollback_a_retry_finishes_the_task_on_its_history(
    lesson, engine, current_durable_task
):
    calls = Counter()
    deployed = {"version": 2}

    @durable_task(engine, "job", max_attempts=5, backoff=0.01)
    def job(input):
        ctx = current_durable_task()
        if ctx.attempt > 1 and deployed["version"] == 2:
            return steps("a", "c", "b")(ctx, calls)
        done = [ctx.step(name, counted(ctx, calls, name)) for name in "ab"]  # version 1
        if ctx.attempt == 1:
            raise RuntimeError("crash, then the deploy of version 2")
        return done + [ctx.step("c", counted(ctx, calls, "c"))]

    (task,) = finish(lesson, engine, engine.enqueue("job"))
    assert (task.status, task.attempts) == ("failed", 2)
    deployed["version"] = 1  # the deploy is rolled back; the history is intact
    engine.retry(task.id)
    (task,) = finish(lesson, engine, task.id)
    assert (task.status, task.attempts) == ("completed", 3)
    assert task.output == ["a done", "b done", "c done"]
    assert calls == {(1, "a"): 1, (1, "b"): 1, (3, "c"): 1}
    assert [(e[2], e[4]) for e in log_of(engine, task.id)] == [(1, "a"), (1, "b"), (3, "c")]


def test_retry_and_replay_refuse_what_they_cannot_do(lesson, engine):
    TaskStateError, TaskNotFoundError = (
        lesson.engine.TaskStateError,
        lesson.engine.TaskNotFoundError,
    )
    durable_task(engine, "job", max_attempts=1)(lambda input: input)
    queued = engine.enqueue("job", "queued")
    with pytest.raises(TaskStateError, match=rf"^task {queued} is queued: only a failed or"
                       " cancelled task can be retried$"):  # fmt: skip
        engine.retry(queued)
    # (What a replay accepts grew in lesson 07, which replays completed tasks too.)
    with pytest.raises(TaskStateError, match=rf"^task {queued} is queued: only a failed"):
        engine.replay(queued)
    (done,) = finish(lesson, engine, queued)
    with pytest.raises(TaskStateError, match="is completed: only a failed or cancelled task can"
                       " be retried"):  # fmt: skip
        engine.retry(done.id)
    with pytest.raises(TaskNotFoundError, match="no task with id 999"):
        engine.retry(999)
    cancelled = engine.enqueue("job", "cancelled")
    assert engine.cancel(cancelled)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(
            lesson.engine.TaskOptionError, match="attempts must be an integer from 1 to 1000"
        ):
            engine.retry(cancelled, attempts=bad)
    # A cancelled task can be retried; twice in a row, the second finds it queued.
    assert engine.retry(cancelled).status == "cancelled"
    with pytest.raises(TaskStateError, match="is queued"):
        engine.retry(cancelled)
    assert len(engine.actions(cancelled)) == 1


# Lesson 06 only: lesson 07 replays a completed task too, on purpose (from an empty history).
@only_lesson_06
def test_a_completed_task_cannot_be_replayed(lesson, engine):
    durable_task(engine, "job", max_attempts=1)(lambda input: input)
    (done,) = finish(lesson, engine, engine.enqueue("job"))
    with pytest.raises(lesson.engine.TaskStateError, match=rf"^task {done.id} is completed: only"
                       " a failed or cancelled task can be replayed$"):  # fmt: skip
        engine.replay(done.id)
    assert engine.actions(done.id) == []


def test_two_operators_retrying_at_once_requeue_the_task_once(lesson, url, engine):
    """Deterministic race: one retry holds the task's row lock while the other arrives."""
    durable_task(engine, "job", max_attempts=1)(lambda input: 1 / 0)
    (task,) = finish(lesson, engine, engine.enqueue("job"))
    assert task.status == "failed"
    errors = []

    def second_operator():
        try:
            engine.replay(task.id)
        except lesson.engine.TaskStateError as err:
            errors.append(err)

    with psycopg.connect(url) as first:  # a transaction, left open: the lock is held
        action = lesson.db_queries.Querier(first).requeue_task(
            id=task.id, action="retry", more_attempts=1
        )
        assert action is not None
        thread = threading.Thread(target=second_operator)
        thread.start()
        # The second operator's requeue waits for the first's lock.
        wait_until(lambda: blocked_by(url, first.info.backend_pid), timeout=30)
        first.commit()
    thread.join(timeout=30)
    assert not thread.is_alive()
    # The second found the task queued, once the first had committed. (The end of the message,
    # what can be replayed, grew in lesson 07.)
    assert [str(err).split(": only")[0] for err in errors] == [f"task {task.id} is queued"]
    assert [a.action for a in engine.actions(task.id)] == ["retry"]
    assert engine.get(task.id).replays == 0


def blocked_by(url: str, holder_pid: int) -> bool:
    """Does a statement wait for a lock that the session `holder_pid` holds?"""
    with psycopg.connect(url) as conn:
        return conn.execute(
            "SELECT count(*) = 1 FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))",
            (holder_pid,),
        ).fetchone()[0]


@pytest.mark.parametrize("action", ["retry", "replay"])
@pytest.mark.parametrize("zombie_then", ["takes a step", "returns"])
def test_a_worker_still_running_the_old_attempt_cannot_write(
    lesson, engine, current_durable_task, action, zombie_then
):
    """A stalled worker, its task cancelled and requeued under it: its writes are refused."""
    Worker, LeaseLostError = lesson.worker.Worker, lesson.task_context.LeaseLostError
    paused, release = threading.Event(), threading.Event()
    calls = Counter()
    raised = []

    @durable_task(engine, "job", max_attempts=1)
    def job(input):
        ctx = current_durable_task()
        ctx.step("one", counted(ctx, calls, "one"))
        if ctx.attempt == 1:
            paused.set()
            release.wait(60)  # a stall: GC, swap, a stopped VM
            if zombie_then == "returns":
                return "the zombie's output"
        try:
            ctx.step("two", counted(ctx, calls, "two"))
        except BaseException as err:
            raised.append((ctx.attempt, err))
            raise
        return f"attempt {ctx.attempt}'s output"

    task_id = engine.enqueue("job")
    zombie = Worker(engine, "zombie", poll_interval=0.02, lease=30)
    zombie.heartbeat_interval = 3600  # it never hears that its attempt is over
    thread = threading.Thread(target=zombie.run_until_idle)
    thread.start()
    try:
        assert paused.wait(30)
        assert engine.cancel(task_id)  # the operator stops the stuck task...
        getattr(engine, action)(task_id)  # ...and runs it again
        assert Worker(engine, "rescuer", lease=30).run_until_idle() == 1
    finally:
        release.set()
        thread.join(timeout=60)
    assert not thread.is_alive()

    task = engine.get(task_id)
    assert (task.status, task.attempts, task.output) == (
        "completed", 2, "attempt 2's output"
    )  # fmt: skip
    # Nothing attempt 1 did after the requeue is in the log: its "two" (if any) was refused.
    expected = {
        "retry": [(0, 1, 1, STEP, "one"), (0, 2, 2, STEP, "two")],
        "replay": [(0, 1, 1, STEP, "one"), (1, 1, 2, STEP, "one"), (1, 2, 2, STEP, "two")],
    }
    assert log_of(engine, task_id) == expected[action]
    if zombie_then == "takes a step":
        ((attempt, err),) = [r for r in raised if r[0] == 1]
        assert isinstance(err, LeaseLostError) and "event 2 ('two') not recorded" in str(err)
        assert calls[(1, "two")] == 1  # the step ran (its side effect happened): not recorded


# --- under concurrency --------------------------------------------------------------------------


def test_divergences_and_replays_under_concurrent_workers(
    lesson, url, engine, current_durable_task
):
    """Thirty tasks crash on version 1; version 2 diverges on each; the replays complete."""
    calls = Counter()
    count = 30

    @durable_task(engine, "job", max_attempts=4, backoff=0.01)
    def job(input):
        ctx = current_durable_task()
        if ctx.attempt == 1:  # version 1: a, b, then a crash
            for name in "ab":
                ctx.step(name, counted(ctx, calls, f"{name}{input}"))
            raise RuntimeError("crash")
        # Version 2:
        return [ctx.step(name, counted(ctx, calls, f"{name}{input}")) for name in "ba"]

    ids = [engine.enqueue("job", n) for n in range(count)]
    Worker = lesson.worker.Worker
    workers = [Worker(engine, f"w{i}", slots=2, poll_interval=0.02) for i in range(4)]
    with running(*workers):
        diverged = [engine.wait(task_id, timeout=60) for task_id in ids]
        for task_id in ids:
            engine.replay(task_id)
        replayed = [engine.wait(task_id, timeout=60) for task_id in ids]

    assert len({t.worker for t in diverged}) > 1  # the work was shared
    for task in diverged:
        assert (task.status, task.attempts) == ("failed", 2)
        assert task.error == (
            f"NonDeterminismError: task {task.id} diverged from its history at event 1: expected"
            " step 'a' (recorded by attempt 1), but the code asked for step 'b'"
        )
    with psycopg.connect(url) as conn:
        events = conn.execute(
            "SELECT task_id, replay, seq, attempt, name FROM task_events"
            " ORDER BY task_id, replay, seq"
        ).fetchall()
        actions = conn.execute(
            "SELECT task_id, action, events FROM operator_actions ORDER BY task_id"
        ).fetchall()
    for n, task in enumerate(replayed):
        assert (task.status, task.attempts, task.output) == (
            "completed", 3, [f"b{n} done", f"a{n} done"]
        )  # fmt: skip
        assert [e[1:] for e in events if e[0] == task.id] == [
            (0, 1, 1, "a"), (0, 2, 1, "b"), (1, 1, 3, "b"), (1, 2, 3, "a")
        ]  # fmt: skip
    assert actions == [(task_id, "replay", 2) for task_id in ids]
    # Each step ran once per history: twice in all, never in the attempts that diverged.
    assert set(calls.values()) == {1} and len(calls) == 4 * count
    assert not [key for key in calls if key[0] == 2]


# --- main.py, as a reader runs it --------------------------------------------------------------


def test_main_shows_the_divergence_the_replay_and_the_patch(pg_server_url):
    """Lesson 06's own demo (later lessons have their own main.py)."""
    dbname = f"t06_main_{os.environ.get('PYTEST_XDIST_WORKER', 'main')}"
    demo_url = conninfo.make_conninfo(pg_server_url, dbname=dbname)
    try:
        for cwd in (None, lesson_dir(LESSON_06)):
            result = run_main(LESSON_06, pg_server_url, dbname, cwd=cwd)
            assert result.returncode == 0, result.stdout + result.stderr
            assert result.stderr == ""
            lines = [re.sub(r"pid \d+", "pid <pid>", line) for line in result.stdout.splitlines()]
            assert lines[0].startswith(f"database {dbname} on ")
            divergence = (
                "NonDeterminismError: task 1 diverged from its history at event 1: expected"
                " step 'reserve' (recorded by attempt 1), but the code asked for step 'charge'"
            )
            for line in [
                "  task 1 failed after attempt 2 of 5:",
                "  killed worker-A (version 1, pid <pid>) in step 4 (charge): 3 events logged",
                "  task 2: killed worker-B (version 2, pid <pid>) in step 3 (ship): 2 events"
                " logged",
                "    attempt 1 on worker-A: failed: lease expired (worker presumed dead)",
                f"    attempt 2 on worker-B: failed: {divergence}",
                "  task 1 failed on attempt 3, with the same error as attempt 2",
                "    history 0 (set aside):",
                '      1 step  charge      attempt 4: {"amount": 50, "payment": "pay-A-1"}',
                "    retry  of a task failed after attempt 2: history 0 (3 events) kept",
                "    replay of a task failed after attempt 3: history 0 (3 events) set aside",
                "  the side effects of task 1: reserve, reserve, reserve by worker-A; charge,"
                " reserve, reserve, reserve, ship, email by worker-B",
                "  task 2 completed on attempt 2 by worker-C: fraud check skipped (started before"
                " version 3)",
                "  task 3 completed on attempt 1 by worker-C: fraud check passed",
                "    1 patch fraud-check attempt 1: marker: this run took the patched path",
                "  task 4 completed on attempt 2 (attempt 1 crashed)",
                "  code, discount and expiry through the context: the same on both attempts",
                "  read directly (uuid.uuid4(), random.random(), datetime.now()): different",
                "    worker-C: task 2 attempt 2: 2 events replayed from the log, 2 steps run",
                "from the database: 0 scheduled, 0 queued, 0 running, 4 completed, 0 failed,"
                " 0 cancelled",
            ]:
                assert line in lines, line
            # Task 2's log: version 2's two steps by attempt 1, then version 3 went on.
            start = lines.index("  the log of task 2:")
            assert [line.split(":")[0].split() for line in lines[start + 1 : start + 5]] == [
                ["1", "step", "charge", "attempt", "1"],
                ["2", "step", "reserve", "attempt", "1"],
                ["3", "step", "ship", "attempt", "2"],
                ["4", "step", "email", "attempt", "2"],
            ]
            check_main_side_effects(demo_url, result.stdout)
    finally:
        drop_database(pg_server_url, dbname)


def check_main_side_effects(demo_url: str, out: str) -> None:
    """What the demo claims, read from its database rather than from its report: each step
    recorded in any history happened once (the effects table), by the worker the story says;
    and the coupon's retry got the values its first attempt recorded, and mailed it once."""
    pids = {
        name: int(pid)
        for name, pid in re.findall(
            r"(?:killed|started) (worker-[ABC]) \(version \d, pid (\d+)\)", out
        )
    }
    a, b, c = pids["worker-A"], pids["worker-B"], pids["worker-C"]
    effects = sql(demo_url, "SELECT task_id, step, detail, pid FROM effects ORDER BY at")
    recorded = sql(demo_url, "SELECT task_id, name FROM task_events WHERE kind = 'step_completed'")
    # "computed" is what the coupon's function worked out on each attempt, outside any step.
    happened = [(task, step) for task, step, _, _ in effects if step != "computed"]
    assert Counter(happened) == Counter(recorded)

    def by_task(task_id: int) -> list[tuple[str, int]]:
        return [(step, pid) for task, step, _, pid in effects if task == task_id]

    # Task 1: version 1's reservations (the history set aside), then the replay's six steps.
    assert by_task(1) == [("reserve", a)] * 3 + [
        ("charge", b), ("reserve", b), ("reserve", b), ("reserve", b), ("ship", b), ("email", b)
    ]  # fmt: skip
    # Task 2: version 2 charged and reserved; version 3 shipped, without a fraud check.
    assert by_task(2) == [("charge", b), ("reserve", b), ("ship", c), ("email", c)]
    assert by_task(3) == [(step, c) for step in ("fraud_check", "charge", "reserve", "ship",
                                                 "email")]  # fmt: skip

    ((coupon,),) = sql(demo_url, "SELECT output FROM tasks WHERE name = 'issue_coupon'")
    values = {
        e_name: result
        for e_name, result in sql(
            demo_url,
            "SELECT name, result FROM task_events WHERE kind = 'value_recorded' AND attempt = 1",
        )
    }
    assert coupon == {
        "code": values["uuid4"],
        "discount": 5 + int(values["random"] * 16),
        "expires": (
            datetime.datetime.fromisoformat(values["now"]) + datetime.timedelta(days=30)
        ).isoformat(),
    }
    computed = [json.loads(detail) for _, step, detail, _ in effects if step == "computed"]
    assert [seen["recorded"] for seen in computed] == [coupon, coupon]
    assert [detail for _, step, detail, _ in effects if step == "mail"] == [
        f"{coupon['code']} to ada"
    ]
