"""Lesson 03: worker slots, per-key concurrency limits that hold across workers, fair turns.

Every limit is audited from the database: the tasks' started_at/finished_at intervals, through
the lesson's own MostRunningPerKey / MostRunningPerWorker queries, with the task functions'
own view of how many ran at once as a second witness. The races are shown deterministically:
two connections, one holding a lock, the other's wait observed in pg_stat_activity.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest
from harness import import_lesson, lesson_dir, lesson_env, run_main, wait_until

LESSON = "03-limiting-concurrent-tasks"
L = import_lesson(LESSON, "engine", "worker", "naive_limit", "db.models", "db.queries")
Engine, Worker = L.engine.Engine, L.worker.Worker
TaskStatus = L.db_models.TaskStatus
Querier = L.db_queries.Querier
TaskOptionError = L.engine.TaskOptionError
XDIST = os.environ.get("PYTEST_XDIST_WORKER", "main")


@pytest.fixture
def url(lesson_db) -> str:
    return lesson_db(LESSON)


@pytest.fixture
def engine(url):
    with Engine(url) as engine:
        yield engine


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
        time.sleep(seconds)
        with self.lock:
            for group in groups:
                self.now[group] -= 1


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


def audit(url: str) -> tuple[dict, dict]:
    """(most running at once per key, per worker), from the tasks table."""
    with psycopg.connect(url) as conn:
        queries = Querier(conn)
        per_key = {r.concurrency_key: r.most_at_once for r in queries.most_running_per_key()}
        per_worker = {r.worker: r.most_at_once for r in queries.most_running_per_worker()}
    return per_key, per_worker


def statuses(url: str) -> dict[str, int]:
    with psycopg.connect(url) as conn:
        return dict(conn.execute("SELECT status::text, count(*) FROM tasks GROUP BY 1").fetchall())


def started_order(url: str) -> list[str | None]:
    """The tasks' keys, in the order they started (from started_at)."""
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT concurrency_key FROM tasks ORDER BY started_at, id").fetchall()
    return [row[0] for row in rows]


# --- limits, audited under contention ----------------------------------------------------------


def test_per_key_limits_hold_with_eight_concurrent_claimers(url, engine):
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
    run_workers([Worker(engine, name=f"w{i}", slots=3, poll_interval=0.01) for i in range(8)])

    per_key, per_worker = audit(url)
    # The database's audit: never above the limit, and the limit was reached, so the claims
    # really were contested (16 claimers' worth of slots against 11 keyed places).
    assert {key: per_key[key] for key in limits} == limits
    # The functions' own view agrees, and every task ran exactly once.
    assert all(witness.most[key] <= limit for key, limit in limits.items()), witness.most
    assert sorted(witness.calls) == list(range(n)) and set(witness.calls.values()) == {1}
    assert statuses(url) == {"completed": n}
    # Tasks without a key have no limit of their own; slots hold everywhere.
    assert per_key[None] > 1
    assert max(per_worker.values()) <= 3 and len(per_worker) > 1


def test_worker_slots_are_never_exceeded_and_are_all_used(url, engine):
    witness = Witness()

    @engine.task("work")
    def work(input):
        # Pool threads are named after their worker ("w3_0", "w3_1", ...).
        witness.run([threading.current_thread().name.split("_")[0]], 0.01, input)

    for n in range(160):
        engine.enqueue("work", n)
    slots = {"w1": 1, "w2": 2, "w3": 3, "w4": 4}
    run_workers(
        [Worker(engine, name=name, slots=s, poll_interval=0.01) for name, s in slots.items()]
    )

    _, per_worker = audit(url)
    assert per_worker == slots
    assert all(witness.most[name] <= s for name, s in slots.items()), witness.most
    assert statuses(url) == {"completed": 160}


# --- the claim, step by step -------------------------------------------------------------------


def test_a_claim_takes_at_most_the_free_slots(url, engine):
    engine.task("t")(lambda input: None)
    for n in range(5):
        engine.enqueue("t", n, concurrency_key="acme", max_running=10)
        engine.enqueue("t", n)
    worker = Worker(engine, name="w", slots=4)
    with worker.connect() as conn:
        assert len(worker.claim(conn, 3)) == 3
        assert worker.claim(conn, 0) == []
        assert len(worker.claim(conn, 100)) == 7
    assert statuses(url) == {"running": 10}


def test_the_claim_skips_a_locked_key_and_then_counts_what_its_holder_claimed(url, engine):
    engine.task("t")(lambda input: None)
    acme = [engine.enqueue("t", n, concurrency_key="acme", max_running=2) for n in range(4)]
    globex = engine.enqueue("t", 0, concurrency_key="globex", max_running=1)
    a, b = Worker(engine, name="a"), Worker(engine, name="b")
    with a.connect() as conn_a, b.connect() as conn_b:
        conn_b.execute("SET statement_timeout = '10s'")  # a claim that waited would fail here
        with conn_a.transaction():  # A's claim, not yet committed: A still holds acme's row
            assert sorted(t.id for t in a.claim(conn_a, 2)) == acme[:2]
            # B passes over acme (locked), at once, and serves the next key instead.
            assert [t.id for t in b.claim(conn_b, 5)] == [globex]
        # A committed: acme has 2 running, its limit, and B claims none of it.
        assert b.claim(conn_b, 5) == []
        Querier(conn_a).complete_task(id=acme[0], output=None)
        assert [t.id for t in b.claim(conn_b, 5)] == [acme[2]]


@pytest.mark.parametrize(
    ("way", "running"),
    [("count_then_claim", 4), ("one_statement", 4), ("lock_then_new_statement", 2)],
)
def test_only_a_count_in_a_new_statement_after_the_lock_keeps_the_limit(url, engine, way, running):
    nl = L.naive_limit
    engine.task("report")(lambda input: input)
    nl.fresh_tasks(engine)
    said: list[str] = []
    with psycopg.connect(url) as a, psycopg.connect(url) as b:
        assert getattr(nl, way)(a, b, say=said.append) == running
    assert nl.LIMIT == 2 and statuses(url) == {"running": running, "queued": 6 - running}
    if way != "count_then_claim":  # B really waited for A's lock before it counted
        assert any("waits for A's lock" in line for line in said), said


def test_producers_and_claimers_do_not_wait_for_each_other(url, engine):
    engine.task("t")(lambda input: None)
    first = engine.enqueue("t", 0, concurrency_key="acme", max_running=5)
    worker = Worker(engine, name="w")
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
        Querier(producer).enqueue_task(name="t", input=2, concurrency_key="acme")
        conn.execute("SET statement_timeout = '10s'")
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


def test_keys_take_turns_least_recently_claimed_first(url, engine):
    engine.task("t")(lambda input: None)
    for key in ("a", "b", "c"):  # all of a's tasks are older than any of b's
        for n in range(3):
            engine.enqueue("t", n, concurrency_key=key, max_running=10)
    worker = Worker(engine, name="w")
    with worker.connect() as conn:
        order = [worker.claim(conn, 1)[0].concurrency_key for _ in range(4)]
        # A key enqueued later, never served yet, goes to the front of the line.
        engine.enqueue("t", 0, concurrency_key="d", max_running=10)
        order += [task.concurrency_key for _ in range(6) for task in worker.claim(conn, 1)]
    assert order == ["a", "b", "c", "a", "d", "b", "c", "a", "b", "c"]


def test_a_full_key_is_passed_over_and_keeps_its_place(url, engine):
    engine.task("t")(lambda input: None)
    a1 = engine.enqueue("t", 1, concurrency_key="a", max_running=1)
    engine.enqueue("t", 2, concurrency_key="a", max_running=1)
    for n in range(3):
        engine.enqueue("t", n, concurrency_key="b", max_running=5)
    worker = Worker(engine, name="w")
    with worker.connect() as conn:
        assert [t.concurrency_key for t in worker.claim(conn, 1)] == ["a"]
        # a is full: b is served, twice in a row, while a waits.
        assert [t.concurrency_key for t in worker.claim(conn, 2)] == ["b", "b"]
        Querier(conn).complete_task(id=a1, output=None)
        # a has room again and was served longer ago than b: it goes first.
        assert [t.concurrency_key for t in worker.claim(conn, 2)] == ["a", "b"]


def test_tasks_without_a_key_fill_the_slots_keys_leave(url, engine):
    engine.task("t")(lambda input: None)
    unkeyed = [engine.enqueue("t", n) for n in range(5)]
    for n in range(3):
        engine.enqueue("t", n, concurrency_key="a", max_running=1)
    worker = Worker(engine, name="w")
    with worker.connect() as conn:
        claimed = worker.claim(conn, 4)
    assert [t.concurrency_key for t in claimed] == ["a", None, None, None]
    assert sorted(t.id for t in claimed[1:]) == unkeyed[:3]  # oldest first, as in lesson 02


def test_a_lowered_limit_holds_back_new_claims_but_not_running_tasks(url, engine):
    engine.task("t")(lambda input: None)
    ids = [engine.enqueue("t", n, concurrency_key="acme", max_running=3) for n in range(3)]
    worker = Worker(engine, name="w")
    with worker.connect() as conn:
        queries = Querier(conn)
        assert len(worker.claim(conn, 3)) == 3
        # The latest enqueue sets the key's limit: down to 1, below the 3 already running.
        later = engine.enqueue("t", 3, concurrency_key="acme", max_running=1)
        assert conn.execute("SELECT max_running FROM concurrency_keys").fetchone() == (1,)
        assert statuses(url) == {"running": 3, "queued": 1}  # nothing was stopped
        queries.complete_task(id=ids[0], output=None)
        queries.complete_task(id=ids[1], output=None)
        assert worker.claim(conn, 3) == []  # 1 running: at the new limit
        queries.complete_task(id=ids[2], output=None)
        assert [t.id for t in worker.claim(conn, 3)] == [later]


def test_claims_read_partial_indexes_however_many_tasks_finished(url, engine):
    engine.task("noop")(lambda input: None)
    engine.enqueue("noop", concurrency_key="acme", max_running=2)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO tasks (name, input, concurrency_key, status, worker, started_at,"
            " finished_at) SELECT 'noop', 'null', CASE WHEN i % 2 = 0 THEN 'acme' END,"
            " 'completed', 'w', now(), now() FROM generate_series(1, 20000) AS i"
        )
        conn.execute("INSERT INTO tasks (name, input) VALUES ('noop', 'null')")
        conn.execute("ANALYZE tasks")
        for query, indexes in [
            (L.db_queries.LOCK_NEXT_KEY, {"tasks_queued", "tasks_running"}),
            (L.db_queries.CLAIM_KEY_TASKS, {"tasks_queued", "tasks_running"}),
            (L.db_queries.CLAIM_UNKEYED_TASKS, {"tasks_queued"}),
        ]:
            # The generated statements as they are, $1 placeholders and all (PostgreSQL 16+).
            rows = conn.execute("EXPLAIN (GENERIC_PLAN) " + query.split("\n", 1)[1])
            plan = "\n".join(row[0] for row in rows)
            assert all(index in plan for index in indexes), plan
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


def test_a_quiet_tenant_is_served_long_before_the_noisy_backlog_drains(url, engine):
    # 4 workers x 2 slots, and the noisy tenant may use all 8: only taking turns protects the
    # quiet one. Its 6 tasks at 2 at a time take 3 turns; each turn waits behind at most one of
    # the noisy tenant's (up to 8 tasks each), plus claims in flight: far fewer than 200.
    workers = [Worker(engine, name=f"w{i}", slots=2, poll_interval=0.01) for i in range(4)]
    first, last = quiet_tenant_progress(url, engine, workers, noisy_tasks=200, noisy_limit=8)
    assert first <= 16 and last <= 60, (first, last)
    per_key = audit(url)[0]
    assert per_key["noisy"] <= 8 and per_key["quiet"] <= 2, per_key


def test_without_turns_the_quiet_tenant_waits_for_the_whole_backlog(url, engine, monkeypatch):
    # The same claim, but keys served oldest queued task first (FIFO across keys): the
    # alternative to round robin. One worker, so there is no race: the quiet tenant waits
    # until every one of the noisy tenant's 80 tasks has started.
    fifo = L.db_queries.LOCK_NEXT_KEY.replace(
        "ORDER BY k.last_claimed_at NULLS FIRST, k.key",
        "ORDER BY (SELECT min(t.id) FROM tasks AS t"
        " WHERE t.concurrency_key = k.key AND t.status = 'queued')",
    )
    assert fifo != L.db_queries.LOCK_NEXT_KEY
    monkeypatch.setattr(L.db_queries, "LOCK_NEXT_KEY", fifo)
    worker = Worker(engine, name="w", slots=4, poll_interval=0.01)
    assert quiet_tenant_progress(url, engine, [worker], noisy_tasks=80, noisy_limit=4)[0] == 80


def test_with_turns_one_worker_serves_the_quiet_tenant_at_once(url, engine):
    # The control for the test above: the real claim, same worker, same tasks. The quiet
    # tenant's first turn comes right after the noisy one's first (4 tasks, all the slots);
    # then no two noisy turns (of at most 3 tasks: the slots the quiet one does not hold) pass
    # while the quiet tenant has room and work. Its last task starts long before the 80th.
    worker = Worker(engine, name="w", slots=4, poll_interval=0.01)
    first, last = quiet_tenant_progress(url, engine, [worker], noisy_tasks=80, noisy_limit=4)
    assert first == 4 and last <= 30, (first, last)


# --- running, recording, stopping --------------------------------------------------------------


def test_results_and_errors_are_recorded_from_the_pool_threads(engine):
    @engine.task("explode")
    def explode(input):
        raise ValueError(f"cannot handle {input!r}")

    engine.task("odd")(lambda input: {1, 2})
    engine.task("echo")(lambda input: {"got": input})
    bad = engine.enqueue("explode", [1, 2], concurrency_key="k", max_running=1)
    odd = engine.enqueue("odd")
    good = engine.enqueue("echo", {"nested": [1.5, None]})
    assert Worker(engine, name="w", slots=3).run_until_idle() == 3
    assert engine.get(bad).error == "ValueError: cannot handle [1, 2]"
    assert engine.get(odd).error == (
        "return value is not JSON-serializable: Object of type set is not JSON serializable"
    )
    assert engine.get(good).output == {"got": {"nested": [1.5, None]}}


def test_a_worker_leaves_tasks_it_does_not_know_queued(url):
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
        assert {new_deploy.get(i).status for i in new_tasks} == {TaskStatus.QUEUED}


def test_run_until_idle_waits_while_a_key_is_full_then_runs_its_task(url, engine):
    engine.task("t")(lambda input: input)
    held = engine.enqueue("t", 1, concurrency_key="k", max_running=1)
    waiting = engine.enqueue("t", 2, concurrency_key="k", max_running=1)
    other, worker = Worker(engine, name="other"), Worker(engine, name="w", poll_interval=0.01)
    claims = []
    claim = worker.claim
    worker.claim = lambda conn, n: claims.append(n) or claim(conn, n)
    with other.connect() as conn, ThreadPoolExecutor(1) as background:
        assert [t.id for t in other.claim(conn, 1)] == [held]  # "other" keeps k full
        result = background.submit(worker.run_until_idle)
        try:
            wait_until(lambda: len(claims) >= 3)  # it asked three times, got nothing, went on
            assert not result.done()
        finally:
            Querier(conn).complete_task(id=held, output=1)  # room under k's limit at last
        assert result.result(timeout=30) == 1
    assert engine.get(waiting).output == 2


def test_stop_finishes_the_tasks_in_hand_and_claims_no_more(engine):
    started, release = threading.Event(), threading.Event()

    @engine.task("slow")
    def slow(input):
        started.set()
        release.wait(timeout=30)
        return input

    first = engine.enqueue("slow", 1)
    stop = threading.Event()
    thread = threading.Thread(target=Worker(engine, poll_interval=0.01).run, args=(stop,))
    thread.start()
    try:
        started.wait(timeout=30)
        later = engine.enqueue("slow", 2)
        stop.set()
        release.set()
    finally:
        thread.join(timeout=30)
    assert not thread.is_alive()
    assert engine.get(first).status == TaskStatus.COMPLETED and engine.get(first).output == 1
    assert engine.get(later).status == TaskStatus.QUEUED


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
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
    ],
)
def test_enqueue_refuses_bad_concurrency_options_and_writes_nothing(url, engine, options, message):
    engine.task("t")(lambda input: None)
    with pytest.raises(TaskOptionError) as caught:
        engine.enqueue("t", None, **options)
    assert str(caught.value) == message
    assert isinstance(caught.value, ValueError)
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT count(*) FROM concurrency_keys").fetchone() == (0,)
    assert statuses(url) == {}


@pytest.mark.parametrize("slots", [0, -1, 1.5, True])
def test_a_worker_needs_a_positive_number_of_slots(engine, slots):
    with pytest.raises(
        ValueError, match=re.escape(f"slots must be a positive integer, got {slots!r}")
    ):
        Worker(engine, slots=slots)


# --- the scripts, as a reader runs them --------------------------------------------------------


def test_naive_limit_py_shows_two_claims_breaking_the_limit(pg_server_url):
    dbname = f"t03_naive_{XDIST}"
    try:
        result = subprocess.run(
            [sys.executable, "naive_limit.py"],
            cwd=lesson_dir(LESSON),
            env=lesson_env(pg_server_url, dbname),
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        _drop(pg_server_url, dbname)
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
    dbname = f"t03_main_{XDIST}"
    try:
        for cwd in (None, lesson_dir(LESSON)):
            result = run_main(LESSON, pg_server_url, dbname, cwd=cwd)
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
        _drop(pg_server_url, dbname)


def _drop(server: str, dbname: str) -> None:
    with psycopg.connect(server, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
