"""The fleet on real processes: a three-node nats-server JetStream cluster on
127.0.0.1 (tests/fleet_cluster.py), the collector (`agentwarden fleet
archive`), and two agentwarden instances on this machine kept apart with
cgroup_scope, each a fleet host. Records reach the central archive exactly
once while a NATS node and a daemon are killed; holds are answered from
another admin's machine with signed decisions; forged or misrouted decisions
are refused and recorded; with NATS down holds work locally and shipping
catches up."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from agentwarden import cgroups, fleet, session
from agentwarden.archive.segments import read_items
from agentwarden.errors import AgentwardenError
from conftest import TEST_CGROUP_PARENT, Warden, stop_process, wait_for
from fleet_cluster import NATS_SERVER, NatsCluster

pytestmark = pytest.mark.kernel

PY = sys.executable
SHELL = ["/usr/bin/sh", "/usr/bin/dash", "/bin/sh", "/bin/dash"]
HOSTS = ("host-a", "host-b")


def _policy(agent: str, exec_hold=(), approvers: int = 1) -> str:
    def lst(items):
        return "[" + ", ".join(f'"{i}"' for i in items) + "]"
    return (f'[agent.{agent}]\nmode = "enforce"\non-violation = "kill"\nhold-approvers = {approvers}\n'
            f'hold-timeout = 120\n'
            f'[agent.{agent}.exec]\nallow = {lst(SHELL + ["/usr/bin/*", "/bin/*"])}\nhold = {lst(exec_hold)}\n'
            f'[agent.{agent}.files]\nread-allow = ["/**"]\nwrite-allow = ["/tmp/**"]\n')


class Fleet:
    def __init__(self, tmp: Path):
        if not os.path.exists(NATS_SERVER):
            pytest.fail("nats-server is missing (make setup installs Debian's nats-server)")
        self.tmp = tmp
        self.cluster = NatsCluster(tmp / "nats", list(HOSTS), ["alice", "bob"])
        self.cluster.start()
        keys = tmp / "keys"
        keys.mkdir()
        lines = [fleet.generate_key(name, keys / f"{name}.key") for name in ("alice", "bob")]
        fleet.generate_key("mallory", keys / "mallory.key")   # not in the hosts' admin list
        self.admin_keys = keys / "admins"
        self.admin_keys.write_text("\n".join(lines) + "\n")
        self.keys = keys
        self.central = tmp / "central"
        self.collector_log = open(tmp / "collector.log", "w+")
        self.collector = self._start_collector()
        self.wardens: dict[str, Warden] = {}
        self.scopes: dict[str, Path] = {}
        root = cgroups.cgroup2_root()
        (root / TEST_CGROUP_PARENT).mkdir(exist_ok=True)
        errors: list[BaseException] = []

        def start(host):
            scope = f"{TEST_CGROUP_PARENT}/fleet-{host}"
            self.scopes[host] = root / scope
            self.scopes[host].mkdir(exist_ok=True)
            (tmp / host).mkdir()
            try:
                self.wardens[host] = Warden(tmp / host, env={
                    "AGENTWARDEN_CGROUP_SCOPE": scope, "AGENTWARDEN_FLEET_URL": self.cluster.url,
                    "AGENTWARDEN_FLEET_CREDENTIALS": str(self.cluster.credentials(host)),
                    "AGENTWARDEN_FLEET_HOST": host,
                    "AGENTWARDEN_FLEET_ADMIN_KEYS": str(self.admin_keys)})
            except BaseException as exc:
                errors.append(exc)
        threads = [threading.Thread(target=start, args=(h,)) for h in HOSTS]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            self.stop()
            raise errors[0]

    def _start_collector(self) -> subprocess.Popen:
        return subprocess.Popen(
            [PY, "-m", "agentwarden", "fleet", "archive", "--dir", str(self.central), "--url",
             self.cluster.url, "--credentials", str(self.cluster.credentials("collector"))],
            stdout=self.collector_log, stderr=subprocess.STDOUT)

    def cli(self, user: str, *args: str, check: bool = True, key: str | None = None):
        extra = ["--url", self.cluster.url, "--credentials", str(self.cluster.credentials(user))]
        if key:
            extra += ["--key", str(self.keys / f"{key}.key")]
        result = subprocess.run([PY, "-m", "agentwarden", "fleet", *args, *extra], capture_output=True,
                                text=True, timeout=60)
        if check and result.returncode != 0:
            raise AssertionError(f"fleet {' '.join(args)} failed ({result.returncode}):\n"
                                 f"{result.stdout}\n{result.stderr}")
        return result

    def agent(self, host: str, name: str) -> tuple[str, Path]:
        """An agent cgroup in host's scope, tagged and watched."""
        agent = f"{name}-{uuid.uuid4().hex[:6]}"
        path = self.scopes[host] / agent
        path.mkdir()
        cgroups.tag(path, agent)
        warden = self.wardens[host]
        cgid = str(cgroups.cgroup_id(path))
        wait_for(lambda: cgid in warden.status()["probe"]["tags"], what=f"{host} to watch {agent}")
        return agent, path

    def fleet_status(self, host: str) -> dict:
        return self.wardens[host].status()["fleet"]

    def shipped_up_to(self, host: str, seq: int, timeout: float = 60) -> None:
        wait_for(lambda: self.fleet_status(host)["acked_seq"] >= seq, timeout=timeout,
                 what=f"{host} to ship up to seq {seq}")

    def central_seqs(self, host: str) -> list[int]:
        directory = self.central / host
        return [item.seq for item in read_items(directory)] if directory.is_dir() else []

    def stop(self) -> None:
        for w in self.wardens.values():
            w.stop()
        stop_process(self.collector)
        self.collector_log.close()
        self.cluster.stop()


@pytest.fixture(scope="module")
def fleet_env(kernel, tmp_path_factory):
    f = Fleet(tmp_path_factory.mktemp("fleet"))
    yield f
    f.stop()


def run_in(path: Path, argv: list[str], **kw) -> subprocess.Popen:
    procs = str(path / "cgroup.procs")

    def join():
        with open(procs, "w") as fh:
            fh.write("0")
    return subprocess.Popen(argv, preexec_fn=join, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)


def workload(path: Path, rounds: int) -> subprocess.Popen:
    """Real tools: find, grep -r, cp -r, tar, rm -r, in a loop."""
    script = (f"d=$(mktemp -d /tmp/awfleet.XXXXXX); for i in $(seq {rounds}); do "
              "find /usr/share/doc/python3 -maxdepth 1 >/dev/null; grep -rl fleet /usr/share/doc/python3 "
              ">/dev/null; cp -r /usr/share/doc/python3 $d/c$i; tar -cf $d/t$i.tar -C $d c$i; "
              "rm -r $d/c$i $d/t$i.tar; done; rm -r $d")
    return run_in(path, ["/bin/sh", "-c", script])


def settled_seq(warden: Warden) -> int:
    """A seq the host archived after everything before now, once it is durable."""
    warden.settle()
    upto = warden.status()["daemon"]["archive_state"]["next_seq"] - 1
    wait_for(lambda: warden.status()["daemon"]["archive_state"]["durable_seq"] >= upto,
             what="the archive to be durable")
    return upto


def compare(fleet_env: Fleet, host: str, upto: int) -> None:
    """The central copy holds seqs first..upto once each, in order, byte for
    byte the host's records with the host's chain."""
    local = {item.seq: item for item in read_items(fleet_env.wardens[host].settings.archive_dir)}
    wait_for(lambda: (fleet_env.central_seqs(host) or [-1])[-1] >= upto, timeout=60,
             what=f"the central archive of {host} to reach seq {upto}")
    central = [item for item in read_items(fleet_env.central / host) if item.seq <= upto]
    seqs = [item.seq for item in central]
    assert seqs == list(range(0, upto + 1)), "missing or repeated records in the central archive"
    for item in central:
        assert item.chain == local[item.seq].chain and item.record == local[item.seq].record


def test_records_arrive_once_through_a_node_kill_and_a_daemon_kill(fleet_env):
    agents = {host: fleet_env.agent(host, "ship") for host in HOSTS}
    loads = [workload(path, 40) for _, path in agents.values()]
    time.sleep(1.0)
    fleet_env.cluster.kill(1)                                     # one NATS node, kill -9
    daemon_b = fleet_env.wardens["host-b"].status()["daemon"]["pid"]
    os.kill(daemon_b, signal.SIGKILL)                             # host-b's daemon, mid-stream
    time.sleep(2.0)
    fleet_env.cluster.start(1)
    for proc in loads:
        assert proc.wait(timeout=120) == 0
    # `up` restarts host-b's daemon; it resumes after the last acknowledged seq.
    wait_for(lambda: fleet_env.wardens["host-b"].status()["daemon"]["pid"] != daemon_b, timeout=30,
             what="host-b's daemon to be restarted")
    for host, (agent, path) in agents.items():
        warden = fleet_env.wardens[host]
        upto = settled_seq(warden)
        fleet_env.shipped_up_to(host, upto)
        compare(fleet_env, host, upto)
        central = [i.record for i in read_items(fleet_env.central / host) if i.seq <= upto]
        local = [i.record for i in read_items(warden.settings.archive_dir) if i.seq <= upto]
        tars = [r for r in central if r["kind"] == "exec" and r.get("agent") == agent
                and r["argv"][:1] == ["tar"]]
        assert tars == [r for r in local if r["kind"] == "exec" and r.get("agent") == agent
                        and r["argv"][:1] == ["tar"]]
        # host-b's daemon lost what the probe had sent it when it was killed (a known limit
        # of the probe -> daemon hop, docs/architecture.md): the restarted one says so.
        restarted = [r for r in local if r["kind"] == "gap" and r["stage"] == "transport"
                     and "started while the probe was running" in r["detail"]]
        assert len(tars) == 40 if host == "host-a" else (len(tars) == 40 or restarted), (host, len(tars))
        assert bool(restarted) == (host == "host-b")
        verify = warden.cli("log", "verify", "--archive", str(fleet_env.central / host), check=False)
        assert verify.returncode == 0, verify.stdout + verify.stderr
        path.joinpath("cgroup.kill").write_text("1")
    # The restart of host-b's daemon made it publish again what was in flight: JetStream or the
    # collector dropped those repeats (compare() found every seq once).
    import json
    reported = {h["host"]: h for h in map(json.loads, fleet_env.cli("alice", "status", "--json").stdout.splitlines())}
    assert set(reported) == set(HOSTS)
    assert all(reported[h]["acked_seq"] > 0 and reported[h]["pending_holds"] == 0 for h in HOSTS)


def start_run(warden: Warden, agent: str, command: list[str]) -> subprocess.Popen:
    return subprocess.Popen([PY, "-m", "agentwarden", "run", "--agent", agent, "--", *command],
                            env=warden.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def fleet_holds(fleet_env: Fleet) -> list[dict] | None:
    """`fleet holds` as admin alice; None while JetStream cannot answer (just after a
    cluster's restart it says so, exit 1, rather than listing nothing)."""
    import json
    result = fleet_env.cli("alice", "holds", "--json", check=False)
    if result.returncode != 0:
        assert "temporarily unavailable" in result.stderr and "Traceback" not in result.stderr, result.stderr
        return None
    return [json.loads(line) for line in result.stdout.splitlines()]


def wait_fleet_hold(fleet_env: Fleet, agent: str) -> dict:
    def found():
        return [h for h in fleet_holds(fleet_env) or [] if h["agent"] == agent]
    [hold] = wait_for(found, timeout=30, what=f"a hold of {agent} in `fleet holds`")
    return hold


def host_records(fleet_env: Fleet, host: str, kind: str) -> list[dict]:
    return [r for r in fleet_env.wardens[host].records() if r["kind"] == kind]


def test_hold_on_a_approved_from_anywhere_by_three_distinct_admins(fleet_env):
    """hold-approvers = 3: two admins' fleet keys from two machines and a local admin on the host."""
    import json
    import re
    warden = fleet_env.wardens["host-a"]
    agent, _ = fleet_env.agent("host-a", "hold")
    warden.set_policy(agent, _policy(agent, exec_hold=["/usr/bin/date *"], approvers=3))
    run = start_run(warden, agent, ["/bin/sh", "-c", "/usr/bin/date +fleet-approved-%Y; echo rc=$?"])
    hold = wait_fleet_hold(fleet_env, agent)
    assert hold["host"] == "host-a" and hold["action"].startswith("exec /usr/bin/date")
    ref = f"host-a/{hold['hold_id']}"
    # `fleet status`: host-a up, the hold pending, what it shipped, its lag and drops.
    def host_a_line():
        lines = [line for line in fleet_env.cli("alice", "status").stdout.splitlines() if line.startswith("host-a ")]
        return lines if lines and " 1 holds pending" in lines[0] else None
    [line] = wait_for(host_a_line, what="fleet status to show host-a's pending hold")
    assert re.match(r"host-a +up, shipped up to seq \d+ \d+s ago, lag \d+, 1 holds pending, drops: ", line), line
    [entry] = [h for h in map(json.loads, fleet_env.cli("alice", "status", "--json").stdout.splitlines())
               if h["host"] == "host-a"]
    assert entry["pending_holds"] == 1 and entry["acked_seq"] > 0 and entry["last_ack"] > 0
    assert {"lag", "drops", "durable_seq", "counters"} <= entry.keys()
    first = fleet_env.cli("bob", "approve", ref, "--reason", "fine", key="alice")
    assert "pending (2 more approvals needed)" in first.stdout
    again = fleet_env.cli("bob", "approve", ref, key="alice", check=False)
    assert again.returncode == 1 and "already approved" in again.stderr
    local = warden.cli("approve", hold["hold_id"], "--reason", "and root on the host")
    assert "1 more distinct approver(s) needed" in local.stdout
    # From "bob's machine": bob's NATS account and bob's own key; the bare id finds its host.
    second = fleet_env.cli("bob", "approve", hold["hold_id"], "--reason", "ok too", key="bob")
    assert f"{ref}: approved" in second.stdout
    out, err = run.communicate(timeout=30)
    assert run.returncode == 0 and "fleet-approved-" in out and "rc=0" in out, err
    approved = [r for r in host_records(fleet_env, "host-a", "hold")
                if r["hold_id"] == hold["hold_id"] and r["state"] == "approved"]
    assert len(approved) == 1
    names = sorted(a["name"].split(" ")[0] for a in approved[0]["approvals"])
    assert len(names) == 3 and "alice" in names and "bob" in names, names
    wait_for(lambda: (holds := fleet_holds(fleet_env)) is not None and not [h for h in holds if h["agent"] == agent],
             what="the hold to leave the fleet's holds")


def test_forged_and_misrouted_decisions_are_refused_and_recorded(fleet_env):
    warden = fleet_env.wardens["host-a"]
    agent, _ = fleet_env.agent("host-a", "forge")
    warden.set_policy(agent, _policy(agent, exec_hold=["/usr/bin/date *"]))
    run = start_run(warden, agent, ["/bin/sh", "-c", "/usr/bin/date +forged-%Y; echo rc=$?"])
    hold = wait_fleet_hold(fleet_env, agent)
    ref = f"host-a/{hold['hold_id']}"
    # A key that is not in host-a's admin list, sent with a real admin account.
    forged = fleet_env.cli("alice", "approve", ref, key="mallory", check=False)
    assert forged.returncode == 1 and "not in this host's fleet_admin_keys" in forged.stderr
    assert "Traceback" not in forged.stderr
    # A real admin key, but published with host-b's NATS account: NATS refuses it.
    misrouted = fleet_env.cli("host-b", "approve", ref, key="bob", check=False)
    assert misrouted.returncode == 1 and "NATS refused the decision" in misrouted.stderr
    assert 'permissions violation for publish to "aw.decide.host-a"' in misrouted.stderr.lower()
    # ...and the server logs it (the record of a refusal that never reached the host).
    assert 'Publish Violation - User "host-b", Subject "aw.decide.host-a"' in fleet_env.cluster.server_log()
    refused = wait_for(lambda: [r for r in host_records(fleet_env, "host-a", "fleet")
                                if r["event"] == "refused" and r.get("hold_id") == hold["hold_id"]],
                       what="the refusal in host-a's archive")
    assert "not in this host's fleet_admin_keys" in refused[0]["detail"]
    assert refused[0]["signer"] == fleet.fingerprint(fleet.load_admin_key(fleet_env.keys / "mallory.key").public)
    # Still held: neither decision did anything. A listed admin denies it over the fleet.
    assert [h for h in session.admin_request(warden.settings, {"cmd": "holds"})["holds"]
            if h["id"] == hold["hold_id"]]
    denied = fleet_env.cli("alice", "deny", ref, "--reason", "forged approvals seen", key="alice")
    assert f"{ref}: denied" in denied.stdout
    out, _ = run.communicate(timeout=30)
    assert "forged-" not in out and "rc=0" not in out
    [record] = [r for r in host_records(fleet_env, "host-a", "hold")
                if r["hold_id"] == hold["hold_id"] and r["state"] == "denied"]
    assert record["denial"]["name"].startswith("alice (fleet key ed25519:")


def test_nats_down_holds_work_locally_and_shipping_catches_up(fleet_env):
    warden = fleet_env.wardens["host-a"]
    agent, path = fleet_env.agent("host-a", "offline")
    warden.set_policy(agent, _policy(agent, exec_hold=["/usr/bin/date *"]))
    fleet_env.cluster.stop()
    wait_for(lambda: not fleet_env.fleet_status("host-a")["connected"], timeout=30,
             what="host-a to notice NATS is gone")
    run = start_run(warden, agent, ["/bin/sh", "-c", "/usr/bin/date +offline-%Y; echo rc=$?"])
    [hold] = wait_for(lambda: [h for h in session.admin_request(warden.settings, {"cmd": "holds"})["holds"]
                               if h["agent"] == agent], timeout=20, what="the local hold")
    warden.cli("approve", hold["id"], "--reason", "approved while the fleet is down")
    out, err = run.communicate(timeout=30)
    assert run.returncode == 0 and "offline-" in out, err
    _, busy = fleet_env.agent("host-a", "offline-load")   # an agent without a policy: watched only
    assert workload(busy, 10).wait(timeout=60) == 0
    durable = settled_seq(warden)
    assert warden.status()["fleet"]["acked_seq"] < durable     # waiting: nothing is lost meanwhile
    assert "NOT CONNECTED" in warden.cli("status").stdout
    fleet_env.cluster.start()
    fleet_env.shipped_up_to("host-a", durable, timeout=90)
    compare(fleet_env, "host-a", durable)
    central = [i.record for i in read_items(fleet_env.central / "host-a")]
    assert [r for r in central if r["kind"] == "hold" and r["hold_id"] == hold["id"]
            and r["state"] == "approved"]
    for cgroup in (path, busy):
        cgroup.joinpath("cgroup.kill").write_text("1")


async def _attempts_as(cluster: NatsCluster, user: str, hold_key: str) -> dict[str, str]:
    """What user's NATS account gets when it reads or writes another host's
    hold key and subjects: per attempt "ok" or the server's refusal."""
    import asyncio
    nats = fleet.nats_module()
    errors: list[str] = []

    async def on_error(exc):
        errors.append(str(exc))
    creds = fleet.load_credentials(cluster.credentials(user))
    nc = await nats.connect(fleet.servers(cluster.url), **fleet.connect_options(creds), error_cb=on_error,
                            connect_timeout=3, max_reconnect_attempts=2)
    js = nc.jetstream(timeout=2)
    # Bound by hand: js.key_value() asks for the stream's info, itself refused to hosts.
    from nats.js.kv import KeyValue
    kv = KeyValue(fleet.HOLDS_BUCKET, f"KV_{fleet.HOLDS_BUCKET}", f"$KV.{fleet.HOLDS_BUCKET}.", js, False)
    results: dict[str, str] = {}

    async def attempt(name, operation):
        before = len(errors)
        try:
            await operation()
            await nc.flush(timeout=2)
            await asyncio.sleep(0.3)   # a refused subscription is reported after the fact
            results[name] = errors[before] if len(errors) > before else "ok"
        except Exception as exc:
            await asyncio.sleep(0.3)
            results[name] = errors[before] if len(errors) > before else f"failed: {exc!r}"
    await attempt("get", lambda: kv.get(hold_key))
    await attempt("keys", kv.keys)
    await attempt("key names", lambda: js.stream_info(f"KV_{fleet.HOLDS_BUCKET}",
                                                      subjects_filter=f"$KV.{fleet.HOLDS_BUCKET}.>"))
    await attempt("put", lambda: kv.put(hold_key, b'{"state": "forged"}'))
    await attempt("delete", lambda: kv.delete(hold_key))
    await attempt("publish record", lambda: js.publish(fleet.record_subject("host-a", "x", "exec"), b"forged"))
    for name, subject in (("watch bucket", f"$KV.{fleet.HOLDS_BUCKET}.>"), ("all inboxes", "_INBOX.>"),
                          ("admin inbox", f"{fleet.inbox_prefix('alice')}.>"),
                          ("host-a decisions", fleet.decide_subject("host-a")),
                          ("records", f"{fleet.RECORD_PREFIX}.>")):
        await attempt(name, lambda s=subject: nc.subscribe(s))
    await nc.close()
    return results


def test_a_host_reads_and_writes_only_its_own_keys_and_subjects(fleet_env):
    import asyncio
    import json
    warden = fleet_env.wardens["host-a"]
    agent, _ = fleet_env.agent("host-a", "private")
    warden.set_policy(agent, _policy(agent, exec_hold=["/usr/bin/date *"]))
    run = start_run(warden, agent, ["/bin/sh", "-c", "/usr/bin/date +private-%Y; echo rc=$?"])
    hold = wait_fleet_hold(fleet_env, agent)
    key = fleet.hold_key("host-a", hold["hold_id"])
    # The same attempts by an admin read the key: the host's refusals below are permissions.
    admin = asyncio.run(_attempts_as(fleet_env.cluster, "alice", key))
    assert admin["get"] == "ok" and admin["key names"] == "ok", admin   # as `fleet holds` lists them
    host_b = asyncio.run(_attempts_as(fleet_env.cluster, "host-b", key))
    for name, outcome in host_b.items():
        assert "permissions violation" in outcome.lower(), (name, outcome)
    log = fleet_env.cluster.server_log()
    assert 'Subscription Violation - User "host-b", Subject "$KV.aw-holds.>"' in log
    assert 'Publish Violation - User "host-b", Subject "$KV.aw-holds.' + key in log
    # Nothing host-b tried changed host-a's pending hold.
    [still] = [h for h in map(json.loads, fleet_env.cli("alice", "holds", "--json").stdout.splitlines())
               if h["hold_id"] == hold["hold_id"]]
    assert still == hold
    # `fleet holds` with a host's account: one line saying why, not an empty list.
    listed = fleet_env.cli("host-b", "holds", check=False)
    assert listed.returncode == 1 and "NATS refused reading the aw-holds bucket" in listed.stderr
    assert "Traceback" not in listed.stderr and not listed.stdout
    fleet_env.cli("alice", "deny", f"host-a/{hold['hold_id']}", "--reason", "permissions test", key="alice")
    out, _ = run.communicate(timeout=30)
    assert "private-" not in out


def test_fleet_tail_follows_one_host_one_agent_and_violations(fleet_env):
    import json
    paths, refusing = {}, {}
    for host in HOSTS:
        paths[host] = fleet_env.agent(host, "tail")          # watched only: the workload
        refusing[host] = fleet_env.agent(host, "tailv")      # its policy refuses nologin
        fleet_env.wardens[host].set_policy(refusing[host][0], _policy(refusing[host][0]))
    a_agent, b_agent = paths["host-a"][0], refusing["host-b"][0]

    def tail(*args: str) -> subprocess.Popen:
        return subprocess.Popen([PY, "-m", "agentwarden", "fleet", "tail", *args, "--url", fleet_env.cluster.url,
                                 "--credentials", str(fleet_env.cluster.credentials("alice"))],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    one_agent = tail("--host", "host-a", "--agent", a_agent, "--json", "--count", "30")
    violations = tail("--violations", "--host", "host-b", "--agent", b_agent, "--json", "--count", "2")
    text = tail("--host", "host-b", "--count", "5")
    tails = (one_agent, violations, text)
    deadline = time.monotonic() + 90
    # Records on both hosts until every tail has what it waits for (each follows from now on).
    while any(t.poll() is None for t in tails) and time.monotonic() < deadline:
        loads = [workload(path, 1) for _, path in paths.values()]
        assert all(p.wait(timeout=60) == 0 for p in loads)
        for _, path in refusing.values():   # not allowed by the policy: a violation on each host
            assert run_in(path, ["/usr/sbin/nologin"]).wait(timeout=30) != 0
    outputs = []
    for t in tails:
        if t.poll() is None:
            t.kill()
        out, err = t.communicate(timeout=10)
        assert t.returncode == 0, err
        outputs.append(out.splitlines())
    local = {r["seq"]: r for r in fleet_env.wardens["host-a"].records() if r.get("agent") == a_agent}
    records = [json.loads(line) for line in outputs[0]]
    assert len(records) == 30
    for record in records:
        assert record["agent"] == a_agent and record["host"] == "host-a", record
        assert {k: v for k, v in record.items() if k != "host"} == {k: v for k, v in local[record["seq"]].items()
                                                                    if k != "host"}
    assert [r["seq"] for r in records] == sorted(r["seq"] for r in records)
    found = [json.loads(line) for line in outputs[1]]
    assert len(found) == 2 and all(r["kind"] == "violation" and r["host"] == "host-b"
                                   and r["agent"] == b_agent for r in found), found
    assert len(outputs[2]) == 5 and all(line.startswith("host-b ") for line in outputs[2]), outputs[2]
    for _, path in [*paths.values(), *refusing.values()]:
        path.joinpath("cgroup.kill").write_text("1")


def test_a_blackholed_nats_never_stalls_enforcement(fleet_env):
    """Every NATS node SIGSTOPped: connections are accepted, nothing ever
    answers. The daemon restarts, enforces, holds and archives as if NATS
    were not there; shipping catches up once the nodes answer again."""
    warden = fleet_env.wardens["host-a"]
    agent, path = fleet_env.agent("host-a", "blackhole")
    warden.set_policy(agent, _policy(agent, exec_hold=["/usr/bin/date *"]))
    # A hold pending when the daemon dies: the restarted one keeps it (docs/sessions.md), and
    # publishes it again once NATS answers.
    kept_run = start_run(warden, agent, ["/bin/sh", "-c", "/usr/bin/date +kept-%Y; echo rc=$?"])
    kept = wait_fleet_hold(fleet_env, agent)
    fleet_env.shipped_up_to("host-a", settled_seq(warden))
    fleet_env.cluster.pause()
    try:
        old = warden.status()["daemon"]["pid"]
        os.kill(old, signal.SIGKILL)          # a daemon that starts while NATS is a blackhole
        wait_for(lambda: warden.status()["daemon"]["pid"] != old, timeout=60, what="host-a's daemon to restart")
        cgid = str(cgroups.cgroup_id(path))
        wait_for(lambda: cgid in warden.status()["probe"]["tags"], what="the restarted daemon to watch the agent")
        def kept_pending():
            try:
                holds = session.admin_request(warden.settings, {"cmd": "holds"})["holds"]
            except AgentwardenError:   # the restarted supervisor is not listening yet
                return False
            return [h for h in holds if h["id"] == kept["hold_id"]]
        wait_for(kept_pending, timeout=30, what="the kept hold to be pending again")
        refused = run_in(path, ["/usr/sbin/nologin"])
        assert refused.wait(timeout=30) != 0
        wait_for(lambda: [r for r in warden.records() if r["kind"] == "violation" and r.get("agent") == agent
                          and "/usr/sbin/nologin" in r["attempted"]],
                 what="the violation in host-a's archive")
        run = start_run(warden, agent, ["/bin/sh", "-c", "/usr/bin/date +blackhole-%Y; echo rc=$?"])
        [hold] = wait_for(lambda: [h for h in session.admin_request(warden.settings, {"cmd": "holds"})["holds"]
                                   if h["agent"] == agent and h["id"] != kept["hold_id"]],
                          timeout=20, what="the local hold")
        warden.cli("approve", hold["id"], "--reason", "approved while NATS is a blackhole")
        out, err = run.communicate(timeout=30)
        assert run.returncode == 0 and "blackhole-" in out, err
        _, busy = fleet_env.agent("host-a", "blackhole-load")   # watched only
        assert workload(busy, 5).wait(timeout=60) == 0
        durable = settled_seq(warden)
        assert warden.status()["fleet"]["acked_seq"] < durable
        shown = warden.cli("status").stdout
        assert "lag" in shown and "fleet:" in shown, shown
    finally:
        fleet_env.cluster.resume()
    fleet_env.shipped_up_to("host-a", durable, timeout=120)
    compare(fleet_env, "host-a", durable)
    assert wait_fleet_hold(fleet_env, agent)["hold_id"] == kept["hold_id"]
    fleet_env.cli("alice", "approve", f"host-a/{kept['hold_id']}", key="alice")
    out, err = kept_run.communicate(timeout=30)
    assert kept_run.returncode == 0 and "kept-" in out, err
    for cgroup in (path, busy):
        cgroup.joinpath("cgroup.kill").write_text("1")
