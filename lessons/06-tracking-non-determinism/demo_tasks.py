"""The task functions of the demo, in a module of their own so that a worker PROCESS can import
them: `python worker.py --tasks demo_tasks` calls `register(engine)`, as main.py does.

Three versions of one durable function, `place_order`, side by side so that you can compare
them: each is a deploy. A worker runs the version that PLACE_ORDER_VERSION names (1, 2 or 3;
by default the latest), the way a server runs the build it was deployed with:

    PLACE_ORDER_VERSION=1 python worker.py --name old-worker

And `issue_coupon`, which reads the clock, a random number and a fresh id through the context.

Each step does its work in "the outside world", here the `effects` table, which is not part of
the engine: the event log (task_events) says what the engine recorded, `effects` what really
happened.
"""

from __future__ import annotations

import datetime
import json
import os
import random
import uuid

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
LATEST = 3

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


def charge(order: str, amount: int, seconds: float) -> dict:
    """The payment service: it takes `seconds` (a slow bank, in the demo)."""
    current_task().sleep(seconds)  # raises if this attempt is stopped meanwhile
    side_effect("charge", f"{amount} for {order}")
    return {"payment": f"pay-{order}", "amount": amount}


def ship(order: str, items: list[str], seconds: float) -> dict:
    current_task().sleep(seconds)
    side_effect("ship", ", ".join(items))
    return {"tracking": f"track-{order}"}


def send_email(order: str, tracking: str) -> str:
    side_effect("email", tracking)
    return f"confirmation for {order} sent"


def check_fraud(order: str, amount: int) -> str:
    side_effect("fraud_check", f"{amount} for {order}")
    return "passed"


def slow(input: dict, step: str) -> float:
    """Seconds that `step` takes: `{"slow": {"charge": 1}}` makes the charge take a second."""
    return input.get("slow", {}).get(step, 0)


# region: versions
def place_order_v1(input: dict) -> dict:
    """Version 1 (lesson 05's): reserve each item, charge the total, ship, email."""
    ctx = current_durable_task()
    reserved = [ctx.step("reserve", reserve, item) for item in input["items"]]
    total = sum(line["price"] for line in reserved)
    payment = ctx.step("charge", charge, input["order"], total, slow(input, "charge"))
    shipment = ctx.step("ship", ship, input["order"], input["items"], slow(input, "ship"))
    ctx.step("email", send_email, input["order"], shipment["tracking"])
    return {"order": input["order"], **payment, **shipment}


def place_order_v2(input: dict) -> dict:
    """Version 2: charge first, then reserve, so that a declined card never holds stock."""
    ctx = current_durable_task()
    total = sum(PRICES[item] for item in input["items"])
    # hash_input: a replay that would charge another amount diverges instead.
    payment = ctx.step(
        "charge", charge, input["order"], total, slow(input, "charge"), hash_input=True
    )
    for item in input["items"]:
        ctx.step("reserve", reserve, item)
    shipment = ctx.step("ship", ship, input["order"], input["items"], slow(input, "ship"))
    ctx.step("email", send_email, input["order"], shipment["tracking"])
    return {"order": input["order"], **payment, **shipment}


def place_order_v3(input: dict) -> dict:
    """Version 3: version 2 with a fraud check before the charge, behind a patch."""
    ctx = current_durable_task()
    total = sum(PRICES[item] for item in input["items"])
    # New tasks check; a task whose history version 2 recorded past this point does not.
    fraud = "skipped (started before version 3)"
    if ctx.patched("fraud-check"):
        fraud = ctx.step("fraud_check", check_fraud, input["order"], total)
    payment = ctx.step(
        "charge", charge, input["order"], total, slow(input, "charge"), hash_input=True
    )
    for item in input["items"]:
        ctx.step("reserve", reserve, item)
    shipment = ctx.step("ship", ship, input["order"], input["items"], slow(input, "ship"))
    ctx.step("email", send_email, input["order"], shipment["tracking"])
    return {"order": input["order"], "fraud_check": fraud, **payment, **shipment}


# endregion

VERSIONS = {1: place_order_v1, 2: place_order_v2, 3: place_order_v3}


# region: coupon
def issue_coupon(input: dict) -> dict:
    """A coupon: a fresh code, a random discount, valid for 30 days from now. Then mail it."""
    ctx = current_durable_task()
    # Recorded: every attempt of this task gets the values that the first one drew.
    code, discount = ctx.uuid4(), 5 + int(ctx.random() * 16)
    expires = ctx.now() + datetime.timedelta(days=30)
    # Read directly (what NOT to do): every attempt draws new ones. Only kept to compare.
    naive = {"code": str(uuid.uuid4()), "discount": 5 + int(random.random() * 16),
             "now": datetime.datetime.now(datetime.UTC).isoformat()}  # fmt: skip
    coupon = {"code": str(code), "discount": discount, "expires": expires.isoformat()}
    # What this attempt computed, for the demo to compare (outside a step: on every attempt).
    side_effect("computed", json.dumps({"recorded": coupon, "naive": naive}))
    ctx.step("mail", mail_coupon, input["customer"], coupon)
    if ctx.attempt == 1 and input.get("crash"):
        raise ConnectionError("the worker lost its network after mailing the coupon")
    return coupon


def mail_coupon(customer: str, coupon: dict) -> str:
    side_effect("mail", f"{coupon['code']} to {customer}")
    return f"coupon {coupon['code']} mailed to {customer}"


# endregion


def register(engine: Engine, version: int | str | None = None) -> None:
    """Register the demo's tasks on `engine`: place_order in `version` (by default
    PLACE_ORDER_VERSION, or the latest), and issue_coupon. Side effects go through engine's pool.
    """
    global _effects
    _effects = engine.pool
    if version is None:
        version = os.environ.get("PLACE_ORDER_VERSION", str(LATEST))
    if str(version) not in map(str, VERSIONS):
        raise SystemExit(f"PLACE_ORDER_VERSION must be 1, 2 or 3, not {version!r}")
    engine.task("place_order", max_attempts=5, backoff=0.3)(VERSIONS[int(version)])
    engine.task("issue_coupon", max_attempts=3, backoff=0.3)(issue_coupon)
