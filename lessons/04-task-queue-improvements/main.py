"""Lesson 04: retries, leases, heartbeats, fencing, scheduling, priorities and cancellation.

Run it (after `source .venv/bin/activate` at the repository root):

    cd lessons/04-task-queue-improvements && python main.py
    # or, from the repository root: python lessons/04-task-queue-improvements/main.py

You will see, in about ten seconds:
1. a flaky task failing twice and succeeding on attempt 3, with the backoff between attempts;
2. a worker PROCESS killed with SIGKILL (kill -9) half-way through a task, and a second worker
   process taking the task over once the dead one's lease has expired;
3. a task scheduled two seconds ahead, and three tasks run in order of priority;
4. a queued task and a running task cancelled.
Each part prints what the database recorded: every attempt, who ran it, how it ended.

The leases here are 2 seconds (a heartbeat every 667 ms) so that a dead worker is noticed quickly;
the default is 30 seconds. A lease is how long the others wait before they decide a silent
worker is dead: too short, and a worker that is merely slow loses its tasks.
"""

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import demo_tasks
from db.models import TaskStatus
from db.queries import Querier
from engine import Engine
from hardway.postgres import describe, lesson_database
from psycopg import conninfo
from worker import Worker

LESSON_DIR = Path(__file__).resolve().parent
LEASE = 2.0  # seconds; short for the demo (see the docstring)


def main() -> None:
    # A fresh `lesson_04` database, loaded from sql/schema.sql: every run starts clean.
    url = lesson_database(LESSON_DIR)
    print(describe(url))
    # The workers' own log lines ("retry in 0.21s"), on stdout with the rest.
    logging.basicConfig(format="  %(message)s", stream=sys.stdout)
    logging.getLogger("worker").setLevel(logging.INFO)

    with Engine(url) as engine:
        demo_tasks.register(engine)
        retries(engine)
        kill_a_worker(engine, url)
        schedule_and_priorities(engine)
        cancel(engine)

        with engine.pool.connection() as conn:
            counts = {status: 0 for status in TaskStatus}
            for row in Querier(conn).count_tasks_by_status():
                counts[row.status] = row.tasks
        print("from the database: " + ", ".join(f"{n} {status}" for status, n in counts.items()))


# region: retries
def retries(engine: Engine) -> None:
    print("1. a payment service that is down twice: retries with exponential backoff")
    task_id = engine.enqueue("charge_card", {"amount": 42, "fails": 2})
    print(f"  enqueued task {task_id}: charge_card, up to 5 attempts, backoff from 300 ms")
    # run_until_idle() waits out the backoffs: a task waiting to be retried is still queued.
    Worker(engine, name="worker-1", lease=LEASE, poll_interval=0.02).run_until_idle()
    task = engine.wait(task_id)  # finished already: returns at once
    print(f"  task {task_id} {task.status} on attempt {task.attempts}: {task.output}")
    show_attempts(engine, task_id)


# endregion


# region: kill
def kill_a_worker(engine: Engine, url: str) -> None:
    print("2. a worker process killed with kill -9 in the middle of a task")
    worker_a = start_worker_process("worker-A", url)
    try:
        task_id = engine.enqueue("resize_video", {"video": "cat.mp4", "seconds": 2})
        wait_for(lambda: status(engine, task_id) == TaskStatus.RUNNING)
        time.sleep(0.5)  # let it get some way into the work
    finally:
        worker_a.send_signal(signal.SIGKILL)  # no cleanup, no goodbye: like a power cut
        worker_a.communicate(timeout=30)
    killed_at = time.monotonic()
    print(f"  task {task_id} was running on worker-A (pid {worker_a.pid}): killed it with SIGKILL")

    worker_b = start_worker_process("worker-B", url)
    print(f"  started worker-B (pid {worker_b.pid})")
    try:
        task = engine.wait(task_id)
        took = time.monotonic() - killed_at
    finally:
        worker_b.terminate()  # SIGTERM: worker-B finishes what it holds, then exits
        _, log = worker_b.communicate(timeout=30)
    print(
        f"  task {task_id} {task.status} by {task.worker}, "
        f"{took:.1f}s after the kill (lease {LEASE:g} s)"
    )
    show_attempts(engine, task_id)
    print("  worker-B's log:")
    for line in log.splitlines():
        print(f"    {line}")


# endregion


def start_worker_process(name: str, url: str) -> subprocess.Popen:
    """`python worker.py --name NAME`, on this demo's database, as a reader would start one."""
    env = dict(os.environ, LESSON_DBNAME=str(conninfo.conninfo_to_dict(url)["dbname"]))
    command = [sys.executable, str(LESSON_DIR / "worker.py"), "--name", name]
    command += ["--lease", str(LEASE), "--poll-interval", "0.1"]
    return subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)


def schedule_and_priorities(engine: Engine) -> None:
    print("3. a task scheduled for later, and tasks run in order of priority")
    later = engine.enqueue("send_reminder", {"user": "ada"}, delay=2)
    print(f"  enqueued task {later} to run in 2 s (run_at is set from the database clock)")
    ids = {p: engine.enqueue("send_reminder", {"user": f"p{p}"}, priority=p) for p in (0, 10, 5)}
    print(f"  enqueued tasks {', '.join(f'{i} (priority {p})' for p, i in ids.items())}")
    Worker(engine, name="worker-1", lease=LEASE, poll_interval=0.02).run_until_idle()
    with engine.connection() as conn:
        ran = conn.execute(
            "SELECT id, extract(epoch FROM started_at - created_at)::float8 FROM tasks"
            " WHERE id = ANY(%s) ORDER BY started_at",
            ([*ids.values(), later],),
        ).fetchall()
    print(f"  worker-1 ran them in this order: {', '.join(str(i) for i, _ in ran)}")
    waited = dict(ran)[later]
    print(f"  task {later} started {waited:.1f}s after it was enqueued")


# region: cancel
def cancel(engine: Engine) -> None:
    print("4. cancelling a task that waits and a task that runs")
    waiting = engine.enqueue("send_reminder", {"user": "bob"}, delay=60)
    engine.cancel(waiting)
    print(f"  cancelled task {waiting}, scheduled for later: {status(engine, waiting)}, never run")

    task_id = engine.enqueue("build_report", {"steps": 200})  # 10 s of work, in 50 ms steps
    worker = Worker(engine, name="worker-1", lease=LEASE)
    thread = threading.Thread(target=worker.run_until_idle)
    thread.start()
    wait_for(lambda: status(engine, task_id) == TaskStatus.RUNNING)
    time.sleep(0.3)
    cancelled_at = time.monotonic()
    engine.cancel(task_id)
    print(f"  cancelled task {task_id} while running: {status(engine, task_id)} at once")
    thread.join()  # returns once the function has noticed, stopped, and nothing else is due
    print(
        f"  its function stopped {time.monotonic() - cancelled_at:.1f}s later, at the next"
        f" heartbeat (every {LEASE / 3 * 1000:.0f} ms)"
    )
    show_attempts(engine, task_id)


# endregion


def show_attempts(engine: Engine, task_id: int) -> None:
    previous = None
    for attempt in engine.attempts(task_id):
        waited = ""
        if previous is not None and previous.finished_at is not None:
            gap = (attempt.started_at - previous.finished_at).total_seconds()
            waited = f", {gap:.2f}s after attempt {previous.attempt} ended"
        error = f": {attempt.error}" if attempt.error else ""
        print(f"    attempt {attempt.attempt} on {attempt.worker}{waited}: {attempt.status}{error}")
        previous = attempt


def status(engine: Engine, task_id: int) -> TaskStatus:
    task = engine.get(task_id)
    assert task is not None, f"task {task_id} has disappeared"
    return task.status


def wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the demo is stuck; is the database overloaded?")
        time.sleep(0.02)


if __name__ == "__main__":
    main()
