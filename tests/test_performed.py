"""daemon/performed.py: a performed call's record takes its place among its
task's records; one the fast path marked pending holds its process's later
records back until its own record comes (or is given up, counted)."""
from __future__ import annotations

from daemon.performed import Performed


def _open(pid=10, tid=10, time=100, **extra) -> dict:
    return {"kind": "open", "pid": pid, "tid": tid, "time": time, "ret": 3, "performed": True, **extra}


def _event(pid=10, time=200) -> dict:
    return {"kind": "fd", "pid": pid, "tid": pid, "time": time}


def test_a_pending_call_holds_back_later_records_of_its_process_only():
    p = Performed()
    p.hold(_open(ret=0, performed_pending=True))
    assert p.awaits(_event(time=200))                   # later, same process: waits
    assert not p.awaits(_event(time=50))                # earlier: goes on
    assert not p.awaits(_event(pid=11, time=200))       # another process: goes on
    assert not p.awaits({"kind": "health", "stage": "probe", "time": 10**12})
    assert p.before(_event(time=200)) == []             # nothing to place yet


def test_the_record_ends_the_wait_and_goes_before_the_later_record():
    p = Performed()
    p.hold(_open(ret=0, performed_pending=True))
    p.hold(_open(ret=5))
    assert not p.awaits(_event(time=200))
    placed = p.before(_event(time=200))
    assert [r["ret"] for r in placed] == [5] and "performed_pending" not in placed[0]


def test_a_record_that_never_comes_is_given_up_with_its_result_unknown():
    p = Performed()
    p.hold(_open(ret=0, performed_pending=True))
    p.hold(_open(pid=11, tid=11, ret=0, performed_pending=True))
    assert p.give_up(10) == 1
    assert not p.awaits(_event(time=200)) and p.awaits(_event(pid=11, time=200))
    placed = p.before(_event(time=200))
    assert len(placed) == 1 and placed[0]["performed_result_unknown"] and "performed_pending" not in placed[0]
    assert placed[0]["ret"] < 0   # no fd named: the process model maps nothing after it
    rest = p.remaining()   # the daemon stops: what is still pending is archived as unknown
    assert [(r["pid"], r["performed_result_unknown"]) for r in rest] == [(11, True)]
    assert not p.pending
