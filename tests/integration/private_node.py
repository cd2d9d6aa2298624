"""A private, throw-away RabbitMQ node for fault tests (kill -9, restart, ...).

The shared broker at 127.0.0.1:5672 (``rabbit@localhost``) must never be stopped or
touched by tests that need to crash a broker. :class:`PrivateNode` runs a second,
independent node from the same RabbitMQ installation instead:

* its own node name (``amqtask-test-<uuid8>@localhost``), AMQP port and distribution
  port (both picked free at construction time and kept across restarts);
* its own data, log, config, env-conf and enabled-plugins files under one temporary
  directory, so nothing from ``/etc/rabbitmq`` (which pins the shared node's name and
  its listener on 5672) leaks in;
* started in the foreground in a new session, so :meth:`PrivateNode.kill` can SIGKILL
  the whole process group (the ``rabbitmq-server`` shell script and the ``beam.smp``
  VM it forks), plus ``erl_child_setup`` which setsid()s out of it.

It shares the ``rabbitmq`` user's Erlang cookie and the already running ``epmd`` with
the shared node; neither is ever modified or stopped.

Usage::

    with PrivateNode() as node:          # started on enter, killed and removed on exit
        ... connect to node.url ...
        node.kill()                      # kill -9 the VM
        node.restart()                   # same node name, same data dir
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import os
import pwd
import random
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import aio_pika

__all__ = ["QUORUM_REGISTRATION_SETTLE", "PrivateNode", "PrivateNodeError"]

#: Seconds to wait after declaring a quorum queue before a ``kill()``. RabbitMQ 3.10
#: (Ra 2.2) records each new Ra member's name in ``names.dets``, which is only flushed by
#: a 500 ms ``auto_save`` timer; SIGKILL inside that window loses the registration and,
#: on restart, the queue comes back as a fresh, empty, leaderless member (``basic.get``
#: hangs) even though its confirmed messages are on disk. Not an issue for messages
#: published to an *existing* queue: those are confirmed only after the WAL fsync.
QUORUM_REGISTRATION_SETTLE = 1.5

#: The real (non-wrapper) scripts. ``/usr/sbin/rabbitmq-server`` is a Debian wrapper
#: that, when run as the rabbitmq user, redirects output to the *shared* node's
#: ``/var/log/rabbitmq/startup_log`` and ``cd``s to ``/var/lib/rabbitmq``; when run as
#: root it goes through ``su``. We bypass it and drop privileges ourselves.
_RABBITMQ_BIN = Path(os.environ.get("AMQTASK_RABBITMQ_BIN", "/usr/lib/rabbitmq/bin"))
_SERVER = "rabbitmq-server"
_CTL = "rabbitmqctl"
_RUN_AS = "rabbitmq"

_SHARED_PORTS = frozenset({5672, 25672, 15672, 4369})
_HOST = "127.0.0.1"

# Process groups of nodes still running, killed at interpreter exit as a last resort.
_LIVE_GROUPS: set[int] = set()


class PrivateNodeError(RuntimeError):
    """The private node failed to start or stop."""


@atexit.register
def _kill_leftovers() -> None:
    for pgid in list(_LIVE_GROUPS):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
    _LIVE_GROUPS.clear()


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((_HOST, port))
        except OSError:
            return False
    return True


def _free_port(exclude: set[int]) -> int:
    """A currently free port *below* the ephemeral range.

    The ports must stay free across kill/restart. An ephemeral port (what bind(0)
    hands out) can meanwhile be taken as the local end of any outgoing connection
    on the machine; a port below the range can only be taken by an explicit listener.
    """
    low, _ = _ephemeral_range()
    rng = random.SystemRandom()
    if low - 1 > 10000:
        for _ in range(200):
            port = rng.randint(10000, low - 1)
            if port not in exclude and port not in _SHARED_PORTS and _bindable(port):
                return port
    while True:  # odd port range configuration: fall back to the kernel's choice
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((_HOST, 0))
            port = int(s.getsockname()[1])
        if port not in exclude and port not in _SHARED_PORTS:
            return port


def _check_traversable(path: Path, account: pwd.struct_passwd) -> None:
    """Fail early (not with an obscure boot error) if ``account`` cannot reach ``path``."""
    for parent in path.parents:
        st = parent.stat()
        if st.st_uid == account.pw_uid:
            ok = bool(st.st_mode & stat.S_IXUSR)
        elif st.st_gid == account.pw_gid:
            ok = bool(st.st_mode & stat.S_IXGRP)
        else:
            ok = bool(st.st_mode & stat.S_IXOTH)
        if not ok:
            raise PrivateNodeError(
                f"{path}: the {account.pw_name!r} user cannot enter {parent} "
                f"(mode {stat.filemode(st.st_mode)}); use a base_dir under /tmp"
            )


def _process_table() -> dict[int, tuple[int, int]] | None:
    """``{pid: (ppid, pgrp)}`` of all not (fully) dead processes; None if no /proc."""
    proc = Path("/proc")
    if not proc.is_dir():
        return None
    table: dict[int, tuple[int, int]] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            line = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ..." -- comm may contain spaces and parens.
        fields = line[line.rfind(")") + 2 :].split()
        if len(fields) < 3:
            continue
        if fields[0] in ("Z", "X"):
            # A zombie leader may still have threads tearing down (holding the
            # listening sockets open): only dead once it is the last task left.
            try:
                if len(os.listdir(entry / "task")) <= 1:
                    continue
            except OSError:
                continue
        table[int(entry.name)] = (int(fields[1]), int(fields[2]))
    return table


def _node_processes(pgid: int) -> set[int] | None:
    """Live processes of the node: its process group plus all their descendants.

    The descendants matter because ``erl_child_setup`` (the VM's port-program
    spawner) calls setsid() and so leaves our process group. None if no /proc.
    """
    table = _process_table()
    if table is None:
        return None
    found = {pid for pid, (_, pgrp) in table.items() if pgrp == pgid}
    frontier = set(found)
    while frontier:
        frontier = {pid for pid, (ppid, _) in table.items() if ppid in frontier} - found
        found |= frontier
    return found


def _group_alive(pgid: int) -> bool:
    """Whether any process of the node started as process group ``pgid`` is alive."""
    procs = _node_processes(pgid)
    if procs is not None:
        return bool(procs)
    try:  # not Linux: a signal probe (also counts zombies)
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"<{path}: not readable>"
    return "\n".join(text.splitlines()[-lines:])


async def _amqp_handshake(url: str, timeout: float) -> None:
    connection = await aio_pika.connect(url, timeout=timeout)
    await connection.close()


class PrivateNode:
    """A RabbitMQ node of our own, in a temporary directory, for crash/restart tests.

    Ports and node name are chosen in ``__init__`` and never change, so :attr:`url`
    stays valid across :meth:`kill`/:meth:`restart`. Not thread-safe.
    """

    def __init__(
        self,
        base_dir: Path | None = None,
        *,
        management: bool = False,
        config: tuple[str, ...] = (),
        advanced_config: str | None = None,
        exclude_ports: set[int] | None = None,
    ) -> None:
        """`management` enables the management plugin on a port of its own
        (:attr:`management_url`); `config` adds `rabbitmq.conf` lines; `advanced_config` is
        the `advanced.config` text; `exclude_ports` are ports not to pick (other nodes')."""
        self._owns_dir = base_dir is None
        if base_dir is None:
            base_dir = Path(tempfile.mkdtemp(prefix="amqtask-rmq-"))
        else:
            base_dir.mkdir(parents=True, exist_ok=True)
        self.base_dir = base_dir.resolve()
        self.nodename = f"amqtask-test-{uuid.uuid4().hex[:8]}@localhost"
        taken = set(exclude_ports or ())
        self.port = _free_port(exclude=taken)
        self.dist_port = _free_port(exclude={*taken, self.port})
        self.url = f"amqp://guest:guest@{_HOST}:{self.port}/"
        self.management_port: int | None = None
        self.management_url: str | None = None
        if management:
            self.management_port = _free_port(exclude={*taken, self.port, self.dist_port})
            self.management_url = f"http://guest:guest@{_HOST}:{self.management_port}"
        self._config = config
        self._advanced_config = advanced_config

        self.mnesia_base = self.base_dir / "mnesia"
        self.log_base = self.base_dir / "log"
        self.log_file = self.log_base / f"{self.nodename}.log"
        self.console_log = self.base_dir / "console.log"
        #: Seconds the last successful :meth:`start` took until AMQP was usable.
        self.last_start_duration: float | None = None

        self._proc: subprocess.Popen[bytes] | None = None
        self._pgid: int | None = None
        self._console: IO[bytes] | None = None
        self._run_as = self._resolve_user()
        try:
            if self._run_as is not None:
                _check_traversable(self.base_dir, self._run_as)
            self._write_files()
        except BaseException:
            if self._owns_dir:
                shutil.rmtree(self.base_dir, ignore_errors=True)
            raise

    # -- setup -----------------------------------------------------------------------

    @staticmethod
    def _resolve_user() -> pwd.struct_passwd | None:
        """The account to drop to: ``rabbitmq`` when we are root, else ourselves."""
        if os.geteuid() != 0:
            return None
        try:
            return pwd.getpwnam(_RUN_AS)
        except KeyError:
            raise PrivateNodeError(
                f"running as root but there is no {_RUN_AS!r} user to drop to"
            ) from None

    def _write_files(self) -> None:
        self.mnesia_base.mkdir(exist_ok=True)
        self.log_base.mkdir(exist_ok=True)
        plugins = "[rabbitmq_management]" if self.management_port else "[]"
        (self.base_dir / "enabled_plugins").write_text(f"{plugins}.\n")
        if self._advanced_config is not None:
            (self.base_dir / "advanced.config").write_text(self._advanced_config)
        management = (
            [f"management.tcp.port = {self.management_port}", f"management.tcp.ip = {_HOST}"]
            if self.management_port
            else []
        )
        # Empty env-conf: /etc/rabbitmq/rabbitmq-env.conf sets NODENAME=rabbit@localhost.
        (self.base_dir / "rabbitmq-env.conf").write_text("")
        # Own main config: /etc/rabbitmq/rabbitmq.conf pins a listener to 5672.
        (self.base_dir / "rabbitmq.conf").write_text(
            "\n".join(
                [
                    f"listeners.tcp.1 = {_HOST}:{self.port}",
                    "loopback_users.guest = true",
                    # Tests must not stall on a nearly full disk of a CI box.
                    "disk_free_limit.absolute = 1MB",
                    "log.file.level = info",
                    "log.console = false",
                    *management,
                    *self._config,
                    "",
                ]
            )
        )
        if self._run_as is not None:
            uid, gid = self._run_as.pw_uid, self._run_as.pw_gid
            for path in [self.base_dir, *self.base_dir.rglob("*")]:
                os.chown(path, uid, gid)

    def _env(self) -> dict[str, str]:
        # Nothing RABBITMQ_*/ERL_* from the caller (e.g. fixtures of the shared node).
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("RABBITMQ_", "ERL_", "CONF_ENV_FILE", "NOTIFY_SOCKET"))
        }
        if self._run_as is not None:
            # Same HOME (and so the same Erlang cookie) as the shared node's account.
            env.update(
                HOME=self._run_as.pw_dir,
                USER=self._run_as.pw_name,
                LOGNAME=self._run_as.pw_name,
            )
        env.update(
            RABBITMQ_NODENAME=self.nodename,
            RABBITMQ_NODE_IP_ADDRESS=_HOST,
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=str(self.mnesia_base),
            RABBITMQ_LOG_BASE=str(self.log_base),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.base_dir / "enabled_plugins"),
            RABBITMQ_CONF_ENV_FILE=str(self.base_dir / "rabbitmq-env.conf"),
            RABBITMQ_CONFIG_FILE=str(self.base_dir / "rabbitmq.conf"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(self.base_dir / "advanced.config"),
            RABBITMQ_PID_FILE=str(self.base_dir / "node.pid"),
            # Keep distribution on loopback, like the shared node.
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
            ERL_EPMD_ADDRESS=_HOST,
            ERL_CRASH_DUMP=str(self.base_dir / "erl_crash.dump"),
        )
        return env

    def _popen_user_kwargs(self) -> dict[str, Any]:
        if self._run_as is None:
            return {}
        return {"user": self._run_as.pw_uid, "group": self._run_as.pw_gid, "extra_groups": []}

    # -- state -----------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether a process of this node (script or VM) is still alive."""
        return self._pgid is not None and _group_alive(self._pgid)

    def log_tail(self, lines: int = 40) -> str:
        return (
            f"--- {self.log_file} ---\n{_tail(self.log_file, lines)}\n"
            f"--- {self.console_log} ---\n{_tail(self.console_log, lines)}"
        )

    # -- lifecycle -------------------------------------------------------------------

    def start(self, timeout: float = 30) -> None:
        """Start the node and block until an AMQP connection as guest succeeds."""
        if self.running:
            raise PrivateNodeError(f"{self.nodename} is already running")
        server = _RABBITMQ_BIN / _SERVER
        if not server.exists():
            raise PrivateNodeError(
                f"no {server}: a private node needs a local RabbitMQ install "
                "(set AMQTASK_RABBITMQ_BIN to the directory holding rabbitmq-server)"
            )
        self._reap()
        started = time.monotonic()
        self._console = self.console_log.open("ab")
        self._proc = subprocess.Popen(
            [str(server)],
            cwd=self.base_dir,
            env=self._env(),
            stdin=subprocess.DEVNULL,
            stdout=self._console,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **self._popen_user_kwargs(),
        )
        self._pgid = self._proc.pid  # session leader => its pid is the group id
        _LIVE_GROUPS.add(self._pgid)
        try:
            self._wait_ready(started + timeout)
        except BaseException:
            self.kill()
            raise
        self.last_start_duration = time.monotonic() - started

    def _wait_ready(self, deadline: float) -> None:
        assert self._proc is not None
        last_error: BaseException | None = None
        with concurrent.futures.ThreadPoolExecutor(1, "private-node-probe") as pool:
            while True:
                code = self._proc.poll()
                if code is not None:
                    raise PrivateNodeError(
                        f"{self.nodename} exited with {code} while starting\n{self.log_tail()}"
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise PrivateNodeError(
                        f"{self.nodename} not accepting AMQP on port {self.port} "
                        f"(last error: {last_error!r})\n{self.log_tail()}"
                    )
                try:
                    with socket.create_connection((_HOST, self.port), timeout=1):
                        pass
                    # A real handshake, run on a fresh loop in a worker thread so that
                    # start() also works when called from inside a running event loop.
                    probe = min(5.0, max(remaining, 0.5))
                    pool.submit(asyncio.run, _amqp_handshake(self.url, probe)).result(
                        timeout=probe + 2
                    )
                    return
                except Exception as exc:  # refused, reset, auth during boot, ...
                    last_error = exc
                time.sleep(0.1)

    def kill(self) -> None:
        """``kill -9`` the node: the script and the Erlang VM, via its process group."""
        if self._pgid is None:
            return
        # Snapshot first: once the VM is dead its children get reparented away.
        stragglers = _node_processes(self._pgid) or set()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._pgid, signal.SIGKILL)
        for pid in stragglers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._wait_group_gone(10)
        self._reap()

    def ctl(self, *args: str, timeout: float = 60, tool: str = _CTL) -> str:
        """Run ``rabbitmqctl -n NODE ARGS`` (or another CLI tool: ``rabbitmq-queues``) as the
        node's user and return its output; raise :class:`PrivateNodeError` when it fails."""
        try:
            done = subprocess.run(
                [str(_RABBITMQ_BIN / tool), "-n", self.nodename, *args],
                cwd=self.base_dir,
                env=self._env(),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=timeout,
                check=False,
                **self._popen_user_kwargs(),
            )
        except subprocess.TimeoutExpired as exc:
            what = f"{tool} {' '.join(args)} on {self.nodename}"
            raise PrivateNodeError(f"{what}: timed out") from exc
        output = (done.stdout + done.stderr).decode(errors="replace")
        if done.returncode != 0:
            raise PrivateNodeError(
                f"{tool} {' '.join(args)} on {self.nodename} exited {done.returncode}: {output}"
            )
        return output

    def stop(self, timeout: float = 30) -> None:
        """Graceful ``rabbitmqctl stop``; falls back to :meth:`kill`."""
        if self._pgid is None:
            return
        if self.running:
            try:
                subprocess.run(
                    [str(_RABBITMQ_BIN / _CTL), "-n", self.nodename, "stop"],
                    cwd=self.base_dir,
                    env=self._env(),
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    timeout=timeout,
                    check=True,
                    **self._popen_user_kwargs(),
                )
                self._wait_group_gone(timeout)
            except (subprocess.SubprocessError, PrivateNodeError):
                pass
        self.kill()

    def restart(self, timeout: float = 30) -> None:
        """(Kill if still running, then) start again with the same name and data dir."""
        self.kill()
        self.start(timeout)

    def cleanup(self, graceful: bool = False) -> None:
        """Stop the node (SIGKILL unless ``graceful``) and delete the directory."""
        try:
            if graceful:
                self.stop()
            else:
                self.kill()
        finally:
            if self._owns_dir:
                shutil.rmtree(self.base_dir, ignore_errors=True)

    def _wait_group_gone(self, timeout: float) -> None:
        assert self._pgid is not None
        deadline = time.monotonic() + timeout
        while _group_alive(self._pgid):
            if time.monotonic() > deadline:
                raise PrivateNodeError(f"{self.nodename} (pgid {self._pgid}) did not exit")
            time.sleep(0.05)

    def _reap(self) -> None:
        """Forget a dead process: wait() it and close the console log."""
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=5)
            self._proc = None
        if self._pgid is not None and not _group_alive(self._pgid):
            _LIVE_GROUPS.discard(self._pgid)
            self._pgid = None
        if self._console is not None:
            self._console.close()
            self._console = None

    # -- context manager -------------------------------------------------------------

    def __enter__(self) -> PrivateNode:
        try:
            self.start()
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
        return f"<PrivateNode {self.nodename} port={self.port} dir={self.base_dir}>"
