"""The task functions of the demo, in a module of their own so that a worker PROCESS can import
them: `python worker.py --tasks demo_tasks` calls `register(engine)`, as main.py does.

Each function takes its input (JSON) and returns its output (JSON). The long-running ones call
`current_task()` to learn their attempt number and to find out when they should stop.
"""

from __future__ import annotations

import os
import signal

from engine import Engine
from task_context import current_task


# region: flaky
def charge_card(input: dict) -> dict:
    """A call to a payment service that is down for the first attempts (input["fails"] of them)."""
    attempt = current_task().attempt
    if attempt <= input["fails"]:
        raise ConnectionError(f"payment service unavailable (attempt {attempt})")
    return {"charged": input["amount"], "attempt": attempt}


# endregion


def resize_video(input: dict) -> dict:
    """Work for input["seconds"], in steps: long enough to kill the worker half-way."""
    task = current_task()
    steps = round(input["seconds"] * 10)
    for _ in range(steps):
        task.sleep(0.1)  # the work; ends early, raising, if the attempt is stopped
    return {"resized": input["video"], "attempt": task.attempt}


def send_reminder(input: dict) -> str:
    return f"reminded {input['user']}"


# region: cancellable
def build_report(input: dict) -> dict:
    """A long job that stops when told: each step checks whether the attempt is still on."""
    task = current_task()
    for _ in range(input["steps"]):
        task.sleep(0.05)  # raises TaskCancelled once a heartbeat has heard of the cancel
    return {"steps": input["steps"]}


# endregion


def crash_worker(input: object) -> None:
    """A poison task: it kills the process running it, every time (think: a segfault in a C
    extension, or the kernel's out-of-memory killer). Leases turn each crash into a failed
    attempt, so it stops after max_attempts instead of killing workers forever."""
    os.kill(os.getpid(), signal.SIGKILL)


def register(engine: Engine) -> None:
    """Register every demo task on `engine`, with its options (see engine.TaskOptions)."""
    engine.task("charge_card", max_attempts=5, backoff=0.3)(charge_card)
    engine.task("resize_video", backoff=0.2)(resize_video)
    engine.task("send_reminder")(send_reminder)
    engine.task("build_report")(build_report)
    engine.task("crash_worker", max_attempts=3, backoff=0.1)(crash_worker)
