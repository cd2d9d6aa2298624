"""The benchmark's own bookkeeping: which broker process it measures, which peer is the best."""

from __future__ import annotations

import math
import os
import socket

from bench import _scenarios, versus


def test_the_broker_process_is_found_by_the_socket_listening_on_its_port() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        inode = str(os.fstat(listener.fileno()).st_ino)
        assert inode in _scenarios._listening_inodes(port)
    # A port nothing listens on has no broker process (not the oldest beam.smp around).
    assert _scenarios.broker_pid(f"amqp://guest:guest@127.0.0.1:{port}/") is None


def test_the_best_peer_is_chosen_by_median_and_a_failed_peer_never_is() -> None:
    runs = {
        "Celery": [1000.0, 1100.0, 900.0],
        "Dramatiq": [1500.0, 200.0, 1400.0],
        "Taskiq": [math.nan],
    }
    assert versus._best(runs, ["Celery", "Dramatiq", "Taskiq"], higher=True) == "Dramatiq"
    assert versus._best(runs, ["Celery", "Dramatiq", "Taskiq"], higher=False) == "Celery"
    assert versus._best(runs, ["Taskiq"], higher=True) is None


def test_without_peers_every_peer_is_reported_not_run() -> None:
    peers = versus.Peers(enabled=False)
    peers.ensure()
    assert peers.failed == {peer.name: "--no-peers" for peer in versus.PEERS}
    assert not any(peers.runs(peer) for peer in versus.PEERS)
