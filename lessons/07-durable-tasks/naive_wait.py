"""The failure before the fix: a parent that waits for its children while it holds its slot.

Run it (after `source .venv/bin/activate` at the repository root):

    cd lessons/07-durable-tasks && python naive_wait.py

The agent of demo_tasks.py (plan, call three tools, summarise), written as the lessons before
this one allow: a regular task that enqueues its tools as tasks of their own and then waits for
them, in its function, with engine.wait(). One worker with one slot runs everything. The agent
takes the slot; its tools are queued behind it, for that same slot: the agent waits for the
tools, the tools wait for the agent. Nothing moves until the agent's wait times out, after 2
seconds here; then the agent fails, and its tools run, for nobody. You will see the agent's
error, and the tools start only once it had given up. (main.py's agent suspends while it waits:
a worker with one slot runs it and its tools to the end.)
"""

import logging
import sys
from pathlib import Path

import demo_tasks
from demo_tasks import plan, summarise
from engine import Engine
from hardway.postgres import describe, lesson_database
from worker import Worker

LESSON_DIR = Path(__file__).resolve().parent
QUESTION = "Where should we picnic in Edinburgh?"
WAIT = 2  # seconds the agent waits for a tool before it gives up (engine.wait's timeout)


def main() -> None:
    url = lesson_database(LESSON_DIR)
    print(describe(url))
    # The worker's own log lines, if it has something to say, on stdout with the rest.
    logging.basicConfig(format="  %(message)s", stream=sys.stdout)
    logging.getLogger("worker").setLevel(logging.INFO)

    with Engine(url) as engine:
        with engine.pool.connection() as conn:
            conn.execute(demo_tasks.EFFECTS_TABLE)
        demo_tasks.register(engine)  # the tools, and the effects table they write to

        @engine.task("research_and_wait", max_attempts=1)
        def research_and_wait(input: dict) -> str:
            """demo_tasks.research as a regular task: no log, so no spawn, and no suspending."""
            calls = plan(input["question"], 0)
            tools = [engine.enqueue(call["tool"], call["args"]) for call in calls]
            print(f"  it enqueues its tools, tasks {', '.join(map(str, tools))}, and waits")
            # The wait is in the function: the attempt goes on, and so does its hold on the
            # worker's slot, while the tools it waits for are queued for a free slot.
            findings = [engine.wait(tool, timeout=WAIT).output for tool in tools]
            return summarise(input["question"], findings, 0)

        agent = engine.enqueue("research_and_wait", {"question": QUESTION})
        print(f"task {agent}: the agent, a regular task; one worker, with one slot, runs it")
        Worker(engine, name="worker-1", slots=1, poll_interval=0.05).run_until_idle()

        task = engine.wait(agent)
        print(f"task {agent} {task.status}: {task.error}")
        with engine.pool.connection() as conn:
            tools = conn.execute(
                "SELECT id, name, status, started_at > %s FROM tasks WHERE id <> %s ORDER BY id",
                (task.finished_at, agent),
            ).fetchall()
        for tool, name, status, after in tools:
            when = "after" if after else "BEFORE"
            print(f"task {tool} ({name}) {status}: it started {when} task {agent} had failed")
        print(
            f"deadlock until the timeout: task {agent} held the only slot for {WAIT} s,"
            " waiting for tools that needed that slot"
        )


if __name__ == "__main__":
    main()
