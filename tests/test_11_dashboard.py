"""Lesson 11's dashboard, in a real browser: Playwright drives the system's Chromium against the
real API (api.create_app), served by uvicorn, a real worker and a real database.

- an operator finds a failed task, reads its timeline and its error, presses Retry once the
  cause is fixed, and watches the task run again and complete; the queue counts follow;
- the engine's refusals reach the page: a retry of a completed task says why it cannot be;
- the token stays in the URL's fragment: no request the page makes carries it in its URL;
- without the token the page shows everything and changes nothing;
- what a task holds is shown as text, never run as HTML.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import lessons_from, load_lesson, running, serving, worker
from playwright.sync_api import Page, expect, sync_playwright

CHROMIUM = Path("/usr/bin/chromium")
TOKEN = "dashboard-test-token"

# The page polls every 2 seconds: a change the worker makes shows within one or two polls.
WORKER_SHOWN_MS = 10_000

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason=f"no browser at {CHROMIUM}: these tests drive the system's Chromium (Playwright"
    " downloads none of its own here)",
)


@pytest.fixture(params=lessons_from("11"), scope="module")
def lesson(request):
    return load_lesson(request.param)


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser) -> Iterator[Page]:
    context = browser.new_context()  # its own cookies and storage: nothing left by another test
    yield context.new_page()
    context.close()


def task_row(page: Page, task_id: int):
    return page.locator(f'[data-testid="task-row"][data-task-id="{task_id}"]')


def queue_count(page: Page, queue: str, field: str):
    return page.locator(f'[data-testid="queue"][data-queue="{queue}"] [data-field="{field}"]')


def test_a_failed_task_is_retried_from_the_dashboard_and_completes(
    lesson, engine, page, current_durable_task
):
    payment_service_up = threading.Event()

    @engine.durable_task("place_order", max_attempts=1)
    def place_order(order):
        ctx = current_durable_task()
        ctx.step("reserve stock", lambda: {"reserved": order["quantity"]})

        def charge():
            if not payment_service_up.is_set():
                raise ConnectionError("payment service unavailable")
            return {"charged": order["amount"]}

        return ctx.step("charge card", charge)

    urls: list[str] = []
    page.on("request", lambda request: urls.append(request.url))
    with serving(lesson.api.create_app(engine, TOKEN)) as api, running(worker(lesson, engine)):
        task_id = engine.enqueue("place_order", {"quantity": 2, "amount": 72})
        assert engine.wait(task_id, timeout=30).status == "failed"

        page.goto(f"{api}/dashboard#token={TOKEN}")
        expect(task_row(page, task_id)).to_contain_text("failed")
        expect(queue_count(page, "place_order", "failed_last_hour")).to_have_text("1")
        task_row(page, task_id).click()
        expect(page.get_by_test_id("task-status")).to_have_text("failed")
        timeline = page.get_by_test_id("timeline")
        # The step that completed is in the log; the one that failed is not (a retry runs it).
        expect(timeline.get_by_test_id("event")).to_have_count(1)
        expect(timeline.get_by_test_id("event")).to_contain_text("reserve stock")
        expect(timeline.get_by_test_id("attempt")).to_contain_text(
            ["started", "ConnectionError: payment service unavailable"]
        )
        expect(page.get_by_test_id("task-error")).to_contain_text("payment service unavailable")

        payment_service_up.set()  # the cause, fixed
        page.get_by_role("button", name="Retry").click()
        expect(page.get_by_test_id("task-status")).to_have_text(
            "completed", timeout=WORKER_SHOWN_MS
        )
        expect(timeline.get_by_test_id("action")).to_contain_text("retry")
        expect(timeline.get_by_test_id("event")).to_contain_text(["reserve stock", "charge card"])
        expect(timeline.get_by_test_id("attempt")).to_have_count(4)  # two started, two ended
        expect(task_row(page, task_id)).to_contain_text("completed")
        expect(queue_count(page, "place_order", "completed_last_hour")).to_have_text(
            "1", timeout=WORKER_SHOWN_MS
        )

        # A completed task cannot be retried: the API says why (409), and the page shows it.
        page.get_by_role("button", name="Retry").click()
        expect(page.get_by_test_id("message")).to_contain_text(
            "only a failed or cancelled task can be retried"
        )
        # Stop the page's polling before the server goes.
        page.close()

    assert engine.get(task_id).output == {"charged": 72}
    assert [action.action for action in engine.actions(task_id)] == ["retry"]
    assert urls and not [url for url in urls if TOKEN in url.split("#")[0]]


def test_without_the_token_the_page_shows_everything_and_changes_nothing(lesson, engine, page):
    engine.task("render")(lambda input: input)
    task_id = engine.enqueue("render", "<b>not bold</b>")  # no worker: it stays queued

    with serving(lesson.api.create_app(engine, TOKEN)) as api:
        page.goto(f"{api}/dashboard")
        expect(page.get_by_test_id("read-only")).to_be_visible()
        task_row(page, task_id).click()
        detail = page.get_by_test_id("task-detail")
        # The input is shown as the characters it holds, not as markup.
        expect(detail).to_contain_text('"<b>not bold</b>"')
        expect(detail.locator("b")).to_have_count(0)

        page.get_by_role("button", name="Cancel").click()
        expect(page.get_by_test_id("message")).to_contain_text("Authorization: Bearer")
        page.close()

    assert engine.get(task_id).status == "queued"
