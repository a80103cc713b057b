"""`make fleet-demo`: a local fleet to watch. A three-node NATS JetStream
cluster on 127.0.0.1 (tests/fleet_cluster.py: the permissions of
docs/fleet.md), the collector, and two agentwarden instances, hosts demo-a and
demo-b, kept apart with cgroup_scope. Prints what to try; Ctrl-C stops it all
and removes everything it made (under /tmp/agentwarden-fleet-demo)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from agentwarden import cgroups, control, fleet  # noqa: E402
from agentwarden.errors import AgentwardenError  # noqa: E402
from fleet_cluster import NatsCluster  # noqa: E402

HOSTS = ("demo-a", "demo-b")
DIR = Path("/tmp/agentwarden-fleet-demo")
SCOPE = "agentwarden-fleet-demo"


def main() -> None:
    if os.geteuid() != 0:
        sys.exit("fleet-demo: run as root (each instance loads the BPF program)")
    shutil.rmtree(DIR, ignore_errors=True)
    DIR.mkdir(parents=True)
    cluster = NatsCluster(DIR / "nats", list(HOSTS), ["alice", "bob"])
    procs: list[subprocess.Popen] = []
    root = cgroups.cgroup2_root()
    try:
        cluster.start()
        lines = [fleet.generate_key(name, DIR / f"{name}.key") for name in ("alice", "bob")]
        (DIR / "admins").write_text("\n".join(lines) + "\n")
        log = open(DIR / "collector.log", "w")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "agentwarden", "fleet", "archive", "--dir", str(DIR / "central"),
             "--url", cluster.url, "--credentials", str(cluster.credentials("collector"))],
            stdout=log, stderr=subprocess.STDOUT))
        env_of = {}
        for host in HOSTS:
            (root / SCOPE / host).mkdir(parents=True, exist_ok=True)
            (DIR / host / "policy").mkdir(parents=True)
            env_of[host] = {**os.environ, "AGENTWARDEN_RUN_DIR": str(DIR / host / "run"),
                            "AGENTWARDEN_STATE_DIR": str(DIR / host / "state"),
                            "AGENTWARDEN_POLICY_DIR": str(DIR / host / "policy"),
                            "AGENTWARDEN_CGROUP_SCOPE": f"{SCOPE}/{host}",
                            "AGENTWARDEN_FLEET_URL": cluster.url, "AGENTWARDEN_FLEET_HOST": host,
                            "AGENTWARDEN_FLEET_CREDENTIALS": str(cluster.credentials(host)),
                            "AGENTWARDEN_FLEET_ADMIN_KEYS": str(DIR / "admins")}
            out = open(DIR / host / "up.log", "w")
            procs.append(subprocess.Popen([sys.executable, "-m", "agentwarden", "up"], env=env_of[host],
                                          stdout=out, stderr=subprocess.STDOUT))
        print("fleet-demo: starting two agentwarden instances (the BPF program compiles; a minute)...")
        from agentwarden.settings import load
        for host in HOSTS:
            settings = load(environ=env_of[host])
            deadline = time.monotonic() + 120
            while True:
                try:
                    if control.request(settings, "status", timeout=2)["status"]["probe"]["health"]:
                        break
                except AgentwardenError:
                    pass
                if time.monotonic() > deadline:
                    sys.exit(f"fleet-demo: {host} did not start; see {DIR / host / 'up.log'}")
                time.sleep(0.5)
        aw = f"{REPO}/.venv/bin/agentwarden"
        admin = f"--url {cluster.url} --credentials {cluster.credentials('alice')}"
        for host in HOSTS:
            (DIR / f"{host}.env").write_text("".join(f"export {k}={v}\n" for k, v in env_of[host].items()
                                                     if k.startswith("AGENTWARDEN_")))
        (DIR / "admin.env").write_text(f"export AGENTWARDEN_FLEET_URL={cluster.url}\n"
                                       f"export AGENTWARDEN_FLEET_CREDENTIALS={cluster.credentials('bob')}\n"
                                       f"export AGENTWARDEN_FLEET_KEY={DIR / 'bob.key'}\n")
        aw = f"{REPO}/.venv/bin/agentwarden"
        bot = root / SCOPE / "demo-a" / "bot"
        policy = ('[agent.bot]\\nmode = \\"enforce\\"\\non-violation = \\"alert\\"\\n[agent.bot.exec]\\nallow = [\\"/usr/bin/*\\", '
                  '\\"/bin/*\\"]\\nhold = [\\"/usr/bin/date *\\"]\\n[agent.bot.files]\\nread-allow = [\\"/**\\"]\\n')
        print(f"""
fleet-demo: running. NATS {cluster.url}; the collector writes {DIR / 'central'}/HOST/.

In another terminal, as root, on "host" demo-a: an agent whose policy holds `date`, and a session:
  . {DIR / 'demo-a.env'}
  {aw} tag {bot} --agent bot --create
  printf "{policy}" > {DIR / 'demo-a' / 'policy' / 'bot.toml'} && {aw} policy reload
  {aw} run --agent bot -- sh -c 'date +%T; echo ran'

In a third, as admin bob (his NATS account and his own key; any machine that reaches NATS):
  . {DIR / 'admin.env'}
  {aw} fleet holds
  {aw} fleet approve demo-a/ID --reason "looks fine"
  {aw} fleet tail --violations        (or --host demo-b, --agent bot, --json)
  {aw} fleet status
  {aw} log verify --archive {DIR / 'central' / 'demo-a'}

Ctrl-C stops the demo.""")
        while True:
            signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        print("\nfleet-demo: stopping")
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                proc.kill()
        cluster.stop()
        for host in HOSTS:
            for path in sorted((root / SCOPE / host).rglob("*"), reverse=True):
                if path.is_dir():
                    try:
                        path.rmdir()
                    except OSError:
                        pass
            try:
                (root / SCOPE / host).rmdir()
            except OSError:
                pass
        try:
            (root / SCOPE).rmdir()
        except OSError:
            pass


if __name__ == "__main__":
    def interrupted(*_):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, interrupted)
    main()
