"""Metrics in Prometheus's format: what an operator graphs, and alerts on before a user calls.

Two kinds, as Prometheus intends:

- what a process sees happen, counted where it happens: claims and how long they take, how long
  tasks waited to be picked up, attempts by outcome, leases that ran out. Counters and
  histograms in the process's own registry (REGISTRY, below): each worker
  serves its own (`python worker.py --metrics-port 9101`), and the API serves the HTTP
  workers' (api.py, /metrics). Prometheus scrapes every process and adds them up.
- what the database holds, read when Prometheus scrapes (QueueCollector): tasks by name and
  status, the age of the oldest queued task, leases run out and not yet taken back. One
  process serves these (the API): every worker serving them would only repeat them.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Iterator

from db.models import Task
from engine import Engine
from outages import DatabaseUnavailableError
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

# From a millisecond (a notification's pickup, a claim on an idle database) to a minute (a
# backlog): the buckets where this engine's numbers fall (docs/performance.md).
LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

# This module's own registry, not prometheus_client's global one: the global one refuses a
# metric registered twice, and a process that imports two copies of this module (the tests,
# which load every lesson) would register each metric twice.
REGISTRY = CollectorRegistry()

CLAIM_SECONDS = Histogram(
    "hardway_claim_seconds",
    "How long one claim took (its transaction: chores, keys, the claim itself)",
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
PICKUP_SECONDS = Histogram(
    "hardway_pickup_seconds",
    "How long a task waited, once it could run (its run_at), for a worker to start it",
    ["task_name"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
ATTEMPTS = Counter(
    "hardway_attempts_total",
    "Attempts whose function has ended, by outcome: completed, failed or suspended",
    ["task_name", "outcome"],
    registry=REGISTRY,
)
RESULTS_DROPPED = Counter(
    "hardway_results_dropped_total",
    "Outcomes the database refused: the attempt had ended meanwhile (cancelled, timed out,"
    " or taken over by another worker after its lease ran out)",
    ["task_name"],
    registry=REGISTRY,
)
LEASES_EXPIRED = Counter(
    "hardway_leases_expired_total",
    "Attempts taken back because their lease ran out: their worker was presumed dead",
    ["task_name"],
    registry=REGISTRY,
)


def observe_claimed(tasks: list[Task], seconds: float) -> None:
    """A claim took `seconds` and started these tasks."""
    CLAIM_SECONDS.observe(seconds)
    for task in tasks:
        # Both times are the database's (started_at is now() at the claim), so no clock of
        # another machine enters. Only tasks that never suspended: a parent queued again by its
        # last child keeps the run_at it had before it waited, which says nothing of pickup.
        if task.suspensions == 0 and task.started_at is not None:
            waited = (task.started_at - task.run_at) / datetime.timedelta(seconds=1)
            PICKUP_SECONDS.labels(task.name).observe(max(0.0, waited))


class QueueCollector(Collector):
    """The queues as the database has them, read at every scrape (Engine.queue_stats: one query
    over the unfinished tasks and the last hour's finished ones)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up = GaugeMetricFamily(
            "hardway_database_up", "Whether the last scrape could read the queues (1) or not (0)"
        )
        try:
            stats = self.engine.queue_stats()
        except DatabaseUnavailableError as err:
            # A scrape must answer, or Prometheus shows a gap and no reason: this gauge says it.
            log.warning("metrics: %s", err)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        tasks = GaugeMetricFamily(
            "hardway_tasks",
            "Tasks that wait or run, by task name and status",
            labels=["task_name", "status"],
        )
        oldest = GaugeMetricFamily(
            "hardway_oldest_queued_seconds",
            "How long the oldest queued task has waited since it could run",
            labels=["task_name"],
        )
        expired = GaugeMetricFamily(
            "hardway_leases_expired",
            "Running tasks whose lease has run out, not yet taken back by a claim",
            labels=["task_name"],
        )
        for row in stats:
            for status in ("scheduled", "queued", "running", "suspended"):
                tasks.add_metric([row.name, status], getattr(row, status))
            oldest.add_metric([row.name], row.oldest_queued_seconds)
            expired.add_metric([row.name], row.leases_expired)
        yield from (tasks, oldest, expired)
