"""What the HTTP API costs, on this machine: tasks run by workers in another language.

Run it (after `source .venv/bin/activate` at the repository root; about a minute):

    cd lessons/11-operating-the-engine && python bench.py
    python bench.py --quick           # fewer tasks and samples: quicker, noisier

It uses a database of its own (`lesson_11_bench`) on the same server as main.py, and prints the
machine and a table. The API is a process of its own (`python api.py --tasks bench`, this file
being its task module: `register()` below declares `http_noop`). The HTTP workers are threads of
this process, each a loop of what http_worker.sh does, minus the steps: a claim (a long poll),
then the completion; two requests, two transactions per task. Times are from the database
clock, except the pickup, which is the HTTP worker's own view.

- yardstick: single-row INSERTs, each its own commit, per second;
- pickup: one idle HTTP worker waiting in a claim; the time from just before an enqueue to the
  claim's answer in the worker's hands: the enqueue's commit, its notification, the API's claim
  and the HTTP answer, one task at a time;
- burn-down through HTTP: N no-op tasks, queued before the clock starts, drained by K HTTP
  workers: tasks per second from the first claim to the last completion;
- for scale, the same N no-ops drained by one Python worker process with 10 slots
  (`python worker.py`): it records ten completions with one statement, and claims with the
  same; an HTTP worker makes two requests for each task.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, LiteralString

import psycopg
from engine import Engine
from hardway.postgres import recreate_database, server_url

LESSON_DIR = Path(__file__).resolve().parent
DBNAME = "lesson_11_bench"
TOKEN = "bench-token"


def register(engine: Engine) -> None:
    """The tasks of the API and worker processes (`--tasks bench`)."""
    engine.declare_task("http_noop")
    engine.task("noop")(noop)


def noop(input: object) -> None:
    return None


def scalar(conn: psycopg.Connection, query: LiteralString) -> Any:
    row = conn.execute(query).fetchone()
    assert row is not None, query
    return row[0]


def machine(url: str) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    with psycopg.connect(url) as conn:
        version = scalar(conn, "SHOW server_version")
        fsync = scalar(conn, "SHOW fsync")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"machine: {cpu}, {os.cpu_count()} cores (load average {load});"
        f" PostgreSQL {version} (fsync {fsync}); Python {platform.python_version()}"
    )


def bench_commit(url: str, n: int = 1000) -> float:
    """The yardstick: single-row INSERTs, each its own transaction, per second (1 client)."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE yardstick (n int)")
        started = time.perf_counter()
        for i in range(n):
            conn.execute("INSERT INTO yardstick VALUES (%s)", (i,))
        rate = n / (time.perf_counter() - started)
        conn.execute("DROP TABLE yardstick")
        return rate


# region: http_worker
class HttpWorker:
    """An HTTP worker as http_worker.sh is one, in Python's standard library: no engine code."""

    def __init__(self, api: str, name: str) -> None:
        self.api = api
        self.name = name

    def post(self, path: str, body: Any) -> tuple[int, Any]:
        request = urllib.request.Request(
            self.api + path,
            data=json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=120) as answer:
                return answer.status, json.loads(answer.read() or b"null")
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    def claim(self, wait: float) -> dict | None:
        body = {"worker": self.name, "task_names": ["http_noop"], "wait": wait, "lease": 30}
        status, answer = self.post("/worker/claim", body)
        assert status in (200, 204), (status, answer)
        return answer["task"] if status == 200 else None

    def complete(self, task: dict) -> None:
        path = f"/worker/tasks/{task['id']}/attempts/{task['attempt']}/complete"
        status, answer = self.post(path, {"output": None})
        assert status == 200, (status, answer)

    def run_until_idle(self) -> None:
        """Claim and complete until a claim finds nothing for a second."""
        while (task := self.claim(wait=1)) is not None:
            self.complete(task)


# endregion


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_api() -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ, LESSON_DBNAME=DBNAME, HARDWAY_API_TOKEN=TOKEN)
    api = subprocess.Popen(
        [sys.executable, str(LESSON_DIR / "api.py"), "--tasks", "bench", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,  # uvicorn's access log: a line per request
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(url + "/stats", timeout=1).close()
            return api, url
        except OSError:
            if time.monotonic() > deadline or api.poll() is not None:
                raise RuntimeError("the API did not start") from None
            time.sleep(0.05)


def fresh(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("TRUNCATE tasks, task_attempts, task_events, operator_actions")


def burn_down_rate(url: str) -> float:
    with psycopg.connect(url, autocommit=True) as conn:
        return scalar(
            conn,
            "SELECT count(*) / extract(epoch FROM max(finished_at) - min(started_at))::float8"
            " FROM tasks",
        )


def bench_pickup(engine: Engine, api: str, samples: int) -> tuple[float, float]:
    """(p50, p99) milliseconds from just before an enqueue to the claim's answer."""
    worker = HttpWorker(api, "pickup")
    answered: list[float] = []
    for _ in range(samples):
        waiting = threading.Thread(target=lambda: answered.append(_claimed_at(worker)))
        waiting.start()
        time.sleep(0.05)  # the claim is waiting in the API (it answers 204 only after 30 s)
        started = time.perf_counter()
        engine.enqueue("http_noop")
        waiting.join()
        answered[-1] -= started
    times = sorted(seconds * 1000 for seconds in answered)
    return statistics.median(times), times[int(len(times) * 0.99) - 1]


def _claimed_at(worker: HttpWorker) -> float:
    task = worker.claim(wait=30)
    claimed_at = time.perf_counter()
    assert task is not None
    worker.complete(task)
    return claimed_at


def bench_http_burn_down(engine: Engine, url: str, api: str, tasks: int, workers: int) -> float:
    fresh(url)
    engine.enqueue_many("http_noop", [None] * tasks)
    threads = [
        threading.Thread(target=HttpWorker(api, f"http-{i}").run_until_idle) for i in range(workers)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return burn_down_rate(url)


def bench_python_burn_down(engine: Engine, url: str, tasks: int) -> float:
    fresh(url)
    engine.enqueue_many("noop", [None] * tasks)
    env = dict(os.environ, LESSON_DBNAME=DBNAME)
    worker = subprocess.Popen(
        [sys.executable, str(LESSON_DIR / "worker.py"), "--tasks", "bench", "--slots", "10"],
        env=env,
        stderr=subprocess.DEVNULL,
    )
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            while scalar(conn, "SELECT count(*) FROM tasks WHERE finished_at IS NULL"):
                time.sleep(0.1)
    finally:
        worker.terminate()
        worker.wait(timeout=60)
    return burn_down_rate(url)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer tasks and samples")
    args = parser.parse_args()
    tasks = 1_000 if args.quick else 5_000
    samples = 50 if args.quick else 200
    url = recreate_database(server_url(), DBNAME, (LESSON_DIR / "sql/schema.sql").read_text())
    print(machine(url))
    rows = []
    api_process, api = start_api()
    try:
        with Engine(url) as engine:
            register(engine)
            rows.append(("yardstick: INSERT + commit, 1 client", f"{bench_commit(url):,.0f}/s"))
            p50, p99 = bench_pickup(engine, api, samples)
            rows.append(("pickup, idle HTTP worker", f"p50 {p50:.1f} ms, p99 {p99:.1f} ms"))
            for workers in (1, 4, 16):
                rate = bench_http_burn_down(engine, url, api, tasks, workers)
                rows.append(
                    (
                        f"burn-down {tasks:,} no-ops, {workers} HTTP worker(s)",
                        f"{rate:,.0f} tasks/s",
                    )
                )
            rate = bench_python_burn_down(engine, url, tasks)
            rows.append(
                (f"burn-down {tasks:,} no-ops, 1 Python worker x 10", f"{rate:,.0f} tasks/s")
            )
    finally:
        api_process.terminate()
        api_process.wait(timeout=60)
    width = max(len(what) for what, _ in rows)
    for what, result in rows:
        print(f"  {what:<{width}}  {result}")


if __name__ == "__main__":
    main()
