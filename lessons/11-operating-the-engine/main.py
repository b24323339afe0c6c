"""Lesson 11: operating the engine. The HTTP API, a worker in shell, the command line, metrics.

Run it (after `source .venv/bin/activate` at the repository root):

    cd lessons/11-operating-the-engine && python main.py
    # or, from the repository root: python lessons/11-operating-the-engine/main.py

You will see, in a few seconds:

1. the HTTP API (api.py) start on 127.0.0.1, beside a Python worker; three tasks enqueued
   through it, as any program would, with curl or its HTTP library: two checkouts (ops_tasks.py)
   tagged with their customer, and a greeting;
2. the Python worker run the checkouts; the second card is declined, and that order fails;
3. a worker written in shell (http_worker.sh, curl and jq) claim the greeting through the API,
   record step 1, and "crash"; a second run of the script claim it again once the lease has
   run out, replay step 1 from the history, and run step 2 only;
4. the command line (cli.py, or `hardway`) find the customer's tasks by their tag;
5. the bank fixed, and the failed order retried through the API: it completes; every card was
   charged once;
6. the queues and the metrics, as an operator and Prometheus see them; then the dashboard's
   address. In a terminal, the API stays up for you to open it, until Ctrl-C.
"""

import json
import logging
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ops_tasks
import uvicorn
from api import Server, create_app
from engine import Engine
from hardway.postgres import describe, lesson_database
from worker import Worker

LESSON_DIR = Path(__file__).resolve().parent
TOKEN = os.environ.get("HARDWAY_API_TOKEN") or "demo-token"  # say HARDWAY_API_TOKEN to choose
PORT = 8011  # api.py's default; another, chosen by the system, if something uses it already


def main() -> None:
    # A fresh `lesson_11` database, loaded from sql/schema.sql: every run starts clean.
    url = lesson_database(LESSON_DIR)
    print(describe(url))
    # The engine's warnings (a lease that ran out, in part 3) among the demo's lines.
    logging.basicConfig(stream=sys.stdout, format="   log: %(message)s")
    with Engine(url) as engine:
        ops_tasks.register(engine)
        stop = threading.Event()
        worker = Worker(engine, "py-worker", slots=2)
        thread = threading.Thread(target=worker.run, args=(stop,))
        thread.start()
        try:
            with serving(create_app(engine, TOKEN)) as api:
                demo(engine, api)
                print(f"dashboard: {api}/dashboard#token={TOKEN}")
                if sys.stdin.isatty():
                    print("the API runs until Ctrl-C; open the dashboard in a browser")
                    threading.Event().wait()
        except KeyboardInterrupt:
            pass
        finally:
            stop.set()
            thread.join()


def demo(engine: Engine, api: str) -> None:
    print(f"1. the API on {api}, and a Python worker; three tasks enqueued through the API:")
    orders = [
        {"id": "A-1", "card": "4000-0001", "total": 42.5},
        {"id": "A-2", "card": "4000-0002", "total": 19.9},
    ]
    ids = [
        post(api, "/tasks", {"name": "checkout", "input": order, "tags": {"customer": "42"}})["id"]
        for order in orders
    ]
    greeting = post(api, "/tasks", {"name": "greet", "input": {"name": "Ada"}})["id"]
    print(f"   POST /tasks: checkouts {ids[0]} and {ids[1]} (customer 42), greeting {greeting}")

    print("2. the Python worker runs the checkouts:")
    for task_id in ids:
        task = engine.wait(task_id)
        print(f"   task {task_id} {task.status}: {task.output or task.error}")

    print("3. the shell worker (http_worker.sh) runs the greeting through the API:")
    # A lease of one second, so that the second run need not wait long for the first one's.
    shell_worker(api, "sh-worker-1", STOP_AFTER_STEP="1", LEASE="1")
    shell_worker(api, "sh-worker-2", LEASE="1")
    task = engine.wait(greeting)
    print(
        f"   task {greeting} {task.status} in {task.attempts} attempts: {task.output['greeting']}"
    )

    print("4. the command line: the customer's tasks, found by their tag")
    cli("tasks", "list", "--tag", "customer=42")

    print(f"5. the bank fixed; task {ids[1]} retried through the API:")
    ops_tasks.DECLINED.clear()
    post(api, f"/tasks/{ids[1]}/retry", {})
    task = engine.wait(ids[1])
    print(f"   task {ids[1]} {task.status}: {task.output}")
    print(f"   what happened in the world: {'; '.join(ops_tasks.EFFECTS)}")

    print("6. the queues, and the metrics Prometheus scrapes:")
    cli("queues", "stats")
    with urllib.request.urlopen(f"{api}/metrics") as answer:
        metrics = answer.read().decode().splitlines()
    for line in metrics:
        if line.startswith(("hardway_attempts_total{", "hardway_pickup_seconds_count{")):
            print(f"   {line}")


# region: http
def post(api: str, path: str, body: Any) -> Any:
    """POST `body` as JSON, with the token, as any HTTP client would; the answer's JSON."""
    request = urllib.request.Request(
        api + path,
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request) as answer:
            return json.load(answer)
    except urllib.error.HTTPError as err:
        raise SystemExit(f"POST {path}: HTTP {err.code}: {err.read().decode()}") from None


# endregion


def shell_worker(api: str, name: str, **env: str) -> None:
    """Run http_worker.sh once, as worker `name`, and print what it says (on stderr)."""
    result = subprocess.run(
        ["bash", str(LESSON_DIR / "http_worker.sh")],
        env=dict(os.environ, API=api, HARDWAY_API_TOKEN=TOKEN, WORKER=name, WAIT="10", **env),
        capture_output=True,
        text=True,
        timeout=60,
    )
    if result.returncode != 0:
        raise SystemExit(f"http_worker.sh failed ({result.returncode}): {result.stderr}")
    for line in result.stderr.splitlines():
        print(f"   {name}: {line}")


def cli(*args: str) -> None:
    """Run the command line as an operator would, and print what it prints."""
    print(f"   $ hardway {' '.join(args)}")
    result = subprocess.run(
        [sys.executable, str(LESSON_DIR / "cli.py"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    for line in result.stdout.splitlines():
        print(f"   {line}")


@contextmanager
def serving(app: Any) -> Any:
    """Serve `app` with uvicorn on a thread, on 127.0.0.1: PORT if free, else one the system
    picks; yield its address. Stop it on the way out."""
    server = None
    for port in (PORT, 0):
        server = Server(
            uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"),
            app.state.remote,
        )
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started and thread.is_alive():
            thread.join(0.01)
        if server.started:
            break
    assert server is not None and server.started, "the API did not start"
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        app.state.remote.stop()
        server.should_exit = True
        thread.join()


if __name__ == "__main__":
    main()
