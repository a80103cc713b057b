"""The daemon's priority lane without a kernel: real ZeroMQ sockets, a real
policy and Governor, real processes killed. A copy decided ahead is acted on
once and its record in order gets that decision; a copy that comes after its
record in order, a duplicate, a relative path, an unknown or session cgroup or
a monitor-mode agent is left to the in-order path; the memo is bounded and
counts its evictions; malformed lane messages are counted and dropped."""
from __future__ import annotations

import collections
import os
import subprocess
import time

import pytest
import zmq

from agentwarden import wire
from agentwarden.daemon import priority
from agentwarden.daemon.governor import Governor
from agentwarden.daemon.priority import PriorityLane, exec_paths_alone, judged_path
from agentwarden.daemon.resolver import ProcessState, Resolver

AGENT_CGROUP = 4242
SESSION_CGROUP = 4343
POLICY = """
[agent.acting]
mode = "enforce"
on-violation = "kill"
[agent.acting.exec]
allow = ["/usr/bin/**"]

[agent.watching]
mode = "monitor"
on-violation = "kill"
[agent.watching.exec]
allow = ["/usr/bin/**"]
"""


def exec_record(pid: int, path: str = "/tmp/forbidden-tool", *, time_ns: int | None = None,
                cgroup: int = AGENT_CGROUP, exec_path: str | None = None) -> dict:
    return {"kind": "exec", "time": time_ns or time.time_ns(), "pid": pid, "tid": pid, "ppid": 0,
            "uid": 0, "gid": 0, "comm": "sh", "cgroup_id": cgroup, "agent_cgroup_id": cgroup,
            "syscall": "execve", "filename": path, "exec_path": path if exec_path is None else exec_path,
            "argv": [path, "x"], "argv_truncated": False, "dirfd": -100, "at_flags": 0, "ret": 0,
            "error": None, "died_before_return": False, "filename_unreadable": False,
            "filename_truncated": False, "killed_in_kernel": False, "kernel_rule": None,
            "not_approved": False}


@pytest.fixture
def lane(tmp_path):
    (tmp_path / "policy.toml").write_text(POLICY)
    governor = Governor([tmp_path / "policy.toml"], lambda cgroup_id: None)
    governor.load()
    ctx = zmq.Context.instance()
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.LINGER, 0)
    endpoint = f"ipc://{tmp_path / 'priority.sock'}"
    pull.bind(endpoint)
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.connect(endpoint)
    agents = {AGENT_CGROUP: "acting", SESSION_CGROUP: "acting", 5151: "watching"}
    made = PriorityLane(pull, governor, agents, lambda cgroup_id: cgroup_id == SESSION_CGROUP,
                        collections.Counter())
    made.push = push
    yield made
    push.close()
    made.close()


def send(lane, records, seq=0, source=wire.PRIORITY_SOURCE):
    lane.push.send(wire.encode_batch(source, seq, records))
    deadline = time.monotonic() + 5
    while not lane.sock.poll(100):
        assert time.monotonic() < deadline, "the lane message never arrived"
    lane.drain()


@pytest.fixture
def victim():
    procs = []

    def make() -> subprocess.Popen:
        proc = subprocess.Popen(["sleep", "30"])
        procs.append(proc)
        return proc
    yield make
    for proc in procs:
        proc.kill()
        proc.wait()


def test_a_copy_is_acted_on_once_and_its_record_in_order_gets_that_decision(lane, victim):
    proc = victim()
    record = exec_record(proc.pid)
    send(lane, [dict(record)])
    assert proc.wait(timeout=5) == -9   # killed from the copy, before any record in order
    assert lane.counters["priority_acted"] == 1
    in_order = {**record, "agent": "acting", "resolved_exec_path": record["exec_path"]}
    violation = lane.judge_in_order(in_order)
    assert violation["action_taken"] == f"killed process {proc.pid}"
    assert violation["ahead_of_order"] is True and violation["decision"] == "violation"
    assert in_order["verdict"]["decision"] == "violation"
    assert lane.counters["priority_in_order"] == 1 and not lane.memo
    # The same record again in order (no memo now) is judged anew: the process is gone.
    again = lane.judge_in_order(dict(in_order))
    assert "ahead_of_order" not in again and "killed process" not in again["action_taken"]


def test_a_copy_after_its_record_in_order_is_left_alone(lane, victim):
    proc = victim()
    record = exec_record(proc.pid)
    lane.in_order_until = record["time"]   # an exec as new as it was handled in order
    send(lane, [record])
    assert lane.counters["priority_late"] == 1 and not lane.memo
    assert proc.poll() is None


@pytest.mark.parametrize("changes,counter", [
    ({"exec_path": "forbidden-tool", "filename": "forbidden-tool"}, "priority_left_relative_path"),
    ({"exec_path": "", "filename": "./forbidden-tool"}, "priority_left_relative_path"),
    ({"agent_cgroup_id": 9999}, "priority_left_unknown_cgroup"),
    ({"agent_cgroup_id": SESSION_CGROUP}, "priority_left_session"),
    ({"agent_cgroup_id": 5151}, "priority_left_not_acting"),
])
def test_what_depends_on_earlier_records_is_left_to_the_in_order_path(lane, victim, changes, counter):
    proc = victim()
    send(lane, [{**exec_record(proc.pid), **changes}])
    assert lane.counters[counter] == 1 and not lane.memo
    assert proc.poll() is None


def test_an_allowed_exec_is_not_remembered(lane, victim):
    proc = victim()
    send(lane, [exec_record(proc.pid, "/usr/bin/sleep")])
    assert lane.counters["priority_allowed"] == 1 and not lane.memo
    assert proc.poll() is None


def test_a_duplicate_copy_is_counted_not_acted_on_twice(lane, victim):
    proc = victim()
    record = exec_record(proc.pid)
    send(lane, [record, dict(record)])
    assert lane.counters["priority_acted"] == 1 and lane.counters["priority_duplicates"] == 1


def test_the_memo_is_bounded_and_counts_evictions(lane, victim, monkeypatch):
    monkeypatch.setattr(priority, "MEMO_SIZE", 2)
    procs = [victim() for _ in range(3)]
    send(lane, [exec_record(p.pid) for p in procs])
    assert len(lane.memo) == 2 and lane.counters["priority_evicted"] == 1
    assert all(p.wait(timeout=5) == -9 for p in procs)


@pytest.mark.parametrize("raw", [
    b"not msgpack at all",
    wire.encode_batch("probe", 0, []),
    wire.encode_batch(wire.PRIORITY_SOURCE, 0, [{"kind": "open"}]),
])
def test_malformed_lane_messages_are_counted_and_dropped(lane, raw):
    lane.push.send(raw)
    assert lane.sock.poll(5000)
    lane.drain()
    assert lane.counters["priority_malformed"] == 1 and not lane.memo


def test_missed_lane_batches_are_counted(lane, victim):
    send(lane, [], seq=0)
    send(lane, [], seq=3)
    assert lane.counters["priority_missed_batches"] == 2


def test_exec_paths_alone_are_the_resolvers_for_absolute_paths_only():
    assert exec_paths_alone(exec_record(1, "/usr/bin/../bin/x")) == {
        "resolved_filename": "/usr/bin/x", "resolved_exec_path": "/usr/bin/x"}
    # The kernel's path decides: a relative filename does not matter when it is absolute.
    assert exec_paths_alone({**exec_record(1, "x"), "exec_path": "/usr/bin/x"}) == {
        "resolved_filename": None, "resolved_exec_path": "/usr/bin/x"}
    assert exec_paths_alone({**exec_record(1, "/usr/bin/x"), "exec_path": ""}) == {
        "resolved_filename": "/usr/bin/x", "resolved_exec_path": None}
    assert exec_paths_alone({**exec_record(1, "/usr/bin/x"), "exec_path": "",
                             "filename_truncated": True}) is None
    assert exec_paths_alone(exec_record(1, os.fsdecode(b"/tmp/\xff"))) is not None


@pytest.mark.parametrize("filename,exec_path,dirfd", [
    ("/usr/bin/x", "/usr/bin/x", -100), ("x", "/usr/bin/x", -100), ("x", "/usr/bin//./x", 5),
    ("/usr/bin/x", "", -100), ("/dev/fd/3", "/dev/fd/3", -100), ("", "/dev/fd/5", 5),
    ("x", "x", -100), ("../x", "../x", 5), ("x", "", -100),
])
def test_the_lane_judges_the_path_the_in_order_resolver_would(filename, exec_path, dirfd):
    """Whatever the process model holds (here a cwd and fds it knows), the
    path the decision reads is the resolver's, or the lane leaves the exec."""
    record = {**exec_record(777, filename, exec_path=exec_path), "dirfd": dirfd}
    resolver = Resolver()
    resolver.processes[777] = ProcessState(cwd="/home/agent", ppid=1)
    in_order = dict(record)
    resolver.annotate(in_order)
    alone = exec_paths_alone(record)
    if alone is None:
        assert not (exec_path or filename).startswith("/")
    else:
        assert judged_path({**record, **alone}) == judged_path(in_order)


def test_a_decision_the_in_order_view_does_not_share_is_counted(lane, victim):
    proc = victim()
    record = exec_record(proc.pid)
    send(lane, [record])
    in_order = {**record, "agent": "watching", "resolved_exec_path": record["exec_path"]}   # retagged
    violation = lane.judge_in_order(in_order)
    assert violation["action_taken"] == f"killed process {proc.pid}"   # what was done, said once
    assert lane.counters["priority_disagreed"] == 1
