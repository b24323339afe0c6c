"""The listener: how a worker hears of new work the moment it is committed, instead of asking.

Lesson 07's worker asks the database for work every poll interval: idle, it sends queries all
day, and a task enqueued just after a poll waits for the next one. Here each worker LISTENs on
the channel `task_ready`, and the database NOTIFYs it whenever a task becomes claimable (the
trigger in schema.sql). The listener is one thread and one connection that do nothing else:
each notification for a task this worker runs sets the worker's `wake` event, and the worker's
loop, waiting on that event, claims at once.

A notification is a hint, not a message to act on: the table is the truth. The loop claims
with the same SKIP LOCKED query as ever, and gets nothing when another worker was faster. So a
lost notification costs time, never a task: the loop still polls, every few seconds, as a
safety net. And notifications are lost by design when the listener is away: PostgreSQL keeps
them only for the sessions listening at commit time. So after every (re)connection the listener
wakes the loop once, which claims whatever was enqueued meanwhile.

Its own connection, not the loop's, because the loop is busy with statements, and waiting on a
connection for notifications means doing nothing else with it. And a session of its own: LISTEN
belongs to a session, so it does not work through a pooler in transaction mode (PgBouncer's
`pool_mode = transaction` hands each transaction to any server connection; the LISTEN stays on
one of them, and the notifications go to nobody). Give the listener a direct URL, or one to a
session-mode pool: `Worker(..., listen_url=...)`. NOTIFY itself is fine through any pooler: it
is sent at commit, by whatever connection commits.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Collection

import psycopg
from engine import CONNECTION_OPTIONS
from outages import Backoff, reason

log = logging.getLogger(__name__)

CHANNEL = "task_ready"

# How often the listener looks up from the socket to see whether its worker is stopping. Not a
# query: psycopg waits on the socket, and the database sees nothing of it.
TICK = 0.1  # seconds


class Listener:
    """A thread that sets `wake` for each notification naming one of `task_names` (or none),
    and once after each (re)connection; until `stop` is set. Call start(), then join()."""

    def __init__(
        self,
        url: str,
        name: str,
        task_names: Collection[str],
        wake: threading.Event,
        stop: threading.Event,
    ) -> None:
        self.url = url
        self.name = name
        self.task_names = set(task_names)
        self.wake = wake
        self.stop = stop
        self.connections = 0  # how many times it has connected: 2 after one reconnection
        self._thread = threading.Thread(target=self._run, name=f"{name}-listen", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self) -> None:
        self._thread.join()

    def _run(self) -> None:
        backoff = Backoff()
        while not self.stop.is_set():
            try:
                self._listen(backoff)
            # Any error, not only an outage: a listener that died would leave its worker deaf
            # for good, with nothing in the log but a traceback. Its worker would still poll.
            except psycopg.Error as err:
                if backoff.failures == 0:
                    log.warning("%s: listener lost its connection (%s)", self.name, reason(err))
                self.stop.wait(backoff.next_delay())

    def _listen(self, backoff: Backoff) -> None:
        with psycopg.connect(
            self.url, application_name=f"{self.name}-listen", **CONNECTION_OPTIONS
        ) as conn:
            conn.execute(f"LISTEN {CHANNEL}")
            self.connections += 1
            if backoff.failures:
                log.warning("%s: listener back; claiming at once", self.name)
            backoff.reset()
            # Whatever was enqueued before the LISTEN took effect (at startup, or while the
            # connection was down) notified nobody here: the loop claims now, and finds it.
            self.wake.set()
            while not self.stop.is_set():
                for notification in conn.notifies(timeout=TICK):
                    if notification.payload in self.task_names or notification.payload == "":
                        self.wake.set()
