"""A real three-node NATS JetStream cluster on 127.0.0.1 (random ports), with
the per-role permissions of docs/fleet.md: one account per host, per admin
and for the collector. Used by the fleet tests, bench/fleet.py and
`make fleet-demo`."""
from __future__ import annotations

import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from agentwarden import fleet

NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def host_permissions(host: str) -> str:
    """What a host may do: ship its own records, keep its own hold keys and
    state, answer decisions for itself, read its own inbox. Never publish a
    decision, never read the buckets (other hosts' holds) or another inbox."""
    return f"""{{
        publish: {{ allow: ["aw.rec.{host}.>", "$KV.aw-holds.{host}.>", "$KV.aw-hosts.{host}"] }}
        subscribe: {{ allow: ["aw.decide.{host}", "{fleet.inbox_prefix(host)}.>"] }}
        allow_responses: true
    }}"""


# The JetStream API an admin and the collector use, by name: never `$JS.API.>`,
# which would let them delete or purge the stream, the buckets or the
# collector's consumer (an audit trail an admin can erase is none).
_FLEET_STREAMS = (fleet.STREAM, f"KV_{fleet.HOLDS_BUCKET}", f"KV_{fleet.HOSTS_BUCKET}")
_MADE_AND_READ = ["$JS.API.INFO", "$JS.API.STREAM.NAMES",
                  *(f"$JS.API.STREAM.{verb}.{stream}" for stream in _FLEET_STREAMS for verb in ("INFO", "CREATE"))]


def _quoted(subjects: list[str]) -> str:
    return ", ".join(f'"{s}"' for s in subjects)


def admin_permissions(admin: str) -> str:
    """Decisions; reading the stream (an ordered consumer of its own, which
    answers flow control: $JS.FC) and the buckets; making them (`fleet init`).
    Never records, never deleting or purging anything."""
    reads = [*_MADE_AND_READ,
             *(f"$JS.API.{api}.{stream}{tail}" for stream in _FLEET_STREAMS[1:]
               for api, tail in (("DIRECT.GET", ""), ("DIRECT.GET", ".>"), ("STREAM.MSG.GET", ""))),
             # ordered consumers are unnamed: not .<name>, which could redefine the collector's
             f"$JS.API.CONSUMER.CREATE.{fleet.STREAM}", f"$JS.API.CONSUMER.INFO.{fleet.STREAM}.>"]
    return f"""{{
        publish: {{ allow: ["aw.decide.>", {_quoted(reads)}, "$JS.FC.>"] }}
        subscribe: {{ allow: ["{fleet.inbox_prefix(admin)}.>"] }}
    }}"""


def collector_permissions(user: str) -> str:
    """Consume and acknowledge the stream through its own durable consumer
    (and make the stream and the buckets). Never deleting or purging anything."""
    durable = f"{fleet.STREAM}.{fleet.COLLECTOR_DURABLE}"
    consumes = [*_MADE_AND_READ, f"$JS.API.CONSUMER.DURABLE.CREATE.{durable}",
                f"$JS.API.CONSUMER.CREATE.{durable}", f"$JS.API.CONSUMER.CREATE.{durable}.>",
                f"$JS.API.CONSUMER.INFO.{durable}", f"$JS.API.CONSUMER.MSG.NEXT.{durable}"]
    return f"""{{
        publish: {{ allow: [{_quoted(consumes)}, "$JS.ACK.{fleet.STREAM}.>"] }}
        subscribe: {{ allow: ["{fleet.inbox_prefix(user)}.>"] }}
    }}"""


def authorization(users: dict[str, tuple[str, str]]) -> str:
    """users: name -> (password, permissions block)."""
    lines = [f'        {{ user: "{name}", password: "{password}", permissions: {perms} }}'
             for name, (password, perms) in users.items()]
    return "authorization {\n    users: [\n" + ",\n".join(lines) + "\n    ]\n}\n"


class NatsCluster:
    def __init__(self, directory: Path, hosts: list[str], admins: list[str], nodes: int = 3):
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.users: dict[str, tuple[str, str]] = {}
        for host in hosts:
            self.users[host] = (secrets.token_hex(12), host_permissions(host))
        for admin in admins:
            self.users[admin] = (secrets.token_hex(12), admin_permissions(admin))
        self.users["collector"] = (secrets.token_hex(12), collector_permissions("collector"))
        self.client_ports = [free_port() for _ in range(nodes)]
        self.route_ports = [free_port() for _ in range(nodes)]
        self.procs: list[subprocess.Popen | None] = [None] * nodes
        self.url = ",".join(f"nats://127.0.0.1:{p}" for p in self.client_ports)
        for i in range(nodes):
            self.config(i).write_text(self._config_text(i))

    def config(self, i: int) -> Path:
        return self.directory / f"node{i}.conf"

    def log(self, i: int) -> Path:
        return self.directory / f"node{i}.log"

    def _config_text(self, i: int) -> str:
        routes = ", ".join(f"nats-route://127.0.0.1:{p}" for p in self.route_ports)
        return (f'server_name: "aw-n{i}"\nlisten: "127.0.0.1:{self.client_ports[i]}"\n'
                f'jetstream {{ store_dir: "{self.directory / f"store{i}"}", max_file_store: 1G, '
                f'max_memory_store: 64M }}\n'
                f'cluster {{ name: "aw-test", listen: "127.0.0.1:{self.route_ports[i]}", '
                f'routes: [{routes}] }}\n' + authorization(self.users))

    def credentials(self, user: str) -> Path:
        path = self.directory / f"{user}.creds.toml"
        if not path.exists():
            path.write_text(f'user = "{user}"\npassword = "{self.users[user][0]}"\n')
            path.chmod(0o600)
        return path

    def start(self, i: int | None = None) -> None:
        for n in ([i] if i is not None else range(len(self.procs))):
            log = open(self.log(n), "a")
            self.procs[n] = subprocess.Popen([NATS_SERVER, "-c", str(self.config(n))],
                                             stdout=log, stderr=subprocess.STDOUT)
            log.close()
        for n in ([i] if i is not None else range(len(self.procs))):
            self._wait_port(self.client_ports[n])

    def _wait_port(self, port: int, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"nats-server on port {port} did not start: {self.directory}")

    def kill(self, i: int) -> None:
        proc = self.procs[i]
        if proc and proc.poll() is None:
            proc.kill()
            proc.wait()
        self.procs[i] = None

    def pause(self) -> None:
        """Every node SIGSTOPped: a blackhole. The kernel still accepts
        connections on their ports, nothing ever answers."""
        for proc in self.procs:
            if proc and proc.poll() is None:
                proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        for proc in self.procs:
            if proc and proc.poll() is None:
                proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        self.resume()
        for i, proc in enumerate(self.procs):
            if proc and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            self.procs[i] = None

    def server_log(self) -> str:
        return "".join(self.log(i).read_text(errors="replace") for i in range(len(self.procs))
                       if self.log(i).exists())
