"""The failure before the fix: a replay that hands out the log by position, and checks nothing.

Run it (after `source .venv/bin/activate` at the repository root):

    cd lessons/06-tracking-non-determinism && python naive_replay.py

Part 1 of main.py, with this lesson's check taken out. Version 1 of place_order (demo_tasks.py)
reserves the three items, and its worker process is killed with kill -9 in the middle of the
charge. Version 2, which charges first and then reserves, retries the task in this process,
on a worker whose replay is lesson 05's: the n-th call gets event n, whatever recorded it.
You will see the charge step receive the book's reservation as its payment, each reservation
the next item's, the task complete without an error, and the `effects` table, which the steps
write, show the order shipped and the card never charged. (main.py runs the same retry with the
check: NonDeterminismError at event 1, and the task fails.)
"""

import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import demo_tasks
from db.models import Task, TaskEvent
from durable import Call, DurableContext
from engine import Engine
from hardway.postgres import describe, lesson_database
from psycopg import conninfo
from psycopg_pool import ConnectionPool
from task_context import TaskContext
from worker import Worker

LESSON_DIR = Path(__file__).resolve().parent
LEASE = 1.0  # seconds: how long the retry waits before it decides that worker-A is dead
ORDER = {"order": "A-1", "items": ["book", "lamp", "mug"], "slow": {"charge": 5}}


class PositionalContext(DurableContext):
    """A DurableContext whose replay is lesson 05's: DurableContext._replay without its check."""

    def _replay(self, call: Call) -> TaskEvent | None:
        event = self._next_event(call)
        if event is None:
            return None
        # Here DurableContext._replay compares `call` with the event and, when they differ,
        # raises NonDeterminismError. Without that, whatever recorded the event, `call` gets it.
        recorded = Call.recorded(event).describe()
        print(f"  {call.describe()} gets event {event.seq}, recorded by {recorded}:", end=" ")
        print(json.dumps(event.result))
        self._seq += 1
        return event


class PositionalWorker(Worker):
    def context(self, task: Task, steps: ConnectionPool) -> TaskContext:
        return PositionalContext(steps, task.id, task.attempts, task.timeout)


def main() -> None:
    url = lesson_database(LESSON_DIR)
    print(describe(url))
    # The retrying worker's own log lines ("lease expired"), on stdout with the rest.
    logging.basicConfig(format="  %(message)s", stream=sys.stdout)
    logging.getLogger("worker").setLevel(logging.INFO)

    with Engine(url) as engine:
        with engine.pool.connection() as conn:
            conn.execute(demo_tasks.EFFECTS_TABLE)
        demo_tasks.register(engine, version=2)  # what this process runs: version 2
        task_id = engine.enqueue("place_order", ORDER)

        print(f"worker-A, on version 1, takes order {ORDER['order']}")
        print("  version 1 does: reserve book, reserve lamp, reserve mug, charge, ship, email")
        env = dict(os.environ, LESSON_DBNAME=str(conninfo.conninfo_to_dict(url)["dbname"]))
        env["PLACE_ORDER_VERSION"] = "1"
        command = [sys.executable, str(LESSON_DIR / "worker.py"), "--name", "worker-A"]
        command += ["--lease", str(LEASE), "--poll-interval", "0.05"]
        worker_a = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
        # Steps 1-3 (the reservations) are in the log; step 4, the charge, takes 5 seconds.
        deadline = time.monotonic() + 30
        while len(engine.events(task_id)) < 3:
            if time.monotonic() > deadline:
                raise TimeoutError("worker-A did not reserve the items; is the database busy?")
            time.sleep(0.02)
        worker_a.kill()  # SIGKILL: no cleanup, no goodbye
        worker_a.communicate(timeout=30)
        print("  killed worker-A (kill -9) in step 4, the charge; the log:")
        for event in engine.events(task_id):
            print(f"    {event.seq} {event.name}: {json.dumps(event.result)}")

        print("worker-B, on version 2, retries the task; its replay goes by position, unchecked")
        print("  version 2 does: charge, reserve book, reserve lamp, reserve mug, ship, email")
        stop = threading.Event()
        worker_b = PositionalWorker(engine, name="worker-B", lease=LEASE, poll_interval=0.05)
        thread = threading.Thread(target=worker_b.run, args=(stop,), name=worker_b.name)
        thread.start()
        try:
            task = engine.wait(task_id)
        finally:
            stop.set()
            thread.join()
        print(
            f"  task {task_id} {task.status} on attempt {task.attempts}: {json.dumps(task.output)}"
        )

        with engine.pool.connection() as conn:
            effects = conn.execute(
                "SELECT step, detail, pid FROM effects WHERE task_id = %s ORDER BY at", (task_id,)
            ).fetchall()
        print("the side effects, as the steps wrote them (table effects):")
        for step, detail, pid in effects:
            print(f"  {'worker-A' if pid == worker_a.pid else 'worker-B'}: {step} {detail}")
        charges = sum(step == "charge" for step, _, _ in effects)
        print(f"order {ORDER['order']} shipped, no error, and the card was charged {charges} times")


if __name__ == "__main__":
    main()
