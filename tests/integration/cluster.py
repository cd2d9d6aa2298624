"""A RabbitMQ cluster of private nodes on this machine, for tests where a node dies.

Three :class:`PrivateNode` s (own node names, AMQP, distribution and management ports, data
dirs owned by ``rabbitmq``, the ``rabbitmq`` user's Erlang cookie, an empty env file) are
booted in parallel and joined to the first, one at a time, with ``join_cluster``. The shared
node on 5672/25672 is never touched. Booting takes 30 to 40 s here, so the test session starts one
cluster and shares it (the ``cluster`` fixture in ``conftest.py``); a test that kills nodes
leaves them to :meth:`Cluster.ensure_healthy`, which the fixture runs before each test.

Usage::

    with Cluster() as cluster:           # booted and joined on enter, removed on exit
        app = amqtask.App(cluster.urls, contracts)
        cluster.kill(0)                  # kill -9 node 0
        cluster.start(0)                 # same name, same data dir: it rejoins
"""

from __future__ import annotations

import concurrent.futures
import json
import time
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any, TypeVar

from .private_node import PrivateNode, PrivateNodeError

__all__ = ["Cluster"]

T = TypeVar("T")

# RabbitMQ 3.10.8: after two nodes restart at once, `rabbit_fifo_dlx_sup` may reach its restart
# intensity on one of them, and every quorum queue led there then crashes. `whereis` of it
# answers `undefined` on such a node; stopping and starting the node fixes it.
_DLX_SUP_CHECK = "whereis(rabbit_fifo_dlx_sup)."

_JOIN_ATTEMPTS = 3


def _parallel(function: Callable[[PrivateNode], T], nodes: Iterable[PrivateNode]) -> list[T]:
    nodes = list(nodes)
    if not nodes:
        return []
    with concurrent.futures.ThreadPoolExecutor(len(nodes), "cluster") as pool:
        return list(pool.map(function, nodes))


class Cluster:
    """`size` private nodes joined into one cluster. Not thread-safe."""

    def __init__(
        self,
        size: int = 3,
        *,
        management: bool = True,
        config: tuple[str, ...] = (),
        advanced_config: str | None = None,
    ) -> None:
        self.nodes: list[PrivateNode] = []
        taken: set[int] = set()
        try:
            for _ in range(size):
                node = PrivateNode(
                    management=management,
                    config=config,
                    advanced_config=advanced_config,
                    exclude_ports=taken,
                )
                taken |= {node.port, node.dist_port, node.management_port or 0}
                self.nodes.append(node)
        except BaseException:
            self.cleanup()
            raise
        #: Seconds the last :meth:`boot` took, booting and joining.
        self.boot_duration: float | None = None

    @property
    def urls(self) -> list[str]:
        """Every node's AMQP URL, node 0 first."""
        return [node.url for node in self.nodes]

    @property
    def management_url(self) -> str:
        """Node 0's management API (any node's shows the whole cluster)."""
        url = self.nodes[0].management_url
        if url is None:
            raise PrivateNodeError("this cluster was built without the management plugin")
        return url

    def node_of(self, nodename: str) -> int:
        """The index of the node named `nodename` (as the broker names it: `name@localhost`)."""
        for index, node in enumerate(self.nodes):
            if node.nodename == nodename:
                return index
        raise KeyError(nodename)

    # -- lifecycle -------------------------------------------------------------------

    def boot(self, timeout: float = 90) -> None:
        """Start every node at once, then join the others to node 0 one at a time."""
        started = time.monotonic()
        _parallel(lambda node: node.start(timeout), self.nodes)
        for node in self.nodes[1:]:
            self._join(node, self.nodes[0].nodename)
        self.wait_formed(timeout)
        self.boot_duration = time.monotonic() - started

    @staticmethod
    def _join(node: PrivateNode, seed: str, attempts: int = _JOIN_ATTEMPTS) -> None:
        """Join `node` to `seed`'s cluster. Two nodes joining at once can leave one whose
        `start_app` fails in Mnesia (seen once in CI on 3.10); a failed join is reset and tried
        again."""
        for attempt in range(1, attempts + 1):
            try:
                node.ctl("stop_app")
                if attempt > 1:
                    node.ctl("reset")
                node.ctl("join_cluster", seed)
                node.ctl("start_app")
                return
            except PrivateNodeError:
                if attempt == attempts:
                    raise
                time.sleep(1)

    def running_nodes(self, via: int | None = None) -> set[str]:
        """The node names the cluster reports running, asked of node `via` (the first that
        answers when None)."""
        candidates = [via] if via is not None else range(len(self.nodes))
        last: Exception | None = None
        for index in candidates:
            node = self.nodes[index]
            if not node.running:
                continue
            try:
                status = json.loads(node.ctl("cluster_status", "--formatter", "json"))
            except (PrivateNodeError, ValueError) as exc:
                last = exc
                continue
            return set(status.get("running_nodes", []))
        raise PrivateNodeError(f"no node answered cluster_status (last error: {last!r})")

    def wait_formed(self, timeout: float = 60) -> None:
        """Wait until every running node is reported running by the others."""
        deadline = time.monotonic() + timeout
        wanted = {node.nodename for node in self.nodes if node.running}
        while True:
            try:
                if self.running_nodes() >= wanted:
                    return
            except PrivateNodeError:
                pass
            if time.monotonic() > deadline:
                raise PrivateNodeError(f"the cluster did not report {sorted(wanted)} running")
            time.sleep(0.5)

    def kill(self, *indexes: int) -> None:
        """`kill -9` the given nodes, at once."""
        _parallel(lambda node: node.kill(), (self.nodes[i] for i in indexes))

    def start(self, *indexes: int, timeout: float = 90) -> None:
        """Start the given (killed or stopped) nodes again on their data dirs, at once; they
        rejoin the cluster by themselves."""
        _parallel(lambda node: node.start(timeout), (self.nodes[i] for i in indexes))

    def dlx_supervisor_lost(self, index: int) -> bool:
        """Whether node `index` lost `rabbit_fifo_dlx_sup` (the 3.10.8 bug described above)."""
        answer = self.nodes[index].ctl("eval", _DLX_SUP_CHECK).strip()
        return answer == "undefined"

    def ensure_healthy(self, timeout: float = 90) -> list[str]:
        """Start the nodes that are down, restart those that lost their dead-letter supervisor,
        and wait until all run together. Returns what was done, for the test's report."""
        done: list[str] = []
        down = [i for i, node in enumerate(self.nodes) if not node.running]
        if down:
            self.start(*down, timeout=timeout)
            done += [f"started {self.nodes[i].nodename}" for i in down]
        broken = [i for i, node in enumerate(self.nodes) if self.dlx_supervisor_lost(i)]
        for index in broken:
            self.nodes[index].stop()
            self.nodes[index].start(timeout)
            done.append(f"restarted {self.nodes[index].nodename} (rabbit_fifo_dlx_sup lost)")
        self.wait_formed(timeout)
        return done

    def cleanup(self) -> None:
        """Kill every node and delete its directory."""
        _parallel(lambda node: node.cleanup(), self.nodes)

    def __enter__(self) -> Cluster:
        try:
            self.boot()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    def __repr__(self) -> str:
        return f"<Cluster {[node.nodename for node in self.nodes]}>"

    def log_tails(self, lines: int = 20) -> str:
        return "\n".join(node.log_tail(lines) for node in self.nodes)


def describe(cluster: Cluster, **extra: Any) -> str:
    """One line naming the nodes and their ports, for a test's report."""
    nodes = ", ".join(f"{n.nodename}:{n.port}" for n in cluster.nodes)
    more = " ".join(f"{k}={v}" for k, v in extra.items())
    return f"cluster [{nodes}] {more}".strip()
