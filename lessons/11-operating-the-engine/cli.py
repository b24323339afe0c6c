"""The engine's command line: find tasks, read their timelines, retry, replay, cancel, fork and
reprioritize them, send events, watch the queues, start a worker.

    python cli.py tasks list --status failed --tag customer=42
    python cli.py tasks show 7
    python cli.py tasks retry 7
    python cli.py events send approved '{"by": "ana"}'
    python cli.py queues stats
    python cli.py worker --tasks demo_tasks --slots 4
    python cli.py api --tasks ops_tasks --port 8011

or `hardway ...` from anywhere (the console script, hardway/operate.py, runs the latest
lesson's cli.py). It works on the lesson's database, as a worker process finds it
(worker.lesson_database_url: DATABASE_URL's server or the embedded one).

Every command but `worker` takes `--json`: then stdout holds one JSON document and nothing
else, for scripts (`jq`). An error is one line on stderr, never a traceback, and the exit
status says whose it was: 1, the engine refused (no such task; a task in a state that forbids
the action) or the database could not be reached; 2, the command line itself was wrong (a
missing argument, a tag without `=`, a payload that is not JSON).

Typer rather than argparse (what the other scripts use) or Click: each option is declared once,
as a typed parameter of the function it feeds, and the help, the checks (an id is an integer,
`--limit` at least 1, `--status` one of the statuses) and shell completion all come from that
signature. argparse declares an option and then reads it back from a namespace, untyped; Click,
which Typer grew from, restates in a decorator what the parameter's type already says.

A tool for people and scripts, not part of the engine: every command is one or two calls of
engine.py's API, plus the printing.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from typing import Annotated, Any, NoReturn

import api
import psycopg
import typer
import worker
from db.models import OperatorAction, OperatorActionKind, Task, TaskStatus
from engine import (
    Engine,
    TaskInputError,
    TaskNotFoundError,
    TaskOptionError,
    TaskStateError,
)
from inspect_task import cut, describe, outcome
from outages import DatabaseUnavailableError


class UsageError(ValueError):
    """A mistake in the command line that Typer cannot see from the types: a tag without `=`,
    a payload that is not JSON, both or neither of `--at` and `--before`."""


# The engine's refusals, and an outage: what the command could not do, said in one line.
REFUSED = (
    TaskNotFoundError,
    TaskStateError,
    TaskOptionError,
    TaskInputError,
    DatabaseUnavailableError,
)

# pretty_exceptions_enable=False: a bug (any other exception) prints Python's own traceback,
# as the lesson's other scripts do, which pastes into a bug report as it is (Typer's own is
# drawn in a frame, as wide as the terminal).
app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Operate the engine: its tasks, events and queues, and its workers.",
)
tasks_app = typer.Typer(no_args_is_help=True, help="Find tasks, read them, operate them.")
events_app = typer.Typer(no_args_is_help=True, help="Send events to the tasks waiting for them.")
queues_app = typer.Typer(no_args_is_help=True, help="What waits, what runs, per task name.")
app.add_typer(tasks_app, name="tasks")
app.add_typer(events_app, name="events")
app.add_typer(queues_app, name="queues")

# The parameters several commands share, declared once.
TaskId = Annotated[int, typer.Argument(metavar="ID", help="The task's id.", show_default=False)]
Json = Annotated[bool, typer.Option("--json", help="Print JSON on stdout, for scripts.")]


def main(argv: list[str] | None = None) -> None:
    """Run one command; turn the errors it can name into one line on stderr and an exit status.

    Caught here, once, rather than in every command: a command's code is then only what it
    does. Anything else is a bug, and its traceback is what a bug report needs.
    """
    try:
        app(args=argv)
    except UsageError as err:
        fail(str(err), status=2)
    except REFUSED as err:
        fail(str(err), status=1)
    except (psycopg.errors.UndefinedColumn, psycopg.errors.UndefinedTable) as err:
        # A database made by an earlier lesson's schema (no `tags`, say): not a bug here.
        problem = str(err).splitlines()[0]
        fail(f"{problem}: this database was not made with lesson 11's schema", status=1)


def fail(message: str, status: int) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise SystemExit(status)


def open_engine() -> Engine:
    """An Engine on the lesson's database, as a worker process finds it. No task functions are
    registered: nothing here runs a task, or enqueues one."""
    return Engine(worker.lesson_database_url())


# region: tasks
@tasks_app.command("list")
def list_tasks(
    status: Annotated[
        TaskStatus | None,
        typer.Option(metavar="STATUS", help="Only tasks in this state: queued, failed..."),
    ] = None,
    name: Annotated[
        str | None, typer.Option(metavar="NAME", help="Only tasks of this name.")
    ] = None,
    key: Annotated[
        str | None, typer.Option(metavar="KEY", help="Only tasks under this concurrency key.")
    ] = None,
    older_than: Annotated[
        float | None,
        typer.Option(min=0, metavar="SECONDS", help="Only tasks created more than SECONDS ago."),
    ] = None,
    tag: Annotated[
        list[str] | None,
        typer.Option(
            metavar="NAME=VALUE", help="Only tasks with this tag; repeat it: with all of them."
        ),
    ] = None,
    limit: Annotated[
        int, typer.Option(min=1, max=10_000, metavar="N", help="At most this many.")
    ] = 50,
    as_json: Json = False,
) -> None:
    """The newest tasks that match every filter given, newest first."""
    tags = parse_tags(tag or [])
    with open_engine() as engine:
        found = engine.list_tasks(
            status=status,
            name=name,
            concurrency_key=key,
            older_than=older_than,
            tags=tags,
            limit=limit,
        )
    if as_json:
        print_json(found)
    elif not found:
        typer.echo("no task matches")
    else:
        now = datetime.datetime.now(datetime.UTC)
        header = ["ID", "NAME", "STATUS", "ATTEMPTS", "PRIORITY", "TAGS", "AGE"]
        rows = [task_row(task, now) for task in found]
        typer.echo(table(header, rows))


def parse_tags(texts: list[str]) -> dict[str, str]:
    """`["customer=42", "region=eu"]` -> `{"customer": "42", "region": "eu"}`.

    Split at the first `=`: a value may hold one (`query=a=b`), a name may not. A name given
    twice is refused rather than the last one kept: a task's tags hold one value per name, so
    `--tag a=1 --tag a=2` could match no task at all.
    """
    tags: dict[str, str] = {}
    for text in texts:
        name, equals, value = text.partition("=")
        if not equals or not name:
            raise UsageError(f"--tag {text!r}: expected NAME=VALUE, as in customer=42")
        if name in tags:
            raise UsageError(f"--tag {name!r} given twice: a task has one value per tag")
        tags[name] = value
    return tags


def task_row(task: Task, now: datetime.datetime) -> list[str]:
    """A task as a row of `tasks list`. Its age is this machine's clock minus created_at, which
    is the database's: off by as much as the two clocks disagree. (The filters, --older-than
    included, use the database's clock alone.)"""
    tags = ",".join(f"{name}={value}" for name, value in sorted(task.tags.items()))
    return [
        str(task.id),
        task.name,
        str(task.status),
        str(task.attempts),
        str(task.priority),
        cut(tags, 40),
        age((now - task.created_at).total_seconds()),
    ]


@tasks_app.command("show")
def show_task(task_id: TaskId, as_json: Json = False) -> None:
    """The task's timeline (inspect_task.py's), and its children, theirs and so on, as a tree."""
    with open_engine() as engine:
        if as_json:
            print_json(task_json(engine, task_id))
        else:
            typer.echo(family(engine, task_id))


def family(engine: Engine, task_id: int) -> str:
    """inspect_task's description of the task, its flat list of children replaced by a tree:
    lesson 10's durable children have children of their own."""
    # describe() ends with that list, under a "  children: N" line; the lines above it are the
    # task, its lineage and its timeline (each of those starts "  +").
    timeline = describe(engine, task_id).partition("\n  children: ")[0]
    children = engine.children(task_id)
    if not children:
        return timeline
    return "\n".join([timeline, f"  children: {len(children)}", *tree(engine, children, depth=2)])


def tree(engine: Engine, children: list[Task], depth: int) -> list[str]:
    """One line per descendant, as describe() lists a child, indented by its generation."""
    lines = []
    for child in children:
        failed = [
            f"attempt {a.attempt} on {a.worker}: {a.error}"
            for a in engine.attempts(child.id)
            if a.error
        ]
        earlier = f" (after {'; '.join(failed)})" if failed else ""
        ended = outcome(child, output=False)
        lines.append(f"{'  ' * depth}task {child.id} {child.name}: {ended}{earlier}")
        lines += tree(engine, engine.children(child.id), depth + 1)
    return lines


def task_json(engine: Engine, task_id: int) -> dict[str, Any]:
    """All that `tasks show` reads, as JSON: the task, its attempts, every history's events, the
    operators' actions, its forks' ids, and its descendants as nested {task, children}."""
    task = engine.get(task_id)
    if task is None:
        raise TaskNotFoundError(f"no task with id {task_id}")

    def descendants(parent: Task) -> list[dict[str, Any]]:
        return [
            {"task": child, "children": descendants(child)} for child in engine.children(parent.id)
        ]

    return {
        "task": task,
        "attempts": engine.attempts(task_id),
        "events": engine.events(task_id),
        "actions": engine.actions(task_id),
        "forks": [fork.id for fork in engine.forks(task_id)],
        "children": descendants(task),
    }


@tasks_app.command("retry")
def retry_task(task_id: TaskId, as_json: Json = False) -> None:
    """Run a failed or cancelled task again, going on from its history (its steps replay)."""
    with open_engine() as engine:
        action = engine.retry(task_id)
    print_action(task_id, action, as_json)


@tasks_app.command("replay")
def replay_task(task_id: TaskId, as_json: Json = False) -> None:
    """Run a finished task again from an empty history: every step runs again."""
    with open_engine() as engine:
        action = engine.replay(task_id)
    print_action(task_id, action, as_json)


def print_action(task_id: int, action: OperatorAction, as_json: bool) -> None:
    """The audit row of a retry or a replay (operator_actions): JSON, or a sentence."""
    if as_json:
        print_json(action)
        return
    if action.action == OperatorActionKind.RETRY:
        history = f"going on from its history ({action.events} events)"
    else:
        history = f"from an empty history (the old one, {action.events} events, set aside)"
    typer.echo(f"task {task_id} was {action.status}: queued again, {history}")


@tasks_app.command("cancel")
def cancel_task(task_id: TaskId, as_json: Json = False) -> None:
    """Cancel an unfinished task, and its unfinished children."""
    with open_engine() as engine:
        if not engine.cancel(task_id):
            # The engine calls that no change, not an error (a second cancel is harmless); for
            # a person or a script who asked for a cancel, it is a refusal: exit status 1.
            raise TaskStateError(
                f"task {task_id} has finished already: only an unfinished task can be cancelled"
            )
        task = engine.get(task_id)
    if as_json:
        print_json(task)
    else:
        typer.echo(f"task {task_id} cancelled, and its unfinished children with it")


@tasks_app.command("fork")
def fork_task(
    task_id: TaskId,
    at: Annotated[
        int | None, typer.Option(min=0, metavar="N", help="Keep the first N events.")
    ] = None,
    before: Annotated[
        str | None,
        typer.Option(metavar="STEP", help="Keep the events before the first one named STEP."),
    ] = None,
    as_json: Json = False,
) -> None:
    """A new task with a copy of the start of this one's history; it runs on from there."""
    if (at is None) == (before is None):
        raise UsageError("fork needs the fork point: --at N or --before STEP (one of them)")
    with open_engine() as engine:
        fork_id = engine.fork(task_id, at, before=before)
        fork = engine.get(fork_id)
    assert fork is not None  # just created, and only retention deletes tasks
    if as_json:
        print_json(fork)
    else:
        typer.echo(f"task {fork_id} forked from task {task_id} at event {fork.forked_at}: queued")


# ignore_unknown_options: so that `reprioritize 7 -5` reads -5 as a number, not as an option.
@tasks_app.command("reprioritize", context_settings={"ignore_unknown_options": True})
def reprioritize_task(
    task_id: TaskId,
    priority: Annotated[
        int, typer.Argument(metavar="N", help="The new priority: higher runs first.")
    ],
    as_json: Json = False,
) -> None:
    """Move a queued or scheduled task up or down its queue."""
    with open_engine() as engine:
        task = engine.reprioritize(task_id, priority)
    if as_json:
        print_json(task)
    else:
        typer.echo(f"task {task_id} ({task.status}) now has priority {task.priority}")


# endregion


# region: events
@events_app.command("send")
def send_event(
    name: Annotated[str, typer.Argument(metavar="NAME", help="The event's name.")],
    payload: Annotated[
        str,
        typer.Argument(
            metavar="PAYLOAD", help="""The event's payload, as JSON: '{"by": "ana"}', '"yes"'."""
        ),
    ] = "null",
    as_json: Json = False,
) -> None:
    """Send an event: the tasks waiting for it wake up, and later waits receive it at once."""
    try:
        value = json.loads(payload)
    except ValueError as err:
        raise UsageError(f"PAYLOAD is not JSON ({err}); a string needs quotes: '\"yes\"'") from None
    with open_engine() as engine:
        sent = engine.send_event(name, value)
    if as_json:
        print_json(sent)
    elif not sent.first:
        shown = json.dumps(sent.payload, sort_keys=True)
        typer.echo(f"event {name!r} had been sent already, with {cut(shown, 64)}: nothing changed")
    elif sent.woken:
        typer.echo(f"event {name!r} sent: woke tasks {', '.join(map(str, sent.woken))}")
    else:
        typer.echo(f"event {name!r} sent: no task was waiting for it; later waits receive it")


# endregion


# region: queues
@queues_app.command("stats")
def queue_stats(as_json: Json = False) -> None:
    """Per task name: waiting, sleeping, running, suspended; failed and done lately; the wait.

    SCHEDULED are the tasks due later (a delay, a retry's backoff, a durable sleep); EXPIRED,
    running on a lease that ran out (a dead worker's, until a claim takes them back); OLDEST,
    how long the oldest queued task has been due; DONE/MIN, completed in the last minute.
    """
    with open_engine() as engine:
        stats = engine.queue_stats()
    if as_json:
        print_json(stats)
        return
    if not stats:
        typer.echo("no task waits, runs, or finished in the last hour")
        return
    header = ["NAME", "QUEUED", "SCHEDULED", "RUNNING", "SUSPENDED", "EXPIRED", "FAILED/H"]
    header += ["OLDEST", "DONE/MIN"]
    rows = [
        [
            row.name,
            *(str(count) for count in (row.queued, row.scheduled, row.running, row.suspended)),
            *(str(count) for count in (row.leases_expired, row.failed_last_hour)),
            age(row.oldest_queued_seconds) if row.queued else "-",
            str(row.completed_last_minute),
        ]
        for row in stats
    ]
    typer.echo(table(header, rows))


# endregion


# region: worker
# Commands that hand their arguments on, unread, to another program's main(): its options are
# its own, and `--help` prints its help.
PASS_THROUGH: dict[str, Any] = {"allow_extra_args": True, "ignore_unknown_options": True}


@app.command("worker", context_settings=PASS_THROUGH, add_help_option=False)
def run_worker(context: typer.Context) -> None:
    """Start a worker: worker.py's options (`worker --help` lists them)."""
    worker.main(context.args)


@app.command("api", context_settings=PASS_THROUGH, add_help_option=False)
def run_api(context: typer.Context) -> None:
    """Serve the HTTP API and the dashboard: api.py's options (`api --help` lists them)."""
    api.main(context.args)


# endregion


# region: output
def print_json(value: Any) -> None:
    """`value` as one JSON document on stdout: the rows as objects, times in ISO 8601 (UTC
    offset included), durations in seconds."""
    typer.echo(json.dumps(value, default=to_json, indent=2))


def to_json(value: object) -> object:
    """json.dumps's `default`: what it cannot write itself, as what it can."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, datetime.datetime):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    raise TypeError(f"{type(value).__name__} is not JSON")


def table(header: list[str], rows: list[list[str]]) -> str:
    """Columns as wide as their widest cell, two spaces apart."""
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    )


def age(seconds: float) -> str:
    """`42s`, `5m03s`, `2h10m`, `3d04h`: two units at most, enough to read at a glance."""
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02}h"


# endregion


if __name__ == "__main__":
    main()
