"""Lesson 10: branching and forking. A bug fixed, and the task re-run from the step before it.

Run it (after `source .venv/bin/activate` at the repository root):

    cd lessons/10-branching-and-forking && python main.py
    # or, from the repository root: python lessons/10-branching-and-forking/main.py

You will see, in a few seconds, an order (shop_tasks.py) go through its five steps: reserve the
stock, price the order, book a courier, apply the discount, send the invoice. Step 4 has a bug:
the invoice says 8.00 where it should say 72.00. Then:

1. the fix is deployed (shop_tasks.DISCOUNT_BUG = False), and check_histories says the new
   code still matches the order's history: the fix changed a step's result, not the calls;
2. the order is forked before "apply discount": a new task with a copy of events 1-3. The
   stock is not reserved twice, the courier not booked twice: those steps replay. Steps 4
   and 5 run, with the fix, and a corrected invoice goes out. The two histories, side by side;
3. a change that would break the histories on record (step 2 renamed): check_histories says
   where each task would diverge, and exits with status 1, as a deploy pipeline wants it to.
"""

import threading
from pathlib import Path

import shop_tasks
from check_histories import check
from engine import Engine
from hardway.postgres import describe, lesson_database
from inspect_task import diff
from worker import Worker

LESSON_DIR = Path(__file__).resolve().parent
ORDER = {
    "item": "kettle", "quantity": 2, "unit_price": 40.0, "discount": 10,
    "address": "1 Main St", "email": "ana@example.com",
}  # fmt: skip


def main() -> None:
    # A fresh `lesson_10` database, loaded from sql/schema.sql: every run starts clean.
    url = lesson_database(LESSON_DIR)
    print(describe(url))
    with Engine(url) as engine:
        with engine.pool.connection() as conn:
            conn.execute(shop_tasks.EFFECTS_TABLE)
        shop_tasks.register(engine)
        stop = threading.Event()
        worker = Worker(engine, "worker", slots=2)
        thread = threading.Thread(target=worker.run, args=(stop,))
        thread.start()
        try:
            demo(engine)
        finally:
            stop.set()
            thread.join()


def demo(engine: Engine) -> None:
    print("the order, with the code as first deployed:")
    original = engine.enqueue("order", ORDER)
    done = engine.wait(original)
    print(f"  task {original} {done.status}: {done.output!r} (it should have been 72.00)")
    effects(engine)

    print("1. the fix deployed; its check against the order's history:")
    shop_tasks.DISCOUNT_BUG = False
    print(f"  {check(engine, done)}")

    # region: fork
    print('2. fork the order before "apply discount": events 1-3 copied, 4 and 5 run again')
    fork = engine.fork(original, before="apply discount")
    done = engine.wait(fork)
    print(f"  task {fork} {done.status}: {done.output!r}")
    effects(engine)
    print(diff(engine, original, fork))
    # endregion

    print("3. a change the histories on record would not survive: step 2 renamed")
    shop_tasks.PRICE_STEP = "compute price"
    verdicts = [check(engine, engine.wait(task_id)) for task_id in (original, fork)]
    for verdict in verdicts:
        print(f"  {verdict}")
    failing = [verdict for verdict in verdicts if not verdict.matches]
    print(f"  check_histories.py would exit with status {1 if failing else 0}: do not deploy")


def effects(engine: Engine) -> None:
    """What really happened, from the shop_effects table: each effect, and how many times."""
    with engine.pool.connection() as conn:
        rows = conn.execute(
            "SELECT effect, count(*) FROM shop_effects GROUP BY effect ORDER BY min(at)"
        ).fetchall()
    print("  side effects so far: " + "; ".join(f"{effect} ({n}x)" for effect, n in rows))


if __name__ == "__main__":
    main()
