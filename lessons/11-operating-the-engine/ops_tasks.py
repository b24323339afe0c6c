"""The tasks of lesson 11's demo, in a module of their own so that worker and API processes can
load them: `python worker.py --tasks ops_tasks`, `python api.py --tasks ops_tasks`.

- `checkout`, a durable task in Python, written with `@engine.step`: charging the card and
  shipping the parcel are plain calls, and each is recorded as a step. `ship` is `async def`,
  and so is the task. The bank declines the cards in DECLINED: that order fails, until the bank
  is "fixed" and an operator retries it.
- `greet`, declared only (engine.declare_task): its function is not here but in a shell script,
  http_worker.sh, which runs it through the HTTP API.

What the steps do to the world is appended to EFFECTS: main.py prints it, to show that each
happened once.
"""

from __future__ import annotations

import asyncio

from engine import Engine

DECLINED = {"4000-0002"}  # cards the (fake) bank declines
EFFECTS: list[str] = []  # what happened in the world, in order


class CardDeclined(Exception):
    pass


def register(engine: Engine) -> None:
    @engine.step
    def charge(card: str, amount: float) -> str:
        if card in DECLINED:
            raise CardDeclined(f"the bank declined card {card}")
        EFFECTS.append(f"charged {amount:.2f} to card {card}")
        return f"payment of {amount:.2f}"

    @engine.step
    async def ship(order: str) -> str:
        await asyncio.sleep(0.01)  # the carrier's API, awaited
        EFFECTS.append(f"shipped order {order}")
        return f"parcel {order}"

    # region: checkout
    @engine.durable_task("checkout", max_attempts=1)
    async def checkout(order: dict) -> dict:
        # Two plain calls, and two steps in the log: a retry of this task replays a charge
        # that was recorded, and never charges the card twice.
        payment = charge(order["card"], order["total"])
        parcel = await ship(order["id"])
        return {"payment": payment, "parcel": parcel}

    # endregion

    # A task whose worker is http_worker.sh: the engine needs its name and options, not its code.
    engine.declare_task("greet", durable=True, max_attempts=3, backoff=0.2)
