"""The expense claim of main.py, in a module of its own so that a worker PROCESS can import it:
`python worker.py --tasks expense_tasks` calls `register(engine)`.

A durable task asks a person to approve a claim, and waits for the answer, the event
`approved:<claim>`, for as long as it takes: hours, a weekend. Each time the wait times out it
sends a reminder, and waits again. While it waits it is a row in `tasks` with a time (its next
reminder), on no worker: kill every worker, and the claim is still waiting, with its reminders
and its answer in its log.

The side effects (the emails a real system would send, the payment) are rows in
`expense_effects`, outside the engine, with the process that made them: that table says what
really happened, and how many times.
"""

from __future__ import annotations

import os

from durable import EventTimeout, current_durable_task
from engine import Engine
from psycopg_pool import ConnectionPool

# Created by main.py next to the engine's tables; workers only insert.
EFFECTS_TABLE = """
CREATE TABLE expense_effects (
    claim  integer NOT NULL,
    effect text    NOT NULL,
    pid    integer NOT NULL,
    at     timestamptz NOT NULL DEFAULT clock_timestamp()
)
"""

_effects: ConnectionPool | None = None  # set by register()


def side_effect(claim: dict, effect: str) -> None:
    """Change the world: one row in expense_effects, saying what was done, by which process."""
    assert _effects is not None, "call register(engine) first"
    with _effects.connection() as conn:
        conn.execute(
            "INSERT INTO expense_effects (claim, effect, pid) VALUES (%s, %s, %s)",
            (claim["claim"], effect, os.getpid()),
        )


# region: expense
def expense(claim: dict) -> str:
    ctx = current_durable_task()
    ctx.step("ask", side_effect, claim, f"asked {claim['approver']} to approve")
    reminders = 0
    while True:
        try:
            # Suspends: no slot, no lease, no connection, until the event or the timeout.
            answer = ctx.wait_for_event(f"approved:{claim['claim']}", timeout=claim["remind"])
            break
        except EventTimeout:  # recorded: a replay takes the same path, without waiting
            reminders += 1
            ctx.step("remind", side_effect, claim, f"reminder {reminders}")
    if not answer["approved"]:
        ctx.step("reject", side_effect, claim, f"rejected by {answer['by']}")
        return "rejected"
    # A durable sleep: the payment goes out after a cooling-off period (a day, in real life).
    ctx.sleep_for("cooling-off", claim["cooling_off"])
    ctx.step("pay", side_effect, claim, f"paid {claim['amount']:.2f} to {claim['employee']}")
    return f"approved by {answer['by']}, paid after {reminders} reminders"


# endregion


def register(engine: Engine) -> None:
    """Register the expense claim on `engine`, and write side effects through engine's pool."""
    global _effects
    _effects = engine.pool
    engine.durable_task("expense", max_attempts=3, backoff=0.2)(expense)
