"""Outages: the database goes away for a second or for minutes, and comes back.

PostgreSQL restarts: for an upgrade, a failover to a replica, a crash. Every connection to it
breaks, and for a while no new one is accepted. For the engine that is an outage, not a bug:

- the worker logs one line, keeps its in-hand tasks running, and reconnects with capped
  exponential backoff and jitter (below); once back, it records their results (if their leases
  are still its own: the fence decides, as always) and goes on claiming (worker.py);
- `Engine.enqueue()` and the other client calls raise DatabaseUnavailableError, which names the
  cause: the caller decides whether to retry (engine.py).

What "the database is unreachable" looks like to psycopg: an OperationalError, either without
an SQLSTATE (the connection broke: the server said nothing, it is gone) or with one of the
classes below. Any other error is about the statement (bad data, a bug), and retrying it
would fail the same way.
"""

from __future__ import annotations

import random

import psycopg

# SQLSTATE classes that mean "the server went away or turned us away", not "this is wrong":
# 08 connection exception, 53 insufficient resources ("too many clients"), 57 operator
# intervention ("the database system is shutting down", "terminating connection due to
# administrator command"), 58 system error (an I/O error on the server).
OUTAGE_CLASSES = ("08", "53", "57", "58")


class DatabaseUnavailableError(ConnectionError):
    """The database could not be reached, or the connection broke during the call.

    The message names the cause. A write that was under way when the connection broke may or
    may not have been committed: enqueue with an `idempotency_key` to retry it safely.
    """


def is_outage(err: BaseException) -> bool:
    """Whether `err` says that the database is unreachable (retry later), not that we are wrong."""
    if not isinstance(err, psycopg.OperationalError):
        return False
    return err.sqlstate is None or err.sqlstate[:2] in OUTAGE_CLASSES


def reason(err: BaseException) -> str:
    """The cause of an outage in one line: psycopg's messages span several."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return " ".join(lines) or type(err).__name__


class Backoff:
    """How long to wait before the next reconnection attempt: capped exponential, with jitter.

    0.05 s, then twice as long after each failure, never more than `cap`: a blip costs a few
    milliseconds, a long outage one attempt every few seconds. The jitter (a random factor
    between 0.5 and 1) keeps a fleet of workers that lost the database at the same instant
    from knocking on its door at the same instants too, when it is busiest starting up.
    """

    def __init__(self, first: float = 0.05, cap: float = 5.0) -> None:
        self.first = first
        self.cap = cap
        self.failures = 0

    def next_delay(self) -> float:
        delay = min(self.cap, self.first * 2 ** min(self.failures, 30))
        self.failures += 1
        return delay * random.uniform(0.5, 1.0)

    def reset(self) -> None:
        self.failures = 0
