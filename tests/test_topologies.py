"""The topologies of tests/topologies.py do what they promise: a cluster forms with every slot
covered, the queues' hash tags spread over its masters, a killed master's replica takes over
and the killed master comes back as its replica; the Sentinels fail over to the replica, and
the old master comes back as its replica; stop() leaves no process and no folder. Each test runs
three times (a topology that forms only most of the time is no fixture)."""

from __future__ import annotations

import pytest
from redis.cluster import ClusterNode, RedisCluster

from tests.topologies import Cluster, Sentinels, timed

ROUNDS = range(3)
# Four queues whose hash tags land on more than one master of a fresh 3-master cluster
# (slots 1540, 13927, 9798, 5793 of 0-5460, 5461-10922, 10923-16383).
TAGS = ("{jobs:a}", "{jobs:b}", "{jobs:c}", "{jobs:d}")




def cluster_client(cluster: Cluster) -> RedisCluster:
    seeds = [ClusterNode(*address.split(":")) for address in
             cluster.url.removeprefix("redis+cluster://").split(",")]
    return RedisCluster(startup_nodes=seeds, decode_responses=True)


@pytest.mark.parametrize("round", ROUNDS)
def test_a_cluster_forms_and_the_queues_spread_over_its_masters(round: int,
                                                                 cluster: Cluster) -> None:
    masters = cluster.masters()
    assert len(masters) == 3
    for node in cluster.nodes:
        assert "cluster_state:ok" in node.call("CLUSTER", "INFO")
    for master in masters:
        (replica,) = cluster.replicas_of(master)
        assert replica.info("replication")["master_link_status"] == "up"
    owners = {tag: cluster.master_of(f"{tag}:queue") for tag in TAGS}
    assert len(set(owners.values())) >= 2
    client = cluster_client(cluster)
    try:
        for tag, owner in owners.items():  # a client's write lands where master_of says
            client.set(f"{tag}:queue", tag)
            assert owner.call("GET", f"{tag}:queue") == tag
    finally:
        client.close()


@pytest.mark.parametrize("round", ROUNDS)
def test_killing_a_master_promotes_its_replica(round: int, cluster: Cluster) -> None:
    key = "{jobs:a}:queue"
    old = cluster.master_of(key)
    (replica,) = cluster.replicas_of(old)
    assert old.call("RPUSH", key, "job") == 1
    assert old.call("WAIT", 1, 5000) == 1
    cluster.kill(old)
    new = timed("cluster failover", lambda: cluster.wait_failover(old))
    assert new is replica
    assert cluster.master_of(key) is new
    assert new.call("LRANGE", key, 0, -1) == ["job"]
    assert len(cluster.masters()) == 3
    assert new.call("RPUSH", key, "after") == 2
    timed("cluster rejoin", lambda: cluster.rejoin(old))  # back, as the new master's replica
    assert cluster.replicas_of(new) == [old] and cluster.master_of(key) is new
    assert old.info("replication")["master_port"] == new.port
    assert new.call("WAIT", 1, 5000) == 1  # it has the write made while it was away


@pytest.mark.parametrize("round", ROUNDS)
def test_the_sentinels_fail_over_to_the_replica(round: int, sentinels: Sentinels) -> None:
    master, replica = sentinels.data
    assert sentinels.master() == ("127.0.0.1", master.port)
    assert master.call("SET", "{jobs}:x", "1") is True
    assert master.call("WAIT", 1, 5000) == 1
    assert sentinels.kill_master() is master
    new = timed("sentinel failover", sentinels.wait_failover)
    assert new == ("127.0.0.1", replica.port) == sentinels.master()
    assert replica.call("GET", "{jobs}:x") == "1"
    assert replica.call("SET", "{jobs}:x", "2") is True  # takes writes
    timed("sentinel rejoin", lambda: sentinels.rejoin(master))  # back, as the replica
    assert sentinels.master() == ("127.0.0.1", replica.port)
    assert master.info("replication")["role"] == "slave"
    assert replica.call("WAIT", 1, 5000) == 1 and master.call("GET", "{jobs}:x") == "2"
