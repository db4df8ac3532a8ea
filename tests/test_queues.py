"""Named queues: each with its own hash tag, chosen per request; workers on several at once."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest
import redis

import client
from store import Client, Keys
from tests.conftest import ROOT, Procs, delete_prefix, eventually, free_port

if TYPE_CHECKING:
    from tests.topologies import Cluster


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


# Four queues of the deployment's own prefix, whose slots are on all three masters of a fresh
# cluster (CLUSTER KEYSLOT {jobs:a}:queue and so on: 1540, 13927, 9798, 5793, of the ranges
# 0-5460, 5461-10922, 10923-16383 that redis-cli --cluster create gives 3 masters).
QUEUES = ("a", "b", "c", "d")


@pytest.mark.cluster(only=True)
async def test_four_queues_on_a_cluster_each_followed_to_done(
        shared_cluster: Cluster, procs: Procs, r: Client) -> None:
    """A server and a worker on four queues whose keys are on different masters: each job is
    followed over /ws from `queued` to `done` (the changes come over each slot's SSUBSCRIBE),
    is stored on the master of its slot, and /stats counts it in its queue."""
    procs.prefix = "{jobs}"  # the deployment's key names, {jobs:a}:queue...: no other test
    # uses this prefix on the session's cluster, and its keys are deleted before and after
    owners = {queue: shared_cluster.master_of(Keys(procs.prefix, queue).queue)
              for queue in QUEUES}
    assert len(set(owners.values())) >= 2, owners
    delete_prefix(r, procs.prefix)
    try:
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        procs.server(port)
        async with aiohttp.ClientSession() as session:
            jobs = {queue: await call(session, "POST", f"{base}/submit", 201,
                                      json={"input": f"job on {queue}", "queue": queue})
                    for queue in QUEUES}
            sockets = [await session.ws_connect(f"{base}/ws", params={"id": jobs[queue]["id"],
                                                                       "queue": queue})
                       for queue in QUEUES]
            firsts = [(await ws.receive_json(timeout=10))["status"] for ws in sockets]
            assert firsts == ["queued"] * 4
            procs.worker("--queues", ",".join(QUEUES), "--concurrency", "4")

            async def rest(ws: aiohttp.ClientWebSocketResponse) -> list[dict[str, Any]]:
                return [json.loads(m.data) async for m in ws]

            streams = await asyncio.wait_for(asyncio.gather(*map(rest, sockets)), 30)
            assert [[m["status"] for m in stream] for stream in streams] == [
                ["running", "done"]] * 4
            assert [stream[-1]["result"] for stream in streams] == [
                f"job on {queue}".upper() for queue in QUEUES]
            assert [ws.close_code for ws in sockets] == [1000] * 4
            stats = await call(session, "GET", f"{base}/stats", 200)
        assert {name: q["totals"]["done"] for name, q in stats["queues"].items()} == {
            "default": 0} | dict.fromkeys(QUEUES, 1)  # the default queue is always listed
        for queue, owner in owners.items():  # each job where its slot is
            assert owner.call("HGET", Keys(procs.prefix, queue).job(jobs[queue]["id"]),
                              "status") == "done"
    finally:
        procs.stop_all()  # before the keys go: a worker's lease would come back
        delete_prefix(r, procs.prefix)
