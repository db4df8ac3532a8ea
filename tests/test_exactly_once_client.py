"""Exactly once (issue 18), the client's side: client.py and its library send an
Idempotency-Key with every submit and send the same request again when it got no answer;
--expires-in and expires_in=; the schedules' flags and functions; the dashboard's schedules card.

    python3 -m pytest tests/test_exactly_once_client.py -q
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

import pytest
from aiohttp import ClientSession, web
from aiohttp.test_utils import TestServer
from playwright.sync_api import Page, expect

import client as library
from server import make_app
from store import Keys
from tests.conftest import ROOT, Console, Procs, free_port, wait_until

HEX32 = re.compile(r"[0-9a-f]{32}")


def run_client(procs: Procs, *args: str) -> subprocess.CompletedProcess[str]:
    env = {name: value for name, value in procs.env().items() if name != "JOBS_TOKEN"}
    return subprocess.run([sys.executable, "client.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.fixture(autouse=True)
def no_token(monkeypatch: pytest.MonkeyPatch) -> None:
    """The library reads JOBS_TOKEN: none from the environment of whoever runs the tests."""
    monkeypatch.delenv("JOBS_TOKEN", raising=False)


def send(base: str, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """A request with plain HTTP, as a client that is not ours: (status, JSON body or None)."""
    request = urllib.request.Request(f"{base}{path}", method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            data = response.read()
            return response.status, json.loads(data) if data else None
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


# -- the key, and the retries: a server of the test's own in front of the real one -------------

class Flaky:
    """Stands in front of the real server and answers each POST /submit as its plan says: a
    status (not passed on: a proxy's page), "drop" (passed on, so the job is made, then the
    connection is cut before the answer), and, once the plan is done, the real answer. It
    keeps the Idempotency-Key and the body of every try, and the real answers."""

    def __init__(self, real: str, plan: list[int | str]) -> None:
        self.real, self.plan = real, list(plan)
        self.tries: list[tuple[str | None, bytes]] = []
        self.answers: list[tuple[int, dict[str, Any], str | None]] = []

    async def submit(self, request: web.Request) -> web.StreamResponse:
        body, key = await request.read(), request.headers.get("Idempotency-Key")
        self.tries.append((key, body))
        step = self.plan.pop(0) if self.plan else "pass"
        if isinstance(step, int):
            return web.Response(status=step, text=f"<html><h1>{step} from a proxy</h1></html>",
                                content_type="text/html")
        headers = {"Content-Type": "application/json"} | ({} if key is None else
                                                          {"Idempotency-Key": key})
        async with ClientSession() as session, session.post(
                f"{self.real}/submit", data=body, headers=headers) as answer:
            status, data = answer.status, await answer.read()
            self.answers.append((status, json.loads(data),
                                 answer.headers.get("Idempotent-Replayed")))
        if step == "drop":
            assert request.transport is not None
            request.transport.abort()  # the job is made; its answer never comes
        return web.Response(status=status, body=data, content_type="application/json")

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/submit", self.submit)
        return app


async def flaky(aiohttp_server: Any, redis_url: str, prefix: str,
                plan: list[int | str]) -> tuple[Flaky, str]:
    real: TestServer = await aiohttp_server(make_app(redis_url, prefix=prefix))
    front = Flaky(str(real.make_url("")).rstrip("/"), plan)
    proxy: TestServer = await aiohttp_server(front.app())
    return front, str(proxy.make_url("")).rstrip("/")


def queued(r: Any, prefix: str, queue: str = "default") -> int:
    return int(r.zcard(Keys(prefix, queue).index("queued")))


async def test_the_library_sends_the_same_key_again_until_answered(
        aiohttp_server: Any, redis_url: str, prefix: str, r: Any) -> None:
    front, url = await flaky(aiohttp_server, redis_url, prefix, [503, "drop", 502])
    job = await asyncio.to_thread(library.submit, "once", server=url, priority=7)
    keys = {key for key, _ in front.tries}
    assert len(front.tries) == 4 and len(keys) == 1, front.tries
    assert HEX32.fullmatch(keys.pop() or "")
    assert {body for _, body in front.tries} == {front.tries[0][1]}  # byte for byte
    (made, first, replayed), (again, last, header) = front.answers
    assert (made, replayed, again, header) == (201, None, 200, "true")
    assert job["id"] == first["id"] == last["id"] and job["priority"] == 7
    assert queued(r, prefix) == 1  # four tries, two reached Redis: one job


async def test_each_submit_has_a_key_of_its_own(aiohttp_server: Any, redis_url: str,
                                                prefix: str, r: Any) -> None:
    front, url = await flaky(aiohttp_server, redis_url, prefix, [])
    one = await asyncio.to_thread(library.submit, "same text", server=url)
    two = await asyncio.to_thread(library.submit, "same text", server=url)
    assert one["id"] != two["id"] and queued(r, prefix) == 2
    assert front.tries[0][0] != front.tries[1][0]


async def test_the_async_piece_retries_too_and_names_the_tries_when_it_gives_up(
        aiohttp_server: Any, redis_url: str, prefix: str) -> None:
    front, url = await flaky(aiohttp_server, redis_url, prefix, [503] * 100)
    async with library.open_session() as session:
        started = time.monotonic()
        with pytest.raises(library.ServerError) as refused:
            await library.submit_job(session, url, "never", retry_for=0.5)
    assert time.monotonic() - started < 5
    assert refused.value.status == 503 and "503 from a proxy" in refused.value.error
    assert len(front.tries) > 1 and len({key for key, _ in front.tries}) == 1
    assert f"after {len(front.tries)} tries" in str(refused.value)
    assert "Idempotency-Key" in str(refused.value)


@pytest.mark.parametrize("status", [400, 409, 413, 507])
async def test_an_answer_that_is_no_outage_is_not_sent_again(
        aiohttp_server: Any, redis_url: str, prefix: str, status: int) -> None:
    front, url = await flaky(aiohttp_server, redis_url, prefix, [status])
    with pytest.raises(library.ServerError) as refused:
        await asyncio.to_thread(library.submit, "x", server=url)
    assert refused.value.status == status and len(front.tries) == 1
    assert "tries" not in str(refused.value)


async def test_the_command_line_sends_the_same_key_again(
        aiohttp_server: Any, redis_url: str, prefix: str, r: Any, procs: Procs) -> None:
    front, url = await flaky(aiohttp_server, redis_url, prefix, ["drop", 504])
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "client.py", "--server", url, "--no-wait", "--queue", "emails", "hi",
        cwd=ROOT, env=procs.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err
    assert out.decode().strip() == front.answers[0][1]["id"]
    assert len(front.tries) == 3 and len({key for key, _ in front.tries}) == 1
    assert "submit answered at try 3" in err.decode()
    assert queued(r, prefix, "emails") == 1


def test_a_key_of_the_callers_own_makes_one_job(procs: Procs, server: str, r: Any,
                                                prefix: str) -> None:
    first = library.submit("order 17", server=server, idempotency_key="order-17")
    again = library.submit("order 17", server=server, idempotency_key="order-17")
    assert again["id"] == first["id"] and queued(r, prefix) == 1
    with pytest.raises(library.ServerError) as conflict:
        library.submit("order 18", server=server, idempotency_key="order-17")
    assert conflict.value.status == 409 and "different body" in conflict.value.error
    with pytest.raises(library.ServerError) as bad:
        library.submit("x", server=server, idempotency_key="é")
    assert bad.value.status == 400 and "Idempotency-Key" in bad.value.error


def test_nothing_listens_one_line_after_the_tries(procs: Procs) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    result = run_client(procs, "--server", nowhere, "--timeout", "1", "x")
    assert time.monotonic() - started < 15
    assert result.returncode == 2 and result.stdout == ""
    [line] = result.stderr.splitlines()
    assert "cannot reach" in line and "tries" in line and "Idempotency-Key" in line, line
    with pytest.raises(library.ServerError, match="cannot reach") as unreachable:
        library.submit("x", server=nowhere, retry_for=0)
    assert unreachable.value.status is None and "tries" not in str(unreachable.value)


# -- expires_in -----------------------------------------------------------------------------------

def test_expires_in_is_sent_and_an_expired_job_says_so(procs: Procs, server: str) -> None:
    job = library.submit("soon or never", server=server, expires_in=30)
    assert job["expires_in"] == 30 and job["expires_at"]
    library.pause("default", server=server)  # nothing starts: the next job expires queued
    procs.worker()
    result = run_client(procs, "--server", server, "--expires-in", "0.5", "too late")
    assert (result.returncode, result.stdout) == (1, ""), result.stderr
    assert "was cancelled (expired: not started within 0.5 s)" in result.stderr, result.stderr
    with pytest.raises(library.ServerError) as bad:
        library.submit("x", server=server, expires_in=-1)
    assert bad.value.status == 400 and '"expires_in"' in bad.value.error


# -- schedules: the command line ------------------------------------------------------------------

def test_the_command_line_sets_lists_pauses_resumes_and_deletes_schedules(
        procs: Procs, server: str) -> None:
    made = run_client(procs, "--server", server, "--schedule", "nightly", "--cron",
                      "0  3 * * *", "--timezone", "Europe/Paris", "backup")
    assert made.returncode == 0, made.stderr
    assert re.fullmatch(r"nightly +active  cron '0 3 \* \* \*' Europe/Paris +next "
                        r"\d{4}-\d\d-\d\dT03:00:00\+0[12]:00  0 runs, last job -\n",
                        made.stdout), made.stdout
    assert library.schedule("nightly", server=server) | {"next_run": None} == {
        "name": "nightly", "cron": "0 3 * * *", "timezone": "Europe/Paris", "input": "backup",
        "queue": "default", "priority": 5, "group": None, "expires_in": None,
        "overlap": "allow", "paused": False, "next_run": None, "last_job": None, "runs": 0}
    every = run_client(procs, "--server", server, "--schedule", "ping", "--every", "3600",
                       "--queue", "emails", "--priority", "8", "--group", "ops",
                       "--expires-in", "30", "--overlap", "skip", "ping")
    assert every.returncode == 0, every.stderr
    assert every.stdout.split()[:4] == ["ping", "active", "every", "3600s"]
    assert every.stdout.rstrip().endswith(";  queue emails")
    assert {k: v for k, v in library.schedule("ping", server=server).items()
            if k in ("every", "queue", "priority", "group", "expires_in", "overlap")} == {
        "every": 3600, "queue": "emails", "priority": 8, "group": "ops", "expires_in": 30,
        "overlap": "skip"}
    listed = run_client(procs, "--server", server, "--schedules")
    assert listed.returncode == 0 and "2 schedules" in listed.stderr, listed.stderr
    assert [line.split()[:2] for line in listed.stdout.splitlines()] == [
        ["nightly", "active"], ["ping", "active"]]
    paused = run_client(procs, "--server", server, "--pause-schedule", "ping")
    assert (paused.returncode, paused.stdout.split()[:2]) == (0, ["ping", "paused"])
    assert library.schedule("ping", server=server)["paused"] is True
    resumed = run_client(procs, "--server", server, "--resume-schedule", "ping")
    assert (resumed.returncode, resumed.stdout.split()[:2]) == (0, ["ping", "active"])
    deleted = run_client(procs, "--server", server, "--delete-schedule", "ping")
    assert (deleted.returncode, deleted.stdout) == (0, ""), deleted.stderr
    assert "schedule ping deleted" in deleted.stderr
    assert [s["name"] for s in library.schedules(server=server)] == ["nightly"]


def test_a_schedule_that_ran_shows_its_runs_and_last_job(procs: Procs, server: str) -> None:
    procs.worker()
    library.set_schedule("tick", "tock", every=1, server=server)
    ran = wait_until(lambda: (s := library.schedule("tick", server=server))["runs"] >= 1 and s,
                     what="the schedule to make a job")
    job = library.wait(ran["last_job"], server=server, timeout=30)
    assert (job["result"], job["schedule"]) == ("TOCK", "tick")
    listed = run_client(procs, "--server", server, "--schedules")
    line = listed.stdout.strip()
    assert re.search(r" \d+ runs?, last job [0-9a-f]{32}$", line), line


@pytest.mark.parametrize(("args", "words"), [
    (["--schedule", "n", "--every", "5"], "--schedule NAME needs the TEXT"),
    (["--schedule", "n", "x"], "--cron EXPR or --every SECONDS, one of them"),
    (["--schedule", "n", "--cron", "* * * * *", "--every", "5", "x"], "one of them"),
    (["--schedule", "Nightly", "--every", "5", "x"], "'Nightly' is not a schedule name"),
    (["--schedule", "n", "--cron", "0 3 * *", "x"], "'0 3 * *' is not a cron expression"),
    (["--schedule", "n", "--every", "0.5", "x"], "argument --every: 0.5 is out of range"),
    (["--schedule", "n", "--every", "soon", "x"], "argument --every: 'soon' is not a number"),
    (["--schedule", "n", "--every", "5", "--overlap", "never", "x"], "argument --overlap"),
    (["--schedule", "n", "--every", "5", "--delay", "1", "x"], "--delay is for a submit"),
    (["--schedule", "n", "--every", "5", "--no-wait", "x"], "--no-wait is for a submit"),
    (["--schedule", "n", "--every", "5", "--timezone", "UTC", "x"], "--timezone goes with"),
    (["--cron", "* * * * *", "x"], "--cron goes with --schedule"),
    (["--every", "5", "x"], "--every goes with --schedule"),
    (["--overlap", "skip", "x"], "--overlap goes with --schedule"),
    (["--schedules", "--queues"], "not allowed with argument"),
    (["--schedules", "x"], "not allowed with argument"),
    (["--pause-schedule", "a b"], "'a b' is not a schedule name"),
    (["--delete-schedule", "n", "--concurrency", "2"], "the limits"),
    (["--expires-in", "0", "x"], "argument --expires-in: 0 is out of range"),
    (["--expires-in", "nan", "x"], "argument --expires-in: 'nan' is not a number"),
    (["--expires-in", "5", "--stats"], "--expires-in goes with TEXT"),
])
def test_bad_flags_are_one_line_and_exit_2(procs: Procs, args: list[str], words: str) -> None:
    result = run_client(procs, *args)
    assert result.returncode == 2 and result.stdout == ""
    assert "Traceback" not in result.stderr and result.stderr.startswith("usage:")
    [error] = [line for line in result.stderr.splitlines() if "error:" in line]
    assert error.startswith("client.py: error: ") and words in error, result.stderr


@pytest.mark.parametrize(("args", "words"), [
    (["--schedule", "n", "--cron", "0 25 * * *", "x"], "server said 400: '25' is not a hour"),
    (["--schedule", "n", "--cron", "0 3 * * *", "--timezone", "Mars/Base", "x"],
     "'Mars/Base' is not an IANA time zone"),
    (["--schedule", "n", "--every", "99999999", "x"], '"every" must be'),
    (["--schedule", "n", "--every", "5", "--expires-in", "99999999", "x"], '"expires_in"'),
    (["--pause-schedule", "nope"], "server said 404: no schedule named 'nope'"),
    (["--resume-schedule", "nope"], "server said 404"),
    (["--delete-schedule", "nope"], "server said 404"),
])
def test_a_value_the_server_refuses_is_one_line_and_exit_2(
        procs: Procs, server: str, args: list[str], words: str) -> None:
    result = run_client(procs, "--server", server, *args)
    assert (result.returncode, result.stdout) == (2, ""), result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith("client: ") and words in line, line
    assert library.schedules(server=server) == []


# -- schedules: the library -----------------------------------------------------------------------

def test_the_library_steers_schedules(procs: Procs, server: str) -> None:
    made = library.set_schedule("digest", "weekly digest", cron="30 8 * * mon-fri",
                                timezone="America/New_York", queue="emails", priority=3,
                                group="news", expires_in=600, overlap="skip", server=server)
    assert made | {"next_run": None} == {
        "name": "digest", "cron": "30 8 * * mon-fri", "timezone": "America/New_York",
        "input": "weekly digest", "queue": "emails", "priority": 3, "group": "news",
        "expires_in": 600, "overlap": "skip", "paused": False, "next_run": None,
        "last_job": None, "runs": 0}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT08:30:00-0[45]:00", made["next_run"])
    assert library.schedule("digest", server=server) == made
    every = library.set_schedule("ping", "ping", every=90, server=server)
    assert (every["every"], every["queue"], every["overlap"]) == (90, "default", "allow")
    assert [s["name"] for s in library.schedules(server=server)] == ["digest", "ping"]
    assert library.pause_schedule("ping", server=server)["paused"] is True
    assert library.schedule("ping", server=server)["paused"] is True
    assert library.resume_schedule("ping", server=server)["paused"] is False
    replaced = library.set_schedule("ping", "pong", every=30, server=server)
    assert (replaced["input"], replaced["every"]) == ("pong", 30)
    library.delete_schedule("ping", server=server)
    assert [s["name"] for s in library.schedules(server=server)] == ["digest"]
    for call in (library.schedule, library.delete_schedule, library.pause_schedule,
                 library.resume_schedule):
        with pytest.raises(library.ServerError) as unknown:
            call("ping", server=server)
        assert unknown.value.status == 404 and "no schedule named 'ping'" in unknown.value.error
    for kwargs, words in (({}, '"cron"'), ({"cron": "* * * * *", "every": 5}, '"cron"'),
                          ({"every": 5, "timezone": "UTC"}, '"timezone" goes with "cron"'),
                          ({"cron": "61 * * * *"}, "minute"), ({"every": 5, "priority": 11},
                                                               '"priority"'),
                          ({"every": 5, "overlap": "never"}, '"overlap"')):
        with pytest.raises(library.ServerError) as bad:
            library.set_schedule("bad", "x", server=server, **kwargs)
        assert bad.value.status == 400 and words in bad.value.error, (kwargs, bad.value.error)
    with pytest.raises(library.ServerError) as bad_name:
        library.set_schedule("Bad Name", "x", every=5, server=server)
    assert bad_name.value.status == 400
    assert [s["name"] for s in library.schedules(server=server)] == ["digest"]


# -- schedules: the dashboard ---------------------------------------------------------------------

def test_the_dashboard_shows_adds_pauses_and_deletes_schedules(
        page: Page, procs: Procs, server: str) -> None:
    procs.worker()
    send(server, "PUT", "/schedules/heartbeat", {"every": 1, "input": "beat"})
    send(server, "PUT", "/schedules/nightly",
         {"cron": "0 3 * * *", "timezone": "Europe/Paris", "input": "backup"})
    console = Console(page)
    page.goto(f"{server}/")
    expect(page.locator("#live")).to_have_text("live")
    nightly = page.locator('#schedules tr[data-schedule="nightly"]')
    expect(nightly.locator(".when")).to_have_text("0 3 * * * Europe/Paris")
    expect(nightly.locator(".state")).to_have_text("active")
    expect(nightly.locator(".next")).to_have_text(re.compile(  # the date; within the hour, how soon
        r"^(\d{4}-\d\d-\d\d 03:00|03:00 \((in \d+ (s|min)|due)\))$"))
    expect(nightly.locator(".last")).to_have_text("\u2013")  # a dash: none yet
    heartbeat = page.locator('#schedules tr[data-schedule="heartbeat"]')
    expect(heartbeat.locator(".when")).to_have_text("every 1 s")
    link = heartbeat.locator(".last a")  # once it has made a job: a link to it
    expect(link).to_have_attribute("href", re.compile(r"^/status\?id=[0-9a-f]{32}$"))
    job_id = (link.get_attribute("title") or "")
    status, job = send(server, "GET", f"/status?id={job_id}")
    assert status == 200 and job["schedule"] == "heartbeat"
    expect(heartbeat.locator(".runs")).not_to_have_text("0")

    heartbeat.locator("button.pause").click()
    expect(heartbeat.locator(".state")).to_have_text("paused")
    assert send(server, "GET", "/schedules/heartbeat")[1]["paused"] is True
    heartbeat.locator("button.resume").click()
    expect(heartbeat.locator(".state")).to_have_text("active")
    assert send(server, "GET", "/schedules/heartbeat")[1]["paused"] is False
    heartbeat.locator("button.delete").click()
    expect(heartbeat).to_have_count(0)
    assert send(server, "GET", "/schedules/heartbeat")[0] == 404

    page.fill("#schedule-name", "digest")
    page.fill("#schedule-when", "30 8 * * mon-fri")
    page.fill("#schedule-timezone", "America/New_York")
    page.fill("#schedule-input", "weekly digest")
    page.fill("#schedule-queue", "emails")
    page.click("#schedule-add")
    digest = page.locator('#schedules tr[data-schedule="digest"]')
    expect(digest.locator(".when")).to_have_text("30 8 * * mon-fri America/New_York")
    expect(digest.locator(".queue")).to_have_text("emails")
    expect(page.locator("#schedule-message")).to_contain_text("schedule digest: next run")
    assert send(server, "GET", "/schedules/digest")[1] | {"next_run": None} == {
        "name": "digest", "cron": "30 8 * * mon-fri", "timezone": "America/New_York",
        "input": "weekly digest", "queue": "emails", "priority": 5, "group": None,
        "expires_in": None, "overlap": "allow", "paused": False, "next_run": None,
        "last_job": None, "runs": 0}

    page.select_option("#schedule-kind", "every")
    expect(page.locator("#schedule-timezone")).to_be_hidden()
    page.fill("#schedule-name", "hourly")
    page.fill("#schedule-when", "3600")
    page.fill("#schedule-input", "tidy up")
    page.click("#schedule-add")
    expect(page.locator('#schedules tr[data-schedule="hourly"] .when')).to_have_text(
        "every 1 h")
    assert send(server, "GET", "/schedules/hourly")[1]["every"] == 3600
    assert console.messages == []

    page.select_option("#schedule-kind", "cron")
    page.fill("#schedule-name", "wrong")
    page.fill("#schedule-when", "61 * * * *")
    page.fill("#schedule-input", "never")
    page.click("#schedule-add")
    message = page.locator("#schedule-message")
    expect(message).to_have_class(re.compile(r"\berror\b"))
    expect(message).to_contain_text("minute")
    assert send(server, "GET", "/schedules/wrong")[0] == 404
    expect(page.locator("#schedules tbody tr")).to_have_count(3)
    assert [e for e in console.messages if "status of 400" not in e] == []  # the browser logs a 400
