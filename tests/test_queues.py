"""Named queues: each with its own hash tag, chosen per request; workers on several at once."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import aiohttp
import pytest
import redis

import client
from store import Client, Keys
from tests.conftest import ROOT, Procs, eventually, free_port


def test_each_queue_has_a_hash_tag_of_its_own_and_the_default_keeps_the_old_keys() -> None:
    assert Keys("{jobs}").queue == Keys("{jobs}", "default").queue == "{jobs}:queue"
    emails = Keys("{jobs}", "emails")
    assert (emails.queue, emails.job("x"), emails.events) == (
        "{jobs:emails}:queue", "{jobs:emails}:job:x", "{jobs:emails}:events")
    assert emails.registry == Keys("{jobs}").registry == "{jobs}:queues"
    assert Keys("jobs", "emails").queue == "jobs:emails:queue"  # no hash tag to put it in


@pytest.fixture
def stack(procs: Procs) -> str:
    """A server and a worker with two slots on each of two queues; the server's address."""
    port = free_port()
    procs.server(port)
    procs.worker("--queues", "emails,default", "--concurrency", "4")
    return f"127.0.0.1:{port}"


async def call(session: aiohttp.ClientSession, method: str, url: str, status: int,
               **kwargs: Any) -> Any:
    async with session.request(method, url, **kwargs) as response:
        body = await response.json()
        assert response.status == status, body
        return body


@pytest.mark.cluster
async def test_jobs_go_to_the_queue_they_name_and_are_followed_there(
        stack: str, r: Client, prefix: str) -> None:
    base = f"http://{stack}"
    async with aiohttp.ClientSession() as session:
        mail = await call(session, "POST", f"{base}/submit", 201,
                          json={"input": "mail", "queue": "emails"})
        plain = await call(session, "POST", f"{base}/submit", 201, json={"input": "plain"})
        assert r.exists(Keys(prefix, "emails").job(mail["id"]))
        assert not r.exists(Keys(prefix).job(mail["id"]))
        async with session.ws_connect(f"{base}/ws", params={"id": mail["id"],
                                                             "queue": "emails"}) as ws:
            statuses = [json.loads(m.data)["status"] async for m in ws]
        assert statuses[-1] == "done" and ws.close_code == 1000
        done = await call(session, "GET", f"{base}/status", 200,
                          params={"id": mail["id"], "queue": "emails"})
        assert (done["result"], done["queue"], mail["queue"], plain["queue"]) == (
            "MAIL", "emails", "emails", "default")
        # the same id in another queue is no job; a queue never used has none
        await call(session, "GET", f"{base}/status", 404, params={"id": mail["id"]})
        async with session.get(f"{base}/ws", params={"id": mail["id"], "queue": "nothing"},
                               headers={"Upgrade": "websocket", "Connection": "Upgrade",
                                        "Sec-WebSocket-Version": "13",
                                        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
                               ) as response:
            assert response.status == 404
        await eventually(lambda: _status(session, base, plain["id"], None), what="plain done")
        listed = await call(session, "GET", f"{base}/jobs", 200,
                            params={"status": "done", "queue": "emails"})
        assert [j["id"] for j in listed["jobs"]] == [mail["id"]]
        stats = await call(session, "GET", f"{base}/stats", 200)
        assert stats["totals"]["submitted"] == 2 and stats["jobs"]["done"] == 2
        assert {name: q["totals"]["done"] for name, q in stats["queues"].items()} == {
            "default": 1, "emails": 1}
        one = await call(session, "GET", f"{base}/stats", 200, params={"queue": "emails"})
        assert one["totals"]["done"] == 1 and "queues" not in one
        assert [len(w["running"]) for w in stats["workers"]] == [0]


async def _status(session: aiohttp.ClientSession, base: str, job_id: str,
                  queue: str | None) -> bool:
    params = {"id": job_id} | ({"queue": queue} if queue else {})
    body = await call(session, "GET", f"{base}/status", 200, params=params)
    return bool(body["status"] == "done")


@pytest.mark.parametrize("queue", ["", "Emails", "a b", "x" * 65, "é", 7])
async def test_a_bad_queue_name_is_400_and_writes_nothing(
        stack: str, r: redis.Redis, prefix: str, queue: object) -> None:
    base = f"http://{stack}"
    async with aiohttp.ClientSession() as session:
        await call(session, "POST", f"{base}/submit", 400, json={"input": "x", "queue": queue})
        if isinstance(queue, str):
            for path in ("/status?id=" + "0" * 32, "/jobs?status=done", "/stats"):
                await call(session, "GET", f"{base}{path}", 400, params={"queue": queue})
    assert not r.exists(Keys(prefix).registry) or r.smembers(Keys(prefix).registry) <= {
        "default", "emails"}


async def test_cancel_and_retry_take_the_queue(stack: str) -> None:
    base = f"http://{stack}"
    async with aiohttp.ClientSession() as session:
        later = await call(session, "POST", f"{base}/submit", 201,
                           json={"input": "later", "queue": "emails", "delay": 3600})
        await call(session, "POST", f"{base}/jobs/{later['id']}/cancel", 404)  # not in default
        cancelled = await call(session, "POST", f"{base}/jobs/{later['id']}/cancel?queue=emails",
                               200)
        assert cancelled["status"] == "cancelled"
        again = await call(session, "POST", f"{base}/jobs/{later['id']}/retry?queue=emails", 200)
        assert again["status"] in ("queued", "running", "done")
        await eventually(lambda: _status(session, base, later["id"], "emails"),
                         what="the retried job to be done")


def test_the_client_submits_to_a_queue_and_follows_it_there(stack: str) -> None:
    done = subprocess.run([sys.executable, "client.py", "--server", f"http://{stack}",
                           "--queue", "emails", "hello"], cwd=ROOT, capture_output=True,
                          text=True, timeout=30)
    assert (done.returncode, done.stdout) == (0, "HELLO\n"), done.stderr
    job = client.submit("again", server=f"http://{stack}", queue="emails")
    assert client.wait(job["id"], server=f"http://{stack}", queue="emails",
                       timeout=20)["result"] == "AGAIN"
    bad = subprocess.run([sys.executable, "client.py", "--queue", "No", "x"], cwd=ROOT,
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "is not a queue name" in bad.stderr
