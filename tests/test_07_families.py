"""Lesson 07's family rules, kept by lesson 07 and every later lesson.

- the close policy: children never outlive their parent (it completes, fails for good, on a
  NonDeterminismError too, is cancelled, or its lease runs out on its last attempt);
- a child is operated through its parent: retrying or replaying it alone is refused;
- retrying a cancelled parent runs again the children that were cancelled with it;
- a child that fails for good wakes its waiting parent: when it times out on its last try,
  and when its lease runs out on its last try (its worker died);
- retention never deletes what an operator action requeues, whichever goes first (the races
  are set up deterministically: a lock held, pg_stat_activity watched, then released), nor a
  family before all of it has finished: not a finished parent whose children run or wait,
  nor a finished child on its own;
- a child's input is part of its spawn's identity;
- a connection that breaks just after a commit (a spawn, the children's outcomes, a
  suspension) is retried without spawning, recording or suspending twice.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from collections import Counter
from contextlib import contextmanager

import psycopg
import pytest
from harness import (
    lesson_dir,
    lesson_env,
    lessons_from,
    load_lesson,
    running,
    sql,
    statuses,
    wait_until,
    worker,
)
from psycopg import conninfo


@pytest.fixture(params=lessons_from("07"), scope="module")
def lesson(request):
    return load_lesson(request.param)


def unfinished_children(url: str, parent: int) -> int:
    query = "SELECT count(*) FROM tasks WHERE parent_id = %s AND finished_at IS NULL"
    return sql(url, query, parent)[0][0]


def register_blocker(lesson, engine, stopped: list[str] | None = None) -> None:
    """A child that runs until its attempt is stopped (a cancel, heard at a heartbeat)."""
    current_task = lesson.task_context.current_task

    @engine.task("blocker")
    def blocker(input):
        try:
            current_task().sleep(60)
        except lesson.task_context.TaskStopped as err:
            if stopped is not None:
                stopped.append(str(err))
            raise


# --- the close policy: children never outlive their parent ------------------------------------


def test_a_parent_that_completes_cancels_the_children_it_did_not_wait_for(lesson, engine, url):
    stopped: list[str] = []
    register_blocker(lesson, engine, stopped)
    current_task = lesson.task_context.current_task

    def running_child(parent: int) -> None:
        wait_until(lambda: statuses(engine.children(parent)) == ["running"], timeout=30)

    @engine.durable_task("fire_and_forget")
    def fire_and_forget(input):
        ctx = current_task()
        ctx.spawn("blocker")
        ctx.step("until the child runs", running_child, ctx.task_id)
        return "done"

    task_id = engine.enqueue("fire_and_forget")
    with running(worker(lesson, engine, slots=2, lease=1.5)):
        assert engine.wait(task_id, timeout=30).status == "completed"
        wait_until(lambda: stopped, timeout=30)  # its worker heard of it at a heartbeat
    (child,) = engine.children(task_id)
    assert child.status == "cancelled"
    assert stopped == [f"task {child.id} was cancelled"]
    assert unfinished_children(url, task_id) == 0
    # Cancelling the finished parent says False, and does nothing.
    assert engine.cancel(task_id) is False
    assert engine.get(task_id).status == "completed"


@pytest.mark.parametrize("how", ["non-retryable error", "non-determinism"])
def test_a_parent_that_fails_for_good_cancels_its_children(lesson, engine, url, how):
    register_blocker(lesson, engine)
    current_task = lesson.task_context.current_task
    deployed = {"version": 1}

    @engine.durable_task("parent", max_attempts=3, backoff=0.01)
    def parent(input):
        ctx = current_task()
        if how == "non-retryable error":
            ctx.spawn("blocker")
            raise lesson.task_context.NonRetryableError("the order was withdrawn")
        if deployed["version"] == 1:
            ctx.spawn("blocker")
            deployed["version"] = 2  # the deploy: the retry runs other code
            raise ConnectionError("down")  # retryable
        ctx.step("something else", lambda: 1)  # where the history has the spawn

    task_id = engine.enqueue("parent")
    with running(worker(lesson, engine, slots=2, lease=1.5)):
        failed = engine.wait(task_id, timeout=30)
        assert failed.status == "failed"
        wait_until(lambda: statuses(engine.children(task_id)) == ["cancelled"], timeout=30)
        if how == "non-determinism":
            assert failed.error.startswith("NonDeterminismError: ")
            return
        # A replay spawns a new child, and fails again: no two children ever run at once.
        engine.replay(task_id)
        assert engine.wait(task_id, timeout=30).status == "failed"
        wait_until(lambda: statuses(engine.children(task_id)) == ["cancelled"] * 2, timeout=30)
    assert unfinished_children(url, task_id) == 0


TASKS_OF_A_DYING_PARENT = """
import time

from task_context import current_task


def parent(input):
    current_task().spawn("blocker")
    time.sleep(600)  # its worker is killed here


def register(engine):
    engine.durable_task("parent", max_attempts=1)(parent)
    engine.task("blocker")(lambda input: current_task().sleep(60))
"""


def test_a_parent_whose_lease_runs_out_on_its_last_attempt_cancels_its_children(
    lesson, engine, url, pg_server_url, tmp_path
):
    (tmp_path / "dying_tasks.py").write_text(TASKS_OF_A_DYING_PARENT)
    register_blocker(lesson, engine)
    engine.durable_task("parent", max_attempts=1)(lambda input: None)
    task_id = engine.enqueue("parent")
    env = lesson_env(pg_server_url, conninfo.conninfo_to_dict(url)["dbname"])
    env["PYTHONPATH"] = str(tmp_path)
    command = [sys.executable, str(lesson_dir(lesson.name) / "worker.py"), "--name", "doomed"]
    command += ["--tasks", "dying_tasks", "--slots", "1", "--lease", "1"]
    doomed = subprocess.Popen(command, env=env, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: len(engine.children(task_id)) == 1, timeout=60)
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(timeout=30)
    finally:
        if doomed.poll() is None:
            doomed.kill()
            doomed.wait()
    # Another worker runs the child, and reclaims the parent once its lease has run out.
    with running(worker(lesson, engine, "rescuer", slots=2, lease=1)):
        failed = engine.wait(task_id, timeout=30)
        assert (failed.status, failed.error) == ("failed", "lease expired (worker presumed dead)")
        wait_until(lambda: statuses(engine.children(task_id)) == ["cancelled"], timeout=30)


# --- a child that fails for good wakes its waiting parent, however it fails --------------------


def register_waiting_parent(lesson, engine, before_the_wait=None) -> None:
    """A parent that spawns a child, waits for it, and says how the child failed, if it did.
    `before_the_wait(child_id)`, if given, runs as a step between the spawn and the wait."""
    current_task = lesson.task_context.current_task

    @engine.durable_task("parent", max_attempts=1)
    def parent(input):
        ctx = current_task()
        child = ctx.spawn("child")
        if before_the_wait is not None:
            ctx.step("before the wait", before_the_wait, child.task_id)
        try:
            return ctx.wait(child)
        except lesson.durable.ChildTaskError as err:
            return f"gave up: {err.error}"


def test_a_child_that_times_out_on_its_last_try_wakes_its_parent(lesson, engine):
    hung = threading.Event()

    @engine.task("child", max_attempts=1, timeout=0.3)
    def child(input):
        hung.wait(60)  # a hung call: it never checks its context, and returns only at teardown
        return "too late"

    register_waiting_parent(lesson, engine)
    task_id = engine.enqueue("parent")
    # Worker A has ONE slot: the parent suspends before the child can run; then the hung child
    # keeps that slot, its attempt failed by A's timeout, and the woken parent resumes on B.
    with running(worker(lesson, engine, "A", slots=1)):
        try:
            wait_until(lambda: statuses(engine.attempts(task_id))[:1] == ["suspended"], timeout=30)
            with running(worker(lesson, engine, "B", slots=1)):
                task = engine.wait(task_id, timeout=30)
        finally:
            hung.set()  # only now: a child that returned late would wake its parent too
    timed_out = "TaskTimeout: attempt exceeded its timeout of 0.3s"
    assert (task.status, task.output) == ("completed", f"gave up: {timed_out}")
    assert statuses(engine.attempts(task_id)) == ["suspended", "completed"]
    (child_task,) = engine.children(task_id)
    assert (child_task.status, child_task.error, child_task.attempts) == ("failed", timed_out, 1)


def test_a_child_whose_lease_runs_out_on_its_last_try_wakes_its_parent(lesson, engine):
    engine.task("child", max_attempts=1)(lambda input: "never runs")

    def claimed(child: int) -> None:
        wait_until(lambda: engine.get(child).status != "queued", timeout=30)

    register_waiting_parent(lesson, engine, before_the_wait=claimed)
    task_id = engine.enqueue("parent")
    # ONE slot: while the parent runs, its worker neither claims the child nor reclaims it
    # (the reclaim is part of the claim). So the child's lease runs out, and is reclaimed,
    # after the parent has suspended, however slow this machine is.
    with running(worker(lesson, engine, slots=1)):
        wait_until(lambda: engine.children(task_id), timeout=30)
        # A worker that claims the child with a short lease and dies: no heartbeat, no outcome.
        dead = worker(lesson, engine, "dead", lease=0.2)
        with dead.connect() as conn:
            assert [t.name for t in dead.claim(conn, 1)] == ["child"]
        task = engine.wait(task_id, timeout=30)
    expired = "lease expired (worker presumed dead)"
    assert (task.status, task.output) == ("completed", f"gave up: {expired}")
    assert statuses(engine.attempts(task_id)) == ["suspended", "completed"]
    (child_task,) = engine.children(task_id)
    assert (child_task.status, child_task.error) == ("failed", expired)
    assert [(a.worker, a.status) for a in engine.attempts(child_task.id)] == [("dead", "failed")]


# --- operator actions on families ---------------------------------------------------------------


def test_a_child_is_retried_or_replayed_through_its_parent_only(lesson, engine, url):
    current_task = lesson.task_context.current_task

    @engine.task("broken", max_attempts=1)
    def broken(input):
        raise ValueError("no")

    @engine.durable_task("parent", max_attempts=1)
    def parent(input):
        ctx = current_task()
        return ctx.wait(ctx.spawn("broken"))

    task_id = engine.enqueue("parent")
    with running(worker(lesson, engine, slots=2)):
        assert engine.wait(task_id, timeout=30).status == "failed"
    (child,) = engine.children(task_id)
    for action in (engine.retry, engine.replay):
        with pytest.raises(
            lesson.engine.TaskStateError,
            match=f"task {child.id} is a child of task {task_id}: .*"
            f"retry or replay task {task_id} instead",
        ):
            action(child.id)
    assert engine.get(child.id).status == "failed" and engine.actions(child.id) == []


def test_retrying_a_cancelled_parent_runs_the_children_cancelled_with_it(lesson, engine, url):
    current_task = lesson.task_context.current_task
    runs: Counter[str] = Counter()
    gate = threading.Event()

    @engine.task("quick")
    def quick(input):
        runs["quick"] += 1
        return "quick"

    @engine.task("gated")
    def gated(input):
        runs["gated"] += 1
        while not gate.is_set():
            current_task().sleep(0.02)  # raises once its attempt is cancelled
        return "gated"

    @engine.durable_task("parent")
    def parent(input):
        ctx = current_task()
        first = ctx.wait(ctx.spawn("quick"))
        return [first, ctx.wait(ctx.spawn("gated"))]

    task_id = engine.enqueue("parent")
    with running(worker(lesson, engine, slots=2, lease=1)):
        wait_until(lambda: statuses(engine.children(task_id)) == ["completed", "running"])
        assert engine.cancel(task_id) is True
        wait_until(lambda: engine.attempts(engine.children(task_id)[1].id)[0].status != "running")
        assert statuses(engine.children(task_id)) == ["completed", "cancelled"]

        gate.set()
        engine.retry(task_id)
        task = engine.wait(task_id, timeout=30)
    assert (task.status, task.output) == ("completed", ["quick", "gated"])
    # quick's end was in the parent's history: kept. gated's was not: it ran again.
    assert runs == {"quick": 1, "gated": 2}
    assert statuses(engine.children(task_id)) == ["completed", "completed"]


# --- retention and operator actions, whichever goes first --------------------------------------


def waiting_for_locks(url: str) -> int:
    """How many sessions on the test's database are waiting for a lock."""
    query = (
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    return sql(url, query)[0][0]


@contextmanager
def share_lock(url: str, task_id: int):
    """A transaction of the test's holding a share lock on one task's row, until the block ends."""
    with psycopg.connect(url) as holder:
        holder.execute("SELECT 1 FROM tasks WHERE id = %s FOR SHARE", (task_id,))
        yield
        holder.commit()


def cancelled_family(lesson, engine) -> tuple[int, int]:
    """A parent cancelled while waiting for its child: both finished (cancelled)."""
    register_blocker(lesson, engine)
    current_task = lesson.task_context.current_task

    @engine.durable_task("parent")
    def parent(input):
        ctx = current_task()
        return ctx.wait(ctx.spawn("blocker"))

    task_id = engine.enqueue("parent")
    with running(worker(lesson, engine, slots=2, lease=1)):
        wait_until(lambda: engine.get(task_id).status == "suspended", timeout=30)
        assert engine.cancel(task_id) is True
        (child,) = engine.children(task_id)
        # (On a loaded machine the child may not have started yet: then it has no attempt.)
        wait_until(
            lambda: all(a.status != "running" for a in engine.attempts(child.id)), timeout=30
        )
    return task_id, child.id


def in_thread(function, *args):
    """Run function(*args) on a thread; the returned dict gets its result or its exception."""
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = function(*args)
        except Exception as err:
            outcome["error"] = err

    thread = threading.Thread(target=run)
    thread.start()
    outcome["thread"] = thread
    return outcome


def test_retention_skips_a_family_an_operator_is_requeueing(lesson, engine, url):
    parent, child = cancelled_family(lesson, engine)
    with share_lock(url, child):
        # The retry locks the parent, then waits for the child's row (held by the test).
        retry = in_thread(engine.retry, parent)
        wait_until(lambda: waiting_for_locks(url) == 1, timeout=30)
        # Retention meets the parent locked, and skips it: it deletes nothing.
        assert engine.cleanup(older_than=0) == 0
    retry["thread"].join(timeout=30)
    assert "error" not in retry, retry
    assert retry["result"].task_id == parent
    assert [engine.get(parent).status, engine.get(child).status] == ["queued", "queued"]
    assert len(engine.actions(parent)) == 1


def test_a_requeue_after_retention_deleted_the_family_says_so(lesson, engine, url):
    parent, child = cancelled_family(lesson, engine)
    with share_lock(url, child):
        # Retention locks the parent, deletes it, and its delete of the child (the cascade)
        # waits for the test's lock. Then the retry waits for the parent's row.
        cleanup = in_thread(engine.cleanup, 0)
        wait_until(lambda: waiting_for_locks(url) == 1, timeout=30)
        retry = in_thread(engine.retry, parent)
        wait_until(lambda: waiting_for_locks(url) == 2, timeout=30)
    cleanup["thread"].join(timeout=30)
    retry["thread"].join(timeout=30)
    assert cleanup.get("result") == 1, cleanup
    # The operator is told: the task is gone, nothing was requeued, nothing half-done.
    assert isinstance(retry.get("error"), lesson.engine.TaskNotFoundError), retry
    assert engine.get(parent) is None and engine.get(child) is None
    assert sql(url, "SELECT count(*) FROM operator_actions") == [(0,)]


def stalling_worker(lesson, engine, stalled: threading.Event, **options):
    """A worker whose heartbeats stop once `stalled` is set, as if its process had frozen: the
    leases of the tasks it runs run out, and another worker's claim reclaims them."""

    class StallingWorker(lesson.worker.Worker):
        def _heartbeat(self, conn, contexts):
            if not stalled.is_set():
                super()._heartbeat(conn, contexts)

    options.setdefault("poll_interval", 0.02)
    return StallingWorker(engine, "stalling", **options)


def test_retention_keeps_a_family_until_all_of_it_has_finished(lesson, engine, url, monkeypatch):
    """A parent that failed for good while its children still run or wait: the moment between
    the reclaim that fails it (its lease ran out on its last attempt) and the close policy's
    cancel of its children, which comes in a transaction of its own (a worker that dies in
    between leaves the family so). Retention, run in that moment, deletes neither the parent
    (its children are not done) nor its finished child (a child goes with its parent only)."""
    current_task = lesson.task_context.current_task
    stalled, hung = threading.Event(), threading.Event()
    engine.task("quick")(lambda input: "quick")
    engine.task("blocker")(lambda input: None)  # never runs: claimed by a worker that stops

    @engine.durable_task("parent", max_attempts=1)
    def parent(input):
        ctx = current_task()
        ctx.wait(ctx.spawn("quick"))
        ctx.spawn("blocker")
        ctx.spawn("blocker")
        stalled.set()  # its worker freezes here: no more heartbeats
        hung.wait(60)

    def family() -> list[str]:
        return [status for (status,) in sql(url, "SELECT status FROM tasks ORDER BY id")]

    retention = {}
    close_children = lesson.db_queries.Querier.close_children

    def retention_first(self, *, ids):
        retention["deleted"] = engine.cleanup(older_than=0)
        retention["family"] = family()
        return close_children(self, ids=ids)

    task_id = engine.enqueue("parent")
    # ONE slot, held by the frozen parent: that worker claims (and reclaims) nothing more.
    with running(stalling_worker(lesson, engine, stalled, slots=1, lease=1)):
        try:
            wait_until(stalled.is_set, timeout=30)
            lease_ran_out = "SELECT lease_expires_at < now() FROM tasks WHERE id = %s"
            wait_until(lambda: sql(url, lease_ran_out, task_id) == [(True,)], timeout=30)
            # The rescuer's claim fails the parent for good, claims the first blocker, and
            # then closes the family: retention runs just before that.
            rescuer = worker(lesson, engine, "rescuer")
            with monkeypatch.context() as patch, rescuer.connect() as conn:
                patch.setattr(lesson.db_queries.Querier, "close_children", retention_first)
                assert [t.name for t in rescuer.claim(conn, 1)] == ["blocker"]
        finally:
            hung.set()
    assert retention == {
        "deleted": 0,
        "family": ["failed", "completed", "running", "queued"],
    }
    assert family() == ["failed", "completed", "cancelled", "cancelled"]
    assert engine.cleanup(older_than=3600) == 0  # all finished, none an hour ago
    assert engine.cleanup(older_than=0) == 1  # the parent, and its children with it
    assert family() == []


# --- a child's input is part of its spawn's identity --------------------------------------------


def test_a_retry_that_spawns_a_child_with_another_input_diverges(lesson, engine):
    current_task = lesson.task_context.current_task
    deployed = {"query": "cats"}

    @engine.task("search")
    def search(input):
        return f"results for {input['q']}"

    @engine.durable_task("agent", max_attempts=2, backoff=0.01)
    def agent(input):
        ctx = current_task()
        found = ctx.wait(ctx.spawn("search", {"q": deployed["query"]}))
        if ctx.attempt <= 2 and deployed["query"] == "cats":
            deployed["query"] = "dogs"  # the deploy: the retry would search for something else
            raise ConnectionError("the model is down")
        return found

    task_id = engine.enqueue("agent")
    with running(worker(lesson, engine, slots=2)):
        task = engine.wait(task_id, timeout=30)
    assert task.status == "failed"
    (child,) = engine.children(task_id)
    assert task.error.startswith(f"NonDeterminismError: task {task_id} diverged from its history")
    assert (
        f'the child it spawned then, task {child.id}, has input {{"q": "cats"}};'
        ' the code now passes {"q": "dogs"}'
    ) in task.error


# --- hiccups: the connection breaks just after a commit -----------------------------------------


class Hiccup:
    """Break the connection's answer once, after the statement has done its work."""

    def __init__(self) -> None:
        self.armed = False
        self.fired = 0

    def fire(self) -> None:
        if self.armed:
            self.armed, self.fired = False, self.fired + 1
            raise psycopg.OperationalError("server closed the connection unexpectedly (a test)")


def test_a_spawn_whose_commit_answer_is_lost_spawns_one_child(lesson, engine, monkeypatch):
    hiccup = Hiccup()
    original = psycopg.Connection.transaction

    @contextmanager
    def transaction(self, *args, **kwargs):
        with original(self, *args, **kwargs) as tx:
            yield tx
        hiccup.fire()  # after the COMMIT: the spawn and its event are in

    monkeypatch.setattr(psycopg.Connection, "transaction", transaction)
    monkeypatch.setattr(lesson.durable, "crash_point", lambda name: setattr(hiccup, "armed", True))
    current_task = lesson.task_context.current_task
    engine.task("child")(lambda input: input * 2)

    @engine.durable_task("parent", max_attempts=1)
    def parent(input):
        ctx = current_task()
        return ctx.wait(ctx.spawn("child", 21))

    task_id = engine.enqueue("parent")
    with running(worker(lesson, engine, slots=2)):
        task = engine.wait(task_id, timeout=30)
    assert hiccup.fired >= 1
    assert (task.status, task.output) == ("completed", 42)
    assert len(engine.children(task_id)) == 1


def test_outcomes_and_a_suspension_whose_answers_are_lost_are_recorded_once(
    lesson, engine, monkeypatch
):
    queries = lesson.db_queries.Querier
    hiccups = {"record_child_outcomes": Hiccup(), "suspend_task": Hiccup()}
    for method, hiccup in hiccups.items():
        original = getattr(queries, method)

        def broken(self, *args, _original=original, _hiccup=hiccup, **kwargs):
            result = _original(self, *args, **kwargs)
            _hiccup.fire()
            return result

        hiccup.armed = True
        monkeypatch.setattr(queries, method, broken)
    current_task = lesson.task_context.current_task
    gate = threading.Event()

    @engine.task("gated")
    def gated(input):
        gate.wait(30)
        return input

    @engine.durable_task("parent", max_attempts=1)
    def parent(input):
        ctx = current_task()
        return ctx.wait_all([ctx.spawn("gated", n) for n in (1, 2)])

    task_id = engine.enqueue("parent")
    with running(worker(lesson, engine, slots=3)):
        wait_until(lambda: engine.get(task_id).status == "suspended", timeout=30)
        gate.set()
        task = engine.wait(task_id, timeout=30)
    assert [h.fired for h in hiccups.values()] == [1, 1]
    assert (task.status, task.output) == ("completed", [1, 2])
    kinds = Counter(str(event.kind) for event in engine.events(task_id))
    assert kinds == {"child_spawned": 2, "child_completed": 2}
    assert statuses(engine.attempts(task_id)) == ["suspended", "completed"]


def test_children_left_running_by_a_parent_that_ended_without_closing_them_are_cancelled(
    lesson, engine, url
):
    """The state a worker leaves when it dies between a reclaim that failed a parent for good
    and the close of its children (two transactions): the parent failed, its children running
    on. The chores' sweep (CloseOrphans) cancels them."""
    register_blocker(lesson, engine)
    current_task = lesson.task_context.current_task

    @engine.durable_task("parent")
    def parent(input):
        ctx = current_task()
        return ctx.wait_all([ctx.spawn("blocker"), ctx.spawn("blocker")])

    task_id = engine.enqueue("parent")
    # A slot left free: the chores run with a claim, and a full worker does not claim. A short
    # lease: the blockers hear of their cancel at their next heartbeat, a third of it.
    with running(worker(lesson, engine, slots=3, poll_interval=0.05, lease=1)):
        wait_until(lambda: engine.get(task_id).status == "suspended")
        wait_until(lambda: statuses(engine.children(task_id)) == ["running", "running"])
        # What the reclaim writes, without the close that would follow it.
        sql(
            url,
            "UPDATE tasks SET status = 'failed', error = 'lease expired (worker presumed dead)',"
            " finished_at = now(), waiting_for = NULL WHERE id = %s",
            task_id,
        )
        unfinished = "SELECT count(*) FROM tasks WHERE finished_at IS NULL"
        wait_until(lambda: sql(url, unfinished) == [(0,)])
    assert statuses(engine.children(task_id)) == ["cancelled", "cancelled"]
    assert engine.get(task_id).status == "failed"
