"""Hold notifications in tests: a hold record as the supervisor makes it, and
receivers: a real HTTP server on 127.0.0.1 (the webhook) and a real program
that records its stdin (the command)."""
from __future__ import annotations

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

T = 1_700_000_000_000_000_000


def hold(state: str = "pending", hold_id: str = "h1-ab12", **changes) -> dict:
    return {"kind": "hold", "time": T, "hold_id": hold_id, "state": state, "session": "s-1",
            "agent": "coder", "on_behalf_of": "alice", "task": "fix #12", "pid": 4242,
            "action": "exec /usr/bin/date +%Y", "rule": 'exec.hold "/usr/bin/date *" at p.toml:3',
            "policy_hash": "sha256:00", "required": 1, "approvers": [], "reason": None,
            "waited": 0.0, "approvals": [], "denial": None, **changes}


class Hook:
    """A real HTTP server on 127.0.0.1 that records the JSON bodies POSTed to it
    and answers with `statuses` (one per request, the last one repeated).
    `down()` closes its socket (connections are refused); `up()` listens on the
    same port again."""

    def __init__(self, statuses=(200,)):
        self.bodies: list[dict] = []
        self.statuses = list(statuses)
        self.port = 0
        self.server: ThreadingHTTPServer | None = None
        self.up()
        self.url = f"http://127.0.0.1:{self.port}/hook"

    def up(self) -> None:
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status = hook.statuses.pop(0) if len(hook.statuses) > 1 else hook.statuses[0]
                if status == 200:
                    hook.bodies.append(body)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.port = self.server.server_port
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def down(self) -> None:
        if self.server:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    close = down


def recorder(tmp_path: Path, exit_status: int = 0, wait_for_file: Path | None = None) -> Path:
    """A command that appends its stdin as one line to out.jsonl (after
    `wait_for_file` exists, if named), then exits with exit_status."""
    script = tmp_path / "recorder.py"
    gate = (f"import os, time\nwhile not os.path.exists({str(wait_for_file)!r}):\n"
            "    time.sleep(0.01)\n") if wait_for_file else ""
    script.write_text(f"#!{sys.executable}\nimport sys\n{gate}"
                      f"data = sys.stdin.read()\n"
                      f"with open({str(tmp_path / 'out.jsonl')!r}, 'a') as f:\n"
                      f"    f.write(data.replace('\\n', ' ') + '\\n')\n"
                      f"sys.exit({exit_status})\n")
    script.chmod(0o755)
    return script


def received(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
