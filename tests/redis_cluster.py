"""A real Redis Cluster of three masters, from the redis-server binary, for the tests that run the service on one.

No redis-cli: the nodes are joined (CLUSTER MEET) and given the 16384 slots (CLUSTER ADDSLOTSRANGE) through
redis-py. Nothing is persisted (--save '', --appendonly no); each node's cluster file lives in a temporary folder.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

SLOTS = 16384
READY_WITHIN = 30.0  # generous: a shared CI machine may be slow to start three servers


@dataclass
class Cluster:
    ports: list[int]
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def url(self) -> str:
        """REDIS_URL for the service: one node; the cluster client learns the others from it."""
        return f"redis://127.0.0.1:{self.ports[0]}"

    def node(self, port: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)

    def port_of(self, key: str | bytes) -> int:
        """The port of the master holding `key`'s slot (asked of the cluster, not worked out here)."""
        with self.node(self.ports[0]) as r:
            slot = int(r.execute_command("CLUSTER", "KEYSLOT", key))
            for start, end, master, *_ in r.execute_command("CLUSTER", "SLOTS"):
                if start <= slot <= end:
                    return int(master[1])
        raise AssertionError(f"no node holds slot {slot}")

    def held_by(self, port: int, key: str | bytes) -> bytes | None:
        """`key`'s value read from that node alone (a plain client: a key elsewhere answers MOVED)."""
        with self.node(port) as r:
            return r.get(key)


def _free_ports(count: int) -> list[int]:
    """Ports nobody listens on now, held open together so they differ."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def _wait(check: str, condition: object, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            if condition():  # type: ignore[operator]
                return
        except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"the test Redis Cluster did not come up: {check}")


def _slots_known_everywhere(cluster: Cluster) -> bool:
    for port in cluster.ports:
        with cluster.node(port) as r:
            if b"cluster_state:ok" not in r.execute_command("CLUSTER", "INFO"):
                return False
            covered = sum(end - start + 1 for start, end, *_ in r.execute_command("CLUSTER", "SLOTS"))
            if covered != SLOTS or len(r.execute_command("CLUSTER", "NODES").splitlines()) != len(cluster.ports):
                return False
    return True


class _NodeExited(Exception):
    """A node stopped before the cluster came up: most likely its port, found free, was taken before it bound it
    (another test's server, a connection's local port)."""


ATTEMPTS = 3  # fresh ports each time a node could not bind its own


def _launch(binary: str, folder: Path, masters: int) -> Cluster:
    """Start `masters` nodes on free ports, join them and split the slots; stop them again if it fails."""
    ports = _free_ports(2 * masters)  # each node's client port, then its cluster bus port
    cluster = Cluster(ports[:masters])
    try:
        for port, bus in zip(ports[:masters], ports[masters:], strict=True):
            cluster.procs.append(subprocess.Popen(
                [binary, "--port", str(port), "--cluster-port", str(bus), "--bind", "127.0.0.1",
                 "--cluster-enabled", "yes", "--cluster-config-file", str(folder / f"nodes-{port}.conf"),
                 "--dir", str(folder), "--save", "", "--appendonly", "no", "--daemonize", "no",
                 "--logfile", str(folder / f"redis-{port}.log")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + READY_WITHIN

        def answering() -> bool:
            for proc in cluster.procs:
                if proc.poll() is not None:
                    raise _NodeExited(f"exit status {proc.returncode}")
            for port in cluster.ports:
                # One try, a short wait: something else on the port (our node failed to bind it) may never answer,
                # and redis-py's own retries would hold this a minute before the exit above is seen.
                with redis.Redis(host="127.0.0.1", port=port, socket_timeout=1, retry=Retry(NoBackoff(), 0)) as r:
                    # Ours, not whatever took the port after our node failed to bind it.
                    mine = str(folder / f"nodes-{port}.conf")
                    said = r.config_get("cluster-config-file").values()
                    if mine not in {v.decode() if isinstance(v, bytes) else v for v in said}:
                        raise _NodeExited(f"another server answers on {port}")
            return True

        _wait("nodes answering PING", answering, deadline)
        first, *others = zip(ports[:masters], ports[masters:], strict=True)
        with cluster.node(first[0]) as r:
            for port, bus in others:
                r.execute_command("CLUSTER", "MEET", "127.0.0.1", port, bus)
        share = SLOTS // masters
        for i, port in enumerate(cluster.ports):
            start, end = i * share, (SLOTS - 1 if i == masters - 1 else (i + 1) * share - 1)
            with cluster.node(port) as r:
                r.execute_command("CLUSTER", "ADDSLOTSRANGE", start, end)
        _wait("cluster_state:ok with every slot known on every node", lambda: _slots_known_everywhere(cluster),
              deadline)
        return cluster
    except BaseException:
        _stop(cluster)
        raise


def _stop(cluster: Cluster) -> None:
    for proc in cluster.procs:
        proc.terminate()
    for proc in cluster.procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def start_cluster(masters: int = 3) -> Iterator[Cluster]:
    """Start `masters` nodes on free 127.0.0.1 ports, join them and split the slots between them (again on other
    ports if a port was taken meanwhile); stop them (by their PIDs) and remove their folder at the end."""
    binary = shutil.which("redis-server")
    assert binary is not None
    folder = Path(tempfile.mkdtemp(prefix="gateway-redis-cluster-"))
    cluster: Cluster | None = None
    try:
        for attempt in range(ATTEMPTS):
            try:
                cluster = _launch(binary, folder, masters)
                break
            except _NodeExited:
                if attempt == ATTEMPTS - 1:
                    raise
        assert cluster is not None
        yield cluster
    finally:
        if cluster is not None:
            _stop(cluster)
        shutil.rmtree(folder, ignore_errors=True)
