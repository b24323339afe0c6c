"""The order of main.py, in a module of its own so that worker processes and check_histories.py
can import it: `python worker.py --tasks shop_tasks`, `python check_histories.py --tasks
shop_tasks` call `register(engine)`.

An order in five steps. Step 4, "apply discount", has a bug: it keeps 10% of the price where
it should take 10% off. Step 5 sends the invoice with whatever step 4 returned. main.py plays
the deploys by changing the two settings below: the fix (DISCOUNT_BUG = False), and a rename
of step 2 that the histories on record would not survive (PRICE_STEP).

The side effects (stock reserved, a courier booked, an invoice sent) are rows in
`shop_effects`, outside the engine: that table says what really happened, and how many times.
"""

from __future__ import annotations

from durable import current_durable_task
from engine import Engine
from psycopg_pool import ConnectionPool

DISCOUNT_BUG = True  # the code as first deployed
PRICE_STEP = "price order"  # the name of step 2 in the histories on record

EFFECTS_TABLE = """
CREATE TABLE shop_effects (
    task_id bigint  NOT NULL,
    effect  text    NOT NULL,
    at      timestamptz NOT NULL DEFAULT clock_timestamp()
)
"""

_effects: ConnectionPool | None = None  # set by register()


def side_effect(effect: str) -> None:
    assert _effects is not None, "call register(engine) first"
    with _effects.connection() as conn:
        conn.execute(
            "INSERT INTO shop_effects (task_id, effect) VALUES (%s, %s)",
            (current_durable_task().task_id, effect),
        )


def reserve_stock(item: str, quantity: int) -> str:
    side_effect(f"reserved {quantity} x {item}")
    return f"{quantity} x {item}"


def price(quantity: int, unit_price: float) -> float:
    return round(quantity * unit_price, 2)


def book_courier(address: str) -> str:
    side_effect(f"booked a courier to {address}")
    return "courier 42"


def apply_discount(subtotal: float, percent: int) -> float:
    if DISCOUNT_BUG:
        return round(subtotal * percent / 100, 2)  # the bug: keeps 10%, instead of taking it off
    return round(subtotal * (100 - percent) / 100, 2)


def send_invoice(email: str, total: float) -> str:
    side_effect(f"invoice for {total:.2f} sent to {email}")
    return f"invoiced {total:.2f}"


# region: order
def order(input: dict) -> str:
    ctx = current_durable_task()
    ctx.step("reserve stock", reserve_stock, input["item"], input["quantity"])
    subtotal = ctx.step(PRICE_STEP, price, input["quantity"], input["unit_price"])
    ctx.step("book courier", book_courier, input["address"])
    total = ctx.step("apply discount", apply_discount, subtotal, input["discount"])
    return ctx.step("send invoice", send_invoice, input["email"], total)


# endregion


def register(engine: Engine) -> None:
    global _effects
    _effects = engine.pool
    engine.durable_task("order", max_attempts=1)(order)
