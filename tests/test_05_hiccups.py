"""A step's append whose answer is lost (the connection breaks just after the commit) is tried
again without recording the step twice or running it again: lesson 05 and every later lesson.

The whole outage, a database that restarts or stops for ten seconds, is test_04_outages.py.
"""

from __future__ import annotations

import psycopg
import pytest
from harness import lessons_from, load_lesson, running


@pytest.fixture(params=lessons_from("05"), scope="module")
def lesson(request):
    return load_lesson(request.param)


def test_an_append_whose_answer_is_lost_records_the_step_once(lesson, engine, monkeypatch):
    lost = []
    original = lesson.db_queries.Querier.append_event

    def append_then_break(self, **event):
        row = original(self, **event)  # committed: the event is in the log
        if event["seq"] == 2 and not lost:
            lost.append(event["seq"])
            raise psycopg.OperationalError("server closed the connection unexpectedly (a test)")
        return row

    monkeypatch.setattr(lesson.db_queries.Querier, "append_event", append_then_break)
    current_task = lesson.task_context.current_task
    runs = []
    register = getattr(engine, "durable_task", engine.task)

    @register("job", max_attempts=1)
    def job(input):
        ctx = current_task()
        first = ctx.step("one", lambda: runs.append("one") or 1)
        second = ctx.step("two", lambda: runs.append("two") or 2)
        return first + second

    task_id = engine.enqueue("job")
    with running(lesson.worker.Worker(engine, "w", poll_interval=0.02)):
        task = engine.wait(task_id, timeout=30)
    assert lost == [2]
    assert (task.status, task.output, task.attempts) == ("completed", 3, 1)
    assert runs == ["one", "two"]  # each step ran once
    assert [(event.seq, event.name) for event in engine.events(task_id)] == [(1, "one"), (2, "two")]
