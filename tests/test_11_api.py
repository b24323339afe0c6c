"""Lesson 11's HTTP API and its worker protocol, against a real server (uvicorn, on a loopback
port) and a real client (httpx), as a program in another language would use them.

- an HTTP worker claims with a long poll, which a new task ends within 50 ms; it heartbeats
  and completes; an attempt that is over (taken over, cancelled, timed out) writes nothing;
- the shell worker (http_worker.sh) runs a durable task; killed after its first step, its
  next run replays that step and runs the second only;
- a durable task's steps: recorded once, answered on repeat, refused when they diverge;
- no token, no change; bad input is a 4xx with one sentence, never a 500;
- the operator's routes (list, retry, cancel, replay, fork, priority, events), /stats,
  /metrics and /openapi.json.
"""

from __future__ import annotations

import datetime
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from harness import (
    lesson_dir,
    lesson_env,
    lessons_from,
    load_lesson,
    running,
    serving,
    sql,
    wait_until,
    worker,
)
from prometheus_client.parser import text_string_to_metric_families
from psycopg import conninfo

TOKEN = "test-token"


@pytest.fixture(params=lessons_from("11"), scope="module")
def lesson(request):
    return load_lesson(request.param)


# --- the server ----------------------------------------------------------------------------


@dataclass
class Api:
    url: str
    client: httpx.Client  # with the token
    anonymous: httpx.Client  # without
    remote: Any  # the app's RemoteWorkers

    def attempt(self, task_id: int, attempt: int, action: str, body: Any = None):
        """POST to one of an attempt's routes (heartbeat, complete, fail, steps)."""
        path = f"/worker/tasks/{task_id}/attempts/{attempt}/{action}"
        return self.client.post(path, json=body if body is not None else {})

    def claim(self, names=("resize",), wait: float = 10, lease: float = 30, name: str = "http-1"):
        body = {"worker": name, "task_names": list(names), "wait": wait, "lease": lease}
        return self.client.post("/worker/claim", json=body)


@contextmanager
def serving_api(lesson, engine) -> Iterator[Api]:
    """The lesson's API for `engine`, served on a loopback port (harness.serving), and clients."""
    app = lesson.api.create_app(engine, TOKEN)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with (
        serving(app) as url,
        httpx.Client(base_url=url, headers=headers, timeout=30) as client,
        httpx.Client(base_url=url, timeout=30) as anonymous,
    ):
        yield Api(url, client, anonymous, app.state.remote)


@pytest.fixture
def api(lesson, engine) -> Iterator[Api]:
    # Two tasks whose functions run elsewhere: the HTTP workers' (engine.declare_task).
    engine.declare_task("greet", durable=True, backoff=0.05)
    engine.declare_task("resize", backoff=0.05)
    with serving_api(lesson, engine) as running_api:
        yield running_api


def error_of(response: httpx.Response) -> str:
    """The error's sentence; fails unless the body is exactly {"error": "..."}."""
    body = response.json()
    assert list(body) == ["error"] and isinstance(body["error"], str) and body["error"], body
    return body["error"]


def metric(api: Api, name: str, **labels: str) -> float:
    """One sample of /metrics (0 if absent)."""
    for family in text_string_to_metric_families(api.client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return 0.0


# --- the worker protocol -------------------------------------------------------------------


def test_an_http_worker_claims_with_a_long_poll_heartbeats_and_completes(api, engine):
    outcome = {"task_name": "resize", "outcome": "completed"}
    completed_before = metric(api, "hardway_attempts_total", **outcome)
    # Nothing queued: an answer at once with wait=0, after `wait` seconds otherwise.
    assert api.claim(wait=0).status_code == 204
    started = time.monotonic()
    assert api.claim(wait=0.3).status_code == 204
    assert time.monotonic() - started >= 0.3

    with ThreadPoolExecutor(1) as pool:
        claiming = pool.submit(api.claim, wait=20)
        wait_until(lambda: api.remote.waiting == 1)
        enqueued = api.client.post("/tasks", json={"name": "resize", "input": {"width": 640}})
        assert enqueued.status_code == 201
        task_id = enqueued.json()["id"]
        claimed = claiming.result(timeout=30)
    assert claimed.status_code == 200
    assert claimed.json() == {
        "task": {
            "id": task_id,
            "attempt": 1,
            "name": "resize",
            "input": {"width": 640},
            "durable": False,
            "history": [],
        }
    }
    lease_before = engine.get(task_id).lease_expires_at
    beat = api.attempt(task_id, 1, "heartbeat", {"lease": 600})
    assert beat.status_code == 200
    assert engine.get(task_id).lease_expires_at > lease_before + datetime.timedelta(seconds=500)

    done = api.attempt(task_id, 1, "complete", {"output": {"url": "a.png"}})
    assert (done.status_code, done.json()) == (200, {"status": "completed"})
    shown = api.client.get(f"/tasks/{task_id}").json()
    assert shown["task"]["status"] == "completed"
    assert shown["task"]["output"] == {"url": "a.png"}
    assert shown["task"]["worker"] == "http-1"
    assert [(a["worker"], a["status"]) for a in shown["attempts"]] == [("http-1", "completed")]
    assert metric(api, "hardway_attempts_total", **outcome) == completed_before + 1


def test_an_attempt_taken_over_writes_nothing(api, engine, url):
    task_id = engine.enqueue("resize")
    assert api.claim(lease=0.3, name="stalled").json()["task"]["attempt"] == 1
    # The stalled worker's lease runs out; the next claim takes the task back, and over.
    wait_until(lambda: sql(url, "SELECT lease_expires_at < now() FROM tasks")[0][0])
    second = api.claim(name="fresh")
    assert second.json()["task"]["attempt"] == 2
    before = engine.get(task_id)
    for action, body in [
        ("heartbeat", {}),
        ("complete", {"output": "stale"}),
        ("fail", {"error": "stale"}),
        ("steps", {"seq": 1, "name": "x", "output": 1}),
    ]:
        refused = api.attempt(task_id, 1, action, body)
        assert refused.status_code == 409, action
        assert error_of(refused) == (
            f"attempt 1 of task {task_id} has ended (failed: lease expired (worker presumed"
            " dead)); the task is on attempt 2 now"
        )
    assert engine.get(task_id) == before  # not even the lease moved
    assert api.attempt(task_id, 2, "complete", {"output": "fresh"}).status_code == 200
    assert (engine.get(task_id).status, engine.get(task_id).output) == ("completed", "fresh")


def test_a_cancelled_attempt_learns_it_at_its_next_request(api, engine):
    task_id = engine.enqueue("resize")
    api.claim()
    assert api.client.post(f"/tasks/{task_id}/cancel").json()["task"]["status"] == "cancelled"
    for action, body in [("heartbeat", {}), ("complete", {"output": 1})]:
        refused = api.attempt(task_id, 1, action, body)
        assert (refused.status_code, error_of(refused)) == (409, f"task {task_id} was cancelled")
    task = engine.get(task_id)
    assert (task.status, task.output) == ("cancelled", None)


def test_an_attempt_past_its_timeout_is_failed_at_its_next_request(api, engine):
    task_id = engine.enqueue("resize", timeout=0.3)
    api.claim()
    # It heartbeats, as it should; once the timeout has passed, the answer is 409.
    wait_until(lambda: api.attempt(task_id, 1, "heartbeat").status_code == 409)
    assert engine.get(task_id).status == "scheduled"  # retried after the backoff
    [attempt] = engine.attempts(task_id)
    assert attempt.error == "TaskTimeout: attempt exceeded its timeout of 0.3s"
    refused = api.attempt(task_id, 1, "complete", {"output": "late"})
    assert refused.status_code == 409
    assert "has ended (failed: TaskTimeout" in error_of(refused)
    # The retry is claimed as attempt 2, by whoever asks.
    assert api.claim().json()["task"]["attempt"] == 2


def test_a_waiting_claim_gets_a_new_task_within_50_ms(api, engine, url):
    # The API's listener is LISTENing (a notification sent before would reach no one).
    listening = (
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'api-listen'"
        " AND datname = current_database() AND query LIKE 'LISTEN%%'"
    )
    wait_until(lambda: sql(url, listening)[0][0] == 1)

    def claim():
        response = api.claim(wait=20)
        return response, time.perf_counter()

    latencies = []
    with ThreadPoolExecutor(1) as pool:
        for _ in range(5):
            claiming = pool.submit(claim)
            wait_until(lambda: api.remote.waiting == 1, interval=0.005)
            enqueued_at = time.perf_counter()
            task_id = engine.enqueue("resize")
            response, answered_at = claiming.result(timeout=30)
            assert response.json()["task"]["id"] == task_id
            latencies.append(answered_at - enqueued_at)
    assert statistics.median(latencies) < 0.05, latencies


# --- the shell worker ----------------------------------------------------------------------

SCRIPT = lesson_dir("11-operating-the-engine") / "http_worker.sh"


def run_script(api: Api, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "API": api.url, "HARDWAY_API_TOKEN": TOKEN, "WAIT": "20", **env}
    return subprocess.run(
        ["bash", str(SCRIPT)], env=environment, capture_output=True, text=True, timeout=60
    )


def test_the_shell_worker_runs_a_durable_task_and_a_crash_replays_its_first_step(api, engine):
    # Uninterrupted, for comparison.
    whole = engine.enqueue("greet", {"name": "Ada"})
    run = run_script(api)
    assert run.returncode == 0, run.stderr
    assert engine.get(whole).output["greeting"] == "Hello, Ada!"
    assert [(e.seq, e.name, e.attempt) for e in engine.events(whole)] == [
        (1, "compose", 1),
        (2, "deliver", 1),
    ]

    # Stopped after its first step, as if it had crashed there; the lease (1 s) runs out.
    task_id = engine.enqueue("greet", {"name": "Ada"})
    first = run_script(api, STOP_AFTER_STEP="1", LEASE="1")
    assert first.returncode == 0, first.stderr
    assert "running step 1 (compose)" in first.stderr
    assert "deliver" not in first.stderr
    assert engine.get(task_id).status == "running"
    assert [(e.seq, e.name) for e in engine.events(task_id)] == [(1, "compose")]

    second = run_script(api)
    assert second.returncode == 0, second.stderr
    # Step 1 is replayed from the history, not run again; step 2 runs.
    assert "replayed step 1 (compose)" in second.stderr
    assert "running step 1" not in second.stderr
    assert "running step 2 (deliver)" in second.stderr
    task = engine.get(task_id)
    assert task.status == "completed"
    assert task.output["greeting"] == engine.get(whole).output["greeting"]
    assert [(e.seq, e.name, e.attempt) for e in engine.events(task_id)] == [
        (1, "compose", 1),
        (2, "deliver", 2),
    ]
    assert [a.error for a in engine.attempts(task_id)] == [
        "lease expired (worker presumed dead)",
        None,
    ]


# --- durable steps -------------------------------------------------------------------------


def test_durable_steps_are_recorded_once_answered_on_repeat_and_refused_when_they_diverge(
    api, engine
):
    task_id = engine.enqueue("greet", {"name": "Bo"})
    assert api.claim(names=["greet"]).json()["task"]["durable"] is True

    def step(attempt, **body):
        return api.attempt(task_id, attempt, "steps", body)

    recorded = step(1, seq=1, name="compose", output="Hi")
    assert recorded.status_code == 200
    event = {"seq": 1, "kind": "step_completed", "name": "compose", "result": "Hi", "error": None}
    assert recorded.json() == {"event": event}
    # A repeat (an answer lost, a request sent again) gets the recorded result, not its own.
    assert step(1, seq=1, name="compose", output="Hello").json() == {"event": event}
    gap = step(1, seq=3, name="deliver", output=None)
    assert (gap.status_code, error_of(gap)) == (
        422,
        f"task {task_id}'s history holds 1 events: its next step is event 2, not 3",
    )
    assert step(1, seq=2, name="x", output=1, error="both").status_code == 422
    # A failure the worker caught and went on from: history, too.
    failed = step(1, seq=2, name="deliver", error="SMTP down")
    assert failed.json()["event"]["kind"] == "step_failed"
    history = api.client.get(f"/worker/tasks/{task_id}/attempts/1/history").json()["history"]
    assert [(e["seq"], e["name"], e["result"], e["error"]) for e in history] == [
        (1, "compose", "Hi", None),
        (2, "deliver", None, "SMTP down"),
    ]
    assert api.attempt(task_id, 1, "fail", {"error": "boom"}).json() == {"status": "scheduled"}

    retried = api.claim(names=["greet"]).json()["task"]
    assert retried["attempt"] == 2
    assert retried["history"] == history
    assert step(1, seq=3, name="late", output=1).status_code == 409  # attempt 1 is over
    assert step(2, seq=1, name="compose", output="?").json() == {"event": event}
    # Event 2 is `deliver`: a step of another name there is code that has changed.
    diverged = step(2, seq=2, name="shout", output="HI")
    assert diverged.status_code == 409
    assert f"task {task_id} diverged from its history at event 2" in error_of(diverged)
    task = engine.get(task_id)
    assert task.status == "failed"  # for good: the same code would diverge again
    assert task.error.startswith("NonDeterminismError: ")
    assert len(engine.events(task_id)) == 2


def test_a_regular_task_has_no_steps(api, engine):
    task_id = engine.enqueue("resize")
    api.claim()
    refused = api.attempt(task_id, 1, "steps", {"seq": 1, "name": "x", "output": 1})
    assert refused.status_code == 422
    assert "is a regular task" in error_of(refused)
    assert engine.events(task_id) == []


# --- the token -----------------------------------------------------------------------------


def test_without_the_token_nothing_changes(api, engine, url):
    task_id = engine.enqueue("resize")
    for headers in (
        {},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": "Bearer"},
    ):
        for method, path, body in [
            ("POST", "/tasks", {"name": "resize"}),
            ("POST", "/tasks", "not JSON: the token is checked first"),
            ("POST", f"/tasks/{task_id}/cancel", None),
            ("POST", f"/tasks/{task_id}/priority", {"priority": 9}),
            ("POST", "/events/go", {"payload": 1}),
            ("POST", "/worker/claim", {"worker": "w", "task_names": ["resize"]}),
            ("GET", f"/worker/tasks/{task_id}/attempts/1/history", None),
        ]:
            content = body if isinstance(body, str) else None
            json = None if isinstance(body, str) else body
            response = api.anonymous.request(
                method, path, json=json, content=content, headers=headers
            )
            assert response.status_code == 401, (headers, path)
            assert response.headers["www-authenticate"] == "Bearer"
            error_of(response)
    assert sql(url, "SELECT id, status::text, priority FROM tasks") == [(task_id, "queued", 0)]
    assert sql(url, "SELECT count(*) FROM sent_events") == [(0,)]
    # Reads need no token.
    assert api.anonymous.get("/tasks").json()["tasks"][0]["id"] == task_id


# --- bad input -----------------------------------------------------------------------------


def test_bad_input_is_a_4xx_with_one_sentence_never_a_500(api, engine, url):
    queued = engine.enqueue("resize")
    done = engine.enqueue("resize", priority=-1)  # claimed after `queued`, then completed
    api.claim()
    api.claim()
    api.attempt(done, 1, "complete", {"output": None})
    attempt = f"/worker/tasks/{queued}/attempts/1"
    json_type = {"Content-Type": "application/json"}
    huge = b'{"name": "resize", "input": "' + b"x" * (1024 * 1024) + b'"}'

    def chunks():  # a body sent without a Content-Length
        for _ in range(20):
            yield b"x" * 65536

    cases: list[tuple[int, str, str, Any]] = [
        # Enqueue.
        (400, "POST", "/tasks", b"{not json"),
        (400, "POST", "/tasks", b"[" * 100_000 + b"]" * 100_000),  # too deep for any parser
        (400, "POST", "/tasks", b'{"name": "resize", "input": 1' + b"0" * 5000 + b"}"),
        (404, "POST", "/tasks", {"name": "no-such-task"}),
        (404, "POST", "/tasks", {"name": "\x00"}),
        (413, "POST", "/tasks", huge),
        (413, "POST", "/tasks", chunks()),
        (422, "POST", "/tasks", b'{"name": "resize", "input": NaN}'),
        (422, "POST", "/tasks", b'{"name": "resize", "input": [Infinity]}'),
        (422, "POST", "/tasks", b'{"name": "resize", "input": "\\ud800"}'),
        (422, "POST", "/tasks", {"name": "resize", "input": "a\x00b"}),
        # Deeper than the engine stores (MAX_JSON_DEPTH), not than Python's parser reads.
        (422, "POST", "/tasks", b'{"name": "resize", "input": ' + b"[" * 900 + b"]" * 900 + b"}"),
        (422, "POST", "/tasks", b'{"name": "resize", "priority": 1e400}'),
        (422, "POST", "/tasks", {"name": "resize", "priority": 10**30}),
        (422, "POST", "/tasks", {"name": "resize", "priority": "5"}),
        (422, "POST", "/tasks", {"name": "resize", "max_attempts": True}),
        (422, "POST", "/tasks", {"name": "resize", "max_attempts": 0}),
        (422, "POST", "/tasks", {"name": "resize", "timeout": 0}),
        (422, "POST", "/tasks", {"name": "resize", "delay": -1}),
        (422, "POST", "/tasks", b'{"name": "resize", "delay": NaN}'),
        (422, "POST", "/tasks", {"name": "resize", "tags": {"customer": "\x00"}}),
        (422, "POST", "/tasks", {"name": "resize", "tags": {"customer": 42}}),
        (422, "POST", "/tasks", {"name": "resize", "tags": ["customer"]}),
        (422, "POST", "/tasks", {"name": "resize", "max_running": 2}),
        (422, "POST", "/tasks", {"name": "resize", "concurrency_key": "", "max_running": 1}),
        (422, "POST", "/tasks", {"name": "resize", "idempotency_key": 7}),
        (422, "POST", "/tasks", {"name": "resize", "colour": "red"}),
        (422, "POST", "/tasks", [1, 2, 3]),
        (422, "POST", "/tasks", {}),
        # Lists and tasks.
        (422, "GET", "/tasks?limit=0", None),
        (422, "GET", "/tasks?limit=ten", None),
        (422, "GET", "/tasks?status=lost", None),
        (422, "GET", "/tasks?tag=customer", None),
        (422, "GET", "/tasks?tag=customer%3D%00", None),
        (422, "GET", "/tasks?older_than=nan", None),
        (422, "GET", "/tasks?name=%00", None),
        (422, "GET", "/tasks/seven", None),
        (404, "GET", "/tasks/99999999999999999999999", None),
        (404, "GET", "/tasks/-1", None),
        (404, "POST", "/tasks/424242/retry", None),
        (404, "POST", "/tasks/424242/cancel", None),
        (422, "POST", f"/tasks/{queued}/priority", {"priority": 2**40}),
        (422, "POST", f"/tasks/{queued}/priority", {"priority": 1.5}),
        (422, "POST", f"/tasks/{done}/fork", {}),
        (422, "POST", f"/tasks/{done}/fork", {"at": -1}),
        (422, "POST", f"/tasks/{done}/fork", {"at": 0, "before": "x"}),
        (422, "POST", "/events/%00", {"payload": 1}),
        (422, "POST", "/events/go", b'{"payload": NaN}'),
        # The worker's side.
        (422, "POST", "/worker/claim", {"worker": "w", "task_names": ["no-such-task"]}),
        (422, "POST", "/worker/claim", {"worker": "w", "task_names": []}),
        (422, "POST", "/worker/claim", {"worker": "\x00", "task_names": ["resize"]}),
        (422, "POST", "/worker/claim", {"worker": "w", "task_names": ["resize"], "wait": 61}),
        (422, "POST", "/worker/claim", b'{"worker": "w", "task_names": ["resize"], "wait": NaN}'),
        (422, "POST", "/worker/claim", {"worker": "w", "task_names": ["resize"], "lease": 0}),
        (422, "POST", f"{attempt}/heartbeat", {"lease": -1}),
        (422, "POST", f"{attempt}/complete", b'{"output": [NaN]}'),
        (422, "POST", f"{attempt}/complete", {"output": {"k": "\x00"}}),
        (422, "POST", f"{attempt}/fail", {"error": 5}),
        (422, "POST", f"{attempt}/steps", {"seq": 0, "name": "x"}),
        (404, "POST", "/worker/tasks/424242/attempts/1/complete", {"output": 1}),
        (404, "POST", f"/worker/tasks/{queued}/attempts/9/complete", {"output": 1}),
    ]
    for status, method, path, body in cases:
        if isinstance(body, bytes) or hasattr(body, "__next__"):
            response = api.client.request(method, path, content=body, headers=json_type)
        else:
            response = api.client.request(method, path, json=body)
        assert response.status_code == status, (path, body if len(str(body)) < 200 else "...")
        error_of(response)
    # Nothing was written by any of them: the two tasks, as they were.
    assert sql(url, "SELECT id, status::text, priority FROM tasks ORDER BY id") == [
        (queued, "running", 0),
        (done, "completed", -1),
    ]
    assert sql(url, "SELECT count(*) FROM sent_events") == [(0,)]


# --- the operator's routes -----------------------------------------------------------------


def test_list_filters_and_newest_first(api, engine):
    a = engine.enqueue("resize", tags={"customer": "42", "plan": "pro"})
    b = engine.enqueue("resize", tags={"customer": "7"})
    c = engine.enqueue("greet", {"name": "Cy"}, tags={"customer": "42"})

    def ids(query: str) -> list[int]:
        return [task["id"] for task in api.client.get(f"/tasks{query}").json()["tasks"]]

    assert ids("") == [c, b, a]
    assert ids("?tag=customer=42") == [c, a]
    assert ids("?tag=customer=42&tag=plan=pro") == [a]
    assert ids("?name=resize&limit=1") == [b]
    assert ids("?status=completed") == []
    task = api.client.get("/tasks?name=greet").json()["tasks"][0]
    assert task["tags"] == {"customer": "42"}
    assert task["input"] == {"name": "Cy"}
    datetime.datetime.fromisoformat(task["created_at"])  # ISO 8601


def test_retry_cancel_replay_and_priority(api, engine):
    task_id = engine.enqueue("resize")
    moved = api.client.post(f"/tasks/{task_id}/priority", json={"priority": 7})
    assert moved.json()["task"]["priority"] == 7
    cancelled = api.client.post(f"/tasks/{task_id}/cancel")
    assert cancelled.json()["task"]["status"] == "cancelled"
    again = api.client.post(f"/tasks/{task_id}/cancel")
    assert (again.status_code, error_of(again)) == (
        409,
        f"task {task_id} is cancelled: it has finished already",
    )
    assert api.client.post(f"/tasks/{task_id}/priority", json={"priority": 1}).status_code == 409
    retried = api.client.post(f"/tasks/{task_id}/retry")
    assert retried.json()["task"]["status"] == "queued"
    assert api.client.post(f"/tasks/{task_id}/retry").status_code == 409  # not failed
    assert api.client.post(f"/tasks/{task_id}/replay").status_code == 409  # not finished
    api.claim()
    api.attempt(task_id, 1, "complete", {"output": 1})
    replayed = api.client.post(f"/tasks/{task_id}/replay")
    assert replayed.json()["task"]["status"] == "queued"
    shown = api.client.get(f"/tasks/{task_id}").json()
    assert [a["action"] for a in shown["actions"]] == ["reprioritize", "retry", "replay"]


def test_fork(api, engine):
    task_id = engine.enqueue("greet", {"name": "Di"})
    api.claim(names=["greet"])
    running_fork = api.client.post(f"/tasks/{task_id}/fork", json={"at": 0})
    assert running_fork.status_code == 409
    for seq, name in enumerate(["compose", "deliver"], start=1):
        api.attempt(task_id, 1, "steps", {"seq": seq, "name": name, "output": seq})
    api.attempt(task_id, 1, "complete", {"output": "done"})
    unknown = api.client.post(f"/tasks/{task_id}/fork", json={"before": "shout"})
    assert (unknown.status_code, "no event named 'shout'" in error_of(unknown)) == (422, True)
    forked = api.client.post(f"/tasks/{task_id}/fork", json={"before": "deliver"})
    assert forked.status_code == 201
    fork_id = forked.json()["id"]
    shown = api.client.get(f"/tasks/{fork_id}").json()
    assert (shown["task"]["forked_from"], shown["task"]["forked_at"]) == (task_id, 1)
    assert [e["name"] for e in shown["events"]] == ["compose"]
    assert [f["id"] for f in api.client.get(f"/tasks/{task_id}").json()["forks"]] == [fork_id]
    # The fork is claimed with the copied step to replay.
    claimed = api.claim(names=["greet"]).json()["task"]
    assert claimed["id"] == fork_id
    assert [(s["seq"], s["name"], s["result"]) for s in claimed["history"]] == [(1, "compose", 1)]


def test_an_event_wakes_the_task_waiting_for_it(lesson, api, engine):
    @engine.durable_task("approval")
    def approval(input):
        return lesson.durable.current_durable_task().wait_for_event("approved:7")

    task_id = engine.enqueue("approval")
    with running(worker(lesson, engine)):
        wait_until(lambda: engine.get(task_id).status == "suspended")
        sent = api.client.post("/events/approved:7", json={"payload": {"by": "ana"}})
        assert sent.json() == {"first": True, "woken": [task_id], "payload": {"by": "ana"}}
        assert engine.wait(task_id, timeout=30).output == {"by": "ana"}
    repeated = api.client.post("/events/approved:7", json={"payload": {"by": "bo"}})
    assert repeated.json() == {"first": False, "woken": [], "payload": {"by": "ana"}}


# --- stats, metrics, the OpenAPI document --------------------------------------------------


def test_stats_metrics_and_the_openapi_document(api, engine):
    for _ in range(3):
        assert api.client.post("/tasks", json={"name": "resize"}).status_code == 201
    [stats] = api.client.get("/stats").json()["queues"]
    assert (stats["name"], stats["queued"], stats["running"]) == ("resize", 3, 0)
    assert metric(api, "hardway_tasks", task_name="resize", status="queued") == 3
    assert metric(api, "hardway_database_up") == 1
    assert metric(api, "hardway_http_workers_waiting") == 0
    api.claim()
    assert metric(api, "hardway_tasks", task_name="resize", status="running") == 1
    assert metric(api, "hardway_tasks", task_name="resize", status="queued") == 2

    document = api.client.get("/openapi.json").json()
    assert {"/tasks", "/tasks/{task_id}/fork", "/worker/claim"} <= set(document["paths"])
    assert "/dashboard" not in document["paths"]
    assert api.client.get("/docs").status_code == 200


def test_api_py_without_a_token_makes_one_and_prints_it(lesson, url, pg_server_url):
    dbname = conninfo.conninfo_to_dict(url)["dbname"]
    env = {k: v for k, v in lesson_env(pg_server_url, dbname).items() if k != "HARDWAY_API_TOKEN"}
    port = free_port()
    command = [sys.executable, str(lesson_dir(lesson.name) / "api.py"), "--port", str(port)]
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        assert process.stderr is not None
        first = process.stderr.readline()  # printed before the server starts
        assert first.startswith("API token (set HARDWAY_API_TOKEN to choose one): "), first
        token = first.split(": ", 1)[1].strip()
        assert len(token) >= 32
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: _answers(base + "/stats"), timeout=30)
        task = {"name": "greet", "input": {"name": "Ada"}}  # ops_tasks, api.py's default
        assert httpx.post(base + "/tasks", json=task).status_code == 401
        headers = {"Authorization": f"Bearer {token}"}
        assert httpx.post(base + "/tasks", json=task, headers=headers).status_code == 201
    finally:
        process.terminate()
        process.communicate(timeout=30)
    assert sql(url, "SELECT count(*) FROM tasks") == [(1,)]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.TransportError:
        return False
