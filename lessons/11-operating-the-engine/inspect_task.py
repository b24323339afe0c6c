"""Inspect a task: its attempts, its event log and what operators did, as one timeline.

    python inspect_task.py 7            # task 7 in the lesson's database, as main.py left it
    python inspect_task.py --diff 7 9   # lesson 10: two histories, event by event

or, from code, `describe(engine, 7)` returns the same text. Everything comes from the tables:
a timeline is the task's attempts (task_attempts), its events (task_events, every history a
replay set aside included) and the operator's actions (operator_actions), merged in the order
the database clock put them in, with times counted from the task's creation. Its children
follow, one line each: how they ended, and on which attempt.

Lesson 10: a fork says where it came from, and its original lists its forks. `--diff A B`
(`diff(engine, A, B)`) prints two histories side by side, aligned by position, marking the
fork point and every place where they differ.

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
    if task.forked_at is not None:  # lesson 10
        original = f"task {task.forked_from}" if task.forked_from else "a task since deleted"
        lines.append(f"  forked from {original} at event {task.forked_at}")
    for fork in engine.forks(task_id):
        lines.append(f"  forked: task {fork.id}, at event {fork.forked_at}")

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


# region: diff
def diff(engine: Engine, a: int, b: int) -> str:
    """Two tasks' histories side by side, event by event: `=` where they agree, `|` where
    they differ, and the fork point, if one is a fork of the other."""
    tasks = [engine.get(a), engine.get(b)]
    for task_id, task in zip((a, b), tasks, strict=True):
        if task is None:
            raise TaskNotFoundError(f"no task with id {task_id}")
    first, second = (engine.history(task_id) for task_id in (a, b))
    fork_point = None
    for task, other in ((tasks[1], a), (tasks[0], b)):
        if task is not None and task.forked_from == other:
            fork_point = task.forked_at
    width = 38
    lines = [f"       {'task ' + str(a):<{width}}   task {b}"]
    parted = None
    for seq in range(1, max(len(first), len(second)) + 1):
        left, right = (side[seq - 1] if seq <= len(side) else None for side in (first, second))
        same = left is not None and right is not None and same_event(left, right)
        if not same and parted is None:
            parted = seq
        texts = [cut(show_event(event), width) if event else "" for event in (left, right)]
        lines.append(f"  {seq:>3}  {texts[0]:<{width}} {'=' if same else '|'} {texts[1]}")
        if seq == fork_point:
            lines.append(f"       {'--- fork point: events 1-' + str(seq) + ' copied ---'}")
    if fork_point == 0:
        lines.insert(1, "       --- fork point: no event copied ---")
    ended = "they agree at every event" if parted is None else f"they part at event {parted}"
    lines.append(f"  {ended}")
    return "\n".join(lines)


def same_event(left: TaskEvent, right: TaskEvent) -> bool:
    """The same call, with the same outcome (a child's, by what it returned: its id differs)."""
    return (left.kind, left.name, left.result, left.error) == (
        right.kind, right.name, right.result, right.error
    )  # fmt: skip


def cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


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
    parser.add_argument("task_id", type=int, nargs="?")
    parser.add_argument("--diff", type=int, nargs=2, metavar=("A", "B"), help="two histories")
    args = parser.parse_args(argv)
    if (args.task_id is None) == (args.diff is None):
        parser.error("give a task id, or --diff A B")
    with Engine(lesson_database_url()) as engine:
        try:
            print(describe(engine, args.task_id) if args.diff is None else diff(engine, *args.diff))
        except TaskNotFoundError as err:
            raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
