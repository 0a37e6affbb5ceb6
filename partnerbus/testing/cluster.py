"""A throwaway three-node RabbitMQ cluster on this machine, for fault-injection tests.

Three extra nodes (`pbc1@localhost` … by default) beside whatever node already runs: own
node names, AMQP ports (5681-5683), distribution ports (25681-25683), data, log and config
under one base directory, no plugins, and the Erlang cookie of the system node (so the
usual `rabbitmqctl -n pbc1@localhost …` works too). The system node (rabbit@localhost,
5672) is never touched: every command here names its node explicitly.

    python -m partnerbus.testing.cluster start|status|stop [--dir DIR]

From Python (pytest fixtures):

    with LocalCluster() as cluster:      # start(), stop() and the base dir removed on exit
        cluster.urls                      # one AMQP URL per node
        cluster.kill_node("pbc1")         # SIGKILL its beam, wait until it is gone
        cluster.restart_node("pbc1")      # boot it again, wait until it runs in the cluster

Startup never sleeps: `rabbitmqctl wait PIDFILE` blocks until the node has booted.
Needs the RabbitMQ server scripts (`/usr/lib/rabbitmq/bin`, or set
`PARTNERBUS_RABBITMQ_SBIN`) and, for the shared cookie, read access to
`/var/lib/rabbitmq/.erlang.cookie` (root or the rabbitmq user); without it a fresh cookie
is generated and only the helper's own `ctl()` can talk to the nodes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from partnerbus.errors import PartnerbusError

HOST = "localhost"
SYSTEM_COOKIE = Path("/var/lib/rabbitmq/.erlang.cookie")
DEFAULT_DIR = Path(tempfile.gettempdir()) / "partnerbus-cluster"
DEFAULT_NAMES = ("pbc1", "pbc2", "pbc3")


def _sbin() -> Path:
    override = os.environ.get("PARTNERBUS_RABBITMQ_SBIN")
    if override:
        return Path(override)
    packaged = Path("/usr/lib/rabbitmq/bin")  # Debian/Ubuntu: the real scripts, not su wrappers
    if (packaged / "rabbitmq-server").exists():
        return packaged
    found = shutil.which("rabbitmq-server")
    if not found:
        msg = "rabbitmq-server not found: install RabbitMQ or set PARTNERBUS_RABBITMQ_SBIN"
        raise ClusterError(msg)
    return Path(found).parent


class ClusterError(PartnerbusError, RuntimeError):
    pass


@dataclass(frozen=True)
class Node:
    name: str
    amqp_port: int
    dist_port: int
    base: Path

    @property
    def nodename(self) -> str:
        return f"{self.name}@{HOST}"

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.amqp_port}/"

    @property
    def dir(self) -> Path:
        return self.base / self.name

    @property
    def pid_file(self) -> Path:
        return self.dir / "rabbit.pid"

    def pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is not alive.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class LocalCluster:
    """Three (or `len(names)`) RabbitMQ nodes clustered on this machine."""

    def __init__(
        self,
        base_dir: Path | str | None = None,
        *,
        names: Sequence[str] = DEFAULT_NAMES,
        amqp_port: int = 5681,
        dist_port: int = 25681,
        timeout: float = 120.0,
        extra_config: str = "",
    ) -> None:
        self._owns_dir = base_dir is None
        self.extra_config = extra_config
        """Lines appended to every node's rabbitmq.conf (a TLS listener, say)."""
        self.base = Path(base_dir or tempfile.mkdtemp(prefix="partnerbus-cluster-"))
        self.nodes = [Node(n, amqp_port + i, dist_port + i, self.base) for i, n in enumerate(names)]
        self.timeout = timeout
        self.sbin = _sbin()
        self.home = self.base / "home"
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self.startup_seconds: float | None = None

    # context manager -----------------------------------------------------------------
    def __enter__(self) -> LocalCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # lookups -------------------------------------------------------------------------
    def node(self, name: str) -> Node:
        for n in self.nodes:
            if name in (n.name, n.nodename):
                return n
        msg = f"no node {name!r} in this cluster ({[n.name for n in self.nodes]})"
        raise ClusterError(msg)

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    def running_nodes(self) -> list[Node]:
        return [n for n in self.nodes if _alive(n.pid())]

    # rabbitmqctl ---------------------------------------------------------------------
    def _ctl_env(self, n: Node | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RABBITMQ_")}
        env["HOME"] = str(self.home)
        if n is not None:
            # The CLI's own distribution port, near the node's rather than in the system
            # node's range (35672-35682), which CLI calls to the system node may fill.
            env["RABBITMQ_CTL_DIST_PORT_MIN"] = str(n.dist_port + 10000)
            env["RABBITMQ_CTL_DIST_PORT_MAX"] = str(n.dist_port + 10010)
        return env

    def ctl(
        self, node: str, *args: str, tool: str = "rabbitmqctl", timeout: float | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a RabbitMQ CLI tool against one node of this cluster; raises on failure."""
        target = self.node(node)
        cmd = [str(self.sbin / tool), "-n", target.nodename, *args]
        result = subprocess.run(  # noqa: S603 - an argument list, no shell
            cmd,
            env=self._ctl_env(target),
            capture_output=True,
            text=True,
            timeout=timeout or self.timeout,
            check=False,
        )
        if result.returncode != 0:
            msg = f"{' '.join(cmd)} failed ({result.returncode}): {result.stderr or result.stdout}"
            raise ClusterError(msg)
        return result

    # lifecycle -----------------------------------------------------------------------
    def _prepare(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        cookie = self.home / ".erlang.cookie"
        if not cookie.exists():
            try:
                value = SYSTEM_COOKIE.read_text().strip()
            except OSError:
                value = secrets.token_hex(20).upper()
            cookie.write_text(value)
            cookie.chmod(0o400)
        for n in self.nodes:
            for sub in ("mnesia", "log"):
                (n.dir / sub).mkdir(parents=True, exist_ok=True)
            (n.dir / "rabbitmq.conf").write_text(
                f"listeners.tcp.local = 127.0.0.1:{n.amqp_port}\n"
                "log.file.level = info\n"
                "log.console = false\n" + self.extra_config
            )
            (n.dir / "enabled_plugins").write_text("[].\n")
            (n.dir / "rabbitmq-env.conf").write_text("# partnerbus test node: no system env\n")

    def _server_env(self, n: Node) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("RABBITMQ_", "ERL_")) and k != "NODENAME"
        }
        env.update(
            HOME=str(self.home),
            RABBITMQ_CONF_ENV_FILE=str(n.dir / "rabbitmq-env.conf"),
            RABBITMQ_NODENAME=n.nodename,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(n.amqp_port),
            RABBITMQ_DIST_PORT=str(n.dist_port),
            RABBITMQ_MNESIA_BASE=str(n.dir / "mnesia"),
            RABBITMQ_LOG_BASE=str(n.dir / "log"),
            RABBITMQ_PID_FILE=str(n.pid_file),
            RABBITMQ_CONFIG_FILE=str(n.dir / "rabbitmq.conf"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(n.dir / "enabled_plugins"),
            RABBITMQ_ENABLED_PLUGINS="",
            ERL_EPMD_ADDRESS="127.0.0.1",
            ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}",
        )
        return env

    def _spawn(self, n: Node) -> None:
        if _alive(n.pid()):
            msg = f"{n.nodename} already runs (pid {n.pid()})"
            raise ClusterError(msg)
        for port in (n.amqp_port, n.dist_port):
            if not _port_free(port):
                msg = f"port {port} for {n.nodename} is taken"
                raise ClusterError(msg)
        with contextlib.suppress(FileNotFoundError):
            n.pid_file.unlink()
        out = (n.dir / "server.out").open("ab")
        self._procs[n.name] = subprocess.Popen(  # noqa: S603 - an argument list, no shell
            [str(self.sbin / "rabbitmq-server")],
            env=self._server_env(n),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=n.dir,
            start_new_session=True,  # Ctrl-C in the test run does not reach it
        )
        out.close()

    def _await(self, n: Node) -> None:
        """Block until the node's pid file appears and the node has fully booted."""
        self.ctl(n.name, "wait", str(n.pid_file), "--timeout", str(int(self.timeout)))

    def start(self) -> LocalCluster:
        """Boot every node, join the others to the first, wait until all run clustered."""
        began = time.monotonic()
        self._prepare()
        first, *others = self.nodes
        for n in self.nodes:  # boot in parallel: the CPU is shared, the waiting is not
            self._spawn(n)
        for n in self.nodes:
            self._await(n)
        for n in others:
            members = self.cluster_status(n.name).get("disk_nodes", [])
            if first.nodename in members:
                continue
            self.ctl(n.name, "stop_app")
            self.ctl(n.name, "join_cluster", first.nodename)
            self.ctl(n.name, "start_app")
        for n in self.nodes:
            self.ctl(n.name, "await_startup", "--timeout", str(int(self.timeout)))
        self.await_running(len(self.nodes))
        self.startup_seconds = time.monotonic() - began
        return self

    def cluster_status(self, node: str) -> dict[str, list[str]]:
        out = self.ctl(node, "cluster_status", "--formatter", "json", "--quiet").stdout
        status: dict[str, list[str]] = json.loads(out)
        return status

    def await_running(self, count: int, *, via: str | None = None) -> list[str]:
        """Wait until `count` nodes run in the cluster, as `via` (default: any live node) sees."""
        deadline = time.monotonic() + self.timeout
        while True:
            live = [n.name for n in self.running_nodes()]
            if via is None and not live:
                msg = "no cluster node is running"
                raise ClusterError(msg)
            running = self.cluster_status(via or live[0]).get("running_nodes", [])
            if len(running) >= count:
                return running
            if time.monotonic() > deadline:
                msg = f"only {running} run after {self.timeout}s"
                raise ClusterError(msg)
            # The next cluster_status call is itself a blocking round trip: no sleep needed.

    def kill_node(self, name: str) -> int:
        """SIGKILL the node's beam process (a crash, not a shutdown); wait until it is gone."""
        n = self.node(name)
        pid = n.pid()
        if pid is None or not _alive(pid):
            msg = f"{n.nodename} is not running"
            raise ClusterError(msg)
        os.kill(pid, signal.SIGKILL)
        self._wait_gone(n, pid)
        return pid

    def _wait_gone(self, n: Node, pid: int) -> None:
        proc = self._procs.pop(n.name, None)
        if proc is not None and proc.pid == pid:
            proc.wait(self.timeout)
            return
        if proc is not None:
            proc.wait(self.timeout)
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            return
        try:
            ready, _, _ = select.select([fd], [], [], self.timeout)
        finally:
            os.close(fd)
        if not ready:
            msg = f"{n.nodename} (pid {pid}) did not exit"
            raise ClusterError(msg)

    def restart_node(self, name: str) -> None:
        """Boot a stopped or killed node again; it rejoins the cluster from its data dir."""
        n = self.node(name)
        self._spawn(n)
        self._await(n)
        self.await_running(len(self.nodes), via=n.name)

    def stop_node(self, name: str) -> None:
        """Graceful shutdown of one node (SIGKILL if it does not stop in time)."""
        n = self.node(name)
        pid = n.pid()
        if not _alive(pid):
            self._procs.pop(n.name, None)
            return
        try:
            self.ctl(n.name, "stop", str(n.pid_file), timeout=60)
        except (ClusterError, subprocess.TimeoutExpired):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)  # type: ignore[arg-type]
        self._wait_gone(n, pid)  # type: ignore[arg-type]

    def stop(self, *, remove: bool = True) -> None:
        """Stop every node (followers first) and, by default, remove the base directory
        when this cluster made it (a `base_dir` given by the caller is left, logs and all)."""
        errors = []
        for n in reversed(self.nodes):
            try:
                self.stop_node(n.name)
            except Exception as exc:
                errors.append(f"{n.nodename}: {exc}")
        if remove and self._owns_dir:
            shutil.rmtree(self.base, ignore_errors=True)
        if errors:
            raise ClusterError("; ".join(errors))

    # quorum queues -------------------------------------------------------------------
    def queue_info(
        self, queue: str, *, vhost: str = "/", via: str | None = None, timeout: float | None = None
    ) -> dict[str, Any]:
        """`name`, `type`, `leader` and `members` of a queue, as a live node sees it."""
        node = via or self.running_nodes()[0].name
        out = self.ctl(
            node,
            "list_queues",
            "-p",
            vhost,
            "name",
            "type",
            "leader",
            "members",
            "online",
            "--formatter",
            "json",
            "--quiet",
            timeout=timeout,
        ).stdout
        rows: list[dict[str, Any]] = json.loads(out)
        for row in rows:
            if row["name"] == queue:
                return row
        msg = f"no queue {queue!r} in vhost {vhost!r}"
        raise ClusterError(msg)

    def await_leader(
        self, queue: str, *, via: str, not_on: str | None = None, vhost: str = "/"
    ) -> dict[str, Any]:
        """Block until `via` reports a leader for `queue` (other than `not_on`, a node just
        killed). While a quorum queue elects a new leader, `list_queues` may leave it out
        or name no leader: both mean "not yet", not an error (each call is itself a
        blocking round trip, so the loop does not spin)."""
        deadline = time.monotonic() + self.timeout
        last: object = None
        while True:
            try:
                info = self.queue_info(queue, vhost=vhost, via=via, timeout=30)
                if info.get("leader") not in (None, "", not_on):
                    return info
                last = info
            except (ClusterError, subprocess.TimeoutExpired) as exc:
                last = exc
            if time.monotonic() > deadline:
                msg = f"no leader for {queue!r} seen by {via} within {self.timeout}s: {last}"
                raise ClusterError(msg)

    def status(self) -> list[dict[str, object]]:
        rows: list[dict[str, object]] = []
        for n in self.nodes:
            pid = n.pid()
            row: dict[str, object] = {
                "node": n.nodename,
                "amqp": n.amqp_port,
                "dist": n.dist_port,
                "pid": pid if _alive(pid) else None,
            }
            if row["pid"]:
                try:
                    row["running_nodes"] = self.cluster_status(n.name).get("running_nodes", [])
                except ClusterError as exc:
                    row["error"] = str(exc).splitlines()[0]
            rows.append(row)
        return rows


@contextlib.contextmanager
def local_cluster(**kwargs: object) -> Iterator[LocalCluster]:
    """`with local_cluster() as cluster:`: started, then stopped and removed."""
    with LocalCluster(**kwargs) as cluster:  # type: ignore[arg-type]
        yield cluster


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m partnerbus.testing.cluster",
        description="A local three-node RabbitMQ cluster for fault tests.",
    )
    parser.add_argument("command", choices=["start", "stop", "status"])
    parser.add_argument(
        "--dir",
        type=Path,
        default=Path(os.environ.get("PARTNERBUS_CLUSTER_DIR", DEFAULT_DIR)),
        help=f"base directory of the nodes (default {DEFAULT_DIR})",
    )
    args = parser.parse_args(argv)
    cluster = LocalCluster(args.dir)
    if args.command == "start":
        try:
            cluster.start()
        except ClusterError as exc:
            print(f"cluster start failed: {exc}", file=sys.stderr)
            return 1
        for n in cluster.nodes:
            print(f"{n.nodename}\t{n.url}")
        print(f"started in {cluster.startup_seconds:.1f}s; stop with: {parser.prog} stop")
        return 0
    if args.command == "stop":
        cluster.stop()
        print(f"stopped; removed {args.dir}")
        return 0
    print(json.dumps(cluster.status(), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
