"""How fast is DBOS? Queue pickup latency and durable steps, measured as bench.py measures ours.

Run by bench_peers.py with the peers' own Python (`.venv-peers`, `make bench-peers` builds it),
one measurement per run; or by hand, on a database of its own:

    ../../.venv-peers/bin/python peers/dbos_bench.py URL latency --samples 15
    ../../.venv-peers/bin/python peers/dbos_bench.py URL steps --workflows 200

URL is a libpq connection string; DBOS keeps its system tables there (its `dbos` schema,
created by the first launch). Each run launches DBOS in this process, which is both the client
and the executor, and prints one line of JSON:

- latency: a workflow of one no-op step, enqueued on a queue with DBOS's default polling
  interval (1 s) at a random moment of that interval, again and again: p50 and p99
  milliseconds from the call to `DBOS.enqueue_workflow()` to the start of the workflow's
  function (`time.perf_counter()`, in this one process);
- steps: a workflow of ten no-op steps, called directly (not queued); each step checkpoints its
  output in the system database. The median time per step over the workflows (the function's
  own `time.perf_counter()`, around its ten steps).

Only DBOS's public API is used (docs.dbos.dev: workflows, steps, queues).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

# DBOS (and SQLAlchemy, which it brings) is installed in .venv-peers only: the project's mypy,
# which checks this file too, cannot see it, and types everything from it as Any.
from dbos import DBOS  # type: ignore[import-not-found]
from psycopg.conninfo import conninfo_to_dict
from sqlalchemy.engine import URL  # type: ignore[import-not-found]

QUEUE = "bench"
POLLING_INTERVAL = 1.0  # seconds: DBOS's default for a queue, stated here to sample around it


@DBOS.step()
def noop_step() -> None:
    return None


@DBOS.workflow()
def one_step() -> float:
    """Returns the moment it started, for the caller to subtract the moment it enqueued."""
    started = time.perf_counter()
    noop_step()
    return started


@DBOS.workflow()
def ten_steps() -> float:
    """Returns seconds per step."""
    started = time.perf_counter()
    for _ in range(10):
        noop_step()
    return (time.perf_counter() - started) / 10


def sqlalchemy_url(libpq_url: str) -> str:
    """DBOS wants a SQLAlchemy URL; the driver speaks libpq's (a Unix socket is a `host`)."""
    params = conninfo_to_dict(libpq_url)
    url = URL.create(
        "postgresql",
        username=params.get("user"),
        password=params.get("password"),
        database=params.get("dbname"),
        # In the query string, not in the URL's host part: the host may be a socket directory.
        query={key: str(params[key]) for key in ("host", "port") if key in params},
    )
    return str(url.render_as_string(hide_password=False))


def latency(samples: int) -> dict[str, object]:
    DBOS.register_queue(QUEUE, polling_interval_sec=POLLING_INTERVAL)
    # The first workflow waits for the queue's first poll, just registered: not a sample.
    DBOS.enqueue_workflow(QUEUE, one_step).get_result()
    latencies = []
    for _ in range(samples):
        time.sleep(random.uniform(0, 2 * POLLING_INTERVAL))  # a random point of the poll cycle
        enqueued = time.perf_counter()
        started = DBOS.enqueue_workflow(QUEUE, one_step).get_result()
        latencies.append((started - enqueued) * 1000)
    quantiles = statistics.quantiles(latencies, n=100, method="inclusive")  # as bench.py
    return {"samples": samples, "p50_ms": quantiles[49], "p99_ms": quantiles[98]}


def steps(workflows: int) -> dict[str, object]:
    per_step = [ten_steps() for _ in range(workflows)]
    return {"workflows": workflows, "step_ms": statistics.median(per_step) * 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", help="libpq connection string of the database to use")
    measures = parser.add_subparsers(dest="measure", required=True)
    pickup = measures.add_parser("latency", help="enqueue to start of a queued workflow")
    pickup.add_argument("--samples", type=int, default=15)
    durable = measures.add_parser("steps", help="time per durable step")
    durable.add_argument("--workflows", type=int, default=200)
    args = parser.parse_args()
    config = {
        "name": "bench-peers",
        "system_database_url": sqlalchemy_url(args.url),
        "log_level": "WARNING",  # DBOS's INFO lines (launch, shutdown) are not results
    }
    DBOS(config=config)
    DBOS.launch()
    try:
        result = latency(args.samples) if args.measure == "latency" else steps(args.workflows)
    finally:
        DBOS.destroy()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
