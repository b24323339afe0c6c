"""Lessons 02 and 03: a task's odd output or exception fails that task, never the worker.

Lesson 04 and later keep the same promise, with retries and more cases: test_04_robustness.py.
"""

from __future__ import annotations

import os
import sys

import pytest
from harness import load_lesson, nested, raises, sql

LESSONS = ["02-simple-task-queue", "03-limiting-concurrent-tasks"]


@pytest.fixture(params=LESSONS, scope="module")
def lesson(request):
    return load_lesson(request.param)


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no __str__ for you")


POISON = {
    "raises an exception whose str() raises": (
        raises(Unprintable()),
        "Unprintable: <str() of the exception raised RuntimeError>",
    ),
    "raises with a lone surrogate in the message": (
        raises(ValueError("cannot parse " + os.fsdecode(b"/data/caf\xe9.txt"))),
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
    "returns colliding int and str keys": (
        lambda input: {1: "a", "1": "b"},
        "return value is not JSON-serializable: dict keys must be strings, not int",
    ),
}


@pytest.mark.parametrize("case", POISON)
def test_a_poison_task_fails_with_its_real_error_and_the_next_task_runs(lesson, engine, case):
    function, error = POISON[case]
    engine.task("poison")(function)
    engine.task("innocent")(lambda input: {"ok": input})
    poison, innocent = engine.enqueue("poison"), engine.enqueue("innocent", 1)
    assert lesson.worker.Worker(engine, "w").run_until_idle() == 2
    assert (engine.get(poison).status, engine.get(poison).error) == ("failed", error)
    assert engine.get(innocent).output == {"ok": 1}


def test_an_output_the_database_refuses_fails_its_task(lesson, engine, monkeypatch):
    # More digits than PostgreSQL's numeric holds: valid JSON, refused by the database.
    monkeypatch.setattr(sys, "get_int_max_str_digits", sys.get_int_max_str_digits)
    sys.set_int_max_str_digits(0)
    try:
        engine.task("huge")(lambda input: 10**140_000)
        engine.task("innocent")(lambda input: input)
        huge, innocent = engine.enqueue("huge"), engine.enqueue("innocent", 7)
        assert lesson.worker.Worker(engine, "w").run_until_idle() == 2
    finally:
        sys.set_int_max_str_digits(4300)
    assert engine.get(huge).error.startswith(
        "return value could not be stored: NumericValueOutOfRange: value overflows numeric"
    )
    assert engine.get(innocent).output == 7


def test_names_and_inputs_the_database_cannot_store_are_refused(lesson, engine, lesson_db):
    with pytest.raises(ValueError, match="task name 'a\\\\x00b' cannot be stored: .*NUL"):
        engine.task("a\x00b")
    engine.task("t")(lambda input: input)
    with pytest.raises(lesson.engine.TaskInputError, match="dict keys must be strings, not int"):
        engine.enqueue("t", {1: "a", "1": "b"})
    with pytest.raises(lesson.engine.TaskInputError, match="nested more than 100 levels"):
        engine.enqueue("t", nested(400))
    if hasattr(lesson.engine, "TaskOptionError"):  # lesson 03: concurrency keys
        with pytest.raises(lesson.engine.TaskOptionError, match="concurrency_key .* cannot be"):
            engine.enqueue("t", concurrency_key="a\x00", max_running=1)
    assert sql(engine.database_url, "SELECT count(*) FROM tasks") == [(0,)]


@pytest.mark.parametrize("poll_interval", [0, -1, float("nan"), float("inf"), True])
def test_a_bad_poll_interval_is_refused(lesson, engine, poll_interval):
    with pytest.raises(ValueError, match="poll_interval must be more than 0"):
        lesson.worker.Worker(engine, "w", poll_interval=poll_interval)
