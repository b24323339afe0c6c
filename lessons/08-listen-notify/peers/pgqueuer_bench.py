"""How fast is pgqueuer? Burn-down and pickup latency, measured as bench.py measures ours.

Run by bench_peers.py with the peers' own Python (`.venv-peers`, `make bench-peers` builds it),
one measurement per run; or by hand, on a database of its own:

    ../../.venv-peers/bin/python peers/pgqueuer_bench.py URL burn-down --jobs 20000 \\
        --consumers 2 --batch-size 100
    ../../.venv-peers/bin/python peers/pgqueuer_bench.py URL latency --samples 40

URL is a libpq connection string. The first run installs pgqueuer's tables there, as
`Queries.install()` does by default (all of them logged, as ours are); every run empties them
first. It prints one line of JSON:

- burn-down: N no-op jobs, all enqueued before any consumer runs, drained by C consumer
  PROCESSES (`QueueManager.run(batch_size=B, mode=drain)`): a dequeue takes up to B jobs, the
  role of our slots (pgqueuer dequeues again without waiting for them to finish: its
  `max_concurrent_tasks` is left unlimited, its default). Jobs per second on the database
  clock, from the first pick to the last completion (the `created` times of pgqueuer's own log
  rows, `picked` and `successful`);
- latency: an idle consumer, woken by pgqueuer's NOTIFY, and one job enqueued at a random
  moment (at most `--max-gap` seconds after the previous one started), again and again: p50 and
  p99 milliseconds from the call to `enqueue()` to the start of the job's function
  (`time.perf_counter()`: the producer and the consumer share a process).

Reading pgqueuer's numbers: its psycopg driver waits for notifications on the connection its
queries use, `notifies(timeout=1.0)` in a loop, and holds that connection while it waits: a
query must wait for a notification, or for the timeout. A notification ends one wait, but the
next one begins before the dequeue that the notification asked for can take the connection;
that dequeue waits for the timeout. Hence a pause of about a second after a consumer's first
dequeue, in every burn-down round; and pickups that take either a few milliseconds (a query of
the consumer's, already waiting, gets through and finds the job) or about a second (rarely
two), depending on when the job comes. A consumer idle for seconds takes a second; so do most
jobs 0.1 s apart, and few that are half a second apart.

Only pgqueuer's public API drives the queue (PgQueuer's README and docs); psycopg connects.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import random
import statistics
import time
from multiprocessing.synchronize import Barrier

import psycopg

# pgqueuer is installed in .venv-peers only: the project's mypy, which checks this file too,
# cannot see it, and types everything from it as Any.
from pgqueuer import Job, PsycopgDriver, Queries, QueueManager  # type: ignore[import-not-found]
from pgqueuer.types import QueueExecutionMode  # type: ignore[import-not-found]

ENTRYPOINT = "noop"


async def connect(url: str) -> psycopg.AsyncConnection:
    # pgqueuer's psycopg driver wants autocommit: it commits every statement itself.
    return await psycopg.AsyncConnection.connect(url, autocommit=True)


async def fresh(url: str) -> None:
    """pgqueuer's tables, installed if need be, and empty: every run starts alike."""
    async with await connect(url) as conn:
        queries = Queries(PsycopgDriver(conn))
        if not await queries.schema_is_installed():
            await queries.install()
        await queries.clear_queue()
        await queries.clear_queue_log()
        await queries.clear_statistics_log()


async def enqueue_noops(url: str, n: int) -> None:
    async with await connect(url) as conn:
        queries = Queries(PsycopgDriver(conn))
        for first in range(0, n, 5000):  # in batches of 5,000, as bench.py enqueues ours
            size = min(n, first + 5000) - first
            await queries.enqueue([ENTRYPOINT] * size, [None] * size, [0] * size)
        # The planner statistics of a queue in use, as bench.py gives our tables.
        await conn.execute("ANALYZE")


async def drain(url: str, batch_size: int, start: Barrier) -> None:
    async with await connect(url) as conn:
        qm = QueueManager(Queries(PsycopgDriver(conn)))

        @qm.entrypoint(ENTRYPOINT)
        async def noop(job: Job) -> None:
            return None

        # Connected and ready: start with the other consumers, so that none of them has the
        # queue to itself while the others are still starting up.
        start.wait()
        await qm.run(batch_size=batch_size, mode=QueueExecutionMode.drain)


def consumer(url: str, batch_size: int, start: Barrier) -> None:
    """One consumer process: runs until the queue is empty and its jobs are done."""
    asyncio.run(drain(url, batch_size, start))


async def rate_on_database_clock(url: str, n: int) -> float:
    """Jobs/s from the first pick to the last completion, from pgqueuer's log."""
    async with await connect(url) as conn:
        log = await Queries(PsycopgDriver(conn)).queue_log()
    picked = [entry.created for entry in log if entry.status == "picked"]
    completed = [entry.created for entry in log if entry.status == "successful"]
    if len(completed) != n:
        raise RuntimeError(f"{len(completed)} jobs completed, out of {n}")
    return n / (max(completed) - min(picked)).total_seconds()


def burn_down(url: str, n: int, consumers: int, batch_size: int) -> dict[str, object]:
    asyncio.run(fresh(url))
    asyncio.run(enqueue_noops(url, n))
    # Processes of their own, as our workers are: each consumer is one event loop.
    spawn = multiprocessing.get_context("spawn")
    start = spawn.Barrier(consumers, timeout=60)  # a consumer that fails to start breaks it
    processes = [
        spawn.Process(target=consumer, args=(url, batch_size, start)) for _ in range(consumers)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join()
        if process.exitcode != 0:
            raise RuntimeError(f"a consumer exited with status {process.exitcode}")
    rate = asyncio.run(rate_on_database_clock(url, n))
    return {"jobs": n, "consumers": consumers, "batch_size": batch_size, "jobs_per_s": rate}


async def pickup_latencies(url: str, samples: int, max_gap: float) -> list[float]:
    """Milliseconds from enqueue() to the job's start, one job at a time, `samples` times."""
    start_times = asyncio.Queue[float]()
    async with await connect(url) as consumer_conn, await connect(url) as producer_conn:
        qm = QueueManager(Queries(PsycopgDriver(consumer_conn)))

        @qm.entrypoint(ENTRYPOINT)
        async def noop(job: Job) -> None:
            start_times.put_nowait(time.perf_counter())

        queries = Queries(PsycopgDriver(producer_conn))
        running = asyncio.create_task(qm.run())
        # The first job waits for the consumer to start up: not a sample.
        await queries.enqueue(ENTRYPOINT, None)
        await start_times.get()
        latencies = []
        for _ in range(samples):
            # Arrive at a random moment, the consumer idle on its LISTEN.
            await asyncio.sleep(random.uniform(0, max_gap))
            enqueued = time.perf_counter()
            await queries.enqueue(ENTRYPOINT, None)
            job_started = await start_times.get()
            latencies.append((job_started - enqueued) * 1000)
        qm.shutdown.set()
        await running
    return latencies


def latency(url: str, samples: int, max_gap: float) -> dict[str, object]:
    asyncio.run(fresh(url))
    latencies = asyncio.run(pickup_latencies(url, samples, max_gap))
    quantiles = statistics.quantiles(latencies, n=100, method="inclusive")  # as bench.py
    return {"samples": samples, "p50_ms": quantiles[49], "p99_ms": quantiles[98]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", help="libpq connection string of the database to use")
    measures = parser.add_subparsers(dest="measure", required=True)
    burn = measures.add_parser("burn-down", help="jobs/s draining a full queue")
    burn.add_argument("--jobs", type=int, default=20_000)
    burn.add_argument("--consumers", type=int, default=1, help="consumer processes")
    burn.add_argument("--batch-size", type=int, default=10, help="jobs per dequeue")
    pickup = measures.add_parser("latency", help="enqueue to start, idle consumer")
    pickup.add_argument("--samples", type=int, default=40)
    pickup.add_argument("--max-gap", type=float, default=0.1, help="seconds between jobs, at most")
    args = parser.parse_args()
    if args.measure == "burn-down":
        result = burn_down(args.url, args.jobs, args.consumers, args.batch_size)
    else:
        result = latency(args.url, args.samples, args.max_gap)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
