"""The probe's watch socket (UNIX seqpacket, root only): `agentwarden run` asks
for its new session cgroup to be watched now instead of at the next rescan
(up to tag_scan_interval later), and the supervisor asks how a cgroup is
watched. One request, one answer (wire.PROBE_COMMANDS):

  watch {"cgroup": PATH}     read PATH's tags as a rescan would and put it in
                             the BPF maps before answering {"ok", "tag"}
  tag   {"cgroup_id": ID}    how this probe watches a cgroup {"ok", "tag": ...|None}
  agent {"agent": NAME}      the agent's cgroups that are no session {"ok", "cgroups"}

Nothing in a request is taken on trust: `watch` reads the root-only tags
itself, so a request can only make the probe see sooner what it would see
anyway. Only root may ask (SO_PEERCRED). Served from a thread of its own, so
an answer does not wait for the run loop's next turn.
"""
from __future__ import annotations

import collections
import logging
import os
import socket
import struct
import sys
import threading
from pathlib import Path

from agentwarden import wire

log = logging.getLogger("agentwarden.probe")


class WatchServer:
    def __init__(self, path: Path, tags, counters: collections.Counter):
        """tags: the probe's TagMirror; counters: the probe's (watch_requests, watch_refused)."""
        self.path = path
        self.tags = tags
        self.counters = counters
        path.unlink(missing_ok=True)
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.server.bind(str(path))
        os.chmod(path, 0o600)
        self.server.listen(64)

    def start(self) -> None:
        # While the run loop decodes, this thread waits for the GIL up to the
        # switch interval at each step of an answer (5 ms by default). The
        # interval only matters while a thread waits: idle in accept(), this
        # one costs the loop nothing.
        sys.setswitchinterval(0.0005)
        threading.Thread(target=self._serve, name="watch-socket", daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError as exc:
                log.error("watch socket: accept failed: %s", exc)
                continue
            with conn:
                conn.settimeout(2)
                try:
                    self._one(conn)
                except OSError:
                    self.counters["watch_refused"] += 1   # the asker went away

    def _one(self, conn: socket.socket) -> None:
        data = conn.recv(wire.MAX_ADMIN_REQUEST_BYTES)
        if not data:
            return
        _pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                               struct.calcsize("3i")))
        try:
            reply = self.answer(wire.decode_probe_request(data), uid)
        except (ValueError, TypeError, KeyError) as exc:   # WireError is a ValueError
            reply = {"ok": False, "error": f"malformed request: {exc}"}
        self.counters["watch_requests" if reply.get("ok") else "watch_refused"] += 1
        conn.send(wire.pack(reply))

    def answer(self, request: dict, uid: int) -> dict:
        if uid != 0:
            return {"ok": False, "error": "only root may ask the probe"}
        cmd = request["cmd"]
        if cmd == "watch":
            cgroup = request["cgroup"]
            if not isinstance(cgroup, str) or not cgroup.startswith("/"):
                raise ValueError("cgroup must be an absolute path")
            return self.tags.watch(Path(os.path.normpath(cgroup)))
        if cmd == "tag":
            if type(request["cgroup_id"]) is not int:
                raise ValueError("cgroup_id must be an integer")
            return self.tags.tag_of(request["cgroup_id"])
        if not isinstance(request["agent"], str):   # agent: decode_probe_request knows no other
            raise ValueError("agent must be a string")
        return self.tags.agent_cgroups(request["agent"])
