"""Lesson 07: durable tasks. An agent calls its tools as child tasks, and waits without a worker.

Run it (after `source .venv/bin/activate` at the repository root):

    cd lessons/07-durable-tasks && python main.py
    # or, from the repository root: python lessons/07-durable-tasks/main.py

You will see, in about ten seconds, an "AI agent" (research, in demo_tasks.py): a durable
task that asks a model for a plan, calls three tools in parallel as child tasks (regular tasks),
and asks the model for a summary. Everything runs in worker PROCESSES (python worker.py):
1. worker-A (4 slots) runs the agent: it plans, spawns the tools and suspends, freeing its slot
   while they run. Two tools finish; worker-A is killed with kill -9 in the middle of the third;
2. worker-B, with ONE slot, takes over. The third tool's lease runs out, it is retried and
   finishes, and that queues the agent again, which replays its log (no tool runs twice) and
   asks for the summary: the model is down, and the agent, allowed one try, fails;
3. the operator retries it (engine.retry): the log is kept, the tools do not run again;
4. the operator replays it (engine.replay): a new history, a new plan, three NEW children;
5. the operator cancels a second agent while a tool runs: its children are cancelled with it;
6. the first agent's timeline, as `python inspect_task.py 1` prints it;
7. the side effects, as the tools and the model wrote them in a table of their own: each child
   ran once, and no tool more often than the logs say.

The leases here are 2 seconds, so that a dead worker is noticed quickly; the default is 30.
"""

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import demo_tasks
from db.models import TaskStatus
from db.queries import Querier
from engine import Engine
from hardway.postgres import describe, lesson_database
from inspect_task import describe as timeline
from psycopg import conninfo

LESSON_DIR = Path(__file__).resolve().parent
LEASE = 2.0  # seconds; short for the demo
QUESTION = "Where should we picnic in Edinburgh?"


class Workers:
    """The demo's worker processes: `python worker.py --name NAME --slots N`."""

    def __init__(self, url: str) -> None:
        self.dbname = str(conninfo.conninfo_to_dict(url)["dbname"])
        self.processes: dict[str, subprocess.Popen] = {}
        self.names = {os.getpid(): "main.py"}  # pid -> name, to show who did what
        self.logs: dict[str, str] = {}  # name -> what the worker wrote to stderr, once it ended

    def start(self, name: str, slots: int) -> subprocess.Popen:
        env = dict(os.environ, LESSON_DBNAME=self.dbname)
        command = [sys.executable, str(LESSON_DIR / "worker.py"), "--name", name]
        command += ["--slots", str(slots), "--lease", str(LEASE), "--poll-interval", "0.05"]
        process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
        self.processes[name] = process
        self.names[process.pid] = name
        return process

    def kill(self, name: str) -> int:
        """kill -9: no cleanup, no goodbye, like a power cut."""
        process = self.processes[name]
        process.send_signal(signal.SIGKILL)
        _, self.logs[name] = process.communicate(timeout=30)
        return process.pid

    def stop(self, name: str) -> None:
        process = self.processes[name]
        process.terminate()  # SIGTERM: finish what it holds, then exit
        _, self.logs[name] = process.communicate(timeout=30)


def main() -> None:
    # A fresh `lesson_07` database, loaded from sql/schema.sql: every run starts clean.
    url = lesson_database(LESSON_DIR)
    print(describe(url))
    workers = Workers(url)
    with Engine(url) as engine:
        with engine.pool.connection() as conn:
            conn.execute(demo_tasks.EFFECTS_TABLE)  # the outside world, for the tools to change
        demo_tasks.register(engine)  # to enqueue, and to know which tasks are durable
        try:
            agent = killed_and_resumed(engine, workers)
            retried_and_replayed(engine, agent)
            cancelled(engine)
        finally:
            for name in workers.processes:
                if name not in workers.logs:
                    workers.stop(name)
        print("worker-B's log:")
        for line in workers.logs["worker-B"].splitlines():
            print(f"  {line}")
        print(f"6. the timeline of task {agent} (python inspect_task.py {agent})")
        print(timeline(engine, agent))
        side_effects(engine, agent, workers)
        with engine.pool.connection() as conn:
            counts = {status: 0 for status in TaskStatus}
            for row in Querier(conn).count_tasks_by_status():
                counts[row.status] = row.tasks
        print("from the database: " + ", ".join(f"{n} {status}" for status, n in counts.items()))


# region: kill
def killed_and_resumed(engine: Engine, workers: Workers) -> int:
    print("1. worker-A (4 slots) runs the agent; it is killed with kill -9 in a tool")
    # One try: the summary's failure (part 2) fails the agent for good. Its suspensions are
    # not tries: waiting is not failing.
    agent = engine.enqueue("research", {"question": QUESTION, "outages": 1}, max_attempts=1)
    workers.start("worker-A", slots=4)
    # The plan is made, the three tools spawned, and the agent suspended; two tools have
    # finished, and read_reviews, which takes a second and a half, is running.
    wait_for(
        lambda: (
            status(engine, agent) == TaskStatus.SUSPENDED
            and statuses(engine, agent) == ["completed", "completed", "running"]
        )
    )
    show(engine, agent)
    pid = workers.kill("worker-A")
    print(f"  killed worker-A (pid {pid})")

    print("2. worker-B (ONE slot) takes over")
    workers.start("worker-B", slots=1)
    task = engine.wait(agent, timeout=60)
    show(engine, agent)
    print(f"  agent {task.status} after {task.attempts} attempts: {task.error}")
    return agent


# endregion


def retried_and_replayed(engine: Engine, agent: int) -> None:
    print("3. the operator retries the agent: same history, the tools do not run again")
    engine.retry(agent)
    task = engine.wait(agent, timeout=60)
    show(engine, agent)
    print(f"  agent {task.status} on attempt {task.attempts}: {json.dumps(task.output)}")

    print("4. the operator replays the agent: a new history, new children")
    engine.replay(agent)
    task = engine.wait(agent, timeout=60)
    show(engine, agent)
    print(f"  agent {task.status} on attempt {task.attempts}: {json.dumps(task.output)}")


def cancelled(engine: Engine) -> None:
    print("5. the operator cancels a second agent while its slowest tool runs")
    question = "Where should we picnic in Glasgow?"
    agent = engine.enqueue("research", {"question": question})
    wait_for(lambda: statuses(engine, agent)[-1:] == ["running"])
    # The reviews take 1.5 seconds: cancelled long before. (A tool reads its context's
    # cancellation at its next heartbeat; read_reviews sleeps with ctx.sleep(), which wakes up.)
    engine.cancel(agent)
    task = engine.wait(agent, timeout=60)
    wait_for(lambda: "running" not in statuses(engine, agent))
    print(f"  agent {task.status}")
    show(engine, agent)


def show(engine: Engine, agent: int) -> None:
    """The agent's status, and its children's."""
    task = engine.get(agent)
    assert task is not None
    children = ", ".join(f"{child.name} {child.status}" for child in engine.children(agent))
    print(f"  task {agent} research: {task.status}; children: {children or 'none yet'}")


def statuses(engine: Engine, agent: int) -> list[str]:
    """The statuses of the agent's children, in spawn order."""
    return [str(child.status) for child in engine.children(agent)]


# region: effects
def side_effects(engine: Engine, agent: int, workers: Workers) -> None:
    """What the tools did (the effects table), next to the children the logs recorded."""
    print("7. the side effects, as the tools wrote them (table effects, outside the logs)")
    children = {child.id: child for child in engine.children(agent)}
    with engine.pool.connection() as conn:
        effects = conn.execute("SELECT task_id, step, pid FROM effects ORDER BY at").fetchall()
    for task_id, step, pid in effects:
        if task_id == agent:
            print(f"  agent {step} by {workers.names[pid]}")
        elif task_id in children:
            print(f"  task {task_id} {step} by {workers.names[pid]}")
    ran = Counter(task_id for task_id, step, _ in effects if task_id in children)
    once = all(ran[child] == 1 for child in children)
    print(
        f"  {len(children)} children spawned by 2 histories, {sum(ran.values())} tool runs: "
        + ("each child ran once" if once else "MISMATCH")
    )


# endregion


def status(engine: Engine, task_id: int) -> TaskStatus:
    task = engine.get(task_id)
    assert task is not None, f"task {task_id} has disappeared"
    return task.status


def wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the demo is stuck; is the database overloaded?")
        time.sleep(0.02)


if __name__ == "__main__":
    main()
