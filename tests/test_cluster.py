"""On a Redis Cluster: a queue's slot can move to another master while its jobs run and are
watched (resharding): the worker records the outcome on the new master, the server's sharded
subscription, which Redis ends when the slot leaves, is made again on the new master, and the
watcher gets the end. A worker started before the cluster answers waits for it; /stats adds up
the masters' memory, one master or several. Each cluster is of the test's own
(tests/topologies.py)."""

from __future__ import annotations

import json
import signal

import aiohttp
import pytest

from store import Keys
from tests.conftest import Procs, free_port, wait_until
from tests.topologies import Cluster, Server


def move_slot(cluster: Cluster, slot: int, source: Server, target: Server) -> None:
    """Reshard one slot by hand, keys and all, as `redis-cli --cluster reshard` does."""
    ids = {node: cluster.table(node)[node.address]["node_id"] for node in (source, target)}
    assert target.call("CLUSTER", "SETSLOT", slot, "IMPORTING", ids[source]) == "OK"
    assert source.call("CLUSTER", "SETSLOT", slot, "MIGRATING", ids[target]) == "OK"
    while keys := source.call("CLUSTER", "GETKEYSINSLOT", slot, 100):
        source.call("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys)
    for node in (target, source, *(n for n in cluster.masters() if n not in (source, target))):
        node.call("CLUSTER", "SETSLOT", slot, "NODE", ids[target])
    wait_until(lambda: all(any(first <= slot <= last for first, last in
                               cluster.table(node)[target.address]["slots"])
                           for node in cluster.nodes if node.alive()),
               what=f"every node to know slot {slot} as {target}'s")

async def test_a_queue_whose_slot_moves_mid_job_still_ends_and_is_followed_to_the_end(
        cluster_stack: Procs, cluster: Cluster, prefix: str) -> None:
    procs = cluster_stack
    keys = Keys(prefix)
    gate = procs.tmp / "gate"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = procs.server(port)
    worker = procs.worker("--handler", "handlers:gate", "--concurrency", "2")
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{base}/submit", json={"input": str(gate)}) as response:
            assert response.status == 201, await response.text()
            job_id = (await response.json())["id"]
        source = cluster.master_of(keys.queue)
        wait_until(lambda: source.call("HGET", keys.job(job_id), "status") == "running",
                   what="the job to run")
        async with session.ws_connect(f"{base}/ws?id={job_id}") as ws:
            assert json.loads((await ws.receive(timeout=10)).data)["status"] == "running"
            # followed from its first watcher: subscribed on the source, then the slot moves
            wait_until(lambda: f"subscribed to {keys.events}" in procs.log(server),
                       what="the server's subscription")
            target = next(node for node in cluster.masters() if node is not source)
            move_slot(cluster, cluster.slot(keys.queue), source, target)
            assert cluster.master_of(keys.queue) is target
            gate.touch()
            last = None
            async for message in ws:
                last = json.loads(message.data)
        assert last is not None and (last["status"], last["result"]) == ("done", "through")
        assert target.call("HGET", keys.job(job_id), "status") == "done"
        # and the queue goes on, on its new master
        async with session.post(f"{base}/submit", json={"input": str(gate)}) as response:
            assert response.status == 201, await response.text()
            second = (await response.json())["id"]
        wait_until(lambda: target.call("HGET", keys.job(second), "status") == "done",
                   what="a job submitted after the move to be done")
    assert procs.log(server).count(f"subscribed to {keys.events}") >= 2, procs.log(server)
    for proc in (server, worker):
        assert proc.poll() is None
        assert "Traceback" not in procs.log(proc), procs.log(proc)


def test_a_worker_started_before_the_cluster_answers_waits_for_it(procs: Procs) -> None:
    with Cluster(masters=1, replicas=0) as cluster:
        node = cluster.nodes[0]
        address, url = node.address, cluster.url
        node.kill()  # the cluster is formed, then goes away: a node's address that refuses
        procs.redis_url = url
        worker = procs.worker()
        wait_until(lambda: "redis unavailable" in procs.log(worker) or worker.poll() is not None,
                   what="the worker to meet the closed port")
        assert worker.poll() is None, procs.log(worker)
        assert "Traceback" not in procs.log(worker), procs.log(worker)
        assert address in procs.log(worker)
        worker.send_signal(signal.SIGTERM)  # no job held: a signal ends the wait
        assert worker.wait(10) != 0


@pytest.mark.parametrize("masters", [1, 3])
async def test_stats_add_up_the_masters_memory(procs: Procs, masters: int) -> None:
    with Cluster(masters=masters, replicas=0) as cluster:
        procs.redis_url = cluster.url
        port = free_port()
        procs.server(port)
        async with aiohttp.ClientSession() as session, \
                session.get(f"http://127.0.0.1:{port}/stats") as response:
            assert response.status == 200, await response.text()
            memory = (await response.json())["redis"]
        used = [int(node.info("memory")["used_memory"]) for node in cluster.nodes]
        # every master's counted: more than all but one of them use, at least
        assert memory["used_memory"] > sum(sorted(used)[1:]) * 0.9, (memory, used)
        assert memory["maxmemory"] == 0
