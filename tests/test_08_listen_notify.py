"""Lesson 08's promises, kept by lesson 08 and every later lesson: work is picked up through
notifications, not polling.

Every worker here polls once every ten minutes, so a task it picks up within seconds was
announced to it, or was due on its alarm:

- an enqueued task, a retry after its backoff, an operator's retry, a parent whose last child
  ended, room under a key's limit: each wakes the workers that can run it;
- a scheduled task starts within 50 ms of its run_at, on the alarm, with no poll;
- NOTIFY is delivered at commit, never before; a rolled-back enqueue notifies no one; identical
  notifications in one transaction fold into one;
- a listener that loses its connection reconnects, and its worker claims at once what was
  enqueued while it was away (those notifications are lost for good).

The negative claims ("no notification") are checked deterministically: notifications are
delivered in commit order, so a sentinel NOTIFY committed afterwards arrives after anything the
transaction under test could have sent.
"""

from __future__ import annotations

import logging
import os
import pwd
import re
import shutil
import socket
import statistics
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from hardway import postgres
from harness import (
    drop_database,
    lesson_dir,
    lessons_from,
    load_lesson,
    run_main,
    running,
    sql,
    status_counts,
    wait_until,
    worker,
)
from psycopg import conninfo
from psycopg import sql as pgsql

NO_POLL = 600.0  # seconds: a worker's safety poll never comes during a test


@pytest.fixture(params=lessons_from("08"), scope="module")
def lesson(request):
    return load_lesson(request.param)


def listening(url: str, name: str = "w") -> None:
    """Wait until worker `name` is connected, and its listener has sent its LISTEN."""
    query = (
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND (application_name = %s OR application_name = %s AND query LIKE 'LISTEN%%')"
    )
    wait_until(lambda: sql(url, query, name, f"{name}-listen")[0][0] == 2, timeout=30)


def seconds(url: str, query: str, *params) -> float:
    return float(sql(url, query, *params)[0][0])


def notifications_until_sentinel(conn: psycopg.Connection, url: str) -> list[str]:
    """The payloads `conn` hears before a sentinel notification, committed now by another
    session: all that was committed before it, and nothing else."""
    sql(url, "SELECT pg_notify('task_ready', 'sentinel')")
    payloads = []
    for notification in conn.notifies(timeout=30):
        if notification.payload == "sentinel":
            return payloads
        payloads.append(notification.payload)
    raise AssertionError(f"no sentinel within 30 s; heard {payloads}")


def test_an_enqueued_task_is_picked_up_through_a_notification(lesson, url, engine):
    engine.task("noop")(lambda input: None)
    with running(worker(lesson, engine, poll_interval=NO_POLL)):
        listening(url)
        # One after the other: each is claimed on its own notification (the wake-up after the
        # listener connected can explain the first one at most).
        task_ids = []
        for i in range(5):
            task_ids.append(engine.enqueue("noop", i))
            assert engine.wait(task_ids[-1], timeout=10).status == "completed"
    pickup = seconds(url, "SELECT max(extract(epoch FROM started_at - created_at)) FROM tasks")
    assert pickup < 1.0, f"slowest pickup {pickup:.3f}s, with no poll for {NO_POLL:g}s"


def test_notify_is_delivered_at_commit_never_before_and_a_rollback_notifies_no_one(url):
    insert = "INSERT INTO tasks (name, input) VALUES ('greet', '1')"
    with psycopg.connect(url, autocommit=True) as listener, psycopg.connect(url) as client:
        listener.execute("LISTEN task_ready")
        client.execute(insert)  # a transaction, open
        assert notifications_until_sentinel(listener, url) == []
        client.commit()
        assert notifications_until_sentinel(listener, url) == ["greet"]

        client.execute(insert)
        client.rollback()
        assert notifications_until_sentinel(listener, url) == []
    assert sql(url, "SELECT count(*) FROM tasks")[0][0] == 1


def test_identical_notifications_in_one_transaction_fold_into_one(url, engine):
    engine.task("greet")(lambda input: None)
    with psycopg.connect(url, autocommit=True) as listener:
        listener.execute("LISTEN task_ready")
        engine.enqueue_many("greet", range(100))
        assert notifications_until_sentinel(listener, url) == ["greet"]
        # One per distinct name, in one transaction.
        with psycopg.connect(url) as client:
            for name in ["greet", "bill", "greet", "bill"]:
                client.execute("INSERT INTO tasks (name, input) VALUES (%s, '1')", (name,))
        assert sorted(notifications_until_sentinel(listener, url)) == ["bill", "greet"]


def test_a_scheduled_task_starts_on_time_without_a_poll(lesson, url, engine):
    engine.task("noop")(lambda input: None)
    with running(worker(lesson, engine, poll_interval=NO_POLL)):
        listening(url)
        task_ids = [engine.enqueue("noop", i, delay=0.3 + 0.2 * i) for i in range(3)]
        for task_id in task_ids:
            assert engine.wait(task_id, timeout=10).status == "completed"
    lateness = [
        row[0]
        for row in sql(url, "SELECT extract(epoch FROM started_at - run_at)::float8 FROM tasks")
    ]
    # On time: the median within 50 ms. (A loaded machine may hold up one; but none waited
    # for a poll, ten minutes away.)
    assert all(0 <= late < 1 for late in lateness), lateness
    assert statistics.median(lateness) < 0.05, f"{lateness} s after their run_at"


def test_a_retry_starts_after_its_backoff_without_a_poll(lesson, url, engine):
    current_task = lesson.task_context.current_task

    @engine.task("flaky", backoff=0.2)
    def flaky(input):
        if current_task().attempt == 1:
            raise RuntimeError("first try fails")

    with running(worker(lesson, engine, poll_interval=NO_POLL)):
        listening(url)
        task = engine.wait(engine.enqueue("flaky"), timeout=10)
    assert (task.status, task.attempts) == ("completed", 2)


def test_an_operator_retry_wakes_the_workers(lesson, url, engine):
    fail = threading.Event()
    fail.set()

    @engine.task("once_failing", max_attempts=1)
    def once_failing(input):
        if fail.is_set():
            raise RuntimeError("broken until fixed")

    with running(worker(lesson, engine, poll_interval=NO_POLL)):
        listening(url)
        task_id = engine.enqueue("once_failing")
        assert engine.wait(task_id, timeout=10).status == "failed"
        fail.clear()
        engine.retry(task_id)
        assert engine.wait(task_id, timeout=10).status == "completed"


def test_a_parent_resumes_within_50_ms_of_its_last_child_ending(
    lesson, url, engine, current_durable_task
):
    """The parents run on one worker, the children on another: the parents' worker hears of
    the last child's end from the notification of the commit that queued the parent. The
    children end only once their parent has suspended (otherwise it would not wait at all)."""
    release = threading.Event()

    @engine.task("child")
    def child(input):
        release.wait(30)
        return input

    @engine.durable_task("parent")
    def parent(input):
        ctx = current_durable_task()
        return ctx.wait_all([ctx.spawn("child", i) for i in range(3)])

    parents = worker(lesson, engine, "parents", poll_interval=NO_POLL, task_names=["parent"])
    children = worker(
        lesson, engine, "children", slots=3, poll_interval=NO_POLL, task_names=["child"]
    )
    resumed_after = []
    with running(parents, children):
        listening(url, "parents")
        listening(url, "children")
        for _ in range(5):
            release.clear()
            parent_id = engine.enqueue("parent")
            wait_until(lambda parent_id=parent_id: engine.get(parent_id).status == "suspended")
            release.set()
            assert engine.wait(parent_id, timeout=10).output == [0, 1, 2]
            resumed_after.append(
                seconds(
                    url,
                    "SELECT extract(epoch FROM (SELECT started_at FROM task_attempts"
                    "   WHERE task_id = %s AND attempt = 2)"
                    " - (SELECT max(finished_at) FROM tasks WHERE parent_id = %s))",
                    parent_id,
                    parent_id,
                )
            )
    # The median of five within 50 ms (one or two may meet a loaded machine); none waited for a
    # poll, ten minutes away.
    assert all(0 <= after < 1 for after in resumed_after), resumed_after
    assert statistics.median(resumed_after) < 0.05, f"resumed {resumed_after} s after"


def test_room_under_a_key_wakes_workers_of_other_task_names(lesson, url, engine):
    """Key 'printer' admits one task at a time; 'scan' and 'print' share it, on two workers
    that each run one of the names. When the scan ends, the print worker is woken (an empty
    payload: any name under the key may fit) and claims, with no poll."""
    release = threading.Event()
    scanner_engine = lesson.engine.Engine(engine.database_url)
    try:
        scanner_engine.task("scan")(lambda input: release.wait(30))
        engine.task("print")(lambda input: None)
        scan_id = scanner_engine.enqueue("scan", concurrency_key="printer", max_running=1)
        scanner = worker(lesson, scanner_engine, "scanner", poll_interval=NO_POLL)
        printer = worker(lesson, engine, "printer", poll_interval=NO_POLL)
        with running(scanner, printer):
            listening(url, "scanner")
            listening(url, "printer")
            wait_until(lambda: engine.get(scan_id).status == "running")
            print_id = engine.enqueue("print", concurrency_key="printer", max_running=1)
            assert engine.get(print_id).status == "queued"  # the key is full
            release.set()
            assert engine.wait(print_id, timeout=10).status == "completed"
    finally:
        scanner_engine.close()


def test_a_listener_reconnects_and_its_worker_claims_what_was_enqueued_meanwhile(
    lesson, url, engine, caplog
):
    caplog.set_level(logging.WARNING)
    engine.task("noop")(lambda input: None)
    dbname = conninfo.conninfo_to_dict(url)["dbname"]
    server = conninfo.make_conninfo(url, dbname="postgres")

    def allow_connections(allowed: bool) -> None:
        statement = "ALTER DATABASE {} ALLOW_CONNECTIONS " + ("true" if allowed else "false")
        admin.execute(pgsql.SQL(statement).format(pgsql.Identifier(dbname)))

    with (
        psycopg.connect(server, autocommit=True) as admin,
        psycopg.connect(url, autocommit=True) as client,  # opened before the door closes
        running(worker(lesson, engine, poll_interval=NO_POLL)),
    ):
        listening(url)
        try:
            allow_connections(False)
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = 'w-listen' AND datname = %s",
                (dbname,),
            )
            wait_until(lambda: "listener lost its connection" in caplog.text)
            # Enqueued while the listener is away: its notification reaches no one.
            (task_id,) = client.execute(
                "INSERT INTO tasks (name, input) VALUES ('noop', '1') RETURNING id"
            ).fetchone()
            status = client.execute("SELECT status FROM tasks WHERE id = %s", (task_id,))
            assert status.fetchone() == ("queued",)
        finally:
            allow_connections(True)
        assert engine.wait(task_id, timeout=20).status == "completed"
    assert "listener back; claiming at once" in caplog.text


def test_a_stale_completion_riding_with_a_claim_is_refused_by_the_fence(
    lesson, url, engine, caplog
):
    """The one-statement turn (RecordAndClaimUnkeyed) records completions with the attempt
    fence, as CompleteTasks does. Worker A claims two tasks (a backlog: its next turn takes
    the one-statement way); the attempt of the first is taken over while its function still
    runs, and worker B runs attempt 2 to the end. A's late output for it changes nothing; its
    output for the second is recorded."""
    caplog.set_level(logging.INFO)
    release = threading.Event()

    @engine.task("report", backoff=0.01)
    def report_a(input):
        release.wait(30)
        return "by A"

    with lesson.engine.Engine(url) as engine_b:
        engine_b.task("report", backoff=0.01)(lambda input: "by B")
        taken_over, kept = engine.enqueue_many("report", [1, 2])
        # A long lease: A heartbeats only every 10 s, long after the takeover below.
        a = worker(lesson, engine, "A", slots=2, poll_interval=NO_POLL, lease=30)
        b = worker(lesson, engine_b, "B", poll_interval=0.02)
        with running(a):
            wait_until(lambda: status_counts(url) == {"running": 2})
            # A's lease of the first runs out (as if A had stalled); B reclaims it and runs it.
            sql(
                url,
                "UPDATE tasks SET lease_expires_at = now() - '1 s'::interval WHERE id = %s",
                taken_over,
            )
            with running(b):
                task = engine.wait(taken_over, timeout=10)
                assert (task.output, task.attempts) == ("by B", 2)
            release.set()
            assert engine.wait(kept, timeout=10).output == "by A"
            wait_until(lambda: f"task {taken_over}: attempt 1 is no longer current" in caplog.text)
    task = engine.get(taken_over)
    assert (task.status, task.output, task.attempts) == ("completed", "by B", 2)
    attempts = sql(
        url,
        "SELECT attempt, status::text, worker FROM task_attempts WHERE task_id = %s ORDER BY 1",
        taken_over,
    )
    assert attempts == [(1, "failed", "A"), (2, "completed", "B")]


def test_an_output_the_database_refuses_on_the_one_statement_turn_fails_alone(
    lesson, url, engine, monkeypatch
):
    """The one-statement turn records its riders' outputs and claims in one statement: an
    output the database refuses (a number with more digits than numeric holds) loses it all.
    The worker then records the riders one by one, fails only that one, and goes on claiming.
    Two slots and six tasks: the first claim fills both (a backlog), so the turns after it
    take the one-statement way, and the refused output is in one of them."""
    monkeypatch.setattr(sys, "get_int_max_str_digits", sys.get_int_max_str_digits)
    sys.set_int_max_str_digits(0)
    engine.task("report", max_attempts=1)(lambda input: 10**140_000 if input == 3 else input)
    task_ids = engine.enqueue_many("report", range(6))
    with running(worker(lesson, engine, slots=2, poll_interval=NO_POLL)):
        tasks = [engine.wait(task_id, timeout=10) for task_id in task_ids]
    sys.set_int_max_str_digits(4300)
    assert [task.output for task in tasks] == [0, 1, 2, None, 4, 5]
    assert [task.status for task in tasks] == ["completed"] * 3 + ["failed"] + ["completed"] * 2
    assert tasks[3].error.startswith(
        "return value could not be stored: NumericValueOutOfRange: value overflows numeric"
    )


def test_keys_come_first_on_the_one_statement_turn_too(lesson, url, engine):
    """While a worker has a backlog, its turns take the one-statement way, which claims tasks
    without a key: not while a task with a key waits. Keys come first (lesson 03's order):
    the keyed task starts in the turn right after it was enqueued, not after the backlog."""
    release = threading.Event()

    @engine.task("unkeyed")
    def unkeyed(input):
        if input < 2:  # the first two hold both slots until the keyed task is queued
            release.wait(30)

    engine.task("keyed")(lambda input: None)
    backlog = engine.enqueue_many("unkeyed", range(6))
    with running(worker(lesson, engine, slots=2, poll_interval=NO_POLL)):
        wait_until(lambda: status_counts(url) == {"running": 2, "queued": 4})
        keyed = engine.enqueue("keyed", concurrency_key="k", max_running=1)
        release.set()
        for task_id in [*backlog, keyed]:
            engine.wait(task_id, timeout=10)
    started = [row[0] for row in sql(url, "SELECT id FROM tasks ORDER BY started_at")]
    # The two that held the slots, then the keyed one with the third (in either order).
    assert started.index(keyed) in (2, 3), (started, keyed)


# --- a pooler in transaction mode: PgBouncer, when it is installed ------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_the_loops_generic_plans_stay_on_the_indexes_as_the_tables_grow(lesson, url, engine):
    """The loop's connection keeps one generic plan per statement (lesson 08: no planning per
    turn), made while the tables are small. It must not be a plan that reads a whole table, and
    goes on reading it once the table holds a million rows ("Stale plans", docs/performance.md).
    """
    engine.task("noop")(lambda input: None)
    worker = lesson.worker.Worker(engine, "w")
    queries = lesson.db_queries.Querier
    grow = (
        "WITH t AS (INSERT INTO tasks (name, input, status, attempts, worker, started_at,"
        " lease_expires_at) SELECT 'noop', to_jsonb(n), 'running', 1, 'w', now(),"
        " now() + interval '1 hour' FROM generate_series(1, %s) AS n RETURNING id)"
        " INSERT INTO task_attempts (task_id, attempt, worker, started_at)"
        " SELECT id, 1, 'w', now() FROM t"
    )
    # Fifty tasks, and statistics that say so: a worker that starts on a young queue.
    sql(url, grow, 50)
    sql(url, "ANALYZE tasks, task_attempts")
    with worker.connect() as conn:
        # Planned, and planned again: psycopg prepares the statement at its fifth run, and
        # PostgreSQL tries its generic plan after five more.
        for _ in range(12):
            queries(conn).complete_tasks(done=[{"id": 1, "attempt": 1, "output": None}])
        # Then the tables grow, with no ANALYZE since: what a queue that fills in seconds sees.
        sql(url, grow, 50_000)
        [(last,)] = sql(url, "SELECT max(id) FROM tasks")
        # This session's sequential scans, as its statistics count them, before and after.
        seq_scans = (
            "SELECT relname, seq_scan FROM pg_stat_xact_user_tables"
            " WHERE relname IN ('tasks', 'task_attempts') ORDER BY relname"
        )
        with conn.transaction():
            before = conn.execute(seq_scans).fetchall()
            assert queries(conn).complete_tasks(done=[{"id": last, "attempt": 1, "output": 1}])
            after = conn.execute(seq_scans).fetchall()
    assert after == before


@pytest.fixture
def pgbouncer(url, tmp_path) -> Iterator[str]:
    """`url`'s database through a PgBouncer in transaction mode: the URL to connect to it."""
    binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    if not Path(binary).exists():
        pytest.skip("pgbouncer is not installed (.ci/run installs it with apt)")
    server = conninfo.conninfo_to_dict(url)
    host = str(server.get("host") or "127.0.0.1")
    target = " ".join(
        f"{key}={server[key]}" for key in ("host", "port", "user", "password") if server.get(key)
    )
    port = free_port()
    tmp_path.chmod(0o777)  # pgbouncer may run as another user, below
    (tmp_path / "users.txt").write_text(f'"{server.get("user") or "postgres"}" ""\n')
    config = tmp_path / "pgbouncer.ini"
    config.write_text(
        f"[databases]\n* = {target}\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        f"auth_type = trust\nauth_file = {tmp_path / 'users.txt'}\n"
        "pool_mode = transaction\ndefault_pool_size = 2\n"
        # The engine's connections set plan_cache_mode at startup, which PgBouncer refuses
        # unless told to ignore it.
        "ignore_startup_parameters = options\n"
    )
    command = [binary, "-q", str(config)]
    if os.geteuid() == 0:
        # PgBouncer refuses to run as root; it runs as whoever owns the server's socket
        # directory (the embedded server's), so that it may connect there.
        owner = Path(host).stat().st_uid if host.startswith("/") else "nobody"
        command[1:1] = ["-u", pwd.getpwuid(owner).pw_name if isinstance(owner, int) else owner]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    pooled = conninfo.make_conninfo(url, host="127.0.0.1", port=str(port), password="")
    try:
        wait_until(lambda: process.poll() is not None or accepts(pooled), timeout=10)
        assert process.poll() is None, process.communicate()[1]
        yield pooled
    finally:
        process.terminate()
        process.wait(timeout=10)


def accepts(url: str) -> bool:
    try:
        psycopg.connect(url, connect_timeout=1).close()
    except psycopg.OperationalError:
        return False
    return True


def test_a_listener_behind_a_transaction_pooler_hears_nothing(url, pgbouncer):
    """The trap: LISTEN runs on whichever server connection the pooler lends for that one
    statement, and the notifications go to that server connection, not to this client."""
    with (
        psycopg.connect(url, autocommit=True) as direct,
        psycopg.connect(pgbouncer, autocommit=True) as pooled,
        # Another client of the pooler, which its two server connections also serve.
        psycopg.connect(pgbouncer, autocommit=True) as neighbour,
    ):
        direct.execute("LISTEN task_ready")
        pooled.execute("LISTEN task_ready")
        neighbour.execute("SELECT 1")
        sql(url, "INSERT INTO tasks (name, input) VALUES ('noop', '1')")
        assert notifications_until_sentinel(direct, url) == ["noop"]
        # The direct listener has heard the task and the sentinel after it; the pooled one,
        # given a second more, hears neither.
        assert [n.payload for n in pooled.notifies(timeout=1.0)] == []


def test_a_listener_pointed_past_the_pooler_hears_what_one_behind_it_misses(lesson, url, pgbouncer):
    """The fix, `Worker(listen_url=...)`: the listener connects to PostgreSQL directly (or to a
    pool in session mode), whatever the worker's other connections go through."""
    Listener = lesson.listener.Listener
    stop = threading.Event()
    behind, past = threading.Event(), threading.Event()
    listeners = [
        Listener(pgbouncer, "behind", ["noop"], behind, stop),
        Listener(url, "past", ["noop"], past, stop),
    ]
    for listener in listeners:
        listener.start()
    try:
        # Each wakes its worker once it has run LISTEN; then both wait.
        wait_until(lambda: all(listener.connections == 1 for listener in listeners))
        wait_until(lambda: behind.is_set() and past.is_set())
        behind.clear()
        past.clear()
        sql(url, "INSERT INTO tasks (name, input) VALUES ('noop', '1')")
        assert past.wait(10)
        assert not behind.wait(1.0)
    finally:
        stop.set()
        for listener in listeners:
            listener.join()


# --- main.py: lesson 08's own demo (single-lesson) -------------------------------------------

LESSON = "08-listen-notify"


def measured(lines: list[str], heading: str) -> tuple[float, float, float]:
    """(pickup p50 ms, idle claims/s, agent resumed after ms) printed under `heading`."""
    part = "\n".join(lines[lines.index(heading) + 1 :][:3])
    found = [
        re.search(pattern, part)
        for pattern in (r"p50 ([\d.]+) ms", r"([\d.]+) claims/s", r"resumed ([\d.]+) ms")
    ]
    assert all(found), part
    p50, claims, resumed = (float(match[1]) for match in found if match)
    return p50, claims, resumed


def test_main_compares_polling_with_notifications(pg_server_url):
    dbname = f"t08_main_{os.getpid()}"
    try:
        result = run_main(LESSON, pg_server_url, dbname, cwd=lesson_dir(LESSON))
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stderr == ""
        lines = result.stdout.splitlines()
        assert lines[0].startswith(f"database {dbname} on ")
        polled = measured(lines, "polling every 50 ms (lesson 07):")
        notified = measured(lines, "notifications (this lesson):")
        # 1. pickup p50: a notification beats a 50 ms poll.
        assert notified[0] < polled[0], (notified, polled)
        # 2. idle claims per second: twenty polling (at least 5 on a loaded machine), at most
        # one safety poll in two seconds listening.
        assert polled[1] >= 5 and notified[1] <= 0.5, (polled, notified)
        # 3. the agent resumed, listening, well before the next safety poll (5 s): the
        # notification woke it. (The 50 ms are proved by the test of the parents, above; a
        # loaded machine can hold up one run of the demo.)
        assert notified[2] < 1000, notified
        assert lines[-4:] == [
            "  INSERT, not committed yet: heard nothing",
            "  COMMIT: heard 'noop'",
            "  INSERT, then ROLLBACK: heard nothing",
            "  enqueue_many of 1,000 noop tasks, one transaction: heard 'noop'",
        ]
        # What the demo did, from its database: two agents completed, each tool ran once per
        # agent (the effects table), and the tasks of part 4 wait, unclaimed: the committed
        # INSERT and the thousand, not the rolled-back one.
        url = postgres.database_url(pg_server_url, dbname)
        assert sql(url, "SELECT status::text, count(*) FROM tasks GROUP BY 1 ORDER BY 1") == [
            ("completed", 2 * (20 + 1 + 3)),
            ("queued", 1 + 1000),
        ]
        tools = "SELECT step, count(*) FROM effects WHERE step <> 'plan' AND step <> 'summarise'"
        assert dict(sql(url, tools + " GROUP BY step")) == {
            "weather": 2,
            "find_parks": 2,
            "read_reviews": 2,
        }
    finally:
        drop_database(pg_server_url, dbname)
