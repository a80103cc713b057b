"""The probe's run loop: tags -> BPF maps, ring buffer -> msgpack batches -> daemon."""
from __future__ import annotations

import collections
import ctypes as ct
import hashlib
import heapq
import logging
import math
import os
import platform
import signal
import threading
import time
from pathlib import Path

import zmq

from agentwarden import bpfsys, cgroups, headers, sdnotify, wire
from agentwarden.settings import Settings

from . import loader
from .decode import DecodeError, Decoder
from .fold import Folder
from .priority import PriorityLane
from .rings import open_ring
from .watch_now import WatchServer

log = logging.getLogger("agentwarden.probe")

MAX_BATCH = 4096            # records per ZeroMQ message
# Records of the kernel's `vital` ring: the probe's backlog, when it must drop,
# keeps these and drops the rest (counted).
VITAL_KINDS = frozenset({"exec", "fork", "exit", "move"})
MAX_BACKLOG = 1_000_000     # records held while the daemon is not reading
# Memory: while this many decoded records wait for the daemon, the probe stops
# draining the `events` ring, so backpressure ends in the kernel ring (whose
# drops are counted per kind and sent as `gap` records), not in Python dicts.
# It keeps draining `vital`: those records wait in the probe instead.
PAUSE_BACKLOG = 2 * MAX_BATCH
# Records decoded from `events` per drain: what one drain holds decoded at
# once stays small.
EVENTS_PER_DRAIN = MAX_BATCH
# Bytes of `events` records read ahead of decoding: while the daemon is
# behind they wait here undecoded (an open is about 150 bytes, 1 KB as a
# dict), a second ring's worth; past it `events` backs up in the kernel.
EVENTS_READ_AHEAD = 16 * 2**20
# `vital` records held while `events` is not drained (see Probe._drain); past
# this many, `vital` too backs up into the kernel, where drops are counted.
MAX_VITAL_HELD = 50_000
SEND_HWM = 4                # batches ZeroMQ queues towards the daemon
POLL_MS = 50
# Seconds between heartbeats (see Probe.heartbeat): a detached program is
# noticed within this, and the agents are frozen within 1 s.
HEARTBEAT_INTERVAL = 0.2
# The calls of a heartbeat, by name -> x86-64 syscall number.
HEARTBEAT_CALLS = {"execve": 59, "execveat": 322, "openat": 257}
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def rule_number(rule: str) -> int:
    """A nonzero 31-bit number for an in-kernel rule, from its text."""
    return int.from_bytes(hashlib.sha256(rule.encode()).digest()[:4], "big") & 0x7FFFFFFF or 1


def wall_minus_boot_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_REALTIME) - time.clock_gettime_ns(time.CLOCK_BOOTTIME)


def now_ns() -> int:
    return time.time_ns()


def describe_sender(pid: int, uid: int) -> str:
    """Who sent a signal, for the record: pid, uid, and while it lives its
    command name and cgroup."""
    if pid == 0:
        return "the kernel (a terminal's Ctrl-C)"
    try:
        comm = open(f"/proc/{pid}/comm").read().strip()
    except OSError:
        return f"pid {pid} (uid {uid}, exited since)"
    return f"pid {pid} ({comm}, uid {uid}, cgroup {cgroups.cgroup_of(pid) or '?'})"


class TagMirror:
    """Keeps the BPF agent_cgroups map and level mask equal to the tagged
    cgroups found on disk. Tags added or removed take effect at the next sync,
    or at once for a cgroup `watch` is asked for (`run`'s new session)."""

    def __init__(self, bpf, root: Path, max_levels: int, session_bit: int, scope: str = "",
                 instance: str = "", agents_slice: str = "agents.slice"):
        self.bpf = bpf
        self.instance = instance
        self.scope = scope
        self.session_bit = session_bit
        self.root = root
        self.agents_slice = agents_slice  # its units are agents too ("" : off)
        self.max_levels = max_levels
        self.current: dict[int, cgroups.TaggedCgroup] = {}
        self.too_deep: set[int] = set()
        self._numbers: dict[str, int] = {}
        self._paths: dict[int, object] = {}   # cgroup id -> its agent_paths key
        self.levels = self.session_levels = 0  # the masks last published
        # sync (the run loop) and watch (the watch socket's thread) take turns;
        # agent numbers too (two new agents must never get the same one)
        self.lock = threading.RLock()
        self._added = False   # watch added a cgroup since take_added last looked
        # cgroup id -> the watch number that added it, until a scan begun after it
        self._watched: dict[int, int] = {}
        self._watch_number = 0

    def agent_number(self, agent: str) -> int:
        with self.lock:
            return self._numbers.setdefault(agent, len(self._numbers) + 1)

    def sync(self) -> bool:
        with self.lock:
            begun = self._watch_number
        found = cgroups.scan_tagged(self.root, agents_slice=self.agents_slice, scope=self.scope)
        with self.lock:
            # A cgroup watch added while the scan walked may have been passed
            # before its tags were set: the scan cannot tell it is gone.
            for cgid, number in list(self._watched.items()):
                if number <= begun:
                    del self._watched[cgid]
                elif cgid not in found and cgid in self.current:
                    found[cgid] = self.current[cgid]
            return self._sync(found)

    def _sync(self, found: dict[int, cgroups.TaggedCgroup]) -> bool:
        if found == self.current:
            return False
        table = self.bpf[b"agent_cgroups"]
        mask = sessions = 0
        self.too_deep = set()
        # Add first, then publish the level mask, then remove: a tagged task is
        # never left without a matching map entry for its level.
        for cgid, tagged in found.items():
            if tagged.level >= self.max_levels:
                self.too_deep.add(cgid)
                log.error("cannot watch %s: cgroup depth %d exceeds %d", tagged.path,
                          tagged.level, self.max_levels - 1)
                continue
            number = self._number(tagged)
            if number & self.session_bit:
                sessions |= 1 << tagged.level
            table[table.Key(cgid)] = table.Leaf(number)
            self._set_path(cgid, tagged.path)
            mask |= 1 << tagged.level
        self._publish_levels(mask, sessions)
        for cgid in set(self.current) - set(found):
            try:
                del table[table.Key(cgid)]
            except KeyError:
                pass
            self._set_path(cgid, None)
        self.current = found
        return True

    def _number(self, tagged: cgroups.TaggedCgroup) -> int:
        number = self.agent_number(tagged.agent)
        if tagged.session and tagged.instance == self.instance:
            number |= self.session_bit
        return number

    def _publish_levels(self, mask: int, sessions: int) -> None:
        config = self.bpf[b"config"]
        leaf = config.Leaf()
        leaf.tagged_levels = mask
        leaf.session_levels = sessions
        config[config.Key(0)] = leaf
        self.levels, self.session_levels = mask, sessions

    def watch(self, path: Path) -> dict:
        """Watch one cgroup now, as the next sync would (`agentwarden run` asks
        for its new session cgroup before it joins it). Only adds: what sync
        would remove, sync removes. The reply for the watch socket."""
        scope_root = self.root / self.scope if self.scope else self.root
        if path != scope_root and scope_root not in path.parents:
            return {"ok": False, "error": f"{path} is outside the cgroups this probe watches ({scope_root})"}
        try:
            tagged = cgroups.tagged_at(path, self.root, cgroups.agents_slice_dir(self.root, self.agents_slice))
        except OSError as exc:
            return {"ok": False, "error": f"cannot read {path}: {exc.strerror}"}
        if tagged is None:
            return {"ok": False, "error": f"{path} is not tagged as an agent"}
        if tagged.level >= self.max_levels:
            return {"ok": False, "error": f"cannot watch {path}: cgroup depth {tagged.level} exceeds "
                                          f"{self.max_levels - 1}"}
        with self.lock:
            if self.current.get(tagged.cgroup_id) != tagged:
                # As in sync: the map entry first, then the level mask.
                table = self.bpf[b"agent_cgroups"]
                table[table.Key(tagged.cgroup_id)] = table.Leaf(self._number(tagged))
                self._set_path(tagged.cgroup_id, tagged.path)
                session = 1 << tagged.level if self._number(tagged) & self.session_bit else 0
                self._publish_levels(self.levels | 1 << tagged.level, self.session_levels | session)
                self.current = {**self.current, tagged.cgroup_id: tagged}
                self._added = True
                self._watch_number += 1
                self._watched[tagged.cgroup_id] = self._watch_number
            return {"ok": True, "tag": self.describe(tagged.cgroup_id, tagged)}

    def tag_of(self, cgroup_id: int) -> dict:
        """The watch socket's `tag`: how this probe watches a cgroup (None: not)."""
        with self.lock:
            tagged = self.current.get(cgroup_id)
            return {"ok": True, "tag": None if tagged is None else self.describe(cgroup_id, tagged)}

    def agent_cgroups(self, agent: str) -> dict:
        """The watch socket's `agent`: an agent's cgroups that are no session, outermost first."""
        with self.lock:
            found = sorted((t for t in self.current.values() if t.agent == agent and not t.session
                            and t.cgroup_id not in self.too_deep), key=lambda t: t.level)
        if not found:   # one tagged since the last rescan: the tree as it is now
            found = [t for t in cgroups.agent_cgroups(self.root, agent, self.agents_slice, self.scope)
                     if not t.session]
        return {"ok": True, "cgroups": [str(t.path) for t in found]}

    def take_added(self) -> bool:
        """Whether watch added a cgroup since the last call."""
        with self.lock:
            added, self._added = self._added, False
            return added

    def _set_path(self, cgid: int, path: Path | None) -> None:
        """agent_paths: the cgroup's path from the v2 root, plus '/', -> its id
        (path None: remove it). A path too long for the trie is left out: a move
        into that cgroup then counts as leaving the agent (fail closed)."""
        trie = self.bpf[b"agent_paths"]
        if path is None:
            key = self._paths.pop(cgid, None)
            if key is not None:
                try:
                    del trie[key]
                except KeyError:
                    pass
            return
        relative = path.relative_to(self.root).as_posix()
        data = os.fsencode("/" + relative if relative != "." else "") + b"/"
        key = trie.Key()
        room = type(key).path.size
        if len(data) > room:
            log.error("moves into %s count as leaving its agent: its path is longer than %d bytes",
                      path, room - 1)
            return
        key.prefixlen = 8 * len(data)
        key.path = data
        trie[key] = trie.Leaf(cgid)
        self._paths[cgid] = key

    def describe(self, cgid: int, t: cgroups.TaggedCgroup) -> dict:
        return {"agent": t.agent, "path": str(t.path), "level": t.level,
                "watched": cgid not in self.too_deep, **dict(t.attribution),
                **({"instance": t.instance} if t.instance else {})}

    def record(self) -> dict:
        with self.lock:
            return {"kind": "tags", "time": now_ns(), "agents": {
                str(cgid): self.describe(cgid, t) for cgid, t in self.current.items()}}


class Probe:
    def __init__(self, settings: Settings, bpf, constants: dict[str, int]):
        self.settings = settings
        self.bpf = bpf
        self.c = constants
        self.decoder = Decoder(self._leaf(bpf[b"exec_scratch"]), self._leaf(bpf[b"file_scratch"]),
                               self._leaf(bpf[b"task_scratch"]), self._leaf(bpf[b"inflight_fd"]),
                               self._leaf(bpf[b"inflight_change"]), self._leaf(bpf[b"move_scratch"]),
                               constants, wall_minus_boot_ns())
        self.tags = TagMirror(bpf, cgroups.cgroup2_root(), constants["AW_MAX_CGROUP_LEVELS"],
                              constants["AW_AGENT_SESSION_BIT"], settings.cgroup_scope,
                              settings.instance, settings.agents_slice)
        self.notifier = sdnotify.Notifier()  # systemd readiness, watchdog, status
        self.vital = None    # the rings' readers (probe.rings), from run()
        self.events = None
        # Decoded `vital` records newer than every `events` record taken, held
        # while `events` has records left in the kernel (see _drain).
        self.vital_held: list[dict] = []
        self.events_until = 0   # the latest time of an `events` record taken
        self.events_behind = False   # the last drain left records in `events`
        # How long to wait for a wake-up while records flow. Rounded up: a
        # shorter look could miss a record queued without one. With no
        # interval the kernel wakes the probe itself whenever it has caught up.
        interval_ms = math.ceil(settings.wakeup_interval * 1000)
        self.active_poll_ms = interval_ms if interval_ms else POLL_MS
        self.backlog: collections.deque[list[dict]] = collections.deque()
        self.backlog_records = 0
        self.seq = 0
        self.stopped_by: dict | None = None   # who sent the stop signal (see stop_requested)
        self.programs_stopped: list[str] = []  # programs the heartbeat found detached
        self.libc = ct.CDLL(None, use_errno=True)
        self.counters = collections.Counter()
        self.kernel_dropped_seen = [0] * (constants["AW_COUNTER_SLOTS"])
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.PUSH)
        self.sock.setsockopt(zmq.LINGER, 1000)
        self.sock.setsockopt(zmq.SNDHWM, SEND_HWM)
        self.sock.connect(settings.ingest_endpoint)
        # The daemon publishes the in-kernel deny rules of its policy.
        self.rules_sock = self.ctx.socket(zmq.SUB)
        self.rules_sock.setsockopt(zmq.LINGER, 0)
        self.rules_sock.setsockopt(zmq.SUBSCRIBE, wire.TOPIC_KERNEL_RULES)
        self.rules_sock.connect(settings.events_endpoint)
        # Copies of exec records for the daemon, ahead of the stream (priority.py).
        self.priority = PriorityLane(self.ctx, settings.priority_endpoint, self.tags, self.counters)
        # Repeated opens folded in the kernel, their counts sent by a thread of this class.
        self.folder = self._folder(settings.fold_interval)
        self.kernel_rules_hash: str | None = None
        self.kernel_rules_received = False
        self._kernel_keys: list = []
        self._sidedoor_agents: list[int] = []   # agent numbers in sidedoor_allowed

    def _folder(self, interval: float) -> Folder | None:
        if not interval:
            return None
        try:
            self.bpf[b"folded"]
        except KeyError:   # no BTF offsets: every open goes out
            return None
        table = self.bpf[b"counters"]
        return Folder(self.bpf, self.decoder, self.c, interval,
                      lambda slot: int(table.sum(table.Key(slot)).value))

    @staticmethod
    def _leaf(table):
        leaf = table.Leaf
        return getattr(leaf, "_type_", leaf)  # per-CPU leaves are arrays of the struct

    # -- in-kernel deny rules ---------------------------------------------------

    def _deny_key(self, agent: str, path: str, exact: bool):
        table = self.bpf[b"deny_paths"]
        key = table.Key()
        data = os.fsencode(path) + (b"\0" if exact else b"")
        key.agent = self.tags.agent_number(agent)
        key.prefixlen = 32 + 8 * len(data)
        key.path = data  # ctypes char array: zero-filled past the data
        return key

    def apply_kernel_rules(self, message: dict) -> None:
        """Replace the deny trie's content with the rules of the daemon's policy."""
        rules = message.get("rules")
        if not isinstance(rules, list):
            raise ValueError("rules is not a list")
        applies_bits = {"exec": self.c["AW_DENY_EXEC"], "open": self.c["AW_DENY_OPEN"]}
        table = self.bpf[b"deny_paths"]
        entries: dict[bytes, tuple] = {}
        names: dict[int, str] = dict(self.decoder.deny_rules)  # keep old ones: records in flight
        for rule in rules:
            key = self._deny_key(rule["agent"], rule["path"], bool(rule["exact"]))
            identity = bytes(key)
            previous = entries.get(identity)
            leaf = table.Leaf()
            # A number that stays with the rule's text across reloads, so a
            # record still in the ring names the rule that killed it.
            leaf.rule = previous[1].rule if previous else rule_number(rule["rule"])
            leaf.applies = applies_bits[rule["applies"]] | (previous[1].applies if previous else 0)
            entries[identity] = (key, leaf)
            names.setdefault(leaf.rule, rule["rule"])
        for key in self._kernel_keys:
            try:
                del table[key]
            except KeyError:
                pass
        for key, leaf in entries.values():
            table[key] = leaf
        self._kernel_keys = [key for key, _ in entries.values()]
        self._apply_agent_policy(message.get("kill_on_leave", []), message.get("exec_prompt"))
        self.decoder.deny_rules = names
        self._apply_sidedoors(message["sidedoors"])
        self.kernel_rules_hash = message.get("policy_hash")
        self.kernel_rules_received = True
        log.info("in-kernel deny rules: %d (policy %s)", len(entries), self.kernel_rules_hash)

    def _apply_sidedoors(self, sidedoors: dict[str, list[str]]) -> None:
        """sidedoor_allowed: agent number -> the AW_SIDEDOOR_* bits of the doors
        its policy allows, for the agents the kernel kills at any other."""
        table = self.bpf[b"sidedoor_allowed"]
        numbers = {}
        for agent, doors in sidedoors.items():
            numbers[self.tags.agent_number(agent)] = sum(  # an unknown name raises KeyError: malformed
                {self.c[f"AW_SIDEDOOR_{door.upper()}"] for door in doors})
        for number in set(self._sidedoor_agents) - set(numbers):
            try:
                del table[table.Key(number)]
            except KeyError:
                pass
        for number, mask in numbers.items():
            table[table.Key(number)] = table.Leaf(mask)
        self._sidedoor_agents = list(numbers)

    def _apply_agent_policy(self, kill_on_leave: list[str], exec_prompt: list[str] | None) -> None:
        """agent_policy: which agents' processes the kernel kills when they
        leave, and whose exec records wake this probe at once (exec_prompt
        None: a daemon that does not say, every agent's)."""
        table = self.bpf[b"agent_policy"]
        wanted: dict[int, int] = collections.defaultdict(int)
        for agent in kill_on_leave:
            wanted[self.tags.agent_number(agent)] |= self.c["AW_POLICY_KILL_ON_LEAVE"]
        if exec_prompt is not None:
            for agent in exec_prompt:
                wanted[self.tags.agent_number(agent)] |= self.c["AW_POLICY_EXEC_PROMPT"]
        # Added first and the known flag last, removed in the opposite order:
        # an acting agent's exec is never taken for a recorded-only one.
        known = self.c["AW_POLICY_KNOWN_KEY"]
        if exec_prompt is None:
            try:
                del table[table.Key(known)]
            except KeyError:
                pass
        for key in list(table.keys()):
            if key.value != known and key.value not in wanted:
                try:
                    del table[key]
                except KeyError:
                    pass
        for number, flags in wanted.items():
            table[table.Key(number)] = table.Leaf(flags)
        if exec_prompt is not None:
            table[table.Key(known)] = table.Leaf(self.c["AW_POLICY_KNOWN"])
        self.priority.set_acting(exec_prompt)

    def _poll_kernel_rules(self) -> None:
        # Asked of the socket first: a recv that finds nothing raises, and this
        # runs every turn of the loop (a few percent of the probe's CPU).
        while self.rules_sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            try:
                _topic, raw = self.rules_sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except ValueError:
                self.counters["kernel_rules_malformed"] += 1
                continue
            try:
                message = wire.decode_kernel_rules(raw)
                if message.get("policy_hash") != self.kernel_rules_hash or not self.kernel_rules_received:
                    self.apply_kernel_rules(message)
            except (ValueError, TypeError, KeyError) as exc:  # WireError is a ValueError
                self.counters["kernel_rules_malformed"] += 1
                log.error("ignored malformed kernel rules: %s", exc)

    # -- heartbeat: are the programs still attached? -----------------------------

    def heartbeat(self) -> list[str]:
        """Call execve, execveat and openat with the heartbeat address (they
        fail with EFAULT, nothing runs or opens) and return the programs whose
        count did not move: detached while this probe lives."""
        if platform.machine() != "x86_64":
            return []   # the calls' numbers are x86-64's (HEARTBEAT_CALLS)
        table = self.bpf[b"heartbeats"]
        keys = [(name, self.c[f"AW_HEARTBEAT_{name.upper()}"]) for name in HEARTBEAT_CALLS]
        before = {name: table[table.Key(k)].value for name, k in keys}
        address = ct.c_void_p(self.c["AW_HEARTBEAT_ADDRESS"])
        empty = (ct.c_void_p * 1)()
        libc = self.libc
        libc.syscall(HEARTBEAT_CALLS["execve"], address, empty, empty)
        libc.syscall(HEARTBEAT_CALLS["execveat"], -100, address, empty, empty, 0)
        libc.syscall(HEARTBEAT_CALLS["openat"], -100, address, 0, 0)
        return [f"sys_enter_{name}" for name, k in keys if table[table.Key(k)].value == before[name]]

    def stop_requested(self) -> bool:
        """Take a pending SIGTERM/SIGINT (blocked, see main) and note who sent it:
        the daemon freezes the agents unless the stop is deliberate."""
        info = signal.sigtimedwait(STOP_SIGNALS, 0)
        if info is None:
            return False
        sender = info.si_pid
        self.stopped_by = {"signal": info.si_signo, "sender_pid": sender, "sender_uid": info.si_uid,
                           "sender": describe_sender(sender, info.si_uid),
                           # the service manager, `agentwarden up`, or the terminal (pid 0)
                           "deliberate": sender in (0, 1, os.getppid())}
        return True

    def status_line(self) -> str:
        return (f"watching {len(self.tags.current)} agent cgroups; {self.counters['decoded']} "
                f"records decoded; backlog {self.backlog_records + len(self.vital_held)}")

    # -- counters --------------------------------------------------------------

    def kernel_counters(self) -> list[int]:
        table = self.bpf[b"counters"]
        return [int(table.sum(table.Key(i)).value) for i in range(self.c["AW_COUNTER_SLOTS"])]

    def _kernel_gap(self, counts: list[int]) -> dict | None:
        base = self.c["AW_COUNTER_DROPPED_BASE"]
        lost = {}
        for kind, name in self.decoder.kind_names.items():
            delta = counts[base + kind] - self.kernel_dropped_seen[base + kind]
            if delta:
                lost[name] = delta
        self.kernel_dropped_seen = counts
        if not lost:
            return None
        detail = ", ".join(f"{k}={v}" for k, v in sorted(lost.items()))
        return {"kind": "gap", "time": now_ns(), "stage": "kernel", "count": sum(lost.values()),
                "detail": f"ring buffer or in-flight map full: {detail}"}

    def health(self) -> list[dict]:
        counts = self.kernel_counters()
        base = self.c["AW_COUNTER_DROPPED_BASE"]
        names = self.decoder.kind_names
        records = [self.tags.record()]
        gap = self._kernel_gap(counts)
        if gap:
            records.append(gap)
        health = {"kind": "health", "time": now_ns(), "stage": "probe", "pid": os.getpid(), "counters": {
            "kernel_emitted": {n: counts[k] for k, n in names.items()},
            "kernel_dropped": {n: counts[base + k] for k, n in names.items()},
            # agent processes the kernel had no room to track: watched only in their cgroups
            "agent_tasks_untracked": counts[self.c["AW_COUNTER_UNTRACKED"]],
            # fd records not needed (closes, copies of fds the resolver does not follow): counted, not sent
            "kernel_fd_skipped": counts[self.c["AW_COUNTER_FD_SKIPPED"]],
            # opens folded into a repeat count in the kernel, and what the probe sent of them:
            # records that each stand for `count` opens, and the opens they stand for
            "kernel_folded_opens": counts[self.c["AW_COUNTER_FOLDED"]],
            **(self.folder.counters if self.folder else
               {"fold_records": 0, "folded_opens": 0, "fold_swaps": 0, "fold_errors": 0}),
            "decoded": self.counters["decoded"],
            "decode_errors": self.counters["decode_errors"],
            "batches_sent": self.counters["batches_sent"],
            "records_sent": self.counters["records_sent"],
            "backlog_dropped": self.counters["backlog_dropped"],
            # decoded records waiting to be sent, `vital` ones held (see _drain) included
            "backlog": self.backlog_records + len(self.vital_held),
            "vital_held": len(self.vital_held),
            "tagged_cgroups": len(self.tags.current),
            "kernel_rules": len(self._kernel_keys),
            "kernel_sidedoor_agents": len(self._sidedoor_agents),
            "kernel_rules_policy": self.kernel_rules_hash,
            "kernel_rules_malformed": self.counters["kernel_rules_malformed"],
            # the watch socket: cgroups watched at once on request, and requests refused
            "watch_requests": self.counters["watch_requests"],
            "watch_refused": self.counters["watch_refused"],
            # exec records copied to the daemon's priority lane, and copies dropped (no room)
            "priority_sent": self.counters["priority_sent"],
            "priority_dropped": self.counters["priority_dropped"],
        }}
        if self.stopped_by is not None:
            health["stopping"] = self.stopped_by
        if self.programs_stopped:
            health["programs_stopped"] = self.programs_stopped
        records.append(health)
        return records

    # -- sending ---------------------------------------------------------------

    def _queue(self, records: list[dict]) -> None:
        # Into the last batch waiting while it has room: a backlog of many small
        # batches would go out at ZeroMQ's high-water mark (SEND_HWM) a turn.
        if self.backlog and len(self.backlog[-1]) < MAX_BATCH:
            room = MAX_BATCH - len(self.backlog[-1])
            self.backlog[-1].extend(records[:room])
            self.backlog_records += len(records[:room])
            records = records[room:]
        for i in range(0, len(records), MAX_BATCH):
            chunk = records[i:i + MAX_BATCH]
            self.backlog.append(chunk)
            self.backlog_records += len(chunk)
        # Too much held: the oldest batches lose their records other than
        # VITAL_KINDS (exec, fork, exit, move), in their place a gap that counts them.
        for index, batch in enumerate(self.backlog):
            if self.backlog_records <= MAX_BACKLOG or index == len(self.backlog) - 1:
                break
            kept = [r for r in batch if r["kind"] in VITAL_KINDS or r["kind"] == "gap"]
            lost = collections.Counter(r["kind"] for r in batch
                                       if r["kind"] not in VITAL_KINDS and r["kind"] != "gap")
            if not lost:
                continue
            count = sum(lost.values())
            detail = ", ".join(f"{k}={v}" for k, v in sorted(lost.items()))
            kept.append({"kind": "gap", "time": now_ns(), "stage": "probe-backlog",
                         "count": count, "detail": f"daemon not reading: {detail}"})
            self.backlog[index] = kept
            self.backlog_records -= len(batch) - len(kept)
            self.counters["backlog_dropped"] += count

    def _flush(self) -> None:
        while self.backlog:
            batch = self.backlog[0]
            try:
                self.sock.send(wire.encode_batch("probe", self.seq, batch), zmq.NOBLOCK)
            except zmq.Again:
                return  # daemon slow or absent: keep the backlog, the ring keeps filling
            self.backlog.popleft()
            self.backlog_records -= len(batch)
            self.seq += 1
            self.counters["batches_sent"] += 1
            self.counters["records_sent"] += len(batch)

    def _decode(self, raw: list[bytes]) -> list[dict]:
        records = []
        decode = self.decoder.decode
        for item in raw:
            try:
                records.append(decode(item))
            except DecodeError as exc:
                self.counters["decode_errors"] += 1
                records.append({"kind": "gap", "time": now_ns(), "stage": "probe-decode",
                                "count": 1, "detail": str(exc)})
        self.counters["decoded"] += len(raw)
        return records

    def _drain(self, take_events: bool = True) -> list[dict]:
        """Records from the rings, merged by time, in an order the daemon can
        follow: `vital` is read, then `events` (up to EVENTS_READ_AHEAD bytes
        read, undecoded), then `vital` again, so every `vital` record emitted
        before an `events` record read goes out with it or before. Of the
        `events` records read, the first EVENTS_PER_DRAIN are decoded. And a
        `vital` record never goes out before an `events` record of its time
        not yet decoded (a process's exit before its last opens, a fork before
        its parent's chdir): while `events` has more, the `vital` records from
        the first newer than every `events` record decoded wait in vital_held
        (their ring order kept). take_events False (the daemon is behind):
        nothing is decoded from `events`, and while MAX_VITAL_HELD `vital`
        records are held neither ring is read."""
        vital, reader = self.vital, self.events
        ring_left = True
        if take_events or len(self.vital_held) < MAX_VITAL_HELD:
            vital.read()
            ring_left = reader.read(EVENTS_READ_AHEAD)
            vital.read()
        events = self._decode(reader.take(EVENTS_PER_DRAIN)) if take_events else []
        self.events_behind = ring_left or bool(reader.records)
        held = self.vital_held
        fresh = self._decode(vital.take())
        self.priority.send(fresh)   # exec copies out now, before they wait for their turn
        held += fresh
        times = [r["time"] for r in events if r["kind"] != "gap"]
        if times:
            self.events_until = max(self.events_until, max(times))
        if not self.events_behind:
            released, self.vital_held = held, []
        else:
            until = self.events_until
            cut = next((i for i, r in enumerate(held) if r["time"] > until), len(held))
            released, self.vital_held = held[:cut], held[cut:]
        if not released:
            return events
        if not events:
            return released
        return list(heapq.merge(released, events, key=_record_time))

    def _drain_all(self) -> list[dict]:
        """Everything left in the rings, at the end: for at most a second (an
        agent still flooding would keep it going), then the `vital` records
        still held, which wait for nothing now."""
        records = self._drain()
        deadline = time.monotonic() + 1
        while self.events_behind and time.monotonic() < deadline:
            records += self._drain()
        records += self.vital_held
        self.vital_held = []
        return records

    def _folded_last(self) -> list[dict]:
        """The counts of repeated opens not sent yet, at the end."""
        return self.folder.last() if self.folder else []

    def _wait(self, paused: bool, timeout_ms: int) -> None:
        """Until a ring has records or timeout_ms pass; paused: until `vital`
        has records (while it may hold more) or the daemon reads again."""
        poller = zmq.Poller()
        if not paused or len(self.vital_held) < MAX_VITAL_HELD:
            poller.register(self.vital.fd, zmq.POLLIN)
            if self.events.held < EVENTS_READ_AHEAD:
                poller.register(self.events.fd, zmq.POLLIN)
        if paused or self.backlog:   # batches wait for room at the daemon: on as soon as there is
            poller.register(self.sock, zmq.POLLOUT)
        elif self.events.records:
            timeout_ms = 0   # read ahead, not decoded yet: on at once
        poller.poll(timeout_ms)

    def run(self) -> None:
        self.tags.sync()
        self.vital, self.events = open_ring(self.bpf, "vital"), open_ring(self.bpf, "events")
        if self.folder:
            self.folder.start()
        try:
            self._run()
        finally:
            self.vital.close()
            self.events.close()

    def _run(self) -> None:
        self._queue(self.health())
        self.notifier.ready(self.status_line())
        next_tags = next_health = next_beat = time.monotonic()
        active = False
        while not self.stop_requested():
            self.notifier.alive()
            # The BPF side wakes this loop at most once per wake-up interval
            # and queues later records silently: while records flow, look
            # again one interval later, whether woken or not. While the
            # daemon is behind, `events` holds the rest in the kernel.
            paused = self.backlog_records >= PAUSE_BACKLOG
            self._wait(paused, self.active_poll_ms if active or paused else POLL_MS)
            records = self._drain(take_events=not paused)
            if self.folder:
                records += self.folder.take()   # after the drain: each key's first open goes first
            active = paused or self.events_behind or bool(records)
            if self.tags.take_added():
                # Looked at after the drain: a record of a cgroup watch added
                # can only be in it if the addition was seen, and the tags
                # record goes first, so the daemon knows its agent.
                records.insert(0, self.tags.record())
            if records:   # out before the periodic duties below: an exec the daemon kills for waits on none
                self._queue(records)
                self._flush()
                records = []
            now = time.monotonic()
            self._poll_kernel_rules()   # each turn: a non-blocking read, and rules apply sooner
            if now >= next_tags:
                next_tags = now + self.settings.tag_scan_interval
                if self.tags.sync():
                    records.append(self.tags.record())
            if now >= next_beat:
                next_beat = now + HEARTBEAT_INTERVAL
                stopped = self.heartbeat()
                if stopped:
                    # Its programs no longer run: say so at once (the daemon
                    # freezes every agent), then exit to be started again.
                    log.error("BPF programs stopped running (detached?): %s; exiting %d to be restarted",
                              ", ".join(stopped), EXIT_PROGRAMS_STOPPED)
                    self.programs_stopped = stopped
                    self._queue(records + self._drain_all() + self._folded_last() + self.health())
                    self._flush()
                    break
            if now >= next_health:
                next_health = now + self.settings.health_interval
                records.extend(self._drain(take_events=not paused))
                records.extend(self.health())
                self.notifier.alive(self.status_line())
            if records:
                self._queue(records)
            self._flush()
        # Last words: whatever is left in the ring and the final counters.
        self.notifier.stopping("sending the last records")
        self._queue(self._drain_all() + self._folded_last() + self.health())
        deadline = time.monotonic() + 2
        while self.backlog and time.monotonic() < deadline:
            self._flush()
            time.sleep(0.01)
        self.sock.close()
        self.rules_sock.close()
        self.priority.close()


def _record_time(record: dict) -> int:
    return record["time"]


# Exit status of a probe stopped by someone other than its service manager,
# parent or terminal: a failure, so that Restart= (and `up`) start it again.
EXIT_STOPPED_BY_OUTSIDER = 3
# Exit status of a probe whose BPF programs stopped running (see heartbeat): restarted too.
EXIT_PROGRAMS_STOPPED = 4


def main(settings: Settings) -> int:
    """Run until asked to stop; returns the exit status."""
    bpf = loader.compile_and_attach(settings.wakeup_interval)
    settings.prepare_run_dir()
    # The supervisor uses these maps directly.
    pinned = [settings.bpf_pin_dir / name for name in (*bpfsys.SUPERVISOR_MAPS, bpfsys.INTERPRETER_MAP)]
    try:
        for path in pinned:
            bpfsys.pin(bpf[path.name.encode()].map_fd, path)
        probe = Probe(settings, bpf, headers.header_constants())
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)   # taken in the loop, with the sender
        WatchServer(settings.probe_socket, probe.tags, probe.counters).start()  # after the mask: its thread inherits it
        log.info("probe running: BPF attached, sending to %s", settings.ingest_endpoint)
        probe.run()
        if probe.programs_stopped:
            return EXIT_PROGRAMS_STOPPED
        if probe.stopped_by and not probe.stopped_by["deliberate"]:
            log.error("stopped by %s, not by the service manager: exiting %d to be restarted",
                      probe.stopped_by["sender"], EXIT_STOPPED_BY_OUTSIDER)
            return EXIT_STOPPED_BY_OUTSIDER
        return 0
    finally:
        for path in pinned:
            path.unlink(missing_ok=True)
        settings.probe_socket.unlink(missing_ok=True)
        try:
            settings.bpf_pin_dir.rmdir()
        except OSError:
            pass   # not empty (someone else's pins): leave it
