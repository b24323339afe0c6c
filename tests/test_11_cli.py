"""Lesson 11's command line (cli.py, and the `hardway` console script that runs it), kept by
lesson 11 and every later lesson:

- `tasks list` filters by status, name, concurrency key, age and tags, newest first; the tag
  search reads the GIN index tasks_tags;
- `tasks show` prints inspect_task's timeline, with the children as a tree;
- retry, replay, cancel, fork and reprioritize change the database as the engine's calls do;
- `events send` wakes the task waiting for the event; `queues stats` counts what the table holds;
- `worker` starts a worker process that runs tasks;
- `--json` puts one JSON document on stdout and nothing else;
- an error is one line on stderr, never a traceback: exit status 1 when the engine refused
  (no such task, a state that forbids the action) or the database cannot be reached, 2 when
  the command line is wrong.

Most commands run in this process (cli.main), which is fast; the promises about what a user
sees (exit statuses, nothing but JSON on stdout, no traceback) are checked on real processes.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import psycopg
import pytest
from harness import (
    LESSONS_DIR,
    lesson_dir,
    lesson_env,
    lessons_from,
    load_lesson,
    run_main,
    running,
    sql,
    wait_until,
    worker,
)
from psycopg import conninfo
from psycopg.types.json import Jsonb


@pytest.fixture(params=lessons_from("11"), scope="module")
def lesson(request):
    return load_lesson(request.param)


def dbname(url: str) -> str:
    return conninfo.conninfo_to_dict(url)["dbname"]


class Result(NamedTuple):
    status: int
    out: str
    err: str


@pytest.fixture
def cli(lesson, url, pg_server_url, monkeypatch, capsys):
    """Run one command in this process, on the test's database: its exit status and output."""
    monkeypatch.setenv("DATABASE_URL", pg_server_url)
    monkeypatch.setenv("LESSON_DBNAME", dbname(url))

    def run(*args: str) -> Result:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit:  # Typer exits, even when all went well
            lesson.cli.main(list(args))
        out, err = capsys.readouterr()
        return Result(exit.value.code or 0, out, err)

    return run


def ids(result: Result) -> list[int]:
    """The ids of the tasks a `--json` command printed."""
    assert result.status == 0, result.err
    return [task["id"] for task in json.loads(result.out)]


def finished(process: subprocess.CompletedProcess[str]) -> Result:
    return Result(process.returncode, process.stdout, process.stderr)


def refused(result: Result, status: int) -> str:
    """Check that the command failed with `status`: one line on stderr, nothing on stdout, no
    traceback. Return that line."""
    assert (result.status, result.out) == (status, ""), result.err
    assert "Traceback" not in result.err
    lines = result.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.err
    return lines[0]


# --- the pure parts ------------------------------------------------------------------------


def test_tags_ages_and_tables(lesson):
    cli = lesson.cli
    assert cli.parse_tags(["customer=42", "query=a=b", "empty="]) == {
        "customer": "42",
        "query": "a=b",
        "empty": "",
    }
    for bad in (["customer"], ["=42"], ["a=1", "a=2"]):
        with pytest.raises(cli.UsageError):
            cli.parse_tags(bad)
    assert [cli.age(s) for s in (0, 59.9, 60, 3599, 3600, 7260, 86400 + 7200)] == [
        "0s", "59s", "1m00s", "59m59s", "1h00m", "2h01m", "1d02h",
    ]  # fmt: skip
    assert cli.table(["ID", "NAME"], [["7", "mail"], ["12", "x"]]).splitlines() == [
        "ID  NAME",
        "7   mail",
        "12  x",
    ]


# --- tasks list ----------------------------------------------------------------------------


def test_list_filters_by_status_name_key_age_and_tags(lesson, engine, url, cli):
    for name in ("mail", "bill"):
        engine.task(name)(lambda input: input)
    a = engine.enqueue("mail", tags={"customer": "42", "region": "eu"})
    b = engine.enqueue("mail", tags={"customer": "42"}, concurrency_key="acme", max_running=1)
    c = engine.enqueue("bill", tags={"customer": "7"}, priority=5)
    d = engine.enqueue("bill", delay=3600)
    sql(url, "UPDATE tasks SET created_at = now() - interval '2 hours' WHERE id = %s", a)

    assert ids(cli("tasks", "list", "--json")) == [d, c, b, a]
    assert ids(cli("tasks", "list", "--json", "--tag", "customer=42")) == [b, a]
    both = ("--tag", "customer=42", "--tag", "region=eu")
    assert ids(cli("tasks", "list", "--json", *both)) == [a]
    assert ids(cli("tasks", "list", "--json", "--tag", "customer=4")) == []
    assert ids(cli("tasks", "list", "--json", "--name", "bill")) == [d, c]
    assert ids(cli("tasks", "list", "--json", "--status", "scheduled")) == [d]
    assert ids(cli("tasks", "list", "--json", "--key", "acme")) == [b]
    assert ids(cli("tasks", "list", "--json", "--older-than", "3600")) == [a]
    assert ids(cli("tasks", "list", "--json", "--limit", "2")) == [d, c]
    assert ids(cli("tasks", "list", "--json", "--name", "bill", "--status", "queued")) == [c]

    shown = cli("tasks", "list", "--tag", "customer=42")
    assert shown.status == 0, shown.err
    lines = [line.split() for line in shown.out.splitlines()]
    assert lines[0] == ["ID", "NAME", "STATUS", "ATTEMPTS", "PRIORITY", "TAGS", "AGE"]
    assert lines[1] == [str(b), "mail", "queued", "0", "0", "customer=42", lines[1][-1]]
    assert lines[2] == [str(a), "mail", "queued", "0", "0", "customer=42,region=eu", "2h00m"]
    assert cli("tasks", "list", "--name", "nope").out == "no task matches\n"


def test_the_tag_search_reads_the_gin_index(lesson, engine, url, cli):
    # 5000 tasks, a thousand customers: five tasks each. Enough rows that reading them all
    # costs more than the index, and statistics that say so (ANALYZE).
    sql(
        url,
        "INSERT INTO tasks (name, input, tags)"
        " SELECT 'noop', 'null', jsonb_build_object('customer', (i %% 1000)::text, 'region', 'eu')"
        " FROM generate_series(1, 5000) AS i",
    )
    sql(url, "ANALYZE tasks")
    # The plan of the very statement list_tasks runs (SearchTasks), with the parameters
    # `tasks list --tag customer=42` gives it, on a connection set up as the engine's are.
    params = [None, None, None, None, Jsonb({"customer": "42"}), 50]
    with engine.connection() as conn:
        explained = psycopg.RawCursor(conn).execute(
            "EXPLAIN " + lesson.db_queries.SEARCH_TASKS, params
        )
        plan = "\n".join(row[0] for row in explained.fetchall())
    assert "Bitmap Index Scan on tasks_tags" in plan, plan
    assert "Seq Scan" not in plan, plan
    expected = [
        row[0]
        for row in sql(url, "SELECT id FROM tasks WHERE tags->>'customer' = '42' ORDER BY id DESC")
    ]
    assert len(expected) == 5
    assert ids(cli("tasks", "list", "--json", "--tag", "customer=42")) == expected


# --- tasks show ----------------------------------------------------------------------------


def test_show_prints_the_timeline_and_the_children_as_a_tree(
    lesson, engine, url, cli, current_durable_task
):
    @engine.task("leaf")
    def leaf(n):
        return n + 1

    @engine.durable_task("middle")
    def middle(n):
        ctx = current_durable_task()
        return ctx.wait(ctx.spawn("leaf", n)) * 10

    @engine.durable_task("root")
    def root(input):
        ctx = current_durable_task()
        ctx.step("prepare", lambda: 1)
        return sum(ctx.wait_all([ctx.spawn("middle", 1), ctx.spawn("leaf", 5)]))

    task_id = engine.enqueue("root")
    with running(worker(lesson, engine, slots=4)):
        assert engine.wait(task_id, timeout=30).output == 26
    middle_task, leaf_task = engine.children(task_id)
    [grandchild] = engine.children(middle_task.id)

    shown = cli("tasks", "show", str(task_id))
    assert shown.status == 0, shown.err
    # inspect_task's description, its flat list of the two children replaced by the tree.
    described = lesson.cli.describe(engine, task_id).splitlines()
    assert described[-3] == "  children: 2"
    timeline = described[:-3]
    lines = shown.out.splitlines()
    assert lines[: len(timeline)] == timeline
    assert lines[0].startswith(f"task {task_id} root (durable task): completed")
    ended = lesson.cli.outcome(middle_task, output=False)  # attempt 1 or 2: did it suspend?
    assert lines[len(timeline) :] == [
        "  children: 2",
        f"    task {middle_task.id} middle: {ended}",
        f"      task {grandchild.id} leaf: completed on attempt 1 by w",
        f"    task {leaf_task.id} leaf: completed on attempt 1 by w",
    ]

    data = json.loads(cli("tasks", "show", str(task_id), "--json").out)
    assert (data["task"]["id"], data["task"]["status"], data["task"]["output"]) == (
        task_id, "completed", 26,
    )  # fmt: skip
    assert data["events"][0]["name"] == "prepare"
    assert data["attempts"][-1]["worker"] == "w"
    assert (data["actions"], data["forks"]) == ([], [])
    tree = [(c["task"]["id"], [g["task"]["id"] for g in c["children"]]) for c in data["children"]]
    assert tree == [(middle_task.id, [grandchild.id]), (leaf_task.id, [])]
    assert refused(cli("tasks", "show", "999999"), 1) == "error: no task with id 999999"


# --- operating tasks -----------------------------------------------------------------------


def test_retry_replay_cancel_fork_and_reprioritize_change_the_database(
    lesson, engine, url, cli, current_durable_task
):
    @engine.durable_task("order", max_attempts=1)
    def order(input):
        ctx = current_durable_task()
        ctx.step("one", lambda: 1)
        ctx.step("two", lambda: 2)
        if input["bug"]:
            raise ValueError("bug")
        return ctx.step("three", lambda: 3)

    failed = engine.enqueue("order", {"bug": True})
    completed = engine.enqueue("order", {"bug": False})
    with running(worker(lesson, engine)):
        assert engine.wait(failed, timeout=30).status == "failed"
        assert engine.wait(completed, timeout=30).status == "completed"
    # No worker from here on: every task stays as the commands leave it.

    retried = cli("tasks", "retry", str(failed)).out
    assert (
        retried == f"task {failed} was failed: queued again, going on from its history (2 events)\n"
    )
    assert engine.get(failed).status == "queued"
    assert [a.action for a in engine.actions(failed)] == ["retry"]
    assert "is queued" in refused(cli("tasks", "replay", str(failed)), 1)

    cancelled = cli("tasks", "cancel", str(failed))
    assert cancelled.out == f"task {failed} cancelled, and its unfinished children with it\n"
    assert engine.get(failed).status == "cancelled"
    assert "has finished already" in refused(cli("tasks", "cancel", str(failed)), 1)

    action = json.loads(cli("tasks", "replay", str(failed), "--json").out)
    assert (action["action"], action["status"], action["events"]) == ("replay", "cancelled", 2)
    task = engine.get(failed)
    assert (task.status, task.replays, engine.history(failed)) == ("queued", 1, [])

    fork = json.loads(cli("tasks", "fork", str(completed), "--at", "1", "--json").out)
    assert (fork["status"], fork["forked_from"], fork["forked_at"]) == ("queued", completed, 1)
    assert [e.name for e in engine.history(fork["id"])] == ["one"]
    before = cli("tasks", "fork", str(completed), "--before", "three")
    second = max(t.id for t in engine.forks(completed))
    assert before.out == f"task {second} forked from task {completed} at event 2: queued\n"
    assert [e.name for e in engine.history(second)] == ["one", "two"]
    no_such_step = cli("tasks", "fork", str(completed), "--before", "four")
    assert "no event named 'four'" in refused(no_such_step, 1)
    for both_or_neither in ((), ("--at", "1", "--before", "two")):
        assert "fork point" in refused(cli("tasks", "fork", str(completed), *both_or_neither), 2)

    moved = cli("tasks", "reprioritize", str(second), "7")
    assert moved.out == f"task {second} (queued) now has priority 7\n"
    lowered = json.loads(cli("tasks", "reprioritize", str(second), "-5", "--json").out)
    assert lowered["priority"] == engine.get(second).priority == -5
    assert "is completed" in refused(cli("tasks", "reprioritize", str(completed), "1"), 1)
    assert engine.get(completed).priority == 0


# --- events and queues ---------------------------------------------------------------------


def test_events_send_wakes_the_task_waiting_for_it(
    lesson, engine, url, pg_server_url, cli, current_durable_task
):
    @engine.durable_task("approval")
    def approval(input):
        return current_durable_task().wait_for_event("approved")

    task_id = engine.enqueue("approval")
    with running(worker(lesson, engine)):
        wait_until(lambda: engine.get(task_id).status == "suspended")

    # A real process: its stdout is one JSON document, and nothing else.
    payload = '{"by": "ana"}'
    sent = run_main(
        lesson.name, pg_server_url, dbname(url), "events", "send", "approved", payload, "--json",
        script="cli.py",
    )  # fmt: skip
    assert sent.returncode == 0, sent.stderr
    assert json.loads(sent.stdout) == {
        "name": "approved", "payload": {"by": "ana"}, "first": True, "woken": [task_id],
    }  # fmt: skip
    assert engine.get(task_id).status == "queued"  # woken: the next claim takes it

    again = cli("events", "send", "approved", '"changed my mind"')
    assert again.out == (
        """event 'approved' had been sent already, with {"by": "ana"}: nothing changed\n"""
    )
    nobody = cli("events", "send", "shipped").out
    assert nobody == "event 'shipped' sent: no task was waiting for it; later waits receive it\n"
    assert "is not JSON" in refused(cli("events", "send", "approved", "yes"), 2)
    with running(worker(lesson, engine)):
        assert engine.wait(task_id, timeout=30).output == {"by": "ana"}


def test_queue_stats_count_what_the_table_holds(lesson, engine, url, cli, current_durable_task):
    release = threading.Event()

    @engine.task("work")
    def work(input):
        if input == "block":
            release.wait(30)
        return input

    @engine.task("fail", max_attempts=1)
    def fail(input):
        raise ValueError("no")

    @engine.durable_task("approval")
    def approval(input):
        return current_durable_task().wait_for_event("approved")

    engine.task("mail")(lambda input: input)  # the worker below does not run it: it waits

    done, failed, waiting = (engine.enqueue(name) for name in ("work", "fail", "approval"))
    with running(worker(lesson, engine, slots=3, task_names=["work", "fail", "approval"])):
        try:
            engine.wait(done, timeout=30)
            engine.wait(failed, timeout=30)
            wait_until(lambda: engine.get(waiting).status == "suspended")
            busy = engine.enqueue("work", "block")
            wait_until(lambda: engine.get(busy).status == "running")
            oldest = engine.enqueue("mail")
            engine.enqueue("mail")
            engine.enqueue("mail", delay=3600)
            sql(url, "UPDATE tasks SET run_at = now() - interval '90 s' WHERE id = %s", oldest)
            stats = cli("queues", "stats", "--json")
            shown = cli("queues", "stats")
        finally:
            release.set()

    assert stats.status == 0, stats.err
    rows = {row["name"]: row for row in json.loads(stats.out)}
    columns = ("queued", "scheduled", "running", "suspended", "leases_expired")
    columns += ("completed_last_minute", "completed_last_hour", "failed_last_hour")
    assert {name: tuple(row[column] for column in columns) for name, row in rows.items()} == {
        "approval": (0, 0, 0, 1, 0, 0, 0, 0),
        "fail": (0, 0, 0, 0, 0, 0, 0, 1),
        "mail": (2, 1, 0, 0, 0, 0, 0, 0),
        "work": (0, 0, 1, 0, 0, 1, 1, 0),
    }
    assert 90 <= rows["mail"]["oldest_queued_seconds"] < 150
    assert [rows[name]["oldest_queued_seconds"] for name in ("approval", "fail", "work")] == [0] * 3
    lines = [line.split() for line in shown.out.splitlines()]
    assert lines[0] == [
        "NAME", "QUEUED", "SCHEDULED", "RUNNING", "SUSPENDED", "EXPIRED", "FAILED/H", "OLDEST",
        "DONE/MIN",
    ]  # fmt: skip
    assert [line[0] for line in lines[1:]] == ["approval", "fail", "mail", "work"]
    mail_row, work_row = lines[3], lines[4]
    assert mail_row[:7] == ["mail", "2", "1", "0", "0", "0", "0"] and mail_row[8] == "0"
    assert mail_row[7].startswith("1m")  # 1m30s, or a little more on a slow machine
    assert work_row == ["work", "0", "0", "1", "0", "0", "0", "-", "1"]


# --- what a user sees: exit statuses and one-line errors ------------------------------------


def test_errors_are_one_line_on_stderr_and_the_exit_status_says_whose(
    lesson, engine, url, pg_server_url
):
    engine.task("mail")(lambda input: input)
    queued = engine.enqueue("mail")
    db = dbname(url)
    cases = [  # (server, database, command, exit status, what the line says)
        (pg_server_url, db, ["tasks", "show", "999999"], 1, "no task with id 999999"),
        (pg_server_url, db, ["tasks", "retry", str(queued), "--json"], 1, "is queued"),
        (pg_server_url, db, ["tasks", "list", "--tag", "customer"], 2, "expected NAME=VALUE"),
        (pg_server_url, db, ["events", "send", "approved", "{bad"], 2, "is not JSON"),
        (pg_server_url, "no_such_db", ["queues", "stats"], 1, "run `python main.py` once"),
    ]

    def run(server: str, database: str, command: list[str]) -> subprocess.CompletedProcess[str]:
        return run_main(lesson.name, server, database, *command, script="cli.py", timeout=60)

    # Side by side: each process spends most of its half-second importing.
    unreachable = "postgresql://nobody@127.0.0.1:1/postgres"
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda case: run(*case[:3]), cases))
        down = pool.submit(run, unreachable, db, ["queues", "stats", "--json"])
        typer_usage = pool.submit(run, pg_server_url, db, ["tasks", "show", "seven"])
    for result, (_, _, command, status, says) in zip(results, cases, strict=True):
        assert says in refused(finished(result), status), command
    # The server is down: the first line says so (a second one says how to fix it).
    assert (down.result().returncode, down.result().stdout) == (1, "")
    assert down.result().stderr.startswith("error: could not connect to the PostgreSQL server")
    assert "Traceback" not in down.result().stderr
    # What Typer itself finds wrong (an id that is not a number) is a usage error too.
    assert typer_usage.result().returncode == 2
    assert "Traceback" not in typer_usage.result().stderr


# --- worker, and the console script --------------------------------------------------------

WORKER_TASKS = """
def register(engine):
    engine.task("double")(lambda n: n * 2)
"""


def test_the_worker_command_starts_a_worker_that_runs_tasks(
    lesson, engine, url, pg_server_url, tmp_path
):
    (tmp_path / "cli_worker_tasks.py").write_text(WORKER_TASKS)
    engine.task("double")(lambda n: n * 2)
    task_id = engine.enqueue("double", 21)
    command = [sys.executable, str(lesson_dir(lesson.name) / "cli.py"), "worker"]
    command += ["--tasks", "cli_worker_tasks", "--name", "cli-worker"]
    env = {**lesson_env(pg_server_url, dbname(url)), "PYTHONPATH": str(tmp_path)}
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        done = engine.wait(task_id, timeout=30)
    finally:
        process.send_signal(signal.SIGTERM)  # stop claiming, finish what it holds, exit
        out, err = process.communicate(timeout=30)
    assert (done.status, done.output, done.worker) == ("completed", 42, "cli-worker")
    assert process.returncode == 0, err
    assert "cli-worker (pid" in err


def test_the_api_command_hands_its_options_to_api_py(lesson, cli, capsys):
    result = cli("api", "--port", "not-a-port")  # api.py's own parser refuses it
    assert result.status == 2
    assert "usage:" in result.err and "--port: invalid int value" in result.err


def test_the_hardway_command_runs_the_latest_lessons_cli(lesson_db, pg_server_url, tmp_path):
    latest = sorted(LESSONS_DIR.glob("[0-9][0-9]-*/cli.py"))[-1].parent.name
    url = lesson_db(latest)
    sql(url, """INSERT INTO tasks (name, input, tags) VALUES ('mail', '1', '{"customer": "42"}')""")
    hardway = Path(sys.executable).with_name("hardway")
    assert hardway.exists(), "no hardway command: run `pip install -e '.[dev]'`"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        # From another directory: the command finds the lessons by itself.
        env = lesson_env(pg_server_url, dbname(url))
        return subprocess.run(
            [str(hardway), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
        )

    helped = run("--help")
    assert helped.returncode == 0, helped.stderr
    assert "Usage: hardway" in helped.stdout
    assert all(command in helped.stdout for command in ("tasks", "events", "queues", "worker"))
    listed = run("tasks", "list", "--tag", "customer=42", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [(task["name"], task["tags"]) for task in json.loads(listed.stdout)] == [
        ("mail", {"customer": "42"})
    ]


def test_a_database_of_an_earlier_lesson_is_refused_in_one_line(
    lesson, lesson_db, pg_server_url, monkeypatch, capsys
):
    older = lesson_db("10-branching-and-forking")  # no tags column
    monkeypatch.setenv("DATABASE_URL", pg_server_url)
    monkeypatch.setenv("LESSON_DBNAME", dbname(older))
    with pytest.raises(SystemExit) as exit:
        lesson.cli.main(["tasks", "list"])
    assert exit.value.code == 1
    assert capsys.readouterr().err == (
        'error: column "tags" does not exist: this database was not made with lesson 11\'s schema\n'
    )
