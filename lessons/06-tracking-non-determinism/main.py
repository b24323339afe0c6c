"""Lesson 06: tracking non-determinism. A replay checks that the code still matches its log.

Run it (after `source .venv/bin/activate` at the repository root):

    cd lessons/06-tracking-non-determinism && python main.py
    # or, from the repository root: python lessons/06-tracking-non-determinism/main.py

You will see, in about ten seconds, three deploys of one durable function, place_order
(demo_tasks.py), each a worker PROCESS running one version:
1. version 1 takes an order (reserve each item, charge, ship, email); its worker is killed with
   kill -9 in the middle of the charge. Version 2, deployed in its place, charges first. The
   automatic retry replays the log on version 2, which asks for a charge where the log says
   the first item was reserved: NonDeterminismError, and the task fails at once, for good;
2. the operator retries it (engine.retry): the same history, the same code, the same error;
3. the operator replays it (engine.replay): an empty history, every step runs again on
   version 2, and the task completes. The old history is kept, and the audit says who was reset;
4. version 3 adds a fraud check behind `if ctx.patched("fraud-check"):`. An order that version 2
   had charged when its worker was killed finishes on version 3 without the check (its log
   predates the patch); a new order is checked;
5. a coupon whose code, discount and expiry come from ctx.uuid4(), ctx.random() and ctx.now():
   its retry gets the same values; the same read directly (uuid.uuid4()...) gives new ones.

The leases here are 2 seconds, so that a dead worker is noticed quickly; the default is 30.
"""

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from itertools import groupby
from pathlib import Path

import demo_tasks
from db.models import EventKind, TaskStatus
from db.queries import Querier
from durable import KINDS
from engine import Engine
from hardway.postgres import describe, lesson_database
from psycopg import conninfo

LESSON_DIR = Path(__file__).resolve().parent
LEASE = 2.0  # seconds; short for the demo
ORDER = {"order": "A-1", "items": ["book", "lamp", "mug"]}


class Deploys:
    """The worker processes of the demo, one per deploy: `python worker.py` with a version."""

    def __init__(self, url: str) -> None:
        self.dbname = str(conninfo.conninfo_to_dict(url)["dbname"])
        self.processes: dict[str, subprocess.Popen] = {}
        self.names = {os.getpid(): "main.py"}  # pid -> name, to show who did what
        self.logs: dict[str, str] = {}  # name -> what the worker wrote to stderr, once it ended

    def start(self, name: str, version: int) -> subprocess.Popen:
        env = dict(os.environ, LESSON_DBNAME=self.dbname, PLACE_ORDER_VERSION=str(version))
        command = [sys.executable, str(LESSON_DIR / "worker.py"), "--name", name]
        command += ["--lease", str(LEASE), "--poll-interval", "0.1"]
        process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
        self.processes[name] = process
        self.names[process.pid] = name
        return process

    def kill(self, name: str) -> int:
        """kill -9: no cleanup, no goodbye, like a deploy that does not wait for its workers."""
        process = self.processes[name]
        process.send_signal(signal.SIGKILL)
        _, self.logs[name] = process.communicate(timeout=30)
        return process.pid

    def stop_all(self) -> None:
        for name, process in self.processes.items():
            if name not in self.logs:
                process.terminate()  # SIGTERM: finish what it holds, then exit
                _, self.logs[name] = process.communicate(timeout=30)


def main() -> None:
    # A fresh `lesson_06` database, loaded from sql/schema.sql: every run starts clean.
    url = lesson_database(LESSON_DIR)
    print(describe(url))

    deploys = Deploys(url)
    with Engine(url) as engine:
        with engine.pool.connection() as conn:
            conn.execute(demo_tasks.EFFECTS_TABLE)  # the outside world, for the steps to change
        # This process only enqueues and operates; the functions run in the worker processes.
        demo_tasks.register(engine)
        try:
            task_id = a_deploy_reorders_the_steps(engine, deploys)
            the_operator_retries(engine, task_id)
            the_operator_replays(engine, task_id, deploys)
            a_patch(engine, deploys)
            a_coupon(engine)
        finally:
            deploys.stop_all()
        print("6. the workers' logs")
        for name, log in deploys.logs.items():
            print(f"  {name}:")
            for line in log.splitlines():
                print(f"    {line}")

        with engine.pool.connection() as conn:
            counts = {status: 0 for status in TaskStatus}
            for row in Querier(conn).count_tasks_by_status():
                counts[row.status] = row.tasks
        print("from the database: " + ", ".join(f"{n} {status}" for status, n in counts.items()))


# region: deploy
def a_deploy_reorders_the_steps(engine: Engine, deploys: Deploys) -> int:
    print("1. version 1 takes an order; its worker is killed, and version 2 is deployed")
    task_id = engine.enqueue("place_order", {**ORDER, "slow": {"charge": 1}})
    deploys.start("worker-A", version=1)
    # Steps 1-3 (the reservations) are in the log; step 4, the charge, takes a second.
    wait_for(lambda: len(engine.events(task_id)) == 3)
    pid = deploys.kill("worker-A")
    in_log = len(engine.events(task_id))
    print(f"  killed worker-A (version 1, pid {pid}) in step 4 (charge): {in_log} events logged")
    worker_b = deploys.start("worker-B", version=2)
    print(f"  started worker-B (version 2, pid {worker_b.pid}): it charges first, then reserves")
    # Once worker-A's lease has run out, worker-B retries the task, on version 2.
    task = engine.wait(task_id)
    print(f"  task {task_id} {task.status} after attempt {task.attempts} of {task.max_attempts}:")
    show_attempts(engine, task_id)
    print("  no attempt 3: a divergence is not retried, the same code would diverge again")
    return task_id


# endregion


# region: operator
def the_operator_retries(engine: Engine, task_id: int) -> None:
    print(f"2. the operator retries task {task_id} (engine.retry: same history, one more attempt)")
    engine.retry(task_id)
    task = engine.wait(task_id)
    *_, before, last = engine.attempts(task_id)
    same = "the same error as" if last.error == before.error else "ANOTHER error than"
    print(f"  task {task_id} {task.status} on attempt {last.attempt}, with {same} attempt 2")


def the_operator_replays(engine: Engine, task_id: int, deploys: Deploys) -> None:
    print(f"3. the operator replays task {task_id} (engine.replay: an empty history)")
    engine.replay(task_id)
    task = engine.wait(task_id)
    print(f"  task {task_id} {task.status} on attempt {task.attempts}: {dumps(task.output)}")
    show_log(engine, task_id)
    print("  the audit (operator_actions):")
    for action in engine.actions(task_id):
        kept = "kept" if action.action == "retry" else "set aside"
        print(
            f"    {action.action:<6} of a task {action.status} after attempt {action.attempts}:"
            f" history {action.replay} ({action.events} events) {kept}"
        )
    steps = show_effects(engine, task_id, deploys)
    items = len(engine.wait(task_id).input["items"])
    print(
        f"  {steps['reserve']} reservations for {items} items: a replay runs every step"
        " again, even those whose side effects the old history had made"
    )


# endregion


# region: patch
def a_patch(engine: Engine, deploys: Deploys) -> None:
    print('4. version 3 adds a fraud check before the charge, behind ctx.patched("fraud-check")')
    order = {"order": "B-2", "items": ["lamp"], "slow": {"ship": 1}}
    in_flight = engine.enqueue("place_order", order)
    # Version 2's steps 1-2 (charge, reserve) are in the log; step 3, the shipping, is slow.
    wait_for(lambda: len(engine.events(in_flight)) == 2)
    pid = deploys.kill("worker-B")
    in_log = len(engine.events(in_flight))
    print(f"  task {in_flight}: killed worker-B (version 2, pid {pid}) in step 3 (ship):", end=" ")
    print(f"{in_log} events logged")
    worker_c = deploys.start("worker-C", version=3)
    print(f"  started worker-C (version 3, pid {worker_c.pid})")
    new = engine.enqueue("place_order", {"order": "C-3", "items": ["mug"]})
    for task_id in (in_flight, new):
        task = engine.wait(task_id)
        print(
            f"  task {task_id} {task.status} on attempt {task.attempts} by {task.worker}:"
            f" fraud check {task.output['fraud_check']}"
        )
        show_log(engine, task_id)


# endregion


def a_coupon(engine: Engine) -> None:
    print("5. a coupon: a code from ctx.uuid4(), a discount from ctx.random(), ctx.now() + 30 days")
    task_id = engine.enqueue("issue_coupon", {"customer": "ada", "crash": True})
    task = engine.wait(task_id)
    print(f"  task {task_id} {task.status} on attempt {task.attempts} (attempt 1 crashed)")
    with engine.pool.connection() as conn:
        rows = conn.execute(
            "SELECT detail FROM effects WHERE task_id = %s AND step = 'computed' ORDER BY at",
            (task_id,),
        ).fetchall()
    first, second = (json.loads(detail) for (detail,) in rows)
    for n, seen in enumerate((first, second), start=1):
        print(
            f"    attempt {n}: ctx.uuid4() gave {seen['recorded']['code']},"
            f" uuid.uuid4() gave {seen['naive']['code']}"
        )
    recorded = "the same" if first["recorded"] == second["recorded"] else "DIFFERENT"
    naive = "the same" if first["naive"] == second["naive"] else "different"
    print(f"  code, discount and expiry through the context: {recorded} on both attempts")
    print(f"  read directly (uuid.uuid4(), random.random(), datetime.now()): {naive}")
    show_log(engine, task_id)


def show_log(engine: Engine, task_id: int) -> None:
    print(f"  the log of task {task_id}:")
    events = engine.events(task_id)
    current = max(event.replay for event in events)
    for replay, history in groupby(events, key=lambda event: event.replay):
        indent = "    "
        if current > 0:  # the task was replayed: show each history
            print(f"    history {replay}{' (set aside)' if replay < current else ''}:")
            indent += "  "
        for event in history:
            if event.kind == EventKind.STEP_FAILED:
                outcome = event.error
            elif event.kind == EventKind.PATCH_APPLIED:
                outcome = "marker: this run took the patched path"
            elif event.name == "random":
                outcome = "a number between 0 and 1"  # random: not printed, it would vary
            else:
                outcome = dumps(event.result)
            what = f"{event.seq} {KINDS[event.kind]:<5} {event.name:<11}"
            print(f"{indent}{what} attempt {event.attempt}: {outcome}")


def show_attempts(engine: Engine, task_id: int) -> None:
    for attempt in engine.attempts(task_id):
        error = f": {attempt.error}" if attempt.error else ""
        print(f"    attempt {attempt.attempt} on {attempt.worker}: {attempt.status}{error}")


def show_effects(engine: Engine, task_id: int, deploys: Deploys) -> Counter:
    """Print what the steps of the task did (the effects table), by process; count them."""
    with engine.pool.connection() as conn:
        effects = conn.execute(
            "SELECT step, pid FROM effects WHERE task_id = %s ORDER BY at", (task_id,)
        ).fetchall()
    runs = groupby(effects, key=lambda effect: effect[1])  # consecutive effects of one process
    by = [f"{', '.join(step for step, _ in run)} by {deploys.names[pid]}" for pid, run in runs]
    print(f"  the side effects of task {task_id}: {'; '.join(by)}")
    return Counter(step for step, _ in effects)


def dumps(value: object) -> str:
    return json.dumps(value, sort_keys=True)


def wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the demo is stuck; is the database overloaded?")
        time.sleep(0.02)


if __name__ == "__main__":
    main()
