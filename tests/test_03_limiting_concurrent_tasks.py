"""Lesson 03: worker slots, per-key concurrency limits that hold across workers, fair turns.

Every limit is audited from the database: the tasks' started_at/finished_at intervals (from
lesson 04 on, the attempts'), through the lesson's own MostRunningPerKey / MostRunningPerWorker
queries, with the task functions' own view of how many ran at once as a second witness. The
races are shown deterministically: two connections, one holding a lock, the other's wait
observed in pg_stat_activity, or made to fail at once (lock_timeout) if it waited.

These promises are kept by lesson 03 and by every later lesson: each test of the engine runs
against lessons 03 to the latest (the `lesson` fixture), since a lesson is a complete snapshot
of the engine. The tests of lesson 03's own scripts (naive_limit.py, main.py) run once.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest
from harness import (
    add_finished_tasks,
    drop_database,
    import_lesson,
    lesson_dir,
    lessons_from,
    load_lesson,
    once,
    run_main,
    status_counts,
    wait_until,
)

FIRST = "03-limiting-concurrent-tasks"
XDIST = os.environ.get("PYTEST_XDIST_WORKER", "main")
# A claim that waited for a lock instead of skipping the locked row fails with this, at once.
NEVER_WAIT = "SET lock_timeout = '2s'"


@pytest.fixture(params=lessons_from("03"), scope="module")
def lesson(request):
    return load_lesson(request.param)


@pytest.fixture(scope="module")
def lesson_03():
    """Lesson 03's own modules, with its naive_limit.py: for the tests of its scripts."""
    return import_lesson(FIRST, "engine", "naive_limit")


class Witness:
    """The task functions' own view: how many tasks of each group were inside a function at once.

    Independent of the database's timestamps, so an audit that trusted wrong timestamps would
    still be caught. Function-level overlap can only be smaller than the claim-to-record
    intervals the database audits, never larger.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now: Counter = Counter()
        self.most: Counter = Counter()
        self.calls: Counter = Counter()

    def run(self, groups: list[str], seconds: float, call_id: object) -> None:
        with self.lock:
            self.calls[call_id] += 1
            for group in groups:
                self.now[group] += 1
                self.most[group] = max(self.most[group], self.now[group])
        time.sleep(seconds)  # the task's work
        with self.lock:
            for group in groups:
                self.now[group] -= 1


class Relay:
    """Tasks that overlap for sure: each stays in its function until the next one has started
    (the last one, until all have). So whenever a key's limit lets two tasks run, two run at the
    same moment, and a claim that let in one task too many would have three in at once.
    `most` is how many were ever inside at once."""

    def __init__(self, tasks: int) -> None:
        self.tasks = tasks
        self.changed = threading.Condition()
        self.started = 0
        self.inside = 0
        self.most = 0

    def run(self) -> None:
        with self.changed:
            self.started += 1
            me = self.started
            self.inside += 1
            self.most = max(self.most, self.inside)
            self.changed.notify_all()
            passed = self.changed.wait_for(
                lambda: self.started > me or self.started == self.tasks, timeout=30
            )
            self.inside -= 1
        assert passed, f"task {me} of {self.tasks}: the next one never started"


def run_workers(workers) -> None:
    """Run each worker's run_until_idle in a thread; all connect first, then start together.

    The barrier (in `connect`, which run_until_idle calls first) makes every worker claim from
    the first task on: otherwise the first to connect could take a head start, and the claims
    would be less contested than the test means them to be.
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

    threads = [threading.Thread(target=work, args=(w,), name=f"run-{w.name}") for w in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=90)
        assert not thread.is_alive(), f"{thread.name} did not finish"
    assert not errors, errors


def audit(lesson, url: str) -> tuple[dict, dict]:
    """(most running at once per key, per worker), from the database, by the lesson's queries."""
    with psycopg.connect(url) as conn:
        queries = lesson.db_queries.Querier(conn)
        per_key = {r.concurrency_key: r.most_at_once for r in queries.most_running_per_key()}
        per_worker = {r.worker: r.most_at_once for r in queries.most_running_per_worker()}
    return per_key, per_worker


def started_order(url: str) -> list[str | None]:
    """The tasks' keys, in the order they started (from started_at)."""
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT concurrency_key FROM tasks ORDER BY started_at, id").fetchall()
    return [row[0] for row in rows]


def complete(lesson, conn: psycopg.Connection, task) -> None:
    """Record a claimed task as completed, with the lesson's own query, as its worker would.
    (From lesson 04 on, the write names the attempt it completes: the fence.)"""
    queries = lesson.db_queries.Querier(conn)
    if hasattr(queries, "complete_tasks"):
        done = [{"id": task.id, "attempt": task.attempts, "output": None}]
        assert queries.complete_tasks(done=done) == [task.id]
    else:
        assert queries.complete_task(id=task.id, output=None) == 1


# --- limits, audited under contention ----------------------------------------------------------


def test_per_key_limits_hold_with_eight_concurrent_claimers(lesson, url, engine):
    limits = {"k1": 1, "k2": 2, "k3": 3, "k5": 5}
    witness = Witness()

    @engine.task("work")
    def work(input):
        witness.run([input["key"] or "none"], 0.002 + 0.002 * (input["n"] % 5), input["n"])
        return input["n"]

    n = 0
    for key, tasks in [("k1", 40), ("k2", 60), ("k3", 80), ("k5", 100), (None, 40)]:
        for _ in range(tasks):
            options = {"concurrency_key": key, "max_running": limits[key]} if key else {}
            engine.enqueue("work", {"key": key, "n": n}, **options)
            n += 1
    Worker = lesson.worker.Worker
    run_workers([Worker(engine, name=f"w{i}", slots=3, poll_interval=0.01) for i in range(8)])

    per_key, per_worker = audit(lesson, url)
    # The database's audit: never above the limit, and the limit was reached, so the claims
    # really were contested (16 claimers' worth of slots against 11 keyed places).
    assert {key: per_key[key] for key in limits} == limits
    # The functions' own view agrees, and every task ran exactly once.
    assert all(witness.most[key] <= limit for key, limit in limits.items()), witness.most
    assert sorted(witness.calls) == list(range(n)) and set(witness.calls.values()) == {1}
    assert status_counts(url) == {"completed": n}
    # Tasks without a key have no limit of their own; slots hold everywhere.
    assert per_key[None] > 1
    assert max(per_worker.values()) <= 3 and len(per_worker) > 1


def test_one_worker_with_slots_to_spare_runs_no_more_than_the_key_limit(lesson, url, engine):
    # One worker, six slots, six tasks of one key whose limit is 2: only the limit holds the
    # worker back, and the tasks hold on until the next one starts, so two always overlap.
    # A limit off by one (three at once) shows in both audits.
    relay = Relay(tasks=6)
    engine.task("relay")(lambda input: relay.run())
    for n in range(6):
        engine.enqueue("relay", n, concurrency_key="k", max_running=2)
    worker = lesson.worker.Worker(engine, name="w", slots=6, poll_interval=0.01)
    assert worker.run_until_idle() == 6
    assert status_counts(url) == {"completed": 6}
    assert relay.most == 2  # the functions' own count: two at once, never three
    assert audit(lesson, url) == ({"k": 2}, {"w": 2})  # the database's


def test_worker_slots_are_never_exceeded_and_are_all_used(lesson, url, engine):
    witness = Witness()

    @engine.task("work")
    def work(input):
        # Pool threads are named after their worker ("w3_0", "w3_1", ...).
        witness.run([threading.current_thread().name.split("_")[0]], 0.01, input)

    for n in range(160):
        engine.enqueue("work", n)
    slots = {"w1": 1, "w2": 2, "w3": 3, "w4": 4}
    Worker = lesson.worker.Worker
    run_workers(
        [Worker(engine, name=name, slots=s, poll_interval=0.01) for name, s in slots.items()]
    )

    _, per_worker = audit(lesson, url)
    assert per_worker == slots
    assert all(witness.most[name] <= s for name, s in slots.items()), witness.most
    assert status_counts(url) == {"completed": 160}


# --- the claim, step by step -------------------------------------------------------------------


def test_a_claim_takes_at_most_the_free_slots(lesson, url, engine):
    engine.task("t")(lambda input: None)
    for n in range(5):
        engine.enqueue("t", n, concurrency_key="acme", max_running=10)
        engine.enqueue("t", n)
    worker = lesson.worker.Worker(engine, name="w", slots=4)
    with worker.connect() as conn:
        assert len(worker.claim(conn, 3)) == 3
        assert worker.claim(conn, 0) == []
        assert len(worker.claim(conn, 100)) == 7
    assert status_counts(url) == {"running": 10}


def test_the_claim_skips_a_locked_key_and_then_counts_what_its_holder_claimed(lesson, url, engine):
    engine.task("t")(lambda input: None)
    acme = [engine.enqueue("t", n, concurrency_key="acme", max_running=2) for n in range(4)]
    globex = engine.enqueue("t", 0, concurrency_key="globex", max_running=1)
    a, b = lesson.worker.Worker(engine, name="a"), lesson.worker.Worker(engine, name="b")
    with a.connect() as conn_a, b.connect() as conn_b:
        conn_b.execute(NEVER_WAIT)  # a claim that waited for acme's lock would fail here
        with conn_a.transaction():  # A's claim, not yet committed: A still holds acme's row
            claimed_by_a = sorted(a.claim(conn_a, 2), key=lambda task: task.id)
            assert [t.id for t in claimed_by_a] == acme[:2]
            # B passes over acme (locked), at once, and serves the next key instead.
            assert [t.id for t in b.claim(conn_b, 5)] == [globex]
        # A committed: acme has 2 running, its limit, and B claims none of it.
        assert b.claim(conn_b, 5) == []
        complete(lesson, conn_a, claimed_by_a[0])
        assert [t.id for t in b.claim(conn_b, 5)] == [acme[2]]


def test_the_claim_passes_over_a_locked_task_of_its_key(lesson, url, engine):
    engine.task("t")(lambda input: None)
    acme = [engine.enqueue("t", n, concurrency_key="acme", max_running=5) for n in range(3)]
    worker = lesson.worker.Worker(engine, name="w", slots=5)
    with psycopg.connect(url) as holder, worker.connect() as conn:
        # Another transaction holds the oldest task's row, not its key's: someone changing that
        # task (from lesson 04 on, a cancel does). The claim takes the key's other tasks.
        holder.execute("SELECT id FROM tasks WHERE id = %s FOR UPDATE", (acme[0],))
        conn.execute(NEVER_WAIT)  # a claim that waited for the task's lock would fail here
        assert sorted(t.id for t in worker.claim(conn, 5)) == acme[1:]
        holder.rollback()
        assert [t.id for t in worker.claim(conn, 5)] == [acme[0]]


@pytest.mark.parametrize(
    ("way", "running"),
    [("count_then_claim", 4), ("one_statement", 4), ("lock_then_new_statement", 2)],
)
def test_only_a_count_in_a_new_statement_after_the_lock_keeps_the_limit(
    lesson_03, lesson_db, way, running
):
    # Lesson 03's naive_limit.py, on lesson 03's schema: the script's claims are its own SQL.
    nl = lesson_03.naive_limit
    url = lesson_db(FIRST)
    said: list[str] = []
    with lesson_03.engine.Engine(url) as engine:
        engine.task("report")(lambda input: input)
        nl.fresh_tasks(engine)
        with psycopg.connect(url) as a, psycopg.connect(url) as b:
            assert getattr(nl, way)(a, b, say=said.append) == running
    assert nl.LIMIT == 2 and status_counts(url) == {"running": running, "queued": 6 - running}
    if way != "count_then_claim":  # B really waited for A's lock before it counted
        assert any("waits for A's lock" in line for line in said), said


def test_producers_and_claimers_do_not_wait_for_each_other(lesson, url, engine):
    engine.task("t")(lambda input: None)
    first = engine.enqueue("t", 0, concurrency_key="acme", max_running=5)
    worker = lesson.worker.Worker(engine, name="w")
    with (
        worker.connect() as conn,
        psycopg.connect(url) as producer,
        ThreadPoolExecutor(1) as background,
    ):
        # A claim holds acme's row; an enqueue for acme (same limit) still goes through at once.
        with conn.transaction():
            assert [t.id for t in worker.claim(conn, 1)] == [first]
            second = background.submit(
                engine.enqueue, "t", 1, concurrency_key="acme", max_running=5
            ).result(timeout=10)
            # Changing the limit is a write to acme's row: that one waits for the claim.
            changed = background.submit(
                engine.enqueue, "t", 3, concurrency_key="acme", max_running=6
            )
            wait_until(lambda: lock_waits(producer) == 1)
            assert not changed.done()
        changed.result(timeout=10)
        producer.commit()
        # A producer's uncommitted enqueue (its foreign key check holds a KEY SHARE lock on
        # acme's row) does not make a claim skip acme: NO KEY UPDATE does not conflict with it.
        producer.execute(
            "INSERT INTO tasks (name, input, concurrency_key) VALUES ('t', '2', 'acme')"
        )
        conn.execute(NEVER_WAIT)
        assert sorted(t.id for t in worker.claim(conn, 5)) == [second, changed.result()]
        producer.rollback()


def lock_waits(conn: psycopg.Connection) -> int:
    """How many sessions of this test's database are waiting for a lock right now."""
    query = (
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    count = conn.execute(query).fetchone()[0]
    conn.commit()  # a new snapshot of pg_stat_activity next time
    return count


def test_keys_take_turns_least_recently_claimed_first(lesson, url, engine):
    engine.task("t")(lambda input: None)
    for key in ("a", "b", "c"):  # all of a's tasks are older than any of b's
        for n in range(3):
            engine.enqueue("t", n, concurrency_key=key, max_running=10)
    worker = lesson.worker.Worker(engine, name="w")
    with worker.connect() as conn:
        order = [worker.claim(conn, 1)[0].concurrency_key for _ in range(4)]
        # A key enqueued later, never served yet, goes to the front of the line.
        engine.enqueue("t", 0, concurrency_key="d", max_running=10)
        order += [task.concurrency_key for _ in range(6) for task in worker.claim(conn, 1)]
    assert order == ["a", "b", "c", "a", "d", "b", "c", "a", "b", "c"]


def test_a_full_key_is_passed_over_and_keeps_its_place(lesson, url, engine):
    engine.task("t")(lambda input: None)
    engine.enqueue("t", 1, concurrency_key="a", max_running=1)
    engine.enqueue("t", 2, concurrency_key="a", max_running=1)
    for n in range(3):
        engine.enqueue("t", n, concurrency_key="b", max_running=5)
    worker = lesson.worker.Worker(engine, name="w")
    with worker.connect() as conn:
        [a1] = worker.claim(conn, 1)
        assert a1.concurrency_key == "a"
        # a is full: b is served, twice in a row, while a waits.
        assert [t.concurrency_key for t in worker.claim(conn, 2)] == ["b", "b"]
        complete(lesson, conn, a1)
        # a has room again and was served longer ago than b: it goes first.
        assert [t.concurrency_key for t in worker.claim(conn, 2)] == ["a", "b"]


def test_tasks_without_a_key_fill_the_slots_keys_leave(lesson, url, engine):
    engine.task("t")(lambda input: None)
    unkeyed = [engine.enqueue("t", n) for n in range(5)]
    for n in range(3):
        engine.enqueue("t", n, concurrency_key="a", max_running=1)
    worker = lesson.worker.Worker(engine, name="w")
    with worker.connect() as conn:
        claimed = worker.claim(conn, 4)
    assert [t.concurrency_key for t in claimed] == ["a", None, None, None]
    assert sorted(t.id for t in claimed[1:]) == unkeyed[:3]  # oldest first, as in lesson 02


def test_a_lowered_limit_holds_back_new_claims_but_not_running_tasks(lesson, url, engine):
    engine.task("t")(lambda input: None)
    for n in range(3):
        engine.enqueue("t", n, concurrency_key="acme", max_running=3)
    worker = lesson.worker.Worker(engine, name="w")
    with worker.connect() as conn:
        claimed = sorted(worker.claim(conn, 3), key=lambda task: task.id)
        assert len(claimed) == 3
        # The latest enqueue sets the key's limit: down to 1, below the 3 already running.
        later = engine.enqueue("t", 3, concurrency_key="acme", max_running=1)
        assert conn.execute("SELECT max_running FROM concurrency_keys").fetchone() == (1,)
        assert status_counts(url) == {"running": 3, "queued": 1}  # nothing was stopped
        complete(lesson, conn, claimed[0])
        complete(lesson, conn, claimed[1])
        assert worker.claim(conn, 3) == []  # 1 running: at the new limit
        complete(lesson, conn, claimed[2])
        assert [t.id for t in worker.claim(conn, 3)] == [later]


def test_claims_read_partial_indexes_however_many_tasks_finished(lesson, url, engine):
    engine.task("noop")(lambda input: None)
    engine.enqueue("noop", concurrency_key="acme", max_running=2)
    queries = lesson.db_queries
    # Partial indexes, each holding the queued or the running tasks only. The running ones are
    # counted through tasks_running, or, from lesson 04 on, tasks_leased: it holds the same rows.
    queued, running = {"tasks_queued"}, {"tasks_running", "tasks_leased"}
    with psycopg.connect(url, autocommit=True) as conn:
        add_finished_tasks(conn, 20_000, key="acme")
        conn.execute("INSERT INTO tasks (name, input) VALUES ('noop', 'null')")
        conn.execute("ANALYZE tasks")
        for query, indexes in [
            (queries.LOCK_NEXT_KEY, [queued, running]),
            (queries.CLAIM_KEY_TASKS, [queued, running]),
            (queries.CLAIM_UNKEYED_TASKS, [queued]),
        ]:
            # The generated statements as they are, $1 placeholders and all (PostgreSQL 16+).
            rows = conn.execute("EXPLAIN (GENERIC_PLAN) " + query.split("\n", 1)[1])
            plan = "\n".join(row[0] for row in rows)
            assert all(any(index in plan for index in either) for either in indexes), plan
            assert "Seq Scan on tasks" not in plan, plan


# --- fairness ----------------------------------------------------------------------------------


def quiet_tenant_progress(url, engine, workers, noisy_tasks, noisy_limit) -> tuple[int, int]:
    """A noisy tenant enqueues first, then a quiet one 6 tasks; return (first, last): how many
    noisy tasks had started when the quiet tenant's first, and its last, task started."""
    engine.task("report")(lambda input: time.sleep(0.005))
    for n in range(noisy_tasks):
        engine.enqueue("report", n, concurrency_key="noisy", max_running=noisy_limit)
    for n in range(6):
        engine.enqueue("report", n, concurrency_key="quiet", max_running=2)
    run_workers(workers)
    order = started_order(url)
    quiet_at = [i for i, key in enumerate(order) if key == "quiet"]
    return order[: quiet_at[0]].count("noisy"), order[: quiet_at[-1]].count("noisy")


def test_a_quiet_tenant_is_served_long_before_the_noisy_backlog_drains(lesson, url, engine):
    # 4 workers x 2 slots, and the noisy tenant may use all 8: only taking turns protects the
    # quiet one. Its 6 tasks at 2 at a time take 3 turns; each turn waits behind at most one of
    # the noisy tenant's (up to 8 tasks each), plus claims in flight: far fewer than 200.
    Worker = lesson.worker.Worker
    workers = [Worker(engine, name=f"w{i}", slots=2, poll_interval=0.01) for i in range(4)]
    first, last = quiet_tenant_progress(url, engine, workers, noisy_tasks=200, noisy_limit=8)
    assert first <= 16 and last <= 60, (first, last)
    per_key = audit(lesson, url)[0]
    assert per_key["noisy"] <= 8 and per_key["quiet"] <= 2, per_key


def test_without_turns_the_quiet_tenant_waits_for_the_whole_backlog(
    lesson, url, engine, monkeypatch
):
    # The same claim, but keys served oldest queued task first (FIFO across keys): the
    # alternative to round robin. One worker, so there is no race: the quiet tenant waits
    # until every one of the noisy tenant's 80 tasks has started. (In every lesson: the control
    # that shows the test below can tell the two apart.)
    fifo = lesson.db_queries.LOCK_NEXT_KEY.replace(
        "ORDER BY k.last_claimed_at NULLS FIRST, k.key",
        "ORDER BY (SELECT min(t.id) FROM tasks AS t"
        " WHERE t.concurrency_key = k.key AND t.status = 'queued')",
    )
    assert fifo != lesson.db_queries.LOCK_NEXT_KEY
    monkeypatch.setattr(lesson.db_queries, "LOCK_NEXT_KEY", fifo)
    worker = lesson.worker.Worker(engine, name="w", slots=4, poll_interval=0.01)
    assert quiet_tenant_progress(url, engine, [worker], noisy_tasks=80, noisy_limit=4)[0] == 80


def test_with_turns_one_worker_serves_the_quiet_tenant_at_once(lesson, url, engine):
    # The control for the test above: the real claim, same worker, same tasks. The quiet
    # tenant's first turn comes right after the noisy one's first (4 tasks, all the slots);
    # then no two noisy turns (of at most 3 tasks: the slots the quiet one does not hold) pass
    # while the quiet tenant has room and work. Its last task starts long before the 80th.
    worker = lesson.worker.Worker(engine, name="w", slots=4, poll_interval=0.01)
    first, last = quiet_tenant_progress(url, engine, [worker], noisy_tasks=80, noisy_limit=4)
    assert first == 4 and last <= 30, (first, last)


# --- running, recording, stopping --------------------------------------------------------------


def test_results_and_errors_are_recorded_from_the_pool_threads(lesson, engine):
    @engine.task("explode", **once(lesson))
    def explode(input):
        raise ValueError(f"cannot handle {input!r}")

    engine.task("odd", **once(lesson))(lambda input: {1, 2})
    engine.task("echo")(lambda input: {"got": input})
    bad = engine.enqueue("explode", [1, 2], concurrency_key="k", max_running=1)
    odd = engine.enqueue("odd")
    good = engine.enqueue("echo", {"nested": [1.5, None]})
    assert lesson.worker.Worker(engine, name="w", slots=3).run_until_idle() == 3
    assert engine.get(bad).error == "ValueError: cannot handle [1, 2]"
    assert engine.get(odd).error == (
        "return value is not JSON-serializable: Object of type set is not JSON serializable"
    )
    assert engine.get(good).output == {"got": {"nested": [1.5, None]}}


def test_a_worker_leaves_tasks_it_does_not_know_queued(lesson, url):
    Engine, Worker = lesson.engine.Engine, lesson.worker.Worker
    with Engine(url) as new_deploy, Engine(url) as old_deploy:
        for name in ("old", "new"):
            new_deploy.task(name)(lambda input: "by new")
        old_deploy.task("old")(lambda input: "by old")
        new_tasks = [
            new_deploy.enqueue("new"),
            new_deploy.enqueue("new", 1, concurrency_key="k", max_running=1),
        ]
        old_task = new_deploy.enqueue("old", concurrency_key="k", max_running=1)
        # The old worker runs what it knows and returns: the rest is not its business.
        assert Worker(old_deploy, name="old", slots=2).run_until_idle() == 1
        assert new_deploy.get(old_task).output == "by old"
        queued = lesson.db_models.TaskStatus.QUEUED
        assert {new_deploy.get(i).status for i in new_tasks} == {queued}


def test_run_until_idle_waits_while_a_key_is_full_then_runs_its_task(lesson, url, engine):
    engine.task("t")(lambda input: input)
    held = engine.enqueue("t", 1, concurrency_key="k", max_running=1)
    waiting = engine.enqueue("t", 2, concurrency_key="k", max_running=1)
    Worker = lesson.worker.Worker
    other, worker = Worker(engine, name="other"), Worker(engine, name="w", poll_interval=0.01)
    claims = []
    claim = worker.claim
    # *riders: from lesson 08, the claim also takes the completions that commit with it.
    worker.claim = lambda conn, n, *riders: claims.append(n) or claim(conn, n, *riders)
    with other.connect() as conn, ThreadPoolExecutor(1) as background:
        [task] = other.claim(conn, 1)  # "other" keeps k full
        assert task.id == held
        result = background.submit(worker.run_until_idle)
        try:
            wait_until(lambda: len(claims) >= 3)  # it asked three times, got nothing, went on
            assert not result.done()
        finally:
            complete(lesson, conn, task)  # room under k's limit at last
        assert result.result(timeout=30) == 1
    assert engine.get(waiting).output == 2


def test_stop_finishes_the_tasks_in_hand_and_claims_no_more(lesson, engine):
    started, release = threading.Event(), threading.Event()

    @engine.task("slow")
    def slow(input):
        started.set()
        release.wait(timeout=30)
        return input

    first = engine.enqueue("slow", 1)
    stop = threading.Event()
    worker = lesson.worker.Worker(engine, poll_interval=0.01)
    thread = threading.Thread(target=worker.run, args=(stop,))
    thread.start()
    try:
        assert started.wait(timeout=30)
        later = engine.enqueue("slow", 2)
        stop.set()
        release.set()
    finally:
        thread.join(timeout=30)
    assert not thread.is_alive()
    TaskStatus = lesson.db_models.TaskStatus
    assert engine.get(first).status == TaskStatus.COMPLETED and engine.get(first).output == 1
    assert engine.get(later).status == TaskStatus.QUEUED


# --- bad input ---------------------------------------------------------------------------------


# Concurrency options enqueue refuses, and the message it refuses them with.
BAD_CONCURRENCY_OPTIONS = [
    (
        {"concurrency_key": "acme"},
        "concurrency_key 'acme' needs max_running: how many of its tasks may run at once",
    ),
    (
        {"max_running": 3},
        "max_running=3 needs a concurrency_key: it limits the tasks sharing one",
    ),
    (
        {"concurrency_key": "", "max_running": 1},
        "concurrency_key must be a non-empty string, got ''",
    ),
    (
        {"concurrency_key": 7, "max_running": 1},
        "concurrency_key must be a non-empty string, got 7",
    ),
    (
        {"concurrency_key": "a", "max_running": 0},
        "max_running must be an integer from 1 to 2147483647, got 0",
    ),
    (
        {"concurrency_key": "a", "max_running": 2**31},
        "max_running must be an integer from 1 to 2147483647, got 2147483648",
    ),
    (
        {"concurrency_key": "a", "max_running": True},
        "max_running must be an integer from 1 to 2147483647, got True",
    ),
    (
        {"concurrency_key": "a", "max_running": 2.0},
        "max_running must be an integer from 1 to 2147483647, got 2.0",
    ),
]


def test_enqueue_refuses_bad_concurrency_options_and_writes_nothing(lesson, url, engine):
    engine.task("t")(lambda input: None)
    for options, message in BAD_CONCURRENCY_OPTIONS:
        with pytest.raises(lesson.engine.TaskOptionError) as caught:
            engine.enqueue("t", None, **options)
        assert str(caught.value) == message
        assert isinstance(caught.value, ValueError)
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT count(*) FROM concurrency_keys").fetchone() == (0,)
    assert status_counts(url) == {}


def test_a_worker_needs_a_positive_number_of_slots(lesson, engine):
    for slots in (0, -1, 1.5, True):
        with pytest.raises(
            ValueError, match=re.escape(f"slots must be a positive integer, got {slots!r}")
        ):
            lesson.worker.Worker(engine, slots=slots)


# --- lesson 03's scripts, as a reader runs them ------------------------------------------------


def test_naive_limit_py_shows_two_claims_breaking_the_limit(pg_server_url):
    dbname = f"t03_naive_{XDIST}"
    try:
        result = run_main(
            FIRST, pg_server_url, dbname, cwd=lesson_dir(FIRST), script="naive_limit.py"
        )
    finally:
        drop_database(pg_server_url, dbname)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    verdicts = [line for line in result.stdout.splitlines() if "tasks running:" in line]
    assert verdicts == [
        "   acme has 4 tasks running: over its limit of 2",
        "   acme has 4 tasks running: over its limit of 2",
        "   acme has 2 tasks running: within its limit of 2",
    ]
    assert "   B gets the lock, counts in a new statement, claims nothing and commits" in (
        result.stdout.splitlines()
    )


TIMELINE = re.compile(r"^  (\w+) +(?:max (\d)|(\d) slots) +\|([.\d]+)\|$")


def test_main_keeps_every_limit_and_serves_the_quiet_tenants_first(pg_server_url):
    # Every line main.py prints after the enqueues is read back from its database (the
    # timeline from started_at/finished_at, the maxima from the MostRunningPerKey and
    # MostRunningPerWorker audit, fairness from started_at, the statuses): checking the lines
    # checks the database.
    dbname = f"t03_main_{XDIST}"
    try:
        for cwd in (None, lesson_dir(FIRST)):
            result = run_main(FIRST, pg_server_url, dbname, cwd=cwd)
            assert result.returncode == 0, result.stderr
            assert result.stderr == ""
            lines = result.stdout.splitlines()
            assert lines[0].startswith(f"database {dbname} on ")
            assert lines[1] == (
                "refused: TaskOptionError: concurrency_key 'acme' needs max_running: how many of"
                " its tasks may run at once"
            )
            assert lines[2] == (
                "enqueued, in this order: 40 tasks for acme (max 5), 5 tasks for globex (max 2),"
                " 5 tasks for initech (max 2)"
            )
            assert lines[3] == "2 workers with 3 slots each ran them; tasks running, every 50 ms:"
            # The timeline: no column above a tenant's limit, or above the 6 slots.
            rows = [TIMELINE.match(line) for line in lines[4:8]]
            assert [row[1] for row in rows] == ["acme", "globex", "initech", "all"]
            for row in rows:
                limit = int(row[2] or row[3])
                assert max(int(c) for c in row[4].replace(".", "0")) <= limit, row[0]
            most = dict(re.findall(r"(\S+) (\d) \(", lines[8]))
            assert lines[8].startswith("most running at once: ")
            limits = {"acme": 5, "globex": 2, "initech": 2, "worker-1": 3, "worker-2": 3}
            assert most.keys() == limits.keys()
            assert all(1 <= int(most[name]) <= limit for name, limit in limits.items()), most
            # Fairness: the quiet tenants were done while most of acme's backlog still waited.
            for line, tenant in zip(lines[9:11], ("globex", "initech"), strict=True):
                found = re.fullmatch(
                    rf"{tenant}'s 5 tasks had all started when acme had started (\d+) of its 40",
                    line,
                )
                assert found and int(found[1]) <= 20, line
            assert lines[11:] == ["all 50 tasks finished: completed"]
    finally:
        drop_database(pg_server_url, dbname)
