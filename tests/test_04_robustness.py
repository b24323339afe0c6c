"""Lesson 04's promises about bad input and poison tasks, kept by lesson 04 and every later one.

- whatever a task function returns or raises becomes a recorded outcome, the other tasks of
  its batch are recorded normally, and the worker goes on (a poison task kills no worker);
- bad input, names and options get a clear, specific error before anything is written;
- a task can fail for good at once (NonRetryableError);
- an enqueue with an idempotency key is safe to repeat, even at the same instant;
- a second SIGTERM stops a worker process at once, even while a task runs on.

Each test runs against every lesson from 04 to the latest (the `lesson` fixture): a lesson is a
complete snapshot of the engine, so it must keep every promise of the lessons before it.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import threading
import time

import psycopg
import pytest
from harness import (
    durable_task,
    lesson_dir,
    lesson_env,
    lessons_from,
    load_lesson,
    nested,
    raises,
    running,
    sql,
    wait_until,
)
from psycopg import conninfo


@pytest.fixture(params=lessons_from("04"), scope="module")
def lesson(request):
    return load_lesson(request.param)


def count_tasks(url: str) -> int:
    return sql(url, "SELECT count(*) FROM tasks")[0][0]


# --- poison tasks ------------------------------------------------------------------------------


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no __str__ for you")


class Unreadable(list):
    """A return value whose iteration raises: json.dumps (and our check) meets the error."""

    def __iter__(self):
        raise OSError("disk on fire")


SURROGATE_PATH = os.fsdecode(b"/data/caf\xe9.txt")  # a file name that is not UTF-8

# What a poison task does, and the error its task must end with.
POISON = {
    "raises an exception whose str() raises": (
        raises(Unprintable()),
        "Unprintable: <str() of the exception raised RuntimeError>",
    ),
    "raises with a lone surrogate in the message": (
        raises(ValueError(f"cannot parse {SURROGATE_PATH}")),
        "ValueError: cannot parse /data/caf\\udce9.txt",
    ),
    "returns a lone surrogate": (
        lambda input: "\ud800",
        "return value is not JSON-serializable: it contains \\ud800, a lone surrogate, which"
        " is not valid UTF-8 (decode bytes with errors='replace', or store them as base64)",
    ),
    "returns a list 600 levels deep": (
        lambda input: nested(600),
        "return value is not JSON-serializable: it is nested more than 100 levels deep"
        " (or contains itself)",
    ),
    "returns a list that contains itself": (
        lambda input: (cycle := []).append(cycle) or cycle,
        "return value is not JSON-serializable: it is nested more than 100 levels deep"
        " (or contains itself)",
    ),
    "returns colliding int and str keys": (
        lambda input: {1: "a", "1": "b"},
        "return value is not JSON-serializable: dict keys must be strings, not int",
    ),
    "returns a value whose iteration raises": (
        lambda input: Unreadable([1]),
        "return value is not JSON-serializable: OSError: disk on fire",
    ),
    "calls sys.exit()": (lambda input: sys.exit(3), "SystemExit: 3"),
    "raises KeyboardInterrupt itself": (raises(KeyboardInterrupt()), "KeyboardInterrupt"),
    "raises with a NUL in the message": (
        raises(ValueError("bad byte \x00 here")),
        "ValueError: bad byte \\x00 here",
    ),
}


@pytest.mark.parametrize("case", POISON)
def test_a_poison_task_fails_with_its_real_error_and_the_worker_goes_on(lesson, engine, case):
    function, error = POISON[case]
    engine.task("poison", max_attempts=2, backoff=0.01)(function)
    engine.task("innocent")(lambda input: {"ok": input})
    poison = engine.enqueue("poison")
    innocent = engine.enqueue("innocent", 1)
    # Two slots, both tasks queued before the worker starts: its first claim takes both, and
    # they are recorded together.
    worker = lesson.worker.Worker(engine, "w", slots=2, poll_interval=0.02)
    with running(worker):  # fails the test if the worker's loop raised
        assert engine.wait(innocent).output == {"ok": 1}
        assert engine.wait(poison).status == "failed"
        later = engine.enqueue("innocent", 2)  # the worker is alive, and still claims
        assert engine.wait(later).output == {"ok": 2}
    task = engine.get(poison)
    assert (task.error, task.attempts) == (error, 2)  # the real error, not "lease expired"
    assert [a.error for a in engine.attempts(poison)] == [error, error]
    [first] = engine.attempts(innocent)
    assert first.started_at < engine.attempts(poison)[0].finished_at  # in hand together


def test_a_huge_error_message_is_stored_cut_short(lesson, engine):
    engine.task("loud", max_attempts=1)(raises(ValueError("x" * 1_000_000)))
    task_id = engine.enqueue("loud")
    lesson.worker.Worker(engine, "w", poll_interval=0.02).run_until_idle()
    task = engine.get(task_id)
    assert task.status == "failed"
    assert task.error.startswith("ValueError: xxx") and len(task.error) < 2100
    assert task.error.endswith("more characters)")


def test_an_output_the_database_refuses_fails_alone(lesson, engine, monkeypatch):
    # A number with more digits than PostgreSQL's numeric holds (131,072 before the point):
    # valid JSON, which the database refuses in the middle of the batch's one statement.
    # The worker records the others one by one, and fails only this one, with the reason.
    monkeypatch.setattr(sys, "get_int_max_str_digits", sys.get_int_max_str_digits)
    sys.set_int_max_str_digits(0)
    try:
        engine.task("huge", max_attempts=1)(lambda input: 10**140_000)
        engine.task("innocent")(lambda input: input)
        huge = engine.enqueue("huge")
        innocents = engine.enqueue_many("innocent", [1, 2, 3])
        with running(lesson.worker.Worker(engine, "w", slots=4, poll_interval=0.02)):
            assert [engine.wait(i).output for i in innocents] == [1, 2, 3]
            task = engine.wait(huge)
    finally:
        sys.set_int_max_str_digits(4300)
    assert task.status == "failed"
    assert task.error.startswith(
        "return value could not be stored: NumericValueOutOfRange: value overflows numeric"
    )


# --- bad input, names and options --------------------------------------------------------------


BAD_INPUTS = {
    "int and str keys that collide": ({1: "a", "1": "b"}, "dict keys must be strings, not int"),
    "a tuple key": ({(1, 2): "a"}, "dict keys must be strings, not tuple"),
    "a lone surrogate in a value": ({"path": SURROGATE_PATH}, "\\udce9, a lone surrogate"),
    "a lone surrogate in a key": ({SURROGATE_PATH: 1}, "\\udce9, a lone surrogate"),
    "a NUL in a key": ({"a\x00b": 1}, "NUL character"),
    "400 levels of nesting": (nested(400), "nested more than 100 levels deep"),
    "a set": ({1, 2}, "Object of type set is not JSON serializable"),
    "NaN": ([math.nan], "Out of range float values are not JSON compliant"),
    "a huge int": (10**5000, "Exceeds the limit (4300 digits)"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_refused_before_anything_is_written(lesson, engine, url, case):
    value, message = BAD_INPUTS[case]
    engine.task("t")(lambda input: input)
    TaskInputError = lesson.engine.TaskInputError
    with pytest.raises(TaskInputError, match="input of task 't' is not JSON-serializable") as err:
        engine.enqueue("t", value)
    assert message in str(err.value)
    with pytest.raises(TaskInputError):
        engine.enqueue_many("t", [1, value])  # the good one is not written either
    assert count_tasks(url) == 0


def test_bad_names_durations_and_ids_get_specific_errors(lesson, engine, url):
    TaskOptionError = lesson.engine.TaskOptionError
    TaskNotFoundError = lesson.engine.TaskNotFoundError
    with pytest.raises(TaskOptionError, match="task name 'a\\\\x00b' cannot be stored: .*NUL"):
        engine.task("a\x00b")
    with pytest.raises(TaskOptionError, match="task name .* cannot be stored: .*lone surrogate"):
        engine.task(SURROGATE_PATH)
    with pytest.raises(TaskOptionError, match="task name must be a non-empty string"):
        engine.task("")
    engine.task("t")(lambda input: input)
    with pytest.raises(TaskOptionError, match="concurrency_key 'a\\\\x00' cannot be stored"):
        engine.enqueue("t", concurrency_key="a\x00", max_running=1)
    with pytest.raises(TaskOptionError, match="timeout must be a number of seconds, at least"):
        engine.enqueue("t", timeout=1e-9)  # would be stored as 0 microseconds
    with pytest.raises(TaskOptionError, match="backoff must be"):
        engine.enqueue("t", backoff=float("inf"))
    with pytest.raises(TaskOptionError, match="idempotency_key must be a non-empty string"):
        engine.enqueue("t", idempotency_key="")
    assert count_tasks(url) == 0
    with pytest.raises(TypeError, match="a task id is an integer, got 'abc'"):
        engine.cancel("abc")
    with pytest.raises(TypeError, match="a task id is an integer, got True"):
        engine.get(True)
    assert engine.get(2**70) is None and engine.attempts(-1) == []
    with pytest.raises(TaskNotFoundError):
        engine.cancel(2**70)
    for operator_action in ("retry", "replay"):  # lessons 06 and later
        if hasattr(engine, operator_action):
            with pytest.raises(TypeError, match="a task id is an integer, got 'abc'"):
                getattr(engine, operator_action)("abc")
            with pytest.raises(TaskNotFoundError):
                getattr(engine, operator_action)(2**70)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"lease": math.nan}, "lease must be more than 0 and at most 86400 seconds, got nan"),
        ({"lease": 0}, "lease must be more than 0"),
        ({"lease": math.inf}, "lease must be more than 0"),
        ({"poll_interval": 0}, "poll_interval must be more than 0"),
        ({"poll_interval": -1}, "poll_interval must be more than 0"),
        ({"chores_limit": -1}, "chores_limit must be a positive integer, got -1"),
        ({"chores_limit": 0}, "chores_limit must be a positive integer, got 0"),
        ({"slots": 0}, "slots must be a positive integer, got 0"),
        ({"slots": True}, "slots must be a positive integer, got True"),
    ],
)
def test_bad_worker_options_are_refused(lesson, engine, options, message):
    with pytest.raises(ValueError) as err:
        lesson.worker.Worker(engine, "w", **options)
    assert str(err.value).startswith(message)


def test_the_worker_command_refuses_bad_options_in_one_line(lesson, url, pg_server_url):
    dbname = conninfo.conninfo_to_dict(url)["dbname"]
    for option in (["--lease", "nan"], ["--poll-interval", "0"], ["--slots", "0"]):
        done = subprocess.run(
            [sys.executable, str(lesson_dir(lesson.name) / "worker.py"), *option],
            env=lesson_env(pg_server_url, dbname),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr
        assert done.stderr.splitlines()[-1].startswith("worker.py: error: "), done.stderr


# --- non-retryable errors ----------------------------------------------------------------------


def test_a_non_retryable_error_fails_the_task_at_once(lesson, engine):
    NonRetryableError = lesson.task_context.NonRetryableError

    class CardDeclined(NonRetryableError):
        pass

    engine.task("charge", max_attempts=5, backoff=0.01)(raises(CardDeclined("stolen card")))
    chained = RuntimeError("payment failed")
    chained.__cause__ = NonRetryableError("no such customer")
    engine.task("chained", max_attempts=5, backoff=0.01)(raises(chained))
    engine.task("flaky", max_attempts=2, backoff=0.01)(raises(ConnectionError("down")))
    charge, chain, flaky = (engine.enqueue(name) for name in ("charge", "chained", "flaky"))
    lesson.worker.Worker(engine, "w", poll_interval=0.02).run_until_idle()
    assert [(t.status, t.attempts) for t in map(engine.get, (charge, chain, flaky))] == [
        ("failed", 1),
        ("failed", 1),
        ("failed", 2),  # any other error is retried
    ]
    assert engine.get(charge).error == "CardDeclined: stolen card"


def test_a_non_retryable_error_raised_in_a_durable_step_fails_the_task_at_once(lesson, engine):
    if not hasattr(lesson, "durable"):
        pytest.skip("steps begin in lesson 05")
    NonRetryableError = lesson.task_context.NonRetryableError
    current_task = lesson.task_context.current_task

    @durable_task(engine, "order", max_attempts=5, backoff=0.01)
    def order(input):
        current_task().step("reserve", lambda: "reserved")
        return current_task().step("charge", raises(NonRetryableError("card declined")), None)

    task_id = engine.enqueue("order")
    lesson.worker.Worker(engine, "w", poll_interval=0.02).run_until_idle()
    task = engine.get(task_id)
    assert (task.status, task.attempts) == ("failed", 1)
    assert task.error == "StepError: step 'charge' failed: NonRetryableError: card declined"


# --- idempotent enqueue ------------------------------------------------------------------------


def test_an_idempotency_key_makes_an_enqueue_safe_to_repeat(lesson, engine, url):
    engine.task("ship")(lambda input: input)
    first = engine.enqueue("ship", {"order": 42}, idempotency_key="order-42")
    assert engine.enqueue("ship", {"order": 42}, idempotency_key="order-42") == first
    assert count_tasks(url) == 1
    with pytest.raises(lesson.engine.IdempotencyKeyError, match=f"used by task {first} \\('ship'"):
        engine.enqueue("ship", {"order": 43}, idempotency_key="order-42")
    keyed = engine.enqueue(
        "ship", 7, idempotency_key="order-7", concurrency_key="acme", max_running=1
    )
    assert keyed != first
    assert (
        engine.enqueue("ship", 7, idempotency_key="order-7", concurrency_key="acme", max_running=1)
        == keyed
    )
    assert count_tasks(url) == 2
    # Retention forgets a key with its task: the next enqueue with it makes a new task.
    lesson.worker.Worker(engine, "w", poll_interval=0.02).run_until_idle()
    assert engine.cleanup(older_than=0) == 2
    assert engine.enqueue("ship", {"order": 42}, idempotency_key="order-42") not in (first, keyed)


def test_two_enqueues_with_one_key_at_the_same_instant_make_one_task(lesson, engine, url):
    engine.task("ship")(lambda input: input)
    returned: list[int] = []
    with psycopg.connect(url) as holder:
        # An enqueue with key "k" that has inserted its row, and not committed yet.
        [(held,)] = holder.execute(
            "INSERT INTO tasks (name, input, idempotency_key) VALUES ('ship', '1', 'k')"
            " RETURNING id"
        ).fetchall()
        thread = threading.Thread(
            target=lambda: returned.append(engine.enqueue("ship", 1, idempotency_key="k"))
        )
        thread.start()
        # The second enqueue waits on the unique index for the first to commit (or roll back).
        waiting = (
            "SELECT 1 FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock' AND query LIKE %s"
        )
        wait_until(lambda: sql(url, waiting, "%INSERT INTO tasks%"), timeout=30)
        holder.commit()
        thread.join(timeout=30)
    assert returned == [held]
    assert count_tasks(url) == 1


# --- stopping ----------------------------------------------------------------------------------

SLEEPY_TASKS = """
import time


def register(engine):
    engine.task("sleep")(lambda seconds: time.sleep(seconds))
"""


def test_a_second_sigterm_stops_a_worker_at_once_even_while_a_task_runs(
    lesson, engine, url, pg_server_url, tmp_path
):
    (tmp_path / "sleepy_tasks.py").write_text(SLEEPY_TASKS)
    engine.task("sleep")(time.sleep)
    task_id = engine.enqueue("sleep", 30)  # time.sleep: it never checks whether to stop
    env = lesson_env(pg_server_url, conninfo.conninfo_to_dict(url)["dbname"])
    env["PYTHONPATH"] = str(tmp_path)
    command = [sys.executable, str(lesson_dir(lesson.name) / "worker.py")]
    worker = subprocess.Popen(
        [*command, "--name", "sleepy", "--tasks", "sleepy_tasks"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(worker.stderr), daemon=True)
    reader.start()
    try:
        wait_until(lambda: engine.get(task_id).status == "running", timeout=60)
        worker.send_signal(signal.SIGTERM)
        wait_until(lambda: any("send it again to stop at once" in line for line in lines))
        worker.send_signal(signal.SIGTERM)
        started = time.monotonic()
        assert worker.wait(timeout=10) == 1
        assert time.monotonic() - started < 2
    finally:
        if worker.poll() is None:
            worker.kill()
        worker.wait()
        reader.join(timeout=10)
    assert any("sleepy: stopped at once; its leases will run out" in line for line in lines)
    assert not any("Traceback" in line for line in lines), lines
