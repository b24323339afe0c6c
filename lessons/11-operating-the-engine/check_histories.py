"""Check the code you are about to deploy against the histories of the tasks on record.

    python check_histories.py --tasks ops_tasks                      # the tasks in flight
    python check_histories.py --tasks ops_tasks --task-name checkout --since 2h --all

For each durable task (those not finished yet, by default: the ones a deploy will meet; `--all`:
every one), this replays the function that the module `--tasks` registers (`register(engine)`,
as for worker.py) against the task's history, the way a worker's retry would, and reports:

- `matches its history`: every call the code makes is the one recorded at its place, up to
  the end of the history (where a worker would go on, running new steps);
- `diverges at event n: ...`: the code asks for something else there (a step renamed, moved,
  removed or added, other arguments): a worker would fail it with NonDeterminismError. Such a
  change needs a patch marker (lesson 06, `ctx.patched()`), or must wait for those tasks;
- `raises ...`: the code, given the recorded results, raises where the recorded run did not.

Nothing runs but the function's own code between its steps: a step in the history returns its
recorded result, and the check stops at the first call the history does not hold, before it
runs. Nothing is written: the check's connections are read-only. Exit status 0 if every task
matches, 1 if any diverges or raises, 2 for a usage error: a deploy pipeline can gate on it.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import re
import sys
from collections.abc import Callable
from typing import TypeVar

import psycopg
from db.models import Task, TaskEvent
from db.queries import Querier
from durable import Call, DurableContext, NonDeterminismError
from engine import Engine
from outages import DatabaseUnavailableError
from psycopg import conninfo
from task_context import run_in_context

T = TypeVar("T")


class EndOfHistory(BaseException):
    """The code asked for a call past the end of the history: where the check stops.

    A BaseException, not an Exception: a task function that catches Exception (to retry a
    step, say) must not catch this and go on running unrecorded code.
    """

    def __init__(self, call: Call) -> None:
        super().__init__(call.describe())


# region: replay_only
class ReplayOnly(DurableContext):
    """A DurableContext that replays a history and never goes past its end.

    Every call starts in `_next_event`: there, past the history's end, it stops the function
    (EndOfHistory) where a worker would run the call and record it. A sleep that is the last
    event of the history would ask the database whether it has ended: the check stops there
    too. Everything else is the worker's replay, unchanged: the same matching, the same
    NonDeterminismError.
    """

    def _next_event(self, call: Call) -> TaskEvent:
        event = super()._next_event(call)
        if event is None:
            raise EndOfHistory(call)
        return event

    def _suspend_until(self, seq: int, name: str, until: datetime.datetime) -> bool:
        raise EndOfHistory(Call("sleep", name))

    def _database(self, work: Callable[[psycopg.Connection, bool], T]) -> T:
        """Once. A worker's attempt waits out an outage for as long as its lease; a check has
        no lease, and would wait for ever: it fails at once instead, and says why."""
        with self._connections.connection(timeout=5) as conn:
            return work(conn, False)


# endregion


@dataclasses.dataclass
class Verdict:
    task: Task
    matches: bool
    detail: str

    def __str__(self) -> str:
        return f"task {self.task.id} {self.task.name}: {self.detail}"


# region: check
def check(engine: Engine, task: Task) -> Verdict:
    """Replay the function registered for `task` against its history; never writes."""
    # As the task's next attempt would: its history is every event of the attempts before.
    context = ReplayOnly(engine.pool, task.id, task.attempts + 1, task.timeout, engine)
    events = f"{len(context.history())} events"
    try:
        run_in_context(context, engine.registry[task.name], task.input)
        context.finish()  # the function returned: did it make every recorded call?
    except EndOfHistory as end:
        return Verdict(task, True, f"matches its history ({events}; next, {end})")
    except NonDeterminismError:
        pass  # context.diverged, below: even if the function caught it and raised another
    except Exception as err:
        if context.diverged is None:
            return Verdict(task, False, f"raises {type(err).__name__}: {err}")
    if context.diverged is not None:
        # "task 7 diverged from its history at event 4: expected ..., but ..."
        detail = str(context.diverged).split(": ", 1)[1]
        return Verdict(task, False, f"diverges at event {context.diverged.seq}: {detail}")
    return Verdict(task, True, f"matches its history ({events}; then returns)")


# endregion


def tasks_to_check(
    engine: Engine, names: list[str], since: datetime.timedelta | None, finished: bool
) -> list[Task]:
    with engine.connection() as conn:
        return Querier(conn).list_tasks_to_check(task_names=names, since=since, finished=finished)


def duration(text: str) -> datetime.timedelta:
    """`90`, `90s`, `15m`, `2h`, `7d`: a duration, for --since."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd]?)", text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (say 90s, 15m, 2h or 7d)")
    unit = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match[2]]
    return datetime.timedelta(seconds=float(match[1]) * unit)


def main(argv: list[str] | None = None) -> None:
    from worker import lesson_database_url  # the lesson's database, as worker processes find it

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", required=True, help="module with register(engine)")
    parser.add_argument("--task-name", action="append", help="only these task names")
    parser.add_argument("--since", type=duration, help="only tasks created since: 2h, 7d...")
    parser.add_argument("--all", action="store_true", help="finished tasks too")
    args = parser.parse_args(argv)
    try:
        tasks_module = importlib.import_module(args.tasks)
    except ModuleNotFoundError as err:
        if err.name != args.tasks:
            raise
        parser.error(f"--tasks: no module named {args.tasks!r}")
    # Read-only: whatever the task functions or this file get wrong, the database refuses
    # every write of these connections.
    url = conninfo.make_conninfo(
        lesson_database_url(), options="-c default_transaction_read_only=on"
    )
    with Engine(url) as engine:
        tasks_module.register(engine)
        # Lesson 11: not the declared tasks: their code is not here, but in an HTTP worker.
        names = sorted(engine.durable - engine.declared)
        unknown = sorted(set(args.task_name or []) - set(names))
        if unknown:
            parser.error(f"--task-name: {', '.join(unknown)} not registered by {args.tasks}")
        try:
            tasks = tasks_to_check(engine, args.task_name or names, args.since, args.all)
            verdicts = [check(engine, task) for task in tasks]
        except DatabaseUnavailableError as err:  # engine.connection(): says why
            raise SystemExit(f"error: {err}") from None
        except psycopg.OperationalError as err:  # the check's own connections (PoolTimeout...)
            raise SystemExit(f"error: database unavailable: {err}") from None
    for verdict in verdicts:
        print(verdict)
    bad = [verdict for verdict in verdicts if not verdict.matches]
    print(f"{len(verdicts)} tasks checked: {len(verdicts) - len(bad)} match, {len(bad)} would fail")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
