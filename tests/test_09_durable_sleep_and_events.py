"""Lesson 09's promises, kept by lesson 09 and every later lesson: durable sleep and events.

- a durable sleep records when it ends, once, on the database's clock, and holds nothing while
  it lasts: a crash, a retry or a cancel and retry sleep only what is left of it;
- a task waiting for an event receives it whenever it was sent, before the wait or after, and
  records one outcome: the event or the timeout, never both, even when they come together;
- a second send of an event changes nothing, even at the same instant as the first;
- 10,000 sleepers hold no slot, and cost an idle worker no query;
- the tests move the engine's clock (AdvanceClock), so a day's sleep takes milliseconds.

The races are set up deterministically: one side holds its transaction open, the test watches
pg_stat_activity until the other side waits for its lock, then lets go.
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

import psycopg
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
    status_counts,
    statuses,
    wait_until,
    worker,
)
from psycopg import conninfo

NO_POLL = 600.0  # seconds: the workers here never poll; what wakes them is a notification
DAY = 24 * 3600


@pytest.fixture(params=lessons_from("09"), scope="module")
def lesson(request):
    return load_lesson(request.param)


def advance_clock(lesson, url: str, seconds: float) -> None:
    """Move the engine's clock `seconds` forward, for every worker at once."""
    with psycopg.connect(url, autocommit=True) as conn:
        lesson.db_queries.Querier(conn).advance_clock(by=datetime.timedelta(seconds=seconds))


def kinds(engine, task_id: int) -> list[str]:
    return [f"{e.kind}:{e.name}" for e in engine.events(task_id)]


def waiting_for_lock(url: str, application_name: str) -> bool:
    """Whether the session `application_name` is blocked on a lock (a row's or a name's)."""
    query = (
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND application_name = %s AND wait_event_type = 'Lock'"
    )
    return sql(url, query, application_name)[0][0] == 1


def counting_worker(lesson, engine, **options):
    """The lesson's Worker, counting its claims: what it does when it wakes."""

    class CountingWorker(lesson.worker.Worker):
        claims = 0

        def claim(self, conn, max_tasks, riders=()):
            self.claims += 1
            return super().claim(conn, max_tasks, riders)

    return CountingWorker(engine, "w", poll_interval=NO_POLL, **options)


def sleeper(engine, current_durable_task, effects: Counter, seconds: float = DAY) -> None:
    @engine.durable_task("sleeper", max_attempts=5, backoff=0.05)
    def sleeper_task(input):
        ctx = current_durable_task()
        ctx.step("before", lambda: effects.update(["before"]))
        ctx.sleep_for("nap", seconds)
        ctx.step("after", lambda: effects.update(["after"]))
        return "rested"


# --- durable sleep ---------------------------------------------------------------------------


def test_a_day_of_sleep_holds_nothing_and_ends_when_the_clock_says(
    lesson, engine, url, current_durable_task
):
    effects: Counter = Counter()
    sleeper(engine, current_durable_task, effects)
    task_id = engine.enqueue("sleeper")
    counting = counting_worker(lesson, engine, slots=2)
    with running(counting):
        wait_until(lambda: engine.get(task_id).status == "scheduled")
        task = engine.get(task_id)
        assert task.lease_expires_at is None and task.worker is not None
        [started] = [e for e in engine.events(task_id) if e.kind == "sleep_started"]
        wakes_at = datetime.datetime.fromisoformat(started.result)
        assert task.run_at == wakes_at  # a row with a time: the claim's promote wakes it
        assert statuses(engine.attempts(task_id)) == ["suspended"]
        claims = counting.claims
        advance_clock(lesson, url, DAY - 60)
        # A minute early: the worker heard the clock move, claimed, and left it asleep.
        wait_until(lambda: counting.claims > claims)
        assert engine.get(task_id).status == "scheduled"
        advance_clock(lesson, url, 60)
        done = engine.wait(task_id, timeout=30)
    assert (done.status, done.output) == ("completed", "rested")
    assert effects == {"before": 1, "after": 1}
    assert kinds(engine, task_id) == [
        "step_completed:before", "sleep_started:nap", "step_completed:after"
    ]  # fmt: skip
    assert statuses(engine.attempts(task_id)) == ["suspended", "completed"]


def test_a_crash_between_recording_the_sleep_and_suspending_sleeps_only_the_rest(
    lesson, engine, url, pg_server_url, tmp_path
):
    """The worker dies (SIGKILL) after the sleep's end is in the log, before the task is
    suspended; the retry, once the lease has run out, sleeps until the recorded moment."""
    (tmp_path / "sleep_tasks.py").write_text(SLEEP_TASKS)
    dbname = conninfo.conninfo_to_dict(url)["dbname"]
    env = dict(lesson_env(pg_server_url, dbname), PYTHONPATH=str(tmp_path))

    def worker_process(name: str, **extra_env: str) -> subprocess.Popen:
        command = [sys.executable, str(lesson_dir(lesson.name) / "worker.py"), "--name", name]
        command += ["--tasks", "sleep_tasks", "--lease", "1", "--poll-interval", "0.05"]
        return subprocess.Popen(
            command, env={**env, **extra_env}, stderr=subprocess.PIPE, text=True
        )

    engine.durable_task("sleeper")(lambda input: None)  # the test process only enqueues
    task_id = engine.enqueue("sleeper")
    first = worker_process("worker-A", DURABLE_CRASH_AT="sleep")
    first.communicate(timeout=60)
    assert first.returncode == -signal.SIGKILL
    [started] = [e for e in engine.events(task_id) if e.kind == "sleep_started"]
    wakes_at = datetime.datetime.fromisoformat(started.result)
    assert engine.get(task_id).status == "running"  # until its lease runs out

    second = worker_process("worker-B")
    try:
        # Reclaimed (attempt 1 failed), retried after its backoff (attempt 2), asleep again.
        retried = ["failed", "suspended"]
        wait_until(lambda: statuses(engine.attempts(task_id)) == retried, timeout=60)
        task = engine.get(task_id)
        # The same wake-up time: not a new hour from the retry's start.
        assert task.run_at == wakes_at
        assert kinds(engine, task_id) == ["step_completed:before", "sleep_started:nap"]
        advance_clock(lesson, url, 3600)
        done = engine.wait(task_id, timeout=60)
    finally:
        second.terminate()
        second.communicate(timeout=30)
    assert (done.status, done.output) == ("completed", "rested")
    effects = sql(url, "SELECT step, count(*) FROM sleep_effects GROUP BY step ORDER BY step")
    assert effects == [("after", 1), ("before", 1)]


SLEEP_TASKS = """
import psycopg
from durable import current_durable_task

URL = None


def effect(step):
    with psycopg.connect(URL, autocommit=True) as conn:
        conn.execute("INSERT INTO sleep_effects VALUES (%s)", (step,))


def sleeper(input):
    ctx = current_durable_task()
    ctx.step("before", effect, "before")
    ctx.sleep_for("nap", 3600)
    ctx.step("after", effect, "after")
    return "rested"


def register(engine):
    global URL
    URL = engine.database_url
    with psycopg.connect(URL, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS sleep_effects (step text NOT NULL)")
    engine.durable_task("sleeper", backoff=0.05)(sleeper)
"""


def test_a_retried_sleeper_sleeps_until_the_moment_it_recorded(
    lesson, engine, url, current_durable_task
):
    """Cancelled while asleep, then retried: the retry replays the sleep, and goes back to sleep
    until the same moment; a replay (a new history) starts a new sleep."""
    effects: Counter = Counter()
    sleeper(engine, current_durable_task, effects, seconds=600)
    task_id = engine.enqueue("sleeper")
    with running(worker(lesson, engine, slots=2, poll_interval=NO_POLL)):
        wait_until(lambda: engine.get(task_id).status == "scheduled")
        wakes_at = engine.get(task_id).run_at
        assert engine.cancel(task_id)
        advance_clock(lesson, url, 300)
        engine.retry(task_id)
        wait_until(lambda: engine.get(task_id).attempts == 2)
        wait_until(lambda: engine.get(task_id).status == "scheduled")
        assert engine.get(task_id).run_at == wakes_at  # the 300 s left, not 600 more
        assert effects == {"before": 1}
        advance_clock(lesson, url, 300)
        assert engine.wait(task_id, timeout=30).status == "completed"
        assert effects == {"before": 1, "after": 1}
        engine.replay(task_id)
        wait_until(lambda: engine.get(task_id).status == "scheduled")
        assert engine.get(task_id).run_at > wakes_at + datetime.timedelta(seconds=500)
    assert effects == {"before": 2, "after": 1}


def test_sleep_until_a_moment_that_has_passed_does_not_suspend(
    lesson, engine, current_durable_task
):
    @engine.durable_task("late")
    def late(input):
        ctx = current_durable_task()
        ctx.sleep_until("past", datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC))
        ctx.sleep_for("zero", 0)
        return "on time"

    task_id = engine.enqueue("late")
    with running(worker(lesson, engine, poll_interval=NO_POLL)):
        done = engine.wait(task_id, timeout=30)
    assert (done.status, done.output) == ("completed", "on time")
    assert statuses(engine.attempts(task_id)) == ["completed"]
    assert kinds(engine, task_id) == ["sleep_started:past", "sleep_started:zero"]


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda ctx: ctx.sleep_for("nap", -1), "seconds, 0 or more"),
        (lambda ctx: ctx.sleep_for("nap", float("nan")), "seconds, 0 or more"),
        (lambda ctx: ctx.sleep_for("", 1), "a sleep needs a name"),
        (lambda ctx: ctx.sleep_until("nap", datetime.datetime(2030, 1, 1)), "time zone"),
        (lambda ctx: ctx.wait_for_event("go", timeout=-1), "seconds, 0 or more"),
        (lambda ctx: ctx.wait_for_event(None), "an event needs a name"),
    ],
)
def test_bad_sleeps_and_waits_fail_the_task_with_a_clear_error(
    lesson, engine, current_durable_task, call, error
):
    @engine.durable_task("bad", max_attempts=1)
    def bad(input):
        call(current_durable_task())

    task_id = engine.enqueue("bad")
    with running(worker(lesson, engine, poll_interval=NO_POLL)):
        done = engine.wait(task_id, timeout=30)
    assert done.status == "failed" and error in done.error
    assert engine.events(task_id) == []  # nothing half-written


# --- events ----------------------------------------------------------------------------------


def approval(engine, current_durable_task, timeout: float | None = DAY) -> None:
    @engine.durable_task("approval", max_attempts=3, backoff=0.05)
    def approval_task(claim):
        ctx = current_durable_task()
        try:
            decision = ctx.wait_for_event(f"approved:{claim}", timeout=timeout)
        except TimeoutError as err:
            return f"timed out: {err}"
        return decision


def test_a_waiting_task_is_woken_by_its_event_and_replays_the_payload(
    lesson, engine, url, current_durable_task
):
    approval(engine, current_durable_task)
    task_id = engine.enqueue("approval", 7)
    with running(worker(lesson, engine, slots=2, poll_interval=NO_POLL)):
        wait_until(lambda: engine.get(task_id).status == "scheduled")
        task = engine.get(task_id)
        assert task.awaiting_event == "approved:7" and task.lease_expires_at is None
        sent = engine.send_event("approved:7", {"by": "ana", "ok": True})
        assert (sent.first, sent.woken) == (True, [task_id])
        done = engine.wait(task_id, timeout=30)
        assert (done.status, done.output) == ("completed", {"by": "ana", "ok": True})
        # A second send changes nothing; a replay (a new history) waits again, and finds the
        # event at once: it was sent before that wait began.
        again = engine.send_event("approved:7", {"by": "bob", "ok": False})
        assert (again.first, again.payload, again.woken) == (False, {"by": "ana", "ok": True}, [])
        engine.replay(task_id)
        assert engine.wait(task_id, timeout=30).output == {"by": "ana", "ok": True}
    history = [(e.replay, e.kind, e.result) for e in engine.events(task_id)]
    deadline = history[0][2]
    assert history == [
        (0, "event_awaited", deadline),
        (0, "event_received", {"by": "ana", "ok": True}),
        (1, "event_awaited", history[2][2]),
        (1, "event_received", {"by": "ana", "ok": True}),
    ]


def test_an_event_sent_before_the_wait_is_not_lost(lesson, engine, current_durable_task):
    approval(engine, current_durable_task)
    sent = engine.send_event("approved:1", "yes")
    assert (sent.first, sent.woken) == (True, [])
    task_id = engine.enqueue("approval", 1)
    with running(worker(lesson, engine, poll_interval=NO_POLL)):
        done = engine.wait(task_id, timeout=30)
    assert (done.status, done.output) == ("completed", "yes")
    assert statuses(engine.attempts(task_id)) == ["completed"]  # it never suspended


def test_a_send_that_commits_while_the_wait_decides_is_not_lost(
    lesson, engine, url, current_durable_task
):
    """The send's transaction holds the name's lock, with the event written, not committed. The
    wait looks (no event), then takes the lock to suspend: it waits for the send. The send
    commits; the wait's next look, a new statement, sees the event: it never suspends. Without
    the name's lock it would suspend, and the send, which queued no one, would never wake it."""
    approval(engine, current_durable_task)
    queries = lesson.db_queries
    with psycopg.connect(url, application_name="sender") as sender:
        queries.Querier(sender).lock_event_name(name="approved:2")
        row = queries.Querier(sender).send_event(name="approved:2", payload="late but there")
        assert row.woken == []  # nobody is waiting yet
        task_id = engine.enqueue("approval", 2)
        with running(worker(lesson, engine, slots=2, poll_interval=NO_POLL)):
            wait_until(lambda: waiting_for_lock(url, "w-steps"))
            sender.commit()
            done = engine.wait(task_id, timeout=30)
    assert (done.status, done.output) == ("completed", "late but there")
    assert statuses(engine.attempts(task_id)) == ["completed"]


def test_an_event_and_a_timeout_that_come_together_record_one_outcome(
    lesson, engine, url, current_durable_task
):
    """Both in one transaction: the clock moves past the deadline and the event is sent. The
    task wakes once, and records one outcome: the event, which wins when both are there."""
    approval(engine, current_durable_task, timeout=60)
    task_id = engine.enqueue("approval", 3)
    with running(worker(lesson, engine, slots=2, poll_interval=NO_POLL)):
        wait_until(lambda: engine.get(task_id).status == "scheduled")
        with psycopg.connect(url) as conn:
            queries = lesson.db_queries.Querier(conn)
            queries.advance_clock(by=datetime.timedelta(seconds=61))
            queries.lock_event_name(name="approved:3")
            assert queries.send_event(name="approved:3", payload="both").woken == [task_id]
        done = engine.wait(task_id, timeout=30)
    assert (done.status, done.output) == ("completed", "both")
    assert [e.kind for e in engine.events(task_id)] == ["event_awaited", "event_received"]


def test_an_event_sent_after_the_timeout_changes_nothing(lesson, engine, url, current_durable_task):
    approval(engine, current_durable_task, timeout=60)
    task_id = engine.enqueue("approval", 4)
    with running(worker(lesson, engine, slots=2, poll_interval=NO_POLL)):
        wait_until(lambda: engine.get(task_id).status == "scheduled")
        advance_clock(lesson, url, 61)
        done = engine.wait(task_id, timeout=30)
        assert done.output == "timed out: no event 'approved:4' was sent before the wait timed out"
        sent = engine.send_event("approved:4", "too late")
        assert (sent.first, sent.woken) == (True, [])
    assert [e.kind for e in engine.events(task_id)] == ["event_awaited", "event_timed_out"]
    assert statuses(engine.attempts(task_id)) == ["suspended", "completed"]


def test_two_sends_at_the_same_instant_record_one_event(lesson, engine, url, current_durable_task):
    """The first send holds its transaction open; the second waits for the name's lock (watched
    in pg_stat_activity); the first commits; the second finds the event sent, and changes
    nothing. The waiting task records the first payload, once."""
    approval(engine, current_durable_task)
    task_id = engine.enqueue("approval", 5)
    with running(worker(lesson, engine, slots=2, poll_interval=NO_POLL)):
        wait_until(lambda: engine.get(task_id).status == "scheduled")
        with psycopg.connect(url) as first:
            queries = lesson.db_queries.Querier(first)
            queries.lock_event_name(name="approved:5")
            assert queries.send_event(name="approved:5", payload="first").woken == [task_id]
            second: list = []
            with lesson.engine.Engine(url + " application_name=second") as other:
                sending = threading.Thread(
                    target=lambda: second.append(other.send_event("approved:5", "second"))
                )
                sending.start()
                wait_until(lambda: waiting_for_lock(url, "second"))
                first.commit()
                sending.join(timeout=30)
        [repeat] = second
        assert (repeat.first, repeat.payload, repeat.woken) == (False, "first", [])
        assert engine.wait(task_id, timeout=30).output == "first"
    assert [e.kind for e in engine.events(task_id)] == ["event_awaited", "event_received"]
    assert sql(url, "SELECT name, payload FROM sent_events") == [("approved:5", "first")]


def test_a_cancelled_waiter_is_not_woken_and_its_retry_waits_until_the_same_deadline(
    lesson, engine, url, current_durable_task
):
    approval(engine, current_durable_task, timeout=600)
    task_id = engine.enqueue("approval", 6)
    with running(worker(lesson, engine, slots=2, poll_interval=NO_POLL)):
        wait_until(lambda: engine.get(task_id).status == "scheduled")
        deadline = engine.get(task_id).run_at
        assert engine.cancel(task_id)
        cancelled = engine.get(task_id)
        assert (cancelled.status, cancelled.awaiting_event) == ("cancelled", None)
        engine.retry(task_id)
        wait_until(lambda: engine.get(task_id).attempts == 2)
        wait_until(lambda: engine.get(task_id).status == "scheduled")
        retried = engine.get(task_id)
        assert (retried.run_at, retried.awaiting_event) == (deadline, "approved:6")
        assert engine.send_event("approved:6", "ok").woken == [task_id]
        done = engine.wait(task_id, timeout=30)
    assert (done.status, done.output) == ("completed", "ok")
    # The cancel found no attempt running: the first had ended as the wait suspended.
    assert statuses(engine.attempts(task_id)) == ["suspended", "suspended", "completed"]
    assert [e.kind for e in engine.events(task_id)] == ["event_awaited", "event_received"]


def test_an_event_sent_to_a_cancelled_task_wakes_nobody(lesson, engine, current_durable_task):
    approval(engine, current_durable_task)
    task_id = engine.enqueue("approval", 8)
    with running(worker(lesson, engine, poll_interval=NO_POLL)):
        wait_until(lambda: engine.get(task_id).status == "scheduled")
        engine.cancel(task_id)
        assert engine.send_event("approved:8", "ok").woken == []
    assert engine.get(task_id).status == "cancelled"


def test_a_wait_with_no_timeout_sets_no_alarm(lesson, engine, url, current_durable_task):
    approval(engine, current_durable_task, timeout=None)
    task_id = engine.enqueue("approval", 9)
    with running(worker(lesson, engine, poll_interval=NO_POLL)):
        # Suspended, not scheduled: no time wakes it, only its event.
        wait_until(lambda: engine.get(task_id).status == "suspended")
        with psycopg.connect(url) as conn:
            due_in = lesson.db_queries.Querier(conn).next_due(task_names=["approval"])
        assert due_in == float("inf")
        advance_clock(lesson, url, 100 * 365 * DAY)  # a century later: still waiting
        assert engine.get(task_id).status == "suspended"
        engine.send_event("approved:9", None)  # a JSON null is a payload like any other
        done = engine.wait(task_id, timeout=30)
    assert (done.status, done.output) == ("completed", None)


def test_a_deploy_that_renames_a_sleep_diverges(lesson, engine, url, current_durable_task):
    names = {"sleep": "nap"}

    @engine.durable_task("napper", max_attempts=1)
    def napper(input):
        current_durable_task().sleep_for(names["sleep"], 60)

    task_id = engine.enqueue("napper")
    with running(worker(lesson, engine, poll_interval=NO_POLL)):
        wait_until(lambda: engine.get(task_id).status == "scheduled")
        names["sleep"] = "siesta"
        advance_clock(lesson, url, 60)
        done = engine.wait(task_id, timeout=30)
    assert done.status == "failed"
    assert done.error == (
        f"NonDeterminismError: task {task_id} diverged from its history at event 1: expected"
        " the sleep 'nap' (recorded by attempt 1), but the code asked for the sleep 'siesta'"
    )


def test_bad_events_are_refused_with_a_clear_error(lesson, engine, url):
    with pytest.raises(lesson.engine.TaskInputError, match="payload of event 'x' is not JSON"):
        engine.send_event("x", {1, 2})
    with pytest.raises(lesson.engine.TaskOptionError, match="an event's name must be a non-emp"):
        engine.send_event("", "yes")
    assert sql(url, "SELECT count(*) FROM sent_events") == [(0,)]


# --- scale -----------------------------------------------------------------------------------


def test_ten_thousand_sleepers_hold_no_slot_and_cost_an_idle_worker_nothing(
    lesson, engine, url, current_durable_task
):
    # An hour from now, on the engine's clock, and then one each second for a minute.
    [(base,)] = sql(url, "SELECT clock_now() + interval '1 hour'")

    @engine.durable_task("dozer")
    def dozer(n):
        wakes_at = datetime.datetime.fromisoformat(base) + datetime.timedelta(seconds=n % 60)
        current_durable_task().sleep_until("nap", wakes_at)

    base = base.isoformat()
    engine.enqueue_many("dozer", range(10_000))
    counting = counting_worker(lesson, engine, slots=20)
    with running(counting):
        wait_until(lambda: status_counts(url) == {"scheduled": 10_000}, timeout=120)
        # The last suspensions' notifications may still be arriving: wait for a quiet moment.
        quiet = threading.Event()
        seen = [-1]

        def settled() -> bool:
            settled, seen[0] = seen[0] == counting.claims, counting.claims
            return settled

        wait_until(settled, interval=0.3)
        before = counting.claims
        # Then idle for a second: no claim, no query. (The alarm is set an hour ahead.)
        quiet.wait(1.0)
        assert counting.claims == before
        assert sql(url, "SELECT count(*) FROM tasks WHERE lease_expires_at IS NOT NULL") == [(0,)]
        # Half a second past the first wake-up: the 167 sleepers due then (n % 60 == 0) wake,
        # on the alarm the clock's move set, and the others sleep on.
        [(to_base,)] = sql(url, "SELECT extract(epoch FROM %s::timestamptz - clock_now())", base)
        advance_clock(lesson, url, float(to_base) + 0.5)
        wait_until(lambda: status_counts(url) == {"completed": 167, "scheduled": 9_833})


# --- main.py and approve.py (lesson 09's own) ------------------------------------------------

LESSON = "09-durable-sleep-and-events"


def test_main_waits_for_the_approval_through_a_kill_9(pg_server_url):
    dbname = f"t09_main_{os.getpid()}"
    try:
        started = time.monotonic()
        result = run_main(LESSON, pg_server_url, dbname, cwd=lesson_dir(LESSON))
        took = time.monotonic() - started
        assert result.returncode == 0, result.stdout + result.stderr
        assert took < 15, took  # the budget for the demo
        lines = result.stdout.splitlines()
        assert lines[0].startswith(f"database {dbname} on ")
        effects = [line.strip() for line in lines if line.startswith("   worker-")]
        assert effects == [
            "worker-A: asked Bea to approve",
            "worker-A: reminder 1",
            "worker-A: reminder 2",
            "worker-B: reminder 3",
            "worker-B: paid 42.50 to Ana",
        ]
        assert "4. task 1 completed: 'approved by main.py, paid after 3 reminders'" in lines
        url = postgres.database_url(pg_server_url, dbname)
        # From the database: each side effect once; the kill left no attempt running; the
        # approval reached an attempt of worker-B.
        assert sql(url, "SELECT count(*), count(DISTINCT effect) FROM expense_effects") == [(5, 5)]
        attempts = sql(url, "SELECT worker, status::text FROM task_attempts ORDER BY attempt")
        assert attempts == [("worker-A", "suspended")] * 3 + [
            ("worker-B", "suspended"), ("worker-B", "suspended"), ("worker-B", "completed"),
        ]  # fmt: skip
        received = sql(url, "SELECT attempt FROM task_events WHERE kind = 'event_received'")
        assert received == [(5,)]
    finally:
        drop_database(pg_server_url, dbname)


def test_approve_sends_once_and_refuses_a_second_answer(pg_server_url):
    dbname = f"t09_approve_{os.getpid()}"
    url = postgres.recreate_database(
        pg_server_url, dbname, (lesson_dir(LESSON) / "sql/schema.sql").read_text()
    )
    try:
        first = run_main(LESSON, pg_server_url, dbname, "7", "yes", "--by", "bea",
                         script="approve.py")  # fmt: skip
        assert (first.returncode, first.stderr) == (0, ""), first.stderr
        assert first.stdout == (
            "sent approved:7; no task waits for it yet: the first to wait receives it at once\n"
        )
        second = run_main(LESSON, pg_server_url, dbname, "7", "no", script="approve.py")
        assert second.returncode == 1
        assert second.stdout == (
            "approved:7 was sent already, with {'by': 'bea', 'approved': True}: nothing changed\n"
        )
        assert sql(url, "SELECT payload FROM sent_events") == [({"approved": True, "by": "bea"},)]
        bad = run_main(LESSON, pg_server_url, dbname, "seven", "yes", script="approve.py")
        assert bad.returncode == 2 and "invalid int value: 'seven'" in bad.stderr
    finally:
        drop_database(pg_server_url, dbname)
