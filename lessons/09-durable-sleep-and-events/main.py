"""Lesson 09: durable sleep and events. An expense claim waits for a person, holding nothing.

Run it (after `source .venv/bin/activate` at the repository root):

    cd lessons/09-durable-sleep-and-events && python main.py
    # or, from the repository root: python lessons/09-durable-sleep-and-events/main.py

You will see, in about ten seconds, a durable task (expense_tasks.py) ask Bea to approve
expense claim 1, then wait for the event `approved:1`, sending her a reminder each time its
wait times out (every 1.5 s here; a day, in real life). It runs in worker processes:

1. worker-A runs it: it asks, waits, reminds, waits... While it waits, the task is a row with
   a time (`scheduled`, its next reminder), on no worker;
2. main.py kills worker-A with kill -9, while the claim waits, and starts worker-B. Nothing is
   lost: worker-B sends the next reminder, when it is due, and only that one;
3. the approval: from another terminal, `python approve.py 1 yes`; or main.py sends it
   itself, at once when it has no terminal (the tests, the docs), else after 30 s;
4. worker-B's run receives it, sleeps a durable cooling-off second, and pays. Then the task's
   log, event by event, and the side effects, each of which happened once.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import expense_tasks
from engine import Engine
from hardway.postgres import describe, lesson_database

LESSON_DIR = Path(__file__).resolve().parent
CLAIM = {
    "claim": 1, "employee": "Ana", "approver": "Bea", "amount": 42.5,
    "remind": 1.5, "cooling_off": 1.0,  # seconds
}  # fmt: skip
WAIT_FOR_A_PERSON = 30.0  # seconds, with a terminal


def start_worker(name: str) -> subprocess.Popen:
    """A worker process, as `python worker.py --tasks expense_tasks` would start it."""
    command = [sys.executable, str(LESSON_DIR / "worker.py"), "--tasks", "expense_tasks"]
    command += ["--name", name, "--lease", "5"]
    return subprocess.Popen(command, stderr=subprocess.PIPE, text=True)


class Effects:
    """Prints the rows of expense_effects as they appear, with the worker that wrote them."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.seen = 0
        self.workers: dict[int, str] = {}  # pid -> worker name

    def follow(self, until: str) -> None:
        """Print new effects until one is `until`."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with self.engine.pool.connection() as conn:
                rows = conn.execute(
                    "SELECT effect, pid FROM expense_effects ORDER BY at OFFSET %s", (self.seen,)
                ).fetchall()
            for effect, pid in rows:
                self.seen += 1
                print(f"   {self.workers.get(pid, pid)}: {effect}")
                if effect.startswith(until):
                    return
            time.sleep(0.05)
        raise TimeoutError(f"no effect {until!r} within 60 s")


def main() -> None:
    # A fresh `lesson_09` database, loaded from sql/schema.sql: every run starts clean.
    url = lesson_database(LESSON_DIR)
    print(describe(url))
    with Engine(url) as engine:
        with engine.pool.connection() as conn:
            conn.execute(expense_tasks.EFFECTS_TABLE)
        expense_tasks.register(engine)  # main.py only enqueues: the workers run it
        task_id = engine.enqueue("expense", CLAIM)
        effects = Effects(engine)
        workers = []
        try:
            print("1. worker-A runs the claim: it asks Bea, and waits for approved:1")
            workers.append(start_worker("worker-A"))
            effects.workers[workers[0].pid] = "worker-A"
            effects.follow(until="reminder 2")
            waiting(engine, task_id)

            print("2. kill -9 worker-A while the claim waits; start worker-B")
            workers[0].kill()
            workers[0].wait()
            workers.append(start_worker("worker-B"))
            effects.workers[workers[1].pid] = "worker-B"
            effects.follow(until="reminder 3")
            waiting(engine, task_id)

            print("3. the approval")
            approve(engine, effects)
            done = engine.wait(task_id, timeout=60)
            effects.follow(until="paid")
            print(f"4. task {task_id} {done.status}: {done.output!r}")
            timeline(engine, task_id)
            happened_once(engine)
        except BaseException:
            for worker in workers:
                worker.kill()
                print(worker.communicate()[1], file=sys.stderr)  # what the worker logged
            raise
        finally:
            for worker in workers:
                worker.terminate()
                worker.wait()


def waiting(engine: Engine, task_id: int) -> None:
    """Wait until the task has suspended again, and say what it is meanwhile: a row."""
    deadline = time.monotonic() + 30
    while (task := engine.get(task_id)) is None or task.awaiting_event is None:
        if time.monotonic() > deadline:
            raise TimeoutError("the claim did not go back to waiting")
        time.sleep(0.02)
    lease = "no lease" if task.lease_expires_at is None else "a lease"
    print(
        f"   the task: {task.status} until its next reminder, awaiting {task.awaiting_event};"
        f" {lease}, on no worker"
    )


# region: approve
def approve(engine: Engine, effects: Effects) -> None:
    """A person's approval, from approve.py; or main.py's, when nobody is there to give one."""
    if sys.stdin.isatty():
        print("   approve it from another terminal: python approve.py 1 yes (or no);")
        print(f"   main.py approves it itself in {WAIT_FOR_A_PERSON:.0f} s")
        deadline = time.monotonic() + WAIT_FOR_A_PERSON
        while time.monotonic() < deadline:
            with engine.pool.connection() as conn:
                if conn.execute("SELECT 1 FROM sent_events WHERE name = 'approved:1'").fetchone():
                    print("   approve.py sent approved:1")
                    return
            time.sleep(0.1)
    sent = engine.send_event("approved:1", {"approved": True, "by": "main.py"})
    print(f"   main.py sent approved:1; it woke task {', '.join(map(str, sent.woken))}")


# endregion


def timeline(engine: Engine, task_id: int) -> None:
    """The task's log, one line per event, with the attempt (and worker) that recorded it."""
    workers = {a.attempt: a.worker for a in engine.attempts(task_id)}
    for event in engine.events(task_id):
        result = "" if event.result is None else f" {json.dumps(event.result)}"
        if event.kind in ("sleep_started", "event_awaited"):
            result = " (until: a time on the database's clock)"  # differs from run to run
        print(
            f"   {event.seq:>2} {event.kind:<15} {event.name:<11}"
            f" attempt {event.attempt} on {workers[event.attempt]}{result}"
        )


def happened_once(engine: Engine) -> None:
    with engine.pool.connection() as conn:
        rows = conn.execute(
            "SELECT effect, count(*) FROM expense_effects GROUP BY effect ORDER BY min(at)"
        ).fetchall()
    print("   side effects: " + ", ".join(f"{effect} ({n}x)" for effect, n in rows))


if __name__ == "__main__":
    main()
