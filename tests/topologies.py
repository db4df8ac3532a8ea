"""Throwaway Redis topologies for the tests: a Redis Cluster of 3 masters and 3 replicas, and a
master with a replica watched by 3 Sentinels. Each runs real `redis-server` processes on free
loopback ports, each process in a temp folder of its own; each is started and stopped by its
pid, waited for by polling with a deadline, and can lose its master on purpose.

    with Cluster() as cluster:          # or cluster.start() ... cluster.stop()
        node = cluster.master_of("{jobs:emails}:queue")
        cluster.kill(node)
        cluster.wait_failover(node)
        cluster.rejoin(node)            # back, as the new master's replica

    with Sentinels() as sentinels:
        old = sentinels.kill_master()
        sentinels.wait_failover()
        sentinels.rejoin(old)

Not a test module: the tests (and fixtures) build these.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import redis

from tests.conftest import free_port, stop, wait_until

HOST = "127.0.0.1"
NODE_TIMEOUT_MS = 1000  # cluster-node-timeout: a master unreachable this long is failed over
DOWN_AFTER_MS = 1000  # sentinel down-after-milliseconds
FAILOVER_TIMEOUT_MS = 5000  # sentinel failover-timeout
SERVICE = "jobs"  # the name the Sentinels know the master by
START_TIMEOUT = 30.0  # seconds a topology may take to form
FAILOVER_TIMEOUT = 30.0  # seconds a failover may take


class Server:
    """One redis-server process of a topology: its port, folder and process."""

    def __init__(self, root: Path, name: str, *args: str) -> None:
        self.name, self.port = name, free_port()
        self.bus_port: int | None = None  # a cluster node's bus
        self.folder = root / name
        self.folder.mkdir()
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def start(self, *head: str) -> None:
        """Start it; head goes first on the command line (a config file)."""
        self.proc = subprocess.Popen(
            ["redis-server", *head, "--port", str(self.port), "--bind", HOST,
             "--dir", str(self.folder), "--logfile", str(self.folder / "redis.log"),
             "--save", "", "--appendonly", "no", "--repl-diskless-sync-delay", "0",
             *(("--cluster-port", str(self.bus_port)) if self.bus_port else ()), *self.args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def start_answering(self) -> None:
        """Start it and wait until it answers; should it exit first (a free port taken by
        someone else meanwhile), again on other ports."""
        for _ in range(5):
            self.start()
            wait_until(lambda: self.answers() or not self.alive(), what=f"{self} to answer")
            if self.alive():
                return
            self.kill()
            self.port = free_port()
            self.bus_port = self.bus_port and free_port()
        raise RuntimeError(f"{self} would not start; see {self.folder / 'redis.log'}")

    def client(self, **kwargs: Any) -> redis.Redis:
        """A plain client of this process alone (close it after use)."""
        return redis.Redis(host=HOST, port=self.port, socket_timeout=2,
                           socket_connect_timeout=2, decode_responses=True, **kwargs)

    def call(self, *args: Any) -> Any:
        """One command on this process; None if it does not answer."""
        client = self.client()
        try:
            return client.execute_command(*args)
        except (redis.ConnectionError, redis.TimeoutError):
            return None
        finally:
            client.close()

    def answers(self) -> bool:
        return self.call("PING") is True

    def info(self, section: str) -> dict[str, Any]:
        return self.call("INFO", section) or {}

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL it, by its pid, and reap it."""
        if self.proc is not None:
            stop(self.proc, signal.SIGKILL)

    def __repr__(self) -> str:
        return f"<{self.name} {self.address}>"


class Topology:
    """Servers in one temp folder; stop() kills each by its pid and removes the folder."""

    def __init__(self, prefix: str) -> None:
        self.root = Path(tempfile.mkdtemp(prefix=prefix))
        self.servers: list[Server] = []

    def stop(self) -> None:
        for server in self.servers:
            server.kill()
        shutil.rmtree(self.root, ignore_errors=True)

    def start(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class Cluster(Topology):
    """A Redis Cluster of 3 masters, each with 1 replica (6 processes), formed by
    `redis-cli --cluster create`; replicas=0 for masters alone, and masters=1 (with no
    replica) for one node holding every slot, formed by hand (for the benchmark). Each node's
    cluster bus listens on a free port of its own (`cluster-port`), so no port + 10000 has to
    be free."""

    def __init__(self, masters: int = 3, replicas: int = 1) -> None:
        if masters < 3 and (masters, replicas) != (1, 0):
            raise ValueError("redis-cli --cluster create needs 3 masters; or 1, with no replica")
        super().__init__("jobs-cluster-")
        self.master_count, self.replica_count = masters, replicas
        for n in range(masters * (1 + replicas)):
            node = Server(
                self.root, f"node{n}", "--cluster-enabled", "yes",
                "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
                # a replica whose link to its master is a few seconds old may still take over
                "--cluster-replica-validity-factor", "0")
            node.bus_port = free_port()
            self.servers.append(node)

    @property
    def nodes(self) -> list[Server]:
        return self.servers

    @property
    def url(self) -> str:
        """Two of the nodes as seeds; the client learns the rest."""
        return "redis+cluster://" + ",".join(node.address for node in self.nodes[:2])

    def start(self) -> None:
        for node in self.nodes:
            node.start_answering()
        if self.master_count == 1:  # alone, it knows its address once told (no MEET)
            self.nodes[0].call("CONFIG", "SET", "cluster-announce-ip", HOST)
            self.nodes[0].call("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
        else:
            self.create()
        wait_until(self.ready, timeout=START_TIMEOUT, what="the cluster to form")

    def create(self) -> None:
        created = subprocess.run(
            ["redis-cli", "--cluster", "create", *(node.address for node in self.nodes),
             "--cluster-replicas", str(self.replica_count), "--cluster-yes"],
            capture_output=True, text=True, timeout=START_TIMEOUT)
        if created.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{created.stdout}"
                               f"{created.stderr}")

    def ready(self) -> bool:
        """Every live node says cluster_state:ok with all slots covered, knows every live
        node without a failure flag, and every replica's link to its master is up."""
        live = [node for node in self.nodes if node.alive()]
        for node in live:
            info = node.call("CLUSTER", "INFO")
            if not info or "cluster_state:ok" not in info or "cluster_slots_ok:16384" not in info:
                return False
            table = self.table(node)
            if not table or any(not self.healthy(table, other) for other in live):
                return False
            # and knows which live nodes are replicas (gossip may lag behind the create)
            replicas = [other for other in live if "slave" in table[other.address]["flags"]]
            if len(replicas) != len(live) - self.master_count:
                return False
            replication = node.info("replication")
            if replication.get("role") == "slave" and \
                    replication.get("master_link_status") != "up":
                return False
        return True

    @staticmethod
    def healthy(table: dict[str, dict[str, Any]], node: Server) -> bool:
        row = table.get(node.address)
        return row is not None and row["connected"] and \
            not {"fail", "fail?", "handshake", "noaddr"} & row["flags"]

    @staticmethod
    def table(node: Server) -> dict[str, dict[str, Any]]:
        """CLUSTER NODES as node sees it: address -> node_id, flags (a set), master_id ('-'
        for a master), connected, slots (a list of (first, last) ranges)."""
        table = {}
        for line in (node.call("CLUSTER", "NODES") or "").splitlines():
            node_id, address, flags, master_id, _, _, _, link, *slots = line.split()
            table[address.split("@")[0]] = {
                "node_id": node_id, "flags": set(flags.split(",")), "master_id": master_id,
                "connected": link == "connected",
                "slots": [(int(r.split("-")[0]), int(r.split("-")[-1]))
                          for r in slots if not r.startswith("[")]}
        return table

    def live_node(self) -> Server:
        return next(node for node in self.nodes if node.alive())

    def masters(self) -> list[Server]:
        """The live nodes that serve slots now."""
        table = self.table(self.live_node())
        return [node for node in self.nodes if node.alive() and node.address in table
                and "master" in table[node.address]["flags"] and table[node.address]["slots"]]

    def replicas_of(self, master: Server) -> list[Server]:
        table = self.table(self.live_node())
        master_id = table[master.address]["node_id"]
        return [node for node in self.nodes
                if node.address in table and table[node.address]["master_id"] == master_id]

    def slot(self, key: str) -> int:
        return int(self.live_node().call("CLUSTER", "KEYSLOT", key))

    def master_of(self, key: str) -> Server:
        """The node that owns key's slot now."""
        slot = self.slot(key)
        table = self.table(self.live_node())
        for node in self.nodes:
            row = table.get(node.address)
            if row and "master" in row["flags"] and "fail" not in row["flags"] and any(
                    first <= slot <= last for first, last in row["slots"]):
                return node
        raise LookupError(f"no master owns slot {slot} of {key!r}")

    def kill(self, node: Server) -> None:
        node.kill()

    def wait_failover(self, old_master: Server) -> Server:
        """Wait until a replica of old_master (killed) serves its slots, and the cluster is ok
        again on every live node; return the new master."""
        replicas = [node for node in self.replicas_of(old_master) if node.alive()]

        def promoted() -> Server | None:
            for node in replicas:
                if node.info("replication").get("role") == "master" and self.ready():
                    return node
            return None

        new = wait_until(promoted, timeout=FAILOVER_TIMEOUT,
                         what=f"a replica of {old_master} to take over")
        assert new is not None  # wait_until returns only what is truthy
        return new

    def rejoin(self, old: Server) -> None:
        """Start a killed master again, on its ports and in its folder: its nodes.conf names
        the cluster, which tells it that its slots are served by the replica promoted meanwhile,
        and it becomes that one's replica. Wait until it has synced and every node knows it as
        a replica."""
        old.start()
        wait_until(lambda: old.answers() or not old.alive(), what=f"{old} to answer")
        if not old.alive():  # its port was taken meanwhile: it cannot be the same node
            raise RuntimeError(f"{old} would not start again; see {old.folder / 'redis.log'}")
        wait_until(lambda: old.info("replication").get("master_link_status") == "up",
                   timeout=FAILOVER_TIMEOUT, what=f"{old} to sync from the new master")
        wait_until(self.ready, timeout=FAILOVER_TIMEOUT, what=f"the cluster to know {old} again")


class Sentinels(Topology):
    """A master, its replica, and 3 Sentinels watching them as SERVICE (quorum 2)."""

    def __init__(self, service: str = SERVICE, sentinels: int = 3) -> None:
        super().__init__("jobs-sentinel-")
        self.service = service
        self.data = [Server(self.root, "master"), Server(self.root, "replica")]
        self.sentinels = [Server(self.root, f"sentinel{n}") for n in range(sentinels)]
        self.servers = [*self.data, *self.sentinels]

    @property
    def url(self) -> str:
        return "redis+sentinel://" + ",".join(s.address for s in self.sentinels) + \
            f"/{self.service}"

    def start(self) -> None:
        master, replica = self.data
        master.start()
        wait_until(master.answers, what=f"{master} to answer")
        replica.args = ("--replicaof", HOST, str(master.port))
        replica.start()
        # The Sentinels learn the replica from the master's INFO, read as they connect (and
        # only every 10 s after that): so the replica is linked before they start.
        wait_until(lambda: replica.info("replication").get("master_link_status") == "up",
                   what=f"{replica} to sync")
        for sentinel in self.sentinels:
            conf = sentinel.folder / "sentinel.conf"  # Sentinel rewrites it: one each
            conf.write_text(
                f"sentinel monitor {self.service} {HOST} {master.port} 2\n"
                f"sentinel down-after-milliseconds {self.service} {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {self.service} {FAILOVER_TIMEOUT_MS}\n"
                f"sentinel parallel-syncs {self.service} 1\n")
            sentinel.args = ("--sentinel",)
            sentinel.start(str(conf))
        wait_until(self.ready, timeout=START_TIMEOUT, what="the Sentinels to see both servers")

    def ready(self) -> bool:
        """Every Sentinel knows the master, the replica and the other Sentinels."""
        others = len(self.sentinels) - 1
        for sentinel in self.sentinels:
            if not sentinel.alive():
                continue
            replicas = sentinel.call("SENTINEL", "REPLICAS", self.service)
            peers = sentinel.call("SENTINEL", "SENTINELS", self.service)
            if replicas is None or peers is None or len(peers) < others or not any(
                    "s_down" not in r["flags"] for r in replicas):
                return False
        return True

    def master(self) -> tuple[str, int]:
        """The master's address, as the first Sentinel that answers says."""
        for sentinel in self.sentinels:
            if sentinel.alive():
                addr = sentinel.call("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)
                if addr:
                    return str(addr[0]), int(addr[1])
        raise LookupError("no Sentinel answers")

    def master_server(self) -> Server:
        _, port = self.master()
        return next(server for server in self.data if server.port == port)

    def kill_master(self) -> Server:
        master = self.master_server()
        master.kill()
        return master

    def wait_failover(self, old: tuple[str, int] | None = None) -> tuple[str, int]:
        """Wait until every live Sentinel names a new master (not old, by default the one
        killed) and it says it is one; return its address."""
        old = old or next((HOST, s.port) for s in self.data if not s.alive())

        def promoted() -> tuple[str, int] | None:
            seen = {tuple(s.call("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service) or ())
                    for s in self.sentinels if s.alive()}
            if len(seen) != 1:
                return None
            (addr,) = seen
            if not addr or (addr[0], int(addr[1])) == old:
                return None
            new = next(s for s in self.data if s.port == int(addr[1]))
            return (HOST, new.port) if new.info("replication").get("role") == "master" else None

        new = wait_until(promoted, timeout=FAILOVER_TIMEOUT, what="the Sentinels to fail over")
        assert new is not None  # wait_until returns only what is truthy
        return new

    def rejoin(self, old: Server) -> None:
        """Start the killed master again, as a replica of the new one; wait until it has synced
        and the Sentinels count it."""
        old.args = ("--replicaof", HOST, str(self.master()[1]))
        old.start()
        wait_until(lambda: old.info("replication").get("master_link_status") == "up",
                   timeout=20, what=f"{old} to sync from the new master")
        wait_until(self.ready, timeout=20, what="the Sentinels to see the replica")


def timed(what: str, action: Any) -> Any:
    """Run action(), print how long it took; its result."""
    began = time.monotonic()
    result = action()
    print(f"{what}: {time.monotonic() - began:.2f}s")
    return result
