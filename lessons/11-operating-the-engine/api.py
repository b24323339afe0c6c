"""The HTTP API: the engine, for programs in any language, for HTTP workers, and for people.

    python api.py --tasks ops_tasks       # serves http://127.0.0.1:8011; prints the token

- programs and operators: enqueue, list and inspect tasks, retry, replay, cancel, fork and
  reprioritize them, send events, read the queues (/stats) and the metrics (/metrics): what
  engine.py offers, over HTTP; and the dashboard (dashboard.py), a page that uses just that;
- HTTP workers: a task declared with engine.declare_task() runs in a worker written in any
  language, which claims it here (a long poll), heartbeats, records its steps and reports how
  it ended (the /worker routes; remote.py has the protocol, http_worker.sh is one in shell).

Reads (GET) are open. A request that changes something, and every /worker request, needs the
header `Authorization: Bearer TOKEN`. Errors are JSON, always one sentence, `{"error": "..."}`,
and the status says what was wrong: 400 not JSON, 401 no token (or the wrong one), 404 no such
task, 409 not in this state (or, for a worker, an attempt that is over), 413 a body over 1 MiB,
422 a value that makes no sense, 503 the database is away. Never 500 for bad input: the
engine's own checks (engine.py) refuse it first, and say why.

FastAPI, because it reads and checks the JSON bodies against the models below, and writes from
the same models the OpenAPI document (/openapi.json, and /docs to try it out). The routes are
plain `def`s: FastAPI runs them on a thread pool, so the engine's calls, which block, need no
async twins.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import logging
import os
import secrets
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from types import FrameType
from typing import Annotated, Any

import anyio.to_thread
import dashboard
import metrics
import uvicorn
from db.models import Task, TaskStatus
from engine import (
    Engine,
    IdempotencyKeyError,
    TaskInputError,
    TaskNotFoundError,
    TaskOptionError,
    TaskStateError,
    UnknownTaskError,
)
from fastapi import Body, FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from metrics import QueueCollector
from outages import DatabaseUnavailableError
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest
from pydantic import BaseModel, ConfigDict
from remote import DEFAULT_LEASE, AttemptOverError, RemoteWorkers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from worker import lesson_database_url

# The largest request body read. A task's input is a JSON value stored in a row: a megabyte is
# already more than a row should hold (pass a reference to a file instead), and a server that
# reads any size is one request away from running out of memory.
MAX_BODY = 1024 * 1024  # bytes

# How many requests run at once, each on a thread of its own. Starlette's default is 40, and a
# claim holds its thread while it waits for work (a minute at most, holding no connection):
# forty idle HTTP workers would leave none for any other request.
REQUEST_THREADS = 200

# The engine's refusals, by the HTTP status that says whose mistake it was.
STATUS_OF_ERROR: dict[type[Exception], int] = {
    UnknownTaskError: 404,
    TaskNotFoundError: 404,
    TaskInputError: 422,
    TaskOptionError: 422,
    TaskStateError: 409,
    IdempotencyKeyError: 409,
    AttemptOverError: 409,
    DatabaseUnavailableError: 503,
}


# region: models
class JsonBody(BaseModel):
    """What every request body has in common. Strict: a string where a number belongs (or
    `true` where an integer does) is refused, not converted; and an unknown field is refused,
    so that a typo ("priorty") is not silently ignored."""

    model_config = ConfigDict(strict=True, extra="forbid")


class EnqueueRequest(JsonBody):
    name: str
    input: Any = None
    idempotency_key: str | None = None
    concurrency_key: str | None = None
    max_running: int | None = None
    delay: float = 0
    priority: int | None = None
    max_attempts: int | None = None
    timeout: float | None = None
    tags: dict[str, str] | None = None


class ForkRequest(JsonBody):
    at: int | None = None
    before: str | None = None


class PriorityRequest(JsonBody):
    priority: int


class EventRequest(JsonBody):
    payload: Any = None


class ClaimRequest(JsonBody):
    worker: str
    task_names: list[str]
    wait: float = 0  # seconds to wait for a task (at most 60); 0: answer at once
    lease: float = DEFAULT_LEASE


class HeartbeatRequest(JsonBody):
    lease: float = DEFAULT_LEASE


class CompleteRequest(JsonBody):
    output: Any = None


class FailRequest(JsonBody):
    error: str
    retryable: bool = True


class StepRequest(JsonBody):
    seq: int
    name: str
    output: Any = None
    error: str | None = None  # instead of an output: the step failed, and the worker went on
    duration: float = 0  # seconds the step took, as the worker timed it


# endregion


def create_app(engine: Engine, token: str) -> FastAPI:
    """The API of `engine`; `token` is what requests that change something must present."""
    remote = RemoteWorkers(engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        anyio.to_thread.current_default_thread_limiter().total_tokens = REQUEST_THREADS
        remote.start()
        yield
        remote.close()

    app = FastAPI(
        title="Durable Execution the Hard Way",
        description=__doc__,
        lifespan=lifespan,
    )
    app.state.remote = remote
    app.add_middleware(Gate, token=token)
    add_error_handlers(app)
    add_task_routes(app, engine)
    add_worker_routes(app, remote)
    add_metrics_routes(app, engine, remote)
    app.include_router(dashboard.router)
    return app


# region: gate
class Gate:
    """What a request must pass before any route sees it: the token, then the size of its body.

    An ASGI middleware rather than a dependency of each route: a route added later cannot
    forget it, and a request is refused before its body is even read.
    """

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        if needs_token(request):
            refusal = self.refuse(request.headers.get("authorization"))
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > MAX_BODY:
            await error_response(413, too_large())(scope, receive, send)
            return
        # A body sent in chunks announces no length: it is counted as it arrives.
        received = 0

        async def receive_at_most() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > MAX_BODY:
                # FastAPI, reading the body, passes an HTTPException on as it is (to the error
                # handlers, below): 413, not its 400 for a body it could not read.
                raise HTTPException(413, too_large())
            return message

        await self.app(scope, receive_at_most, send)

    def refuse(self, authorization: str | None) -> JSONResponse | None:
        """A 401 unless the header holds this API's token; None if it does."""
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            message = (
                "this request needs the header `Authorization: Bearer TOKEN` (the API's token)"
            )
        # compare_digest: its time does not depend on how much of the token a guess got right,
        # so guesses cannot find it a character at a time.
        elif secrets.compare_digest(given.strip().encode(), self.token.encode()):
            return None
        else:
            message = "the token in the Authorization header is not this API's token"
        return error_response(401, message, headers={"WWW-Authenticate": "Bearer"})


def needs_token(request: Request) -> bool:
    """Every request that can change something (anything but GET and HEAD), and every worker
    request: a worker's reads are part of running a task."""
    return request.method not in ("GET", "HEAD") or request.url.path.startswith("/worker/")


def too_large() -> str:
    return f"the request body is larger than {MAX_BODY // 2**20} MiB"


# endregion


# region: errors
def error_response(
    status: int, message: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def add_error_handlers(app: FastAPI) -> None:
    """Every error as `{"error": "one sentence"}`: the engine's, the bodies', HTTP's own."""

    def refusal(status: int) -> Callable[[Request, Exception], Awaitable[JSONResponse]]:
        async def refuse(request: Request, err: Exception) -> JSONResponse:
            return error_response(status, str(err))

        return refuse

    for error_type, status in STATUS_OF_ERROR.items():
        app.add_exception_handler(error_type, refusal(status))

    async def invalid_request(request: Request, err: Exception) -> JSONResponse:
        assert isinstance(err, RequestValidationError)
        first = err.errors()[0]
        if first["type"] == "json_invalid":
            return error_response(400, f"the request body is not JSON: {first['ctx']['error']}")
        content_type = request.headers.get("content-type", "application/json")
        if first["loc"][0] == "body" and "json" not in content_type:
            # FastAPI reads a body as JSON only if it says so (`curl -d` says it is a form).
            return error_response(
                400, f"the request body must be JSON, sent as application/json, not {content_type}"
            )
        # ("body", "tags", "customer") -> "tags.customer"; ("query", "limit") -> "limit".
        where = ".".join(str(part) for part in first["loc"][1:]) or first["loc"][0]
        return error_response(422, f"{where}: {first['msg']}")

    app.add_exception_handler(RequestValidationError, invalid_request)

    async def http_error(request: Request, err: Exception) -> JSONResponse:
        assert isinstance(err, HTTPException)
        return error_response(err.status_code, str(err.detail), headers=err.headers)

    app.add_exception_handler(HTTPException, http_error)

    async def bug(request: Request, err: Exception) -> JSONResponse:
        # Starlette logs the traceback; the client learns only that the fault is ours.
        return error_response(500, "internal error: the API's log has the traceback")

    app.add_exception_handler(Exception, bug)


# endregion


# region: task_routes
def add_task_routes(app: FastAPI, engine: Engine) -> None:
    """Tasks, for programs and operators: engine.py's calls, one route each."""

    @app.post("/tasks", status_code=201)
    def enqueue(body: EnqueueRequest) -> dict[str, Any]:
        """Enqueue a task; its id. Repeat it safely with an `idempotency_key`."""
        options = {
            option: value
            for option in ("priority", "max_attempts", "timeout")
            if (value := getattr(body, option)) is not None
        }
        task_id = engine.enqueue(
            body.name,
            body.input,
            idempotency_key=body.idempotency_key,
            concurrency_key=body.concurrency_key,
            max_running=body.max_running,
            delay=body.delay,
            tags=body.tags,
            **options,
        )
        return {"id": task_id}

    @app.get("/tasks")
    def list_tasks(
        status: TaskStatus | None = None,
        name: str | None = None,
        key: str | None = None,
        older_than: float | None = None,
        tag: Annotated[list[str] | None, Query(description="NAME=VALUE, repeated")] = None,
        limit: int = 50,
    ) -> dict[str, Any]:
        """The newest tasks (up to `limit`) that match every filter given."""
        tags = {}
        for text in tag or []:
            tag_name, equals, value = text.partition("=")
            if not equals:
                raise TaskOptionError(f"a tag is NAME=VALUE, got {text!r}")
            tags[tag_name] = value
        tasks = engine.list_tasks(
            status=status,
            name=name,
            concurrency_key=key,
            older_than=older_than,
            tags=tags,
            limit=limit,
        )
        return {"tasks": [as_json(task) for task in tasks]}

    @app.get("/tasks/{task_id}")
    def show(task_id: int) -> dict[str, Any]:
        """A task, with its attempts, events (every history), children, operator actions and
        forks."""
        return {
            "task": as_json(existing_task(engine, task_id)),
            "attempts": [as_json(attempt) for attempt in engine.attempts(task_id)],
            "events": [as_json(event) for event in engine.events(task_id)],
            "children": [as_json(child) for child in engine.children(task_id)],
            "actions": [as_json(action) for action in engine.actions(task_id)],
            "forks": [as_json(fork) for fork in engine.forks(task_id)],
        }

    @app.post("/tasks/{task_id}/retry")
    def retry(task_id: int) -> dict[str, Any]:
        """Run a failed or cancelled task again, on the history it has."""
        engine.retry(task_id)
        return {"task": as_json(existing_task(engine, task_id))}

    @app.post("/tasks/{task_id}/replay")
    def replay(task_id: int) -> dict[str, Any]:
        """Run a finished task again from an empty history: every step runs again."""
        engine.replay(task_id)
        return {"task": as_json(existing_task(engine, task_id))}

    @app.post("/tasks/{task_id}/cancel")
    def cancel(task_id: int) -> dict[str, Any]:
        """Cancel a task that has not finished, and its unfinished children."""
        if not engine.cancel(task_id):
            task = existing_task(engine, task_id)
            raise TaskStateError(f"task {task_id} is {task.status}: it has finished already")
        return {"task": as_json(existing_task(engine, task_id))}

    @app.post("/tasks/{task_id}/fork", status_code=201)
    def fork(task_id: int, body: ForkRequest) -> dict[str, Any]:
        """A new task with a copy of the first `at` events of this one's history (or those
        before the first event named `before`); its id."""
        return {"id": engine.fork(task_id, body.at, before=body.before)}

    @app.post("/tasks/{task_id}/priority")
    def reprioritize(task_id: int, body: PriorityRequest) -> dict[str, Any]:
        """Move a queued or scheduled task up (higher) or down its queue."""
        return {"task": as_json(engine.reprioritize(task_id, body.priority))}

    # `:path`: an event's name may hold a slash ("approved/claim-7").
    @app.post("/events/{name:path}")
    def send_event(
        name: str, body: Annotated[EventRequest | None, Body()] = None
    ) -> dict[str, Any]:
        """Send an event: the tasks waiting for it are queued. Safe to repeat: the first send
        is the event (`first`), and every later one gets its payload back."""
        sent = engine.send_event(name, None if body is None else body.payload)
        return {"first": sent.first, "woken": sent.woken, "payload": sent.payload}


def existing_task(engine: Engine, task_id: int) -> Task:
    """The task, or TaskNotFoundError (a 404)."""
    task = engine.get(task_id)
    if task is None:
        raise TaskNotFoundError(f"no task with id {task_id}")
    return task


def as_json(row: Any) -> dict[str, Any]:
    """A row (a task, an attempt, an event...) as JSON: every column, times in ISO 8601 (with
    their UTC offset), durations in seconds; the same as `cli.py --json` prints."""
    return {name: json_value(value) for name, value in vars(row).items()}


def json_value(value: Any) -> Any:
    if isinstance(value, datetime.datetime):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    return value


# endregion


# region: worker_routes
def add_worker_routes(app: FastAPI, remote: RemoteWorkers) -> None:
    """The worker protocol (remote.py): claim, then heartbeat, steps, complete or fail, each
    naming the attempt the claim started."""
    attempt_path = "/worker/tasks/{task_id}/attempts/{attempt}"

    @app.post(
        "/worker/claim",
        response_model=None,
        responses={204: {"description": "Nothing to claim within `wait` seconds"}},
    )
    def claim(body: ClaimRequest) -> dict[str, Any] | Response:
        """Claim a task of the declared `task_names`; wait up to `wait` seconds for one."""
        claimed = remote.claim(body.worker, body.task_names, body.wait, body.lease)
        if claimed is None:
            return Response(status_code=204)
        task = claimed.task
        return {
            "task": {
                "id": task.id,
                "attempt": task.attempts,
                "name": task.name,
                "input": task.input,
                "durable": claimed.durable,
                "history": [as_json(step) for step in claimed.history],
            }
        }

    @app.post(f"{attempt_path}/heartbeat")
    def heartbeat(
        task_id: int, attempt: int, body: Annotated[HeartbeatRequest | None, Body()] = None
    ) -> dict[str, Any]:
        """Keep the attempt: its lease runs `lease` seconds from now. 409: stop, it is over."""
        lease = DEFAULT_LEASE if body is None else body.lease
        remote.heartbeat(task_id, attempt, lease)
        return {"lease": lease}

    @app.post(f"{attempt_path}/complete")
    def complete(task_id: int, attempt: int, body: CompleteRequest) -> dict[str, Any]:
        """The attempt's output: the task has completed."""
        remote.complete(task_id, attempt, body.output)
        return {"status": TaskStatus.COMPLETED}

    @app.post(f"{attempt_path}/fail")
    def fail(task_id: int, attempt: int, body: FailRequest) -> dict[str, Any]:
        """The attempt's error: the task is retried after a backoff (`scheduled`), or has failed
        for good (`failed`: no attempts left, or `retryable` false)."""
        return {"status": remote.fail(task_id, attempt, body.error, body.retryable)}

    @app.post(f"{attempt_path}/steps")
    def step(task_id: int, attempt: int, body: StepRequest) -> dict[str, Any]:
        """Record step `seq` of a durable task: its output, or its error. If the history holds
        that step already, its recorded outcome is the answer: use it, not your own."""
        if body.error is not None and "output" in body.model_fields_set:
            raise TaskOptionError("a step has an output or an error, not both")
        recorded = remote.append_step(
            task_id, attempt, body.seq, body.name, body.output, body.error, body.duration
        )
        return {"event": as_json(recorded)}

    @app.get(f"{attempt_path}/history")
    def history(task_id: int, attempt: int) -> dict[str, Any]:
        """The task's history as it is now, this attempt's steps included."""
        return {"history": [as_json(step) for step in remote.history(task_id, attempt)]}


# endregion


# region: metrics_routes
def add_metrics_routes(app: FastAPI, engine: Engine, remote: RemoteWorkers) -> None:
    # The database's gauges, read at each scrape (QueueCollector), in a registry of this app's
    # own: a process may serve two engines' APIs (the tests do).
    registry = CollectorRegistry()
    registry.register(QueueCollector(engine))
    Gauge(
        "hardway_http_workers_waiting",
        "HTTP workers waiting in a claim for a task: idle workers",
        registry=registry,
    ).set_function(lambda: remote.waiting)

    @app.get("/stats")
    def stats() -> dict[str, Any]:
        """Per task name: what waits, what runs, what ended lately."""
        return {"queues": [as_json(row) for row in engine.queue_stats()]}

    @app.get("/metrics")
    def prometheus() -> Response:
        """Prometheus's text format: this process's counters (claims, attempts for the HTTP
        workers) and the queues as the database has them."""
        text = generate_latest(metrics.REGISTRY) + generate_latest(registry)
        return Response(text, media_type=CONTENT_TYPE_LATEST)


# endregion


# region: main
class Server(uvicorn.Server):
    """uvicorn's server, which also answers the waiting claims (204) as soon as it is told to
    stop. It waits, before it stops, for the requests in progress: a claim may wait a minute."""

    def __init__(self, config: uvicorn.Config, remote: RemoteWorkers) -> None:
        super().__init__(config)
        self.remote = remote

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.remote.stop()
        super().handle_exit(sig, frame)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve the HTTP API until SIGTERM or Ctrl-C.")
    parser.add_argument("--tasks", default="ops_tasks", help="module with register(engine)")
    # The loopback interface by default: exposing the API further is a deployment's decision
    # (behind TLS: the token travels in every request).
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8011)
    args = parser.parse_args(argv)
    try:
        tasks = importlib.import_module(args.tasks)
    except ModuleNotFoundError as err:
        if err.name != args.tasks:
            raise  # the module exists, and it is one of its imports that is missing
        parser.error(f"--tasks: no module named {args.tasks!r} beside api.py")
    # What the workers' code logs for the HTTP workers' attempts (Worker.ending: parents woken,
    # children closed; the listener's reconnections) at INFO, as a worker's own log has it.
    logging.basicConfig(format="%(message)s")
    for name in ("worker", "listener"):
        logging.getLogger(name).setLevel(logging.INFO)

    token = os.environ.get("HARDWAY_API_TOKEN")
    if not token:
        # Random, printed once: a token nobody chose cannot be guessed, nor found in a repository.
        token = secrets.token_urlsafe(32)
        print(f"API token (set HARDWAY_API_TOKEN to choose one): {token}", file=sys.stderr)
        print(f"dashboard: http://{args.host}:{args.port}/dashboard#token={token}", file=sys.stderr)
    else:
        print(f"dashboard: http://{args.host}:{args.port}/dashboard", file=sys.stderr)
    with Engine(lesson_database_url()) as engine:
        # The tasks first: the API hears of the declared ones (remote.py's Listener).
        tasks.register(engine)
        app = create_app(engine, token)
        config = uvicorn.Config(app, host=args.host, port=args.port)
        Server(config, app.state.remote).run()


if __name__ == "__main__":
    main()


# endregion
