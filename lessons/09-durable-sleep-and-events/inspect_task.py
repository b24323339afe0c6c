"""Inspect a task: its attempts, its event log and what operators did, as one timeline.

    python inspect_task.py 7     # task 7 in the lesson's database, as main.py left it

or, from code, `describe(engine, 7)` returns the same text. Everything comes from the tables:
a timeline is the task's attempts (task_attempts), its events (task_events, every history a
replay set aside included) and the operator's actions (operator_actions), merged in the order
the database clock put them in, with times counted from the task's creation. Its children
follow, one line each: how they ended, and on which attempt.

A reader's tool, not the engine's: nothing here is needed to run tasks.
"""

from __future__ import annotations

import argparse
import datetime
import json
from typing import Any

from db.models import EventKind, Task, TaskEvent
from engine import Engine, TaskNotFoundError

WIDTH = 64  # values longer than this are cut, with "..."


# region: describe
def describe(engine: Engine, task_id: int) -> str:
    """The task's timeline and its children, as lines of text."""
    task = engine.get(task_id)
    if task is None:
        raise TaskNotFoundError(f"no task with id {task_id}")
    kind = "durable task" if task.name in engine.durable or engine.events(task_id) else "task"
    lines = [f"task {task.id} {task.name} ({kind}): {outcome(task)}"]
    if task.parent_id is not None:
        lines.append(f"  child of task {task.parent_id}")
    lines.append(f"  input: {json.dumps(task.input, sort_keys=True)}")

    # (time, order among equal times, text): an attempt starts before its events, ends after.
    timeline: list[tuple[datetime.datetime, int, str]] = []
    for attempt in engine.attempts(task_id):
        started = f"attempt {attempt.attempt} started on {attempt.worker}"
        timeline.append((attempt.started_at, 0, started))
        if attempt.finished_at is not None:
            error = f": {attempt.error}" if attempt.error else ""
            ended = f"attempt {attempt.attempt} {attempt.status}{error}"
            timeline.append((attempt.finished_at, 2, ended))
    for event in engine.events(task_id):
        timeline.append((event.recorded_at, 1, f"  {event.seq:>2} {show_event(event)}"))
    for action in engine.actions(task_id):
        kept = "kept" if action.action == "retry" else "set aside"
        text = f"operator {action.action}: history {action.replay} ({action.events} events) {kept}"
        timeline.append((action.at, 1, text))
    for at, _, text in sorted(timeline, key=lambda entry: entry[:2]):
        lines.append(f"  {offset(task.created_at, at)}  {text}")

    children = engine.children(task_id)
    if children:
        lines.append(f"  children: {len(children)}")
    for child in children:
        tries = engine.attempts(child.id)
        failed = [f"attempt {a.attempt} on {a.worker}: {a.error}" for a in tries if a.error]
        earlier = f" (after {'; '.join(failed)})" if failed else ""
        lines.append(f"    task {child.id} {child.name}: {outcome(child, output=False)}{earlier}")
    return "\n".join(lines)


# endregion


def outcome(task: Task, output: bool = True) -> str:
    """`completed on attempt 2 by worker-B: {...}`, `suspended, waiting for tasks 8, 9`..."""
    if task.awaiting_event is not None:  # lesson 09
        timeout = "" if task.status == "suspended" else f" until {task.run_at:%Y-%m-%d %H:%M:%S}"
        return f"{task.status}, waiting for event {task.awaiting_event!r}{timeout}"
    if task.status == "suspended":
        return f"suspended, waiting for tasks {', '.join(map(str, task.waiting_for or []))}"
    if task.attempts == 0:
        return str(task.status)
    text = f"{task.status} on attempt {task.attempts} by {task.worker}"
    if task.status == "completed":
        return f"{text}: {show(task.output)}" if output else text
    if task.error:
        return f"{text}: {task.error}"
    return text


def show_event(event: TaskEvent) -> str:
    """One event, as the function saw it: what it asked for, and what came of it."""
    history = f"[history {event.replay}] " if event.replay else ""
    if event.kind == EventKind.CHILD_SPAWNED:
        return f"{history}spawned task {event.child_id} {event.name}"
    if event.kind in (EventKind.CHILD_COMPLETED, EventKind.CHILD_FAILED):
        ended = "completed" if event.kind == EventKind.CHILD_COMPLETED else "failed"
        value = show(event.result) if event.kind == EventKind.CHILD_COMPLETED else event.error
        return f"{history}waited: task {event.child_id} {event.name} {ended}: {value}"
    if event.kind == EventKind.SLEEP_STARTED:  # lesson 09
        return f"{history}sleep {event.name}: until {event.result}"
    if event.kind == EventKind.EVENT_AWAITED:
        timeout = "no timeout" if event.result is None else f"until {event.result}"
        return f"{history}waiting for event {event.name} ({timeout})"
    if event.kind == EventKind.EVENT_RECEIVED:
        return f"{history}event {event.name}: {show(event.result)}"
    if event.kind == EventKind.EVENT_TIMED_OUT:
        return f"{history}event {event.name}: timed out"
    kind = {EventKind.VALUE_RECORDED: "value", EventKind.PATCH_APPLIED: "patch"}.get(event.kind)
    if kind == "patch":
        return f"{history}patch {event.name}"
    value = event.error if event.kind == EventKind.STEP_FAILED else show(event.result)
    return f"{history}{kind or 'step'} {event.name}: {value}"


def show(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= WIDTH else text[: WIDTH - 3] + "..."


def offset(start: datetime.datetime, at: datetime.datetime) -> str:
    """`+1.234s` after the task's creation."""
    return f"+{(at - start).total_seconds():.3f}s"


def main(argv: list[str] | None = None) -> None:
    from worker import lesson_database_url  # the lesson's database, as worker processes find it

    parser = argparse.ArgumentParser(description="Print a task's timeline and its children.")
    parser.add_argument("task_id", type=int)
    args = parser.parse_args(argv)
    with Engine(lesson_database_url()) as engine:
        try:
            print(describe(engine, args.task_id))
        except TaskNotFoundError as err:
            raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
