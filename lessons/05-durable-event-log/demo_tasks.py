"""The task functions of the demo, in a module of their own so that a worker PROCESS can import
them: `python worker.py --tasks demo_tasks` calls `register(engine)`, as main.py does.

One durable function, `place_order`, in six steps. Each step does its work in "the outside
world", here the `effects` table, which is not part of the engine: the event log
(task_events) says what the engine recorded, `effects` what really happened. Comparing the two
is how the demo and the tests prove that a recorded step never runs again.
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

PRICES = {"book": 12, "lamp": 30, "mug": 8}

_effects: ConnectionPool | None = None  # where side effects are written; set by register()


def side_effect(step: str, detail: str) -> None:
    """Change the world: one row in `effects`, saying which task did what, from which process."""
    assert _effects is not None, "call register(engine) first"
    with _effects.connection() as conn:
        conn.execute(
            "INSERT INTO effects (task_id, step, detail, pid) VALUES (%s, %s, %s, %s)",
            (current_task().task_id, step, detail, os.getpid()),
        )


# The steps: plain functions. Each returns JSON, which the log stores and a retry gets back.
def reserve(item: str) -> dict:
    side_effect("reserve", item)
    return {"item": item, "price": PRICES[item]}


def charge(order: str, amount: int, fails: int, seconds: float) -> dict:
    """The payment service: slow (`seconds`), and down for the first `fails` attempts."""
    task = current_task()
    if task.attempt <= fails:
        raise ConnectionError(f"payment service unavailable (attempt {task.attempt})")
    task.sleep(seconds)  # waiting for the bank; raises if this attempt is stopped meanwhile
    side_effect("charge", f"{amount} for {order}")
    return {"payment": f"pay-{order}", "amount": amount}


def ship(order: str, items: list[str]) -> dict:
    side_effect("ship", ", ".join(items))
    return {"tracking": f"track-{order}"}


def send_email(order: str, tracking: str) -> str:
    side_effect("email", tracking)
    return f"confirmation for {order} sent"


# region: place_order
def place_order(input: dict) -> dict:
    """Reserve each item, charge the total, ship, email: six steps for three items."""
    ctx = current_durable_task()  # a DurableContext (durable.py): the task's attempt, and its log
    # The same step name once per item: steps are told apart by position, not by name.
    reserved = [ctx.step("reserve", reserve, item) for item in input["items"]]
    # Code between steps runs on every attempt; it only uses the input and step results.
    total = sum(line["price"] for line in reserved)
    payment = ctx.step(
        "charge", charge, input["order"], total,
        input.get("charge_fails", 0), input.get("payment_seconds", 0),
    )  # fmt: skip
    shipment = ctx.step("ship", ship, input["order"], [line["item"] for line in reserved])
    ctx.step("email", send_email, input["order"], shipment["tracking"])
    return {"order": input["order"], **payment, **shipment}


# endregion


def register(engine: Engine) -> None:
    """Register the demo's task on `engine`, and write its side effects through engine's pool."""
    global _effects
    _effects = engine.pool
    engine.task("place_order", max_attempts=5, backoff=0.3)(place_order)
