"""Live streams as a real browser sees them: Debian's chromium, driven by Playwright, on a page of
the server's own origin. Needs `chromium` on PATH (apt-get install chromium) or $CHROMIUM."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis
from playwright.sync_api import Browser, Page

from tests.conftest import Procs, enqueue, free_port, wait_until
from tests.test_faults import all_done, statuses

# Opens a WebSocket on each job, one after another: [statuses, close code, clean] for each.
WEBSOCKETS = """async (ids) => {
  const seen = [];
  for (const id of ids) {
    seen.push(await new Promise((resolve) => {
      const ws = new WebSocket(`ws://${location.host}/ws?id=${id}`);
      const statuses = [];
      ws.onmessage = (e) => statuses.push(JSON.parse(e.data).status);
      ws.onclose = (e) => resolve([statuses, e.code, e.wasClean]);
    }));
  }
  return seen;
}"""

# Follows a job with an EventSource until the browser gives up on it for good (readyState
# CLOSED: it never reconnects after that), or 20 s pass: {statuses, ids, errors, state}.
EVENTSOURCE = """async (id) => new Promise((resolve) => {
  const es = new EventSource(`/events?id=${id}`);
  const seen = {statuses: [], ids: [], errors: 0, state: -1};
  const end = () => { seen.state = es.readyState; es.close(); resolve(seen); };
  es.onmessage = (e) => {
    seen.statuses.push(JSON.parse(e.data).status);
    seen.ids.push(e.lastEventId);
  };
  es.onerror = () => { seen.errors++; if (es.readyState === EventSource.CLOSED) end(); };
  setTimeout(end, 20000);
})"""


@pytest.fixture
def page(browser: Browser, procs: Procs) -> Iterator[Page]:
    """A page on the origin of a server whose worker sleeps for as many seconds as the input."""
    port = free_port()
    procs.server(port)
    procs.worker("--handler", "handlers:slow")
    page = browser.new_page()
    page.goto(f"http://127.0.0.1:{port}/healthz")
    yield page
    page.close()


def finished(r: redis.Redis, prefix: str, n: int) -> list[str]:
    ids = [enqueue(r, prefix, "0") for _ in range(n)]
    wait_until(lambda: all_done(r, prefix, ids), what="the jobs to be done")
    return ids


def running(r: redis.Redis, prefix: str) -> str:
    job_id = enqueue(r, prefix, "1.5")
    wait_until(lambda: statuses(r, prefix, [job_id])[0]["status"] == "running")
    return job_id


def test_websocket_on_finished_jobs_closes_with_1000(page: Page, r: redis.Redis,
                                                     prefix: str) -> None:
    ids = finished(r, prefix, 20)
    assert page.evaluate(WEBSOCKETS, ids) == [[["done"], 1000, True]] * 20


def test_websocket_on_a_running_job_closes_with_1000(page: Page, r: redis.Redis,
                                                     prefix: str) -> None:
    assert page.evaluate(WEBSOCKETS, [running(r, prefix)]) == [[["running", "done"], 1000, True]]


def check_eventsource(seen: dict[str, Any], expected: list[str]) -> None:
    assert seen["statuses"] == expected, seen  # the end exactly once
    assert seen["state"] == 2, f"still reconnecting: {seen}"  # CLOSED: it will not reconnect
    assert all(event_id.isdigit() for event_id in seen["ids"]), seen


def test_eventsource_on_a_finished_job_gets_it_once_then_stops(page: Page, r: redis.Redis,
                                                               prefix: str) -> None:
    [job_id] = finished(r, prefix, 1)
    check_eventsource(page.evaluate(EVENTSOURCE, job_id), ["done"])


def test_eventsource_on_a_running_job_follows_it_then_stops(page: Page, r: redis.Redis,
                                                            prefix: str) -> None:
    check_eventsource(page.evaluate(EVENTSOURCE, running(r, prefix)), ["running", "done"])
