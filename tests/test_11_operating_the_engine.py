"""Lesson 11's promises about the engine itself, kept by lesson 11 and every later lesson:

- tags: given at enqueue, found by containment; bad tags are refused and nothing is written;
- reprioritize: a waiting task moves up its queue, and the next claim sees it; a task past
  waiting is refused, and the action is audited;
- queue_stats: what waits and what runs, per task name, as the table has it;
- declare_task: a task without a function is enqueued, and no Python worker claims it;
- `@engine.step`: a plain call inside a durable task is a step (recorded once, replayed after),
  a plain call anywhere else, and part of the outer step inside another step;
- `async def` tasks and steps run, record and replay like the others;
- the worker's metrics count what it claimed and how its attempts ended.

The CLI, the HTTP API and the dashboard have files of their own (test_11_cli.py,
test_11_api.py, test_11_dashboard.py).
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter

import pytest
from hardway import postgres
from harness import (
    drop_database,
    finish,
    lesson_dir,
    lesson_env,
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


@pytest.fixture(params=lessons_from("11"), scope="module")
def lesson(request):
    return load_lesson(request.param)


# region: tags
def test_tags_are_found_by_containment(lesson, engine):
    engine.task("ship")(lambda input: input)
    a = engine.enqueue("ship", 1, tags={"customer": "42", "region": "eu"})
    b = engine.enqueue("ship", 2, tags={"customer": "42"})
    engine.enqueue("ship", 3, tags={"customer": "7"})
    batch = engine.enqueue_many("ship", [4, 5], tags={"customer": "42", "region": "us"})

    def ids(**filters):
        return [task.id for task in engine.list_tasks(**filters)]

    assert ids(tags={"customer": "42"}) == [*reversed(batch), b, a]  # newest first
    assert ids(tags={"customer": "42", "region": "eu"}) == [a]
    assert ids(tags={"customer": "nobody"}) == []
    assert engine.get(a).tags == {"customer": "42", "region": "eu"}
    assert len(ids()) == 5 and ids(limit=2) == list(reversed(batch))


@pytest.mark.parametrize(
    "tags, problem",
    [
        ({"customer": 42}, "must be a string"),
        ({"": "x"}, "non-empty string"),
        (["customer", "42"], "mapping of strings"),
        ({"customer": "4\x002"}, "NUL"),
    ],
)
def test_bad_tags_are_refused_and_nothing_is_written(lesson, engine, url, tags, problem):
    engine.task("ship")(lambda input: input)
    with pytest.raises(lesson.engine.TaskOptionError, match=problem):
        engine.enqueue("ship", 1, tags=tags)
    assert sql(url, "SELECT count(*) FROM tasks") == [(0,)]


def test_list_filters(lesson, engine, url):
    engine.task("a")(lambda input: input)
    engine.task("b")(lambda input: input)
    first = engine.enqueue("a", 1)
    engine.enqueue("b", 2, concurrency_key="k", max_running=1)
    sql(url, "UPDATE tasks SET created_at = now() - interval '1 hour' WHERE id = %s", first)
    assert [t.name for t in engine.list_tasks(name="b")] == ["b"]
    assert [t.name for t in engine.list_tasks(concurrency_key="k")] == ["b"]
    assert [t.id for t in engine.list_tasks(older_than=600)] == [first]
    assert len(engine.list_tasks(status="queued")) == 2
    assert engine.list_tasks(status="failed") == []
    with pytest.raises(lesson.engine.TaskOptionError, match="status must be one of"):
        engine.list_tasks(status="done")


# endregion


# region: reprioritize
def test_a_reprioritized_task_is_claimed_first(lesson, engine, url):
    order = []
    engine.task("job")(order.append)
    ids = engine.enqueue_many("job", [1, 2, 3])
    moved = engine.reprioritize(ids[2], 10)
    assert moved.priority == 10
    finish(lesson, engine, *ids)
    assert order == [3, 1, 2]
    (action,) = engine.actions(ids[2])
    assert (action.action, action.status) == ("reprioritize", "queued")


def test_only_a_waiting_task_is_reprioritized(lesson, engine, url):
    engine.task("job")(lambda input: input)
    (done,) = finish(lesson, engine, engine.enqueue("job", 1))
    with pytest.raises(lesson.engine.TaskStateError, match="is completed: only a queued"):
        engine.reprioritize(done.id, 5)
    with pytest.raises(lesson.engine.TaskNotFoundError):
        engine.reprioritize(10**6, 5)
    with pytest.raises(lesson.engine.TaskOptionError, match="priority"):
        engine.reprioritize(done.id, 2**31)
    assert engine.get(done.id).priority == 0 and engine.actions(done.id) == []


# endregion


def test_queue_stats_count_what_the_table_holds(lesson, engine, url):
    engine.task("ok")(lambda input: input)
    engine.task("bad", max_attempts=1)(lambda input: 1 / 0)
    finish(lesson, engine, engine.enqueue("ok", 1), engine.enqueue("bad", 1))
    engine.enqueue("ok", 2)
    engine.enqueue("ok", 3, delay=3600)
    sql(url, "UPDATE tasks SET run_at = clock_now() - interval '30 seconds' WHERE input = '2'")
    stats = {row.name: row for row in engine.queue_stats()}
    ok, bad = stats["ok"], stats["bad"]
    assert (ok.queued, ok.scheduled, ok.running, ok.completed_last_hour) == (1, 1, 0, 1)
    assert ok.completed_last_minute == 1 and 30 <= ok.oldest_queued_seconds < 60
    assert (bad.failed_last_hour, bad.queued, bad.oldest_queued_seconds) == (1, 0, 0)


def test_a_declared_task_is_enqueued_and_left_to_its_own_workers(lesson, engine, url):
    engine.task("local")(lambda input: input)
    engine.declare_task("resize", durable=True, max_attempts=2)
    remote = engine.enqueue("resize", {"image": "cat.png"})
    local = engine.enqueue("local", 1)
    finish(lesson, engine, local)
    assert engine.get(remote).status == "queued" and engine.get(remote).max_attempts == 2
    with pytest.raises(ValueError, match="already registered"):
        engine.declare_task("local")
    with pytest.raises(lesson.engine.UnknownTaskError, match="registered: local, resize"):
        engine.enqueue("resise", 1)


def test_check_histories_leaves_declared_tasks_to_their_workers(lesson, engine, url, tmp_path):
    (tmp_path / "declaring_tasks.py").write_text(
        "def register(engine):\n    engine.declare_task('greet', durable=True)\n"
    )
    engine.declare_task("greet", durable=True)
    engine.enqueue("greet", {"name": "Ada"})
    dbname = conninfo.conninfo_to_dict(url)["dbname"]
    server = url.replace(f"dbname={dbname}", "dbname=postgres")
    checked = subprocess.run(
        [sys.executable, str(lesson_dir(lesson.name) / "check_histories.py")]
        + ["--tasks", "declaring_tasks", "--all"],
        env={**lesson_env(server, dbname), "PYTHONPATH": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    # Its code is in another program: nothing here could replay it.
    assert (checked.returncode, checked.stdout) == (0, "0 tasks checked: 0 match, 0 would fail\n")


# region: step decorator
def test_a_decorated_call_is_a_step_inside_a_durable_task_only(lesson, engine, url):
    calls = Counter()
    flaky = {"fail": True}

    @engine.step
    def charge(amount):
        calls["charge"] += 1
        return {"charged": amount}

    @engine.step(name="send receipt")
    def receipt(charged):
        calls["receipt"] += 1
        if flaky.pop("fail", False):
            raise ConnectionError("mail server down")
        return f"receipt for {charged['charged']}"

    @engine.durable_task("checkout", backoff=0.01)
    def checkout(amount):
        return receipt(charge(amount))

    assert charge(5) == {"charged": 5}  # outside a task: a plain call, nothing recorded
    (task,) = finish(lesson, engine, engine.enqueue("checkout", 12))
    assert task.status == "completed" and task.output == "receipt for 12"
    # The retry replayed "charge": it ran once in the task (and once outside it, above).
    assert calls == {"charge": 2, "receipt": 2}
    assert [(e.kind, e.name) for e in engine.events(task.id)] == [
        ("step_completed", "charge"),
        ("step_completed", "send receipt"),
    ]


def test_a_decorated_call_inside_a_step_is_part_of_that_step(lesson, engine, current_durable_task):
    @engine.step
    def price(item):
        return {"kettle": 40}[item]

    def quote(items):
        return sum(price(item) for item in items)

    @engine.durable_task("order")
    def order(items):
        return current_durable_task().step("quote", quote, items)

    (task,) = finish(lesson, engine, engine.enqueue("order", ["kettle", "kettle"]))
    assert task.output == 80
    assert [e.name for e in engine.events(task.id)] == ["quote"]


# endregion


# region: async
def test_async_tasks_and_steps_record_and_replay(lesson, engine, current_durable_task):
    calls = Counter()
    flaky = {"fail": True}

    @engine.step
    async def fetch(url):
        calls[url] += 1
        await asyncio.sleep(0)
        return len(url)

    @engine.durable_task("crawl", backoff=0.01)
    async def crawl(urls):
        sizes = [await fetch(url) for url in urls]
        ctx = current_durable_task()
        total = await ctx.astep("sum", _async_sum, sizes)
        if flaky.pop("fail", False):
            raise ConnectionError("crash after the steps")
        return total

    @engine.task("plain async")
    async def plain(input):
        await asyncio.sleep(0)
        return input * 2

    crawled, doubled = finish(
        lesson, engine, engine.enqueue("crawl", ["a.io", "bb.io"]), engine.enqueue("plain async", 4)
    )
    assert (crawled.status, crawled.output, crawled.attempts) == ("completed", 9, 2)
    assert calls == {"a.io": 1, "bb.io": 1}  # the retry replayed both fetches
    assert doubled.output == 8


async def _async_sum(values):
    return sum(values)


def test_two_steps_at_once_are_refused(lesson, engine):
    @engine.step
    async def wait_a_bit(n):
        await asyncio.sleep(0.01)
        return n

    @engine.durable_task("greedy", max_attempts=1)
    async def greedy(input):
        return await asyncio.gather(wait_a_bit(1), wait_a_bit(2))

    (task,) = finish(lesson, engine, engine.enqueue("greedy", None))
    assert task.status == "failed" and "steps run one at a time" in task.error


# endregion


def test_the_workers_metrics_count_claims_and_outcomes(lesson, engine):
    metrics = lesson.worker.metrics
    engine.task("ok")(lambda input: input)
    engine.task("bad", max_attempts=1)(lambda input: 1 / 0)

    def sample(name, **labels):
        return metrics.REGISTRY.get_sample_value(name, labels) or 0

    before = {
        "claims": sample("hardway_claim_seconds_count"),
        "ok": sample("hardway_attempts_total", task_name="ok", outcome="completed"),
        "bad": sample("hardway_attempts_total", task_name="bad", outcome="failed"),
        "pickups": sample("hardway_pickup_seconds_count", task_name="ok"),
    }
    ids = [engine.enqueue("ok", n) for n in range(3)] + [engine.enqueue("bad", 0)]
    with running(worker(lesson, engine, slots=2)):
        wait_until(lambda: all(engine.get(i).finished_at for i in ids))
    assert sample("hardway_attempts_total", task_name="ok", outcome="completed") - before["ok"] == 3
    assert sample("hardway_attempts_total", task_name="bad", outcome="failed") - before["bad"] == 1
    assert sample("hardway_pickup_seconds_count", task_name="ok") - before["pickups"] == 3
    assert sample("hardway_claim_seconds_count") > before["claims"]


# --- main.py (lesson 11's own) ---------------------------------------------------------------

LESSON = "11-operating-the-engine"


def test_main_runs_tasks_through_the_api_a_shell_worker_and_the_cli(pg_server_url):
    dbname = f"t11_main_{os.getpid()}"
    try:
        started = time.monotonic()
        result = run_main(LESSON, pg_server_url, dbname, cwd=lesson_dir(LESSON))
        took = time.monotonic() - started
        assert result.returncode == 0, result.stdout + result.stderr
        assert took < 15, took  # the budget for the demo
        out = result.stdout
        lines = [line.strip() for line in out.splitlines()]
        assert "task 2 failed: StepError: step 'charge' failed: CardDeclined:" in out
        # The shell worker: step 1, a crash, the lease runs out, step 1 replayed, step 2 run.
        assert [line for line in lines if line.startswith("sh-worker-")] == [
            'sh-worker-1: task 3, attempt 1: {"name":"Ada"}',
            "sh-worker-1: running step 1 (compose)",
            "sh-worker-1: stopping after step 1, as if this worker had crashed",
            'sh-worker-2: task 3, attempt 2: {"name":"Ada"}',
            "sh-worker-2: replayed step 1 (compose)",
            "sh-worker-2: running step 2 (deliver)",
            "sh-worker-2: delivering: Hello, Ada!",
            "sh-worker-2: task 3 completed: Hello, Ada!",
        ]
        # The command line found both checkouts by their tag, and nothing else.
        listed = out.split("$ hardway tasks list --tag customer=42")[1].split("5. ")[0]
        assert [row.split()[:3] for row in listed.strip().splitlines()[1:]] == [
            ["2", "checkout", "failed"],
            ["1", "checkout", "completed"],
        ]
        assert "task 2 completed: {'parcel': 'parcel A-2', 'payment': 'payment of 19.90'}" in out
        assert out.count("charged 19.90 to card 4000-0002") == 1  # once, after the fix
        assert 'hardway_attempts_total{outcome="failed",task_name="checkout"} 1.0' in out
        assert lines[-1] == "dashboard: http://127.0.0.1:8011/dashboard#token=demo-token" or (
            lines[-1].startswith("dashboard: http://127.0.0.1:")  # 8011 was taken
        )
        # From the database: every task completed; the greeting's attempts and events.
        url = postgres.database_url(pg_server_url, dbname)
        assert status_counts(url) == {"completed": 3}
        attempts = sql(
            url, "SELECT worker, status::text, error FROM task_attempts WHERE task_id = 3"
        )
        assert attempts == [
            ("sh-worker-1", "failed", "lease expired (worker presumed dead)"),
            ("sh-worker-2", "completed", None),
        ]
        events = sql(url, "SELECT name, attempt FROM task_events WHERE task_id = 3 ORDER BY seq")
        assert events == [("compose", 1), ("deliver", 2)]
    finally:
        drop_database(pg_server_url, dbname)


def test_a_worker_process_serves_its_metrics(lesson, engine, url, pg_server_url, tmp_path):
    (tmp_path / "metered_tasks.py").write_text(
        "def register(engine):\n    engine.task('double')(lambda n: n * 2)\n"
    )
    engine.task("double")(lambda n: n * 2)
    task_id = engine.enqueue("double", 21)
    with socket.socket() as probe:  # a free port
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dbname = conninfo.conninfo_to_dict(url)["dbname"]
    command = [sys.executable, str(lesson_dir(lesson.name) / "worker.py")]
    command += ["--tasks", "metered_tasks", "--metrics-port", str(port)]
    env = {**lesson_env(pg_server_url, dbname), "PYTHONPATH": str(tmp_path)}
    process = subprocess.Popen(command, env=env, stderr=subprocess.DEVNULL)
    try:
        assert engine.wait(task_id, timeout=30).output == 42
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
            text = answer.read().decode()
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert 'hardway_attempts_total{outcome="completed",task_name="double"} 1.0' in text
    assert 'hardway_pickup_seconds_count{task_name="double"} 1.0' in text
