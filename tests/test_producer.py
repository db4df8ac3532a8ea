"""client.enqueue: a Python producer that skips HTTP (issue 16), through the server's SUBMIT
script, with its checks, and seen by every server at once."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

import client
from server import make_app
from store import Keys
from tests.conftest import ROOT, Procs, job


@pytest.mark.cluster
async def test_an_enqueued_job_is_the_servers_job(aiohttp_client: Any, redis_url: str, r: Any,
                                                  prefix: str, procs: Procs) -> None:
    """Watched over the server's WebSocket from its submit to its end, run by a worker."""
    http = await aiohttp_client(make_app(redis_url, prefix=prefix))
    made = client.enqueue("produced", redis_url=redis_url, prefix=prefix, priority=8,
                          group="acme", queue="emails")
    assert isinstance(made, dict)
    status = await (await http.get("/status", params={"id": made["id"],
                                                      "queue": "emails"})).json()
    assert status | {"updated": made["updated"]} == made
    async with http.ws_connect("/ws", params={"id": made["id"], "queue": "emails"}) as ws:
        assert json.loads((await ws.receive()).data)["status"] == "queued"
        procs.worker("--queues", "emails")
        seen = [json.loads(message.data) async for message in ws]
    assert seen[-1]["status"] == "done" and seen[-1]["result"] == "PRODUCED"
    assert "emails" in {q["name"] for q in (await (await http.get("/queues")).json())["queues"]}


async def test_a_bulk_enqueue_is_all_or_nothing(redis_url: str, r: Any, prefix: str) -> None:
    made = client.enqueue(["a", "b", "c"], redis_url=redis_url, prefix=prefix, delay=60)
    assert isinstance(made, list) and [j["status"] for j in made] == ["delayed"] * 3
    assert r.zcard(Keys(prefix).delayed) == 3
    with pytest.raises(ValueError, match="every one of"):
        client.enqueue(["d", 5], redis_url=redis_url, prefix=prefix)  # type: ignore[list-item]
    assert r.zcard(Keys(prefix).delayed) == 3 and not r.exists(Keys(prefix).queue)


@pytest.mark.parametrize("kwargs", [
    {"priority": 10}, {"priority": True}, {"group": "no spaces"}, {"delay": -1},
    {"expires_in": 0}, {"queue": "No"},
])
async def test_enqueue_checks_as_the_server_does(aiohttp_client: Any, redis_url: str, r: Any,
                                                 prefix: str, kwargs: dict[str, Any]) -> None:
    """The same refusal, in the same words, and nothing stored."""
    http = await aiohttp_client(make_app(redis_url, prefix=prefix))
    response = await http.post("/submit", json={"input": "x", **kwargs})
    said = (await response.json())["error"]
    assert response.status == 400
    with pytest.raises(ValueError) as refused:
        client.enqueue("x", redis_url=redis_url, prefix=prefix, **kwargs)
    assert str(refused.value) == said
    assert not list(r.scan_iter(match=f"{prefix}*:job:*"))


def test_the_client_runs_with_aiohttp_alone() -> None:
    """Without redis-py importable, the command line and the HTTP library still work."""
    code = ("import sys; sys.modules['redis'] = None; import client; "
            "sys.exit(client.main(['--help']))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0 and "usage" in result.stdout, result.stderr


def test_enqueued_jobs_are_stored_as_submitted_ones(redis_url: str, r: Any, prefix: str) -> None:
    made = client.enqueue("x", redis_url=redis_url, prefix=prefix, expires_in=30)
    assert isinstance(made, dict)
    stored = job(r, prefix, made["id"])
    assert stored["expires_in"] == "30" and stored["status"] == "queued"
    assert r.lrange(Keys(prefix).queue, 0, -1) == [made["id"]]
