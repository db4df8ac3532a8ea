"""The dashboard (static/, served at /) in a real browser: Debian's chromium driven by Playwright,
against a real server.py and worker.py. Needs `chromium` on PATH (apt-get install chromium) or
$CHROMIUM, like test_browser.py."""

from __future__ import annotations

import json
import re
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import redis
from playwright.sync_api import Page, expect

from tests.conftest import Console, Procs, enqueue, free_port, stop, wait_until

TOKEN = "dashboard-test-token"
DIGITS = re.compile(r"^[\d,]+$")  # a count, as the page shows it


def start(procs: Procs, *worker_args: str) -> str:
    """A server and one worker (with worker_args); the server's base URL."""
    port = free_port()
    procs.server(port)
    procs.worker(*worker_args)
    return f"http://127.0.0.1:{port}"


def post(url: str, body: dict[str, Any] | None = None) -> Any:
    """POST JSON with plain HTTP, as a client that is not the page; the JSON answer."""
    data = json.dumps(body or {}).encode()
    request = urllib.request.Request(url, data=data, method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read() or b"null")


def get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def open_dashboard(page: Page, base: str) -> None:
    """Load the page and wait until it is live: /feed open and /stats shown."""
    page.goto(f"{base}/")
    expect(page.locator("#live")).to_have_text("live")
    expect(page.locator("#count-done")).to_have_text(DIGITS)



def status_cell(page: Page, job_id: str) -> Any:
    return page.locator(f'tr[data-id="{job_id}"] .status')


def test_the_page_loads_without_console_errors_or_warnings(page: Page, procs: Procs) -> None:
    console = Console(page)
    base = start(procs)
    before = post(f"{base}/submit", {"input": "before the page"})
    open_dashboard(page, base)
    expect(status_cell(page, before["id"])).to_have_text("done")  # seeded from GET /jobs
    markup = '<img src="x" onerror="window.pwned = 1"> after the page'
    after = post(f"{base}/submit", {"input": markup})
    expect(status_cell(page, after["id"])).to_have_text("done")  # from /feed
    row = page.locator(f'tr[data-id="{after["id"]}"]')
    expect(row).to_contain_text(markup)  # shown as text, never parsed as HTML
    expect(row.locator("img")).to_have_count(0)
    assert page.evaluate("window.pwned") is None
    expect(page.locator("#workers tbody tr")).to_have_count(1)
    expect(page.locator("#chart rect.done")).not_to_have_count(0)
    assert console.messages == []


def test_a_job_submitted_with_curl_appears_and_turns_done_without_a_reload(
        page: Page, procs: Procs, tmp_path: Path) -> None:
    base = start(procs, "--handler", "handlers:gate")
    open_dashboard(page, base)
    page.evaluate("window.notReloaded = true")
    gate = tmp_path / "gate"
    body = json.dumps({"input": str(gate)})
    curl = subprocess.run(["curl", "-sS", "--fail-with-body", "-d", body, f"{base}/submit"],
                          capture_output=True, text=True, timeout=30)
    assert curl.returncode == 0, curl.stderr + curl.stdout
    job = json.loads(curl.stdout)
    expect(status_cell(page, job["id"])).to_have_text("running")
    gate.touch()
    expect(status_cell(page, job["id"])).to_have_text("done")
    expect(page.locator(f'tr[data-id="{job["id"]}"]')).to_contain_text("through")
    assert page.evaluate("window.notReloaded") is True


def test_a_job_that_ends_before_the_feed_opens_is_shown_ended(
        page: Page, procs: Procs, tmp_path: Path) -> None:
    """The page reads the jobs only once /feed is open: a job that ends while the feed's
    request is on its way was shown queued for good when the read came first."""
    base = start(procs, "--handler", "handlers:gate")
    gate = tmp_path / "gate"
    job = post(f"{base}/submit", {"input": str(gate)})
    held: list[Any] = []
    page.route("**/feed", lambda route: held.append(route))  # held until we let it go
    page.goto(f"{base}/")
    expect(page.locator("#count-running")).to_have_text("1")  # the page is up, the job runs
    assert len(held) == 1
    gate.touch()
    wait_until(lambda: get(f"{base}/status?id={job['id']}")["status"] == "done",
               what="the job to end")
    held[0].continue_()
    expect(page.locator("#live")).to_have_text("live")
    expect(status_cell(page, job["id"])).to_have_text("done")


def test_retry_makes_a_failed_job_done(page: Page, procs: Procs, tmp_path: Path) -> None:
    base = start(procs, "--handler", "handlers:fails_once", "--max-attempts", "1")
    open_dashboard(page, base)
    job = post(f"{base}/submit", {"input": str(tmp_path / "seen")})
    row = page.locator(f'tr[data-id="{job["id"]}"]')
    expect(status_cell(page, job["id"])).to_have_text("failed")
    expect(row).to_contain_text("first try fails")
    row.locator("button.retry").click()
    expect(status_cell(page, job["id"])).to_have_text("done")
    expect(row.locator("button.retry")).to_have_count(0)
    assert get(f"{base}/status?id={job['id']}")["result"] == "second try"


def test_cancel_makes_a_delayed_job_cancelled(page: Page, procs: Procs) -> None:
    base = start(procs)
    open_dashboard(page, base)
    page.fill("#submit-input", "not before an hour")
    page.fill("#submit-delay", "3600")
    page.click("#submit-button")
    row = page.locator("#jobs tbody tr", has=page.locator(".status", has_text="delayed"))
    expect(row).to_have_count(1)
    job_id = row.get_attribute("data-id")
    assert job_id is not None
    row.locator("button.cancel").click()
    expect(status_cell(page, job_id)).to_have_text("cancelled")
    expect(page.locator(f'tr[data-id="{job_id}"] button.cancel')).to_have_count(0)
    assert get(f"{base}/status?id={job_id}")["status"] == "cancelled"


def test_token_sign_in(page: Page, procs: Procs, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOBS_TOKEN", TOKEN)
    base = start(procs)
    page.goto(f"{base}/")
    expect(page.locator("#signin")).to_be_visible()
    expect(page.locator("#app")).to_be_hidden()

    page.fill("#token-input", "not the token")
    page.click("#token-button")
    expect(page.locator("#signin-error")).to_be_visible()
    expect(page.locator("#signin-error")).not_to_be_empty()
    expect(page.locator("#app")).to_be_hidden()

    page.fill("#token-input", TOKEN)
    page.click("#token-button")
    expect(page.locator("#signin")).to_be_hidden()
    expect(page.locator("#count-done")).to_have_text(DIGITS)
    expect(page.locator("#live")).to_have_text("live")
    [cookie] = page.context.cookies()
    assert cookie["httpOnly"] is True, cookie
    assert TOKEN not in page.evaluate("document.cookie")  # the script cannot read it
    assert page.locator("#token-input").input_value() == ""


    page.context.clear_cookies()  # signed out behind its back: the next poll gets a 401
    expect(page.locator("#signin")).to_be_visible()
    expect(page.locator("#app")).to_be_hidden()

    page.fill("#token-input", TOKEN)
    page.click("#token-button")
    expect(page.locator("#count-done")).to_have_text(DIGITS)
    page.click("#signout")
    expect(page.locator("#signin")).to_be_visible()
    assert all(cookie["value"] != TOKEN for cookie in page.context.cookies())


def test_when_the_feed_comes_back_the_page_reads_the_lists_again(
        page: Page, procs: Procs, r: redis.Redis, prefix: str) -> None:
    port = free_port()
    server = procs.server(port)  # no worker: nothing changes unless the page reads it
    open_dashboard(page, f"http://127.0.0.1:{port}")
    stop(server)
    expect(page.locator("#live")).to_have_text("reconnecting")
    job_id = enqueue(r, prefix, "queued while the server was down")  # no server heard it
    procs.server(port)
    expect(page.locator("#live")).to_have_text("live")
    expect(status_cell(page, job_id)).to_have_text("queued")
    expect(page.locator("#count-queued")).to_have_text("1")


def test_the_queue_picker_shows_one_queue_at_a_time(page: Page, procs: Procs) -> None:
    console = Console(page)
    base = start(procs, "--queues", "default,emails", "--concurrency", "2")
    plain = post(f"{base}/submit", {"input": "plain"})
    open_dashboard(page, base)
    expect(status_cell(page, plain["id"])).to_have_text("done")
    mail = post(f"{base}/submit", {"input": "mail", "queue": "emails"})
    picker = page.locator("#queue-select")
    expect(picker).to_be_visible()  # a second queue exists now
    expect(status_cell(page, mail["id"])).to_have_count(0)  # not the default queue's
    picker.select_option("emails")
    expect(status_cell(page, mail["id"])).to_have_text("done")
    expect(status_cell(page, plain["id"])).to_have_count(0)
    expect(page.locator("#count-done")).to_have_text("1")
    later = page.locator("#submit-input")  # the box submits to the queue shown
    later.fill("from the page")
    page.locator("#submit-delay").fill("3600")
    page.locator("#submit-button").click()
    expect(page.locator("tr", has_text="from the page").locator(".status")).to_have_text(
        "delayed")
    delayed = get(f"{base}/jobs?status=delayed&queue=emails")["jobs"]
    assert [job["input"] for job in delayed] == ["from the page"]
    assert console.messages == []
