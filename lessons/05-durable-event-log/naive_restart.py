"""The failure before the fix: a multi-step function whose retry starts again from the top.

Run it (after `source .venv/bin/activate` at the repository root):

    cd lessons/05-durable-event-log && python naive_restart.py

The same engine, and the same steps as demo_tasks.place_order (reserve each item, charge the
total, ship, email), except that the function calls the steps directly instead of through
`ctx.step`: nothing is logged, and a retry runs the whole function again, as in lesson 04.
Worker-A, a worker process, dies with kill -9 right after the payment; worker-B, in this
process, takes the task over once worker-A's lease has run out. You will see the task complete
on attempt 2 as if nothing had happened, and the `effects` table, which the steps write,
show every item reserved twice and the card charged twice.
"""

import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import demo_tasks
from demo_tasks import charge, reserve, send_email, ship
from engine import Engine
from hardway.postgres import describe, lesson_database
from psycopg import conninfo
from task_context import current_task
from worker import Worker

LESSON_DIR = Path(__file__).resolve().parent
LEASE = 1.0  # seconds: how long worker-B waits before it decides that worker-A is dead
ORDER = {"order": "A-1", "items": ["book", "lamp", "mug"]}


def place_order_without_steps(input: dict) -> dict:
    """demo_tasks.place_order with plain calls where it has `ctx.step`: lesson 04's task."""
    reserved = [reserve(item) for item in input["items"]]
    total = sum(line["price"] for line in reserved)
    payment = charge(input["order"], total, fails=0, seconds=0)
    if current_task().attempt == 1:
        # The worker dies here, between the payment and the shipping: kill -9, the OOM killer,
        # a deploy. A real crash lands anywhere; this one lands here on every run. (Through
        # ctx.step, the payment would be in the log by now, and no retry would run it again.)
        os.kill(os.getpid(), signal.SIGKILL)
    shipment = ship(input["order"], [line["item"] for line in reserved])
    send_email(input["order"], shipment["tracking"])
    return {"order": input["order"], **payment, **shipment}


def register(engine: Engine) -> None:
    """Register the task on `engine`: main() does, and so does worker-A, which is
    `python worker.py --tasks naive_restart` and imports this module for it."""
    demo_tasks.register(engine)  # the steps write to `effects` through engine's pool
    engine.task("place_order_without_steps", backoff=0.3)(place_order_without_steps)


def main() -> None:
    url = lesson_database(LESSON_DIR)
    print(describe(url))
    # Worker-B's own log lines ("lease expired"), on stdout with the rest.
    logging.basicConfig(format="  %(message)s", stream=sys.stdout)
    logging.getLogger("worker").setLevel(logging.INFO)

    with Engine(url) as engine:
        with engine.pool.connection() as conn:
            conn.execute(demo_tasks.EFFECTS_TABLE)
        register(engine)
        task_id = engine.enqueue("place_order_without_steps", ORDER)
        print(f"task {task_id}: order {ORDER['order']}, its steps called directly (nothing logged)")

        env = dict(os.environ, LESSON_DBNAME=str(conninfo.conninfo_to_dict(url)["dbname"]))
        command = [sys.executable, str(LESSON_DIR / "worker.py"), "--name", "worker-A"]
        command += ["--tasks", "naive_restart", "--lease", str(LEASE), "--poll-interval", "0.05"]
        worker_a = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
        _, log = worker_a.communicate(timeout=60)  # it runs the task, and dies in it
        if worker_a.returncode != -signal.SIGKILL:
            raise SystemExit(f"worker-A exited with status {worker_a.returncode}:\n{log}")
        print(f"worker-A (pid {worker_a.pid}) died in attempt 1, right after the payment")

        stop = threading.Event()
        worker_b = Worker(engine, name="worker-B", lease=LEASE, poll_interval=0.05)
        thread = threading.Thread(target=worker_b.run, args=(stop,), name=worker_b.name)
        thread.start()
        try:
            task = engine.wait(task_id)
        finally:
            stop.set()
            thread.join()
        print(f"task {task_id} {task.status} on attempt {task.attempts} by {task.worker}")

        with engine.pool.connection() as conn:
            effects = conn.execute(
                "SELECT step, detail, pid FROM effects WHERE task_id = %s ORDER BY at", (task_id,)
            ).fetchall()
        print("the side effects, as the steps wrote them (table effects):")
        for step, detail, pid in effects:
            print(f"  {'worker-A' if pid == worker_a.pid else 'worker-B'}: {step} {detail}")
        charges = sum(step == "charge" for step, _, _ in effects)
        print(f"the card was charged {charges} times for order {ORDER['order']}")


if __name__ == "__main__":
    main()
