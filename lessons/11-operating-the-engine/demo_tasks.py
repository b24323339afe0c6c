"""The task functions of the demo, in a module of their own so that a worker PROCESS can import
them: `python worker.py --tasks demo_tasks` calls `register(engine)`, as main.py does.

An "AI agent" as a durable task: `research` asks a (fake) language model for a plan, calls the
tools the plan names, in parallel, as child tasks, then has the model summarise what they
returned. The tools are regular tasks: plain functions, each with its own retries. Nothing here
talks to a network: the model and the tools are deterministic stand-ins, so that a run and its
replay can be compared. `read_reviews` is slow (a second and a half), so there is time to kill
its worker in the middle of it.

Each tool does its work in "the outside world", here the `effects` table, which is not part of
the engine: the logs say what the engine recorded, `effects` what really happened.
"""

from __future__ import annotations

import os

from durable import current_durable_task
from engine import Engine
from psycopg_pool import ConnectionPool
from task_context import current_task

# Created by main.py (and the tests) next to the engine's tables; workers only insert.
EFFECTS_TABLE = """
CREATE TABLE effects (
    task_id bigint  NOT NULL,
    step    text    NOT NULL,
    detail  text    NOT NULL,
    pid     integer NOT NULL,
    at      timestamptz NOT NULL DEFAULT clock_timestamp()
)
"""

_effects: ConnectionPool | None = None  # where side effects are written; set by register()


def side_effect(step: str, detail: str) -> None:
    """Change the world: one row in `effects`, saying which task did what, from which process."""
    assert _effects is not None, "call register(engine) first"
    with _effects.connection() as conn:
        conn.execute(
            "INSERT INTO effects (task_id, step, detail, pid) VALUES (%s, %s, %s, %s)",
            (current_task().task_id, step, detail, os.getpid()),
        )


# The model: deterministic stand-ins for two calls to a language model.
def plan(question: str, review_seconds: float) -> list[dict]:
    """Which tools to call, with which arguments."""
    side_effect("plan", question)
    city = question.rsplit(" in ", 1)[-1].rstrip("?")
    return [
        {"tool": "weather", "args": {"city": city}},
        {"tool": "find_parks", "args": {"city": city}},
        {"tool": "read_reviews", "args": {"city": city, "seconds": review_seconds}},
    ]


def summarise(question: str, findings: list[dict], outages: int) -> str:
    """Down for its first `outages` calls (counted in `effects`, so across attempts)."""
    assert _effects is not None, "call register(engine) first"
    with _effects.connection() as conn:
        [(failed,)] = conn.execute(
            "SELECT count(*) FROM effects WHERE task_id = %s AND step = 'model down'",
            (current_task().task_id,),
        ).fetchall()
    if failed < outages:
        side_effect("model down", question)
        raise ConnectionError("the language model is unavailable")
    side_effect("summarise", question)
    best = max(findings[1]["parks"], key=lambda park: findings[2]["stars"][park])
    return f"{findings[0]['forecast']} in {findings[0]['city']}: go to {best}"


# The tools: regular tasks. Each takes its input (a JSON value) and returns JSON.
def weather(input: dict) -> dict:
    side_effect("weather", input["city"])
    return {"city": input["city"], "forecast": "sunny, 21 C"}


def find_parks(input: dict) -> dict:
    side_effect("find_parks", input["city"])
    return {"parks": ["Holyrood Park", "The Meadows"]}


def read_reviews(input: dict) -> dict:
    """Slow, like a tool that pages through a website: time enough to kill its worker."""
    current_task().sleep(input.get("seconds", 0))  # raises if its attempt is stopped meanwhile
    side_effect("read_reviews", input["city"])
    return {"stars": {"Holyrood Park": 4.7, "The Meadows": 4.5}}


# region: research
def research(input: dict) -> str:
    """The agent: plan, call the tools in parallel as child tasks, summarise."""
    ctx = current_durable_task()  # a DurableContext (durable.py): the agent's log
    calls = ctx.step("plan", plan, input["question"], input.get("review_seconds", 1.5))
    # One child per tool call, all started before waiting for any: they run in parallel, on
    # any workers with free slots, each with its own retries.
    children = [ctx.spawn(call["tool"], call["args"]) for call in calls]
    # Suspends (frees this worker's slot) until the last of them has finished; then appends
    # their outputs to the log, in this order, and returns them.
    findings = ctx.wait_all(children)
    return ctx.step("summarise", summarise, input["question"], findings, input.get("outages", 0))


# endregion


def register(engine: Engine) -> None:
    """Register the demo's tasks on `engine`, and write side effects through engine's pool."""
    global _effects
    _effects = engine.pool
    engine.durable_task("research", max_attempts=3, backoff=0.2)(research)
    for tool in (weather, find_parks, read_reviews):
        engine.task(tool.__name__, max_attempts=3, backoff=0.2)(tool)
