"""Lesson 05: durable functions. A task's steps are logged; a retry replays the log.

Run it (after `source .venv/bin/activate` at the repository root):

    cd lessons/05-durable-event-log && python main.py
    # or, from the repository root: python lessons/05-durable-event-log/main.py

You will see, in about ten seconds, one durable function (place_order: reserve three items,
charge, ship, email) run three times on the same order:
1. without interruption: the reference result, and the event log it leaves;
2. in a worker PROCESS killed with SIGKILL (kill -9) in the middle of step 4; a second worker
   process takes the task over once the lease has expired, replays steps 1-3 from the log
   without running them, runs steps 4-6, and returns the same result as run 1;
3. with a payment service that is down for the first attempt: the step raises, the attempt
   fails, and the retry replays steps 1-3 and runs the payment again.
Then the side effects, counted in a table of their own: every step in the logs happened once.

The leases here are 2 seconds, so that a dead worker is noticed quickly; the default is 30.
"""

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from contextlib import contextmanager
from itertools import groupby
from pathlib import Path

import demo_tasks
from db.models import EventKind, TaskStatus
from db.queries import Querier
from engine import Engine
from hardway.postgres import describe, lesson_database
from psycopg import conninfo
from worker import Worker

LESSON_DIR = Path(__file__).resolve().parent
LEASE = 2.0  # seconds; short for the demo
ORDER = {"order": "A-1", "items": ["book", "lamp", "mug"]}


def main() -> None:
    # A fresh `lesson_05` database, loaded from sql/schema.sql: every run starts clean.
    url = lesson_database(LESSON_DIR)
    print(describe(url))
    # The workers' own log lines ("retry in 0.21s"), on stdout with the rest.
    logging.basicConfig(format="  %(message)s", stream=sys.stdout)
    logging.getLogger("worker").setLevel(logging.INFO)

    with Engine(url) as engine:
        with engine.pool.connection() as conn:
            conn.execute(demo_tasks.EFFECTS_TABLE)  # the outside world, for the steps to change
        demo_tasks.register(engine)
        workers = {os.getpid(): "worker-1 (this process)"}
        reference = uninterrupted(engine)
        killed_and_resumed(engine, url, reference, workers)
        retried_after_an_error(engine)
        side_effects(engine, workers)

        with engine.pool.connection() as conn:
            counts = {status: 0 for status in TaskStatus}
            for row in Querier(conn).count_tasks_by_status():
                counts[row.status] = row.tasks
        print("from the database: " + ", ".join(f"{n} {status}" for status, n in counts.items()))


def uninterrupted(engine: Engine) -> int:
    print("1. an order placed without interruption")
    task_id = engine.enqueue("place_order", {**ORDER, "payment_seconds": 1})
    with running(Worker(engine, name="worker-1", lease=LEASE, poll_interval=0.02)):
        task = engine.wait(task_id)
    print(f"  task {task_id} {task.status} on attempt {task.attempts}: {dumps(task.output)}")
    show_log(engine, task_id)
    return task_id


# region: kill
def killed_and_resumed(engine: Engine, url: str, reference: int, workers: dict) -> None:
    print("2. the same order, its worker process killed with kill -9 in the middle")
    task_id = engine.enqueue("place_order", {**ORDER, "payment_seconds": 1})
    worker_a = start_worker_process("worker-A", url)
    workers[worker_a.pid] = "worker-A"
    # Steps 1-3 (the reservations) are in the log; step 4, the payment, takes a second.
    wait_for(lambda: len(engine.events(task_id)) == 3)
    worker_a.send_signal(signal.SIGKILL)  # no cleanup, no goodbye: like a power cut
    worker_a.communicate(timeout=30)
    in_log = len(engine.events(task_id))
    print(f"  killed worker-A (pid {worker_a.pid}) in step 4 (charge): {in_log} events in the log")

    worker_b = start_worker_process("worker-B", url)
    workers[worker_b.pid] = "worker-B"
    print(f"  started worker-B (pid {worker_b.pid}); it waits for worker-A's lease to expire")
    task = engine.wait(task_id)
    print(f"  task {task_id} {task.status} on attempt {task.attempts} by {task.worker}")
    show_attempts(engine, task_id)
    show_log(engine, task_id)
    worker_b.terminate()  # SIGTERM: worker-B finishes what it holds, then exits
    _, log = worker_b.communicate(timeout=30)
    print("  worker-B's log:")
    for line in log.splitlines():
        print(f"    {line}")
    same = task.output == engine.wait(reference).output
    print(f"  same output as the uninterrupted task {reference}: {'yes' if same else 'NO'}")


def start_worker_process(name: str, url: str) -> subprocess.Popen:
    """`python worker.py --name NAME`, on this demo's database, as a reader would start one."""
    env = dict(os.environ, LESSON_DBNAME=str(conninfo.conninfo_to_dict(url)["dbname"]))
    command = [sys.executable, str(LESSON_DIR / "worker.py"), "--name", name]
    command += ["--lease", str(LEASE), "--poll-interval", "0.1"]
    return subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)


# endregion


def retried_after_an_error(engine: Engine) -> None:
    print("3. the same order, with the payment service down for the first attempt")
    task_id = engine.enqueue("place_order", {**ORDER, "charge_fails": 1})
    with running(Worker(engine, name="worker-1", lease=LEASE, poll_interval=0.02)):
        task = engine.wait(task_id)
    print(f"  task {task_id} {task.status} on attempt {task.attempts}: {dumps(task.output)}")
    show_log(engine, task_id)


# region: effects
def side_effects(engine: Engine, workers: dict) -> None:
    """Compare what the steps did (the effects table) with what the logs recorded."""
    print("4. the side effects, as the steps wrote them (table effects, outside the log)")
    with engine.pool.connection() as conn:
        effects = conn.execute("SELECT task_id, step, pid FROM effects ORDER BY at").fetchall()
        task_ids = [row[0] for row in conn.execute("SELECT id FROM tasks ORDER BY id")]
    done: Counter[tuple[int, str]] = Counter()  # (task, step) -> times it ran, or was recorded
    recorded: Counter[tuple[int, str]] = Counter()
    for task_id in task_ids:
        mine = [(step, pid) for t, step, pid in effects if t == task_id]
        runs = groupby(mine, key=lambda effect: effect[1])  # consecutive effects of one process
        by = [f"{', '.join(step for step, _ in run)} by {workers[pid]}" for pid, run in runs]
        print(f"  task {task_id}: {'; '.join(by)}")
        done.update((task_id, step) for step, _ in mine)
        events = engine.events(task_id)
        recorded.update((task_id, e.name) for e in events if e.kind == EventKind.STEP_COMPLETED)
    print(
        f"  {sum(done.values())} side effects for {sum(recorded.values())} recorded steps: "
        + ("each recorded step ran exactly once" if done == recorded else "MISMATCH")
    )


# endregion


def show_log(engine: Engine, task_id: int) -> None:
    print(f"  the log of task {task_id}:")
    for event in engine.events(task_id):
        outcome = dumps(event.result) if event.kind == EventKind.STEP_COMPLETED else event.error
        print(f"    {event.seq} {event.name:<7} attempt {event.attempt}: {outcome}")


def show_attempts(engine: Engine, task_id: int) -> None:
    for attempt in engine.attempts(task_id):
        error = f": {attempt.error}" if attempt.error else ""
        print(f"    attempt {attempt.attempt} on {attempt.worker}: {attempt.status}{error}")


def dumps(value: object) -> str:
    return json.dumps(value, sort_keys=True)


@contextmanager
def running(worker: Worker):
    """Run `worker` in a thread for the duration of a with block."""
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), name=worker.name)
    thread.start()
    try:
        yield worker
    finally:
        stop.set()
        thread.join()


def wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the demo is stuck; is the database overloaded?")
        time.sleep(0.02)


if __name__ == "__main__":
    main()
