"""`agentwarden fleet ...`: every host's holds, records and state over NATS,
from any machine with admin credentials; the collector (`fleet archive`).
Parsing, printing and error translation only: the formats and signatures are
in agentwarden/fleet, the collector in daemon/fleet_collector.py."""
from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path
from typing import Optional

import typer

from agentwarden import fleet, render, wire
from agentwarden.control import DaemonUnavailable
from agentwarden.daemon import fleet_collector
from agentwarden.errors import AgentwardenError, UsageProblem
from agentwarden.settings import Settings
from .output import emit_json

fleet_app = typer.Typer(no_args_is_help=True,
                        help="Holds, records and state of every host, over NATS (docs/fleet.md).\n\n"
                             "Example: agentwarden fleet holds")

_URL_HELP = "NATS servers (default: the fleet_url setting)"
_CREDS_HELP = "TOML file with user and password of your NATS account (default: fleet_credentials)"
_KEY_HELP = "your admin key from `fleet keygen` (also AGENTWARDEN_FLEET_KEY)"
REQUEST_TIMEOUT = 10.0
# What `fleet tail` shows, as `tail` does (health, tags and the like only with --json).
SHOWN_KINDS = {*wire.EVENT_KINDS, "gap", "violation", "admin", "policy", "archive", "hold", "fleet"}


def _target(url: Optional[str], credentials: Optional[Path]) -> tuple[str, fleet.Credentials]:
    settings = Settings.from_env()
    url = url or settings.fleet_url
    if not url:
        raise UsageProblem("no NATS servers: set fleet_url (config or --set fleet_url=nats://HOST:4222) "
                               "or pass --url")
    return url, fleet.load_credentials(credentials or settings.fleet_credentials)


class _Connection:
    """A NATS connection that remembers the server's refusals (permissions)."""

    def __init__(self, url: str, credentials: fleet.Credentials):
        self.url, self.credentials = url, credentials
        self.refused = asyncio.Event()
        self.refusal = ""

    async def __aenter__(self):
        nats = fleet.nats_module()

        async def on_error(exc):
            if "permissions violation" in str(exc).lower():
                self.refusal = str(exc).strip().strip("'")
                self.refused.set()

        try:
            self.nc = await nats.connect(fleet.servers(self.url), **fleet.connect_options(self.credentials),
                                         connect_timeout=3,
                                         max_reconnect_attempts=2, error_cb=on_error,
                                         name="agentwarden fleet CLI")
        except Exception as exc:
            raise DaemonUnavailable(f"cannot connect to {self.url}: {exc or exc.__class__.__name__}; check "
                                    "fleet_url (or --url) and that the NATS server runs") from None
        return self

    async def __aexit__(self, *exc):
        try:
            await asyncio.wait_for(self.nc.close(), 2)
        except Exception:
            pass


LIST_TIMEOUT = 10.0   # seconds a bucket's listing may take, retries of a cluster without a leader included


def _refused(conn: _Connection, bucket: str) -> AgentwardenError:
    return AgentwardenError(f"NATS refused reading the {bucket} bucket to this account "
                            f"({conn.refusal}): use an admin's credentials")


async def _bucket_keys(conn: _Connection, js, bucket: str) -> list[str]:
    """The bucket's keys, from the stream's subject counts: one request answered by the
    stream's leader. (nats-py's kv.keys() watches with a consumer, which could wait for good
    when a cluster's leader changed under it.) Transient answers are retried until
    LIST_TIMEOUT; a cluster that cannot answer by then is said to be so."""
    stream, prefix = f"KV_{bucket}", f"$KV.{bucket}."
    deadline = time.monotonic() + LIST_TIMEOUT
    last = "no answer"
    while True:
        try:
            info = await asyncio.wait_for(js.stream_info(stream, subjects_filter=prefix + ">"), 5)
            return [subject[len(prefix):] for subject in (info.state.subjects or {})]
        except Exception as exc:
            if conn.refusal:   # a refused request is never answered
                raise _refused(conn, bucket) from None
            from nats.js.errors import NotFoundError
            if isinstance(exc, NotFoundError):
                raise AgentwardenError(f"no {bucket} bucket on {conn.url}: is the collector running, "
                                       "or `agentwarden fleet init` done?") from None
            last = str(exc).strip() or exc.__class__.__name__
        if time.monotonic() >= deadline:
            raise AgentwardenError(f"listing the {bucket} bucket on {conn.url}: JetStream temporarily "
                                   f"unavailable ({last}) for {LIST_TIMEOUT:g} s; try again, or check the "
                                   "cluster with `fleet status`") from None
        await asyncio.sleep(0.5)


async def _kv_entries(conn: _Connection, bucket: str) -> list[dict]:
    js = conn.nc.jetstream()
    keys = await _bucket_keys(conn, js, bucket)
    if not keys:
        return []
    try:
        kv = await js.key_value(bucket)
    except Exception as exc:
        if conn.refusal:
            raise _refused(conn, bucket) from None
        raise AgentwardenError(f"cannot open the {bucket} bucket on {conn.url} ({exc.__class__.__name__}); "
                               "try again, or check the cluster with `fleet status`") from None
    entries = []
    for key in keys:
        try:
            entry = await kv.get(key)
        except Exception as exc:
            if conn.refusal:
                raise _refused(conn, bucket) from None
            from nats.js.errors import KeyDeletedError, KeyNotFoundError
            if isinstance(exc, (KeyNotFoundError, KeyDeletedError)):   # deleted (a tombstone), or meanwhile
                continue
            raise AgentwardenError(f"cannot read {key} of the {bucket} bucket on {conn.url}: "
                                   f"{exc.__class__.__name__} {exc}; try again") from None
        if entry.value:
            entries.append(json.loads(entry.value))
    return entries


def _run(coroutine):
    try:
        return asyncio.run(coroutine)
    except KeyboardInterrupt:
        raise typer.Exit(130)


@fleet_app.command("keygen")
def keygen(name: str = typer.Argument(..., help="your admin name, as hosts will record it"),
           out: Path = typer.Option(..., "--out", help="where to write the private key (0600)"),
           as_json: bool = typer.Option(False, "--json", help="print the result as one JSON object")):
    """Make your admin key (Ed25519) and print the line hosts add to fleet_admin_keys.

    Example: agentwarden fleet keygen alice --out ~/.config/agentwarden/alice.key
    """
    line = fleet.generate_key(name, out)
    if as_json:
        emit_json({"name": name, "key_file": str(out), "admin_keys_line": line})
    else:
        typer.echo(line)


@fleet_app.command("init")
def init(replicas: int = typer.Option(3, help="JetStream replicas of the stream and buckets"),
         url: Optional[str] = typer.Option(None, "--url", help=_URL_HELP),
         credentials: Optional[Path] = typer.Option(None, "--credentials", help=_CREDS_HELP),
         as_json: bool = typer.Option(False, "--json", help="print the result as one JSON object")):
    """Create the record stream and the holds and hosts buckets (the collector does it too).

    Example: agentwarden fleet init --replicas 3
    """
    target = _target(url, credentials)

    async def go():
        async with _Connection(*target) as conn:
            await fleet_collector.ensure_fleet(conn.nc.jetstream(), replicas)
    _run(go())
    if as_json:
        emit_json({"stream": fleet.STREAM, "buckets": [fleet.HOLDS_BUCKET, fleet.HOSTS_BUCKET], "replicas": replicas})
    else:
        typer.echo(f"stream {fleet.STREAM} and buckets {fleet.HOLDS_BUCKET}, {fleet.HOSTS_BUCKET} are there")


async def _holds(conn: _Connection) -> list[dict]:
    return sorted(await _kv_entries(conn, fleet.HOLDS_BUCKET), key=lambda h: h.get("since") or 0)


@fleet_app.command("holds")
def holds(as_json: bool = typer.Option(False, "--json", help="as JSON, one hold a line"),
          url: Optional[str] = typer.Option(None, "--url", help=_URL_HELP),
          credentials: Optional[Path] = typer.Option(None, "--credentials", help=_CREDS_HELP)):
    """Pending holds of every host.

    Example: agentwarden fleet holds
    """
    async def go():
        async with _Connection(*_target(url, credentials)) as conn:
            return await _holds(conn)
    pending = _run(go())
    if as_json:
        for h in pending:
            typer.echo(json.dumps(h, sort_keys=True))
        return
    if not pending:
        typer.echo("no pending holds in the fleet")
    now = time.time_ns()
    for h in pending:
        waited = (now - h["since"]) / 1e9 if h.get("since") else 0
        typer.echo(f"{h['host']}/{h['hold_id']}  agent {h['agent']}  for {h['on_behalf_of'] or '-'}  "
                   f"waiting {waited:.0f}s  approvals {len(h['approvers'])}/{h['required']}")
        typer.echo(f"    {h['action']}")
        typer.echo(f"    rule: {h['rule'] or 'no rule allows it'}")


def _decide(verdict: str, hold: str, host: Optional[str], reason: Optional[str],
            remember: Optional[str], key_file: Path, url: Optional[str],
            credentials: Optional[Path]) -> dict:
    key = fleet.load_admin_key(key_file)
    target = _target(url, credentials)

    async def go():
        async with _Connection(*target) as conn:
            name, hold_id = host, hold
            if "/" in hold and not host:
                name, hold_id = hold.split("/", 1)
            if not name:
                found = [h for h in await _holds(conn) if h["hold_id"] == hold_id]
                if not found:
                    raise AgentwardenError(f"no pending hold {hold_id!r} in the fleet (fleet holds lists them)")
                if len(found) > 1:
                    raise AgentwardenError(f"hold {hold_id!r} is pending on several hosts; name one: "
                                           f"HOST/{hold_id}")
                name = found[0]["host"]
            signed = fleet.sign_decision(key, name, hold_id, verdict, reason, remember)
            request = asyncio.ensure_future(conn.nc.request(fleet.decide_subject(name), signed,
                                                            timeout=REQUEST_TIMEOUT))
            refused = asyncio.ensure_future(conn.refused.wait())
            done, _ = await asyncio.wait({request, refused}, return_when=asyncio.FIRST_COMPLETED)
            if refused in done:
                request.cancel()
                raise AgentwardenError(f"NATS refused the decision: {conn.refusal} (your account may not "
                                       "publish decisions: use an admin account)")
            refused.cancel()
            try:
                reply = request.result()
            except Exception as exc:
                raise AgentwardenError(f"host {name!r} did not answer ({exc.__class__.__name__}): is its "
                                       "daemon connected? (fleet status)") from None
            answer = fleet.decode_record(reply.data)
            if not answer.get("ok"):
                raise AgentwardenError(answer.get("error", "refused"))
            return {"host": name, "hold_id": hold_id, **answer}
    return _run(go())


@fleet_app.command("approve")
def approve(hold: str = typer.Argument(..., help="HOST/ID, or an ID pending on one host"),
            host: Optional[str] = typer.Option(None, "--host", help="the hold's host"),
            reason: Optional[str] = typer.Option(None, "--reason", help="why (archived on the host)"),
            remember: Optional[str] = typer.Option(None, "--remember", help="also let the same action "
                                                   "through for this long (15m, 8h; at most remember_max)"),
            key: Path = typer.Option(..., "--key", envvar="AGENTWARDEN_FLEET_KEY", help=_KEY_HELP),
            url: Optional[str] = typer.Option(None, "--url", help=_URL_HELP),
            credentials: Optional[Path] = typer.Option(None, "--credentials", help=_CREDS_HELP),
            as_json: bool = typer.Option(False, "--json", help="print the result as one JSON object")):
    """Approve a hold on any host, signed with your admin key.

    Example: agentwarden fleet approve web-3/h4-1a2b --reason "ok" --key ~/alice.key
    """
    answer = _decide("approve", hold, host, reason, remember, key, url, credentials)
    if as_json:
        emit_json(answer)
        return
    more = f" ({answer['needed']} more approvals needed)" if answer.get("state") == "pending" else ""
    typer.echo(f"{answer['host']}/{answer['hold_id']}: {answer['state']}{more}")


@fleet_app.command("deny")
def deny(hold: str = typer.Argument(..., help="HOST/ID, or an ID pending on one host"),
         host: Optional[str] = typer.Option(None, "--host", help="the hold's host"),
         reason: Optional[str] = typer.Option(None, "--reason", help="why (archived on the host)"),
         key: Path = typer.Option(..., "--key", envvar="AGENTWARDEN_FLEET_KEY", help=_KEY_HELP),
         url: Optional[str] = typer.Option(None, "--url", help=_URL_HELP),
         credentials: Optional[Path] = typer.Option(None, "--credentials", help=_CREDS_HELP),
         as_json: bool = typer.Option(False, "--json", help="print the result as one JSON object")):
    """Deny a hold on any host, signed with your admin key.

    Example: agentwarden fleet deny web-3/h4-1a2b --reason "not on a Friday" --key ~/alice.key
    """
    answer = _decide("deny", hold, host, reason, None, key, url, credentials)
    if as_json:
        emit_json(answer)
        return
    typer.echo(f"{answer['host']}/{answer['hold_id']}: {answer['state']}")


@fleet_app.command("tail")
def tail(host: Optional[str] = typer.Option(None, "--host", help="only this host"),
         agent: Optional[str] = typer.Option(None, "--agent", help="only this agent"),
         violations: bool = typer.Option(False, "--violations", help="only violations"),
         as_json: bool = typer.Option(False, "--json", help="records as JSON, with `host`"),
         count: Optional[int] = typer.Option(None, "--count", help="stop after N records"),
         url: Optional[str] = typer.Option(None, "--url", help=_URL_HELP),
         credentials: Optional[Path] = typer.Option(None, "--credentials", help=_CREDS_HELP)):
    """Follow the records of every host (or one host, one agent) as they are shipped.

    Example: agentwarden fleet tail --violations
    """
    fleet.nats_module()   # says how to install nats-py when it is missing
    from nats.js import api
    target = _target(url, credentials)
    subject = fleet.records_filter(host, agent)
    if violations:
        subject = subject[:-1] + "violation"

    async def go():
        async with _Connection(*target) as conn:
            js = conn.nc.jetstream()
            sub = await js.subscribe(subject, ordered_consumer=True,
                                     config=api.ConsumerConfig(deliver_policy=api.DeliverPolicy.NEW))
            seen = 0
            while count is None or seen < count:
                try:
                    msg = await sub.next_msg(timeout=3600)
                except Exception:
                    continue
                try:
                    shipped = fleet.decode_shipped(msg.data)
                    record = fleet.decode_record(shipped.body)
                except fleet.FleetError:
                    continue
                if not as_json and record.get("kind") not in SHOWN_KINDS:
                    continue
                record["seq"] = shipped.seq
                record["host"] = record.get("host", shipped.host) if record["kind"] == "session" else shipped.host
                typer.echo(render.as_json(record) if as_json else f"{shipped.host:<12} {render.human(record)}")
                seen += 1
    _run(go())


@fleet_app.command("status")
def status(as_json: bool = typer.Option(False, "--json", help="as JSON, one host a line"),
           url: Optional[str] = typer.Option(None, "--url", help=_URL_HELP),
           credentials: Optional[Path] = typer.Option(None, "--credentials", help=_CREDS_HELP)):
    """Each host: up, last record shipped, lag, drops, pending holds.

    Example: agentwarden fleet status
    """
    async def go():
        async with _Connection(*_target(url, credentials)) as conn:
            return await _kv_entries(conn, fleet.HOSTS_BUCKET)
    hosts = sorted(_run(go()), key=lambda h: h["host"])
    if as_json:
        for h in hosts:
            typer.echo(json.dumps(h, sort_keys=True))
        return
    if not hosts:
        typer.echo("no host has reported yet")
    now = time.time_ns()
    for h in hosts:
        age = (now - h["time"]) / 1e9
        up = "up" if age < 5 else f"SILENT for {age:.0f}s"
        drops = ", ".join(f"{k}={v}" for k, v in sorted((h.get("drops") or {}).items())) or "none"
        last = (f" {(now - h['last_ack']) / 1e9:.0f}s ago" if h.get("last_ack") else "")
        typer.echo(f"{h['host']:<16} {up}, shipped up to seq {h['acked_seq']}{last}, lag {h.get('lag', '?')}, "
                   f"{h['pending_holds']} holds pending, drops: {drops}")


@fleet_app.command("archive")
def archive(directory: Optional[Path] = typer.Option(None, "--dir", help="default: fleet_archive_dir"),
            replicas: int = typer.Option(3, help="JetStream replicas, when it creates the stream"),
            url: Optional[str] = typer.Option(None, "--url", help=_URL_HELP),
            credentials: Optional[Path] = typer.Option(None, "--credentials", help=_CREDS_HELP)):
    """The collector: write every host's records into DIR/HOST/, an archive `log verify` checks.

    Runs until SIGTERM; a unit: systemd/agentwarden-fleet-archive.service.

    Example: agentwarden fleet archive --dir /srv/agentwarden/fleet
    """
    target = _target(url, credentials)
    root = directory or Settings.from_env().fleet_archive_dir

    async def go():
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        ready = asyncio.Event()
        task = asyncio.create_task(fleet_collector.run_collector(*target, root, replicas, stop, ready=ready))
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait({task, asyncio.ensure_future(ready.wait()), stopping},
                           return_when=asyncio.FIRST_COMPLETED)
        if not task.done() and not stop.is_set():
            typer.echo(f"fleet archive: collecting into {root}", err=True)
            await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set() and not ready.is_set():
            # Still connecting (nats-py retries for good): nothing collected yet, nothing to close.
            task.cancel()
            typer.echo("fleet archive: stopped before it could connect", err=True)
            return
        collector = await task
        typer.echo(f"fleet archive: stopped; {json.dumps(collector.state(), sort_keys=True)}", err=True)
    fleet.nats_module()
    _run(go())
