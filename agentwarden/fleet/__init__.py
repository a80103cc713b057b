"""The fleet's core: NATS subjects and names, the shipped record's format,
signed hold decisions, admin key lists and credentials files. Shared by the
daemon's shipper (daemon/fleet.py), the collector (daemon/fleet_collector.py)
and `agentwarden fleet` (cli/fleet.py). No NATS client here: nats-py is
imported only by those, through ``nats_module``.

Subjects and buckets (one definition, used by the docs' server configuration)::

    aw.rec.<host>.<agent>.<kind>   every archived record of a host (stream AW_RECORDS)
    aw.decide.<host>               signed decisions for a host's holds (request/reply)
    KV aw-holds   <host>.<hold>    a host's pending holds (deleted when decided)
    KV aw-hosts   <host>           a host's shipping state, refreshed every second
    _INBOX.<user>.>                replies to one NATS account (only it may subscribe there)

A host name becomes one subject token: anything but letters, digits, ``-``
and ``_`` is replaced by ``_`` (the records themselves keep the exact name).
"""
from __future__ import annotations

import base64
import hashlib
import importlib
import os
import re
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

from agentwarden.errors import AgentwardenError
from agentwarden.wire import pack

STREAM = "AW_RECORDS"
RECORD_PREFIX = "aw.rec"
DECIDE_PREFIX = "aw.decide"
HOLDS_BUCKET = "aw-holds"
HOSTS_BUCKET = "aw-hosts"
COLLECTOR_DURABLE = "aw-collector"
INBOX_PREFIX = "_INBOX"
DUPLICATE_WINDOW = 3600.0   # s: JetStream drops a repeated message id within this window
DECISION_MAX_AGE = 300.0    # s: a signed decision older than this (or from the future) is refused
SHIPPED_VERSION = 1
DECISION_VERSION = 1
# Where a host's private copy of nats-py lives when the .deb is installed (docs/fleet.md).
VENDOR_DIR = Path("/usr/lib/agentwarden/vendor")
NATS_PY_VERSION = "2.16.0"

_TOKEN_BAD = re.compile(r"[^A-Za-z0-9_-]")


class FleetError(AgentwardenError):
    pass


def token(name: str | None) -> str:
    """A name as one subject token ("-" for none)."""
    return _TOKEN_BAD.sub("_", name) if name else "-"


def record_subject(host: str, agent: str | None, kind: str) -> str:
    return f"{RECORD_PREFIX}.{token(host)}.{token(agent)}.{token(kind)}"


def records_filter(host: str | None = None, agent: str | None = None) -> str:
    return f"{RECORD_PREFIX}.{token(host) if host else '*'}.{token(agent) if agent else '*'}.*"


def decide_subject(host: str) -> str:
    return f"{DECIDE_PREFIX}.{token(host)}"


def hold_key(host: str, hold_id: str) -> str:
    return f"{token(host)}.{token(hold_id)}"


def message_id(host: str, seq: int) -> str:
    """Nats-Msg-Id: JetStream keeps one message per id (within DUPLICATE_WINDOW)."""
    return f"{host}:{seq}"


# ---- the shipped record ------------------------------------------------------------

@dataclass(frozen=True)
class Shipped:
    """One archived record as it travels: the archive's own envelope (seq, body,
    chain hash), the header of the host's segment it is in, and on the last
    record of a publishing round the host's head file (which names that record
    durable). The collector writes these bytes as they are, so a central copy
    verifies like the host's archive, keyed or not."""
    host: str
    seq: int
    body: bytes
    chain: bytes
    segment_header: bytes      # the packed header object of the record's segment
    head: bytes | None = None  # the host's head file naming this seq, or None

    def encode(self) -> bytes:
        return pack({"v": SHIPPED_VERSION, "host": self.host, "seq": self.seq, "body": self.body,
                     "chain": self.chain, "segment_header": self.segment_header, "head": self.head})


def decode_shipped(raw: bytes) -> Shipped:
    try:
        obj = msgpack.unpackb(raw, raw=False)
        if obj.get("v") != SHIPPED_VERSION:
            raise ValueError(f"version {obj.get('v')!r}")
        shipped = Shipped(obj["host"], obj["seq"], obj["body"], obj["chain"], obj["segment_header"],
                          obj.get("head"))
    except (ValueError, TypeError, KeyError, AttributeError, msgpack.UnpackException) as exc:
        raise FleetError(f"not a shipped record ({exc})") from None
    if not (isinstance(shipped.host, str) and type(shipped.seq) is int and shipped.seq >= 0
            and isinstance(shipped.body, bytes) and isinstance(shipped.chain, bytes)
            and isinstance(shipped.segment_header, bytes)
            and isinstance(shipped.head, (bytes, type(None)))):
        raise FleetError("a shipped record with fields of the wrong type")
    return shipped


def decode_record(body: bytes) -> dict[str, Any]:
    record = msgpack.unpackb(body, raw=False, strict_map_key=False)
    if not isinstance(record, dict):
        raise FleetError("the record is not a map")
    return record


# ---- admin keys and signed decisions ------------------------------------------------

def _ed25519():
    try:
        from cryptography.hazmat.primitives.asymmetric import ed25519
        from cryptography.hazmat.primitives import serialization
    except ImportError:
        raise FleetError("signing needs python3-cryptography (apt install python3-cryptography)") from None
    return ed25519, serialization


def fingerprint(public: bytes) -> str:
    return "ed25519:" + hashlib.sha256(public).hexdigest()[:16]


def public_line(name: str, public: bytes) -> str:
    """One line of an admin keys file."""
    return f"{name} ed25519:{base64.b64encode(public).decode()}"


def generate_key(name: str, path: Path) -> str:
    """A new admin key in path (0600, PEM); returns its public line."""
    ed25519, serialization = _ed25519()
    if not re.fullmatch(r"[A-Za-z0-9_.@-]+", name):
        raise FleetError(f"admin name {name!r}: use letters, digits, and . _ @ -")
    private = ed25519.Ed25519PrivateKey.generate()
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    comment = f"# agentwarden fleet admin key of {name}\n".encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise FleetError(f"{path} exists; choose another file or remove it first") from None
    except OSError as exc:
        raise FleetError(f"cannot write {path}: {exc.strerror}") from None
    with os.fdopen(fd, "wb") as f:
        f.write(comment + pem)
    raw = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return public_line(name, raw)


@dataclass(frozen=True)
class AdminKey:
    name: str
    signer: Any     # the private key

    @property
    def public(self) -> bytes:
        _, serialization = _ed25519()
        return self.signer.public_key().public_bytes(serialization.Encoding.Raw,
                                                     serialization.PublicFormat.Raw)


def load_admin_key(path: Path) -> AdminKey:
    ed25519, serialization = _ed25519()
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise FleetError(f"cannot read the admin key {path}: {exc.strerror} "
                         "(make one: agentwarden fleet keygen NAME --out FILE)") from None
    match = re.search(rb"# agentwarden fleet admin key of (\S+)", data)
    try:
        signer = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise FleetError(f"{path} is not an admin key made by `agentwarden fleet keygen` ({exc})") from None
    if not isinstance(signer, ed25519.Ed25519PrivateKey):
        raise FleetError(f"{path} is not an Ed25519 key")
    return AdminKey(match.group(1).decode() if match else path.stem, signer)


def load_admin_keys(path: Path | None) -> dict[bytes, str]:
    """The admin keys a host accepts: public key -> admin name. An empty file
    (or none configured) accepts no fleet decision."""
    if path is None:
        return {}
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise FleetError(f"cannot read the fleet admin keys {path}: {exc.strerror}") from None
    keys: dict[bytes, str] = {}
    for number, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        try:
            if len(parts) != 2 or not parts[1].startswith("ed25519:"):
                raise ValueError
            public = base64.b64decode(parts[1][len("ed25519:"):], validate=True)
            if len(public) != 32:
                raise ValueError
        except ValueError:
            raise FleetError(f"{path}:{number}: expected `NAME ed25519:BASE64` (the line "
                             "`agentwarden fleet keygen` prints)") from None
        keys[public] = parts[0]
    return keys


def sign_decision(key: AdminKey, host: str, hold_id: str, verdict: str, reason: str | None,
                  remember: str | None = None, now: float | None = None) -> bytes:
    if verdict not in ("approve", "deny"):
        raise ValueError(verdict)
    payload = pack({"v": DECISION_VERSION, "host": host, "hold_id": hold_id, "verdict": verdict,
                    "reason": reason, "remember": remember, "signer": key.name,
                    "time": time.time() if now is None else now,
                    "nonce": os.urandom(8).hex(), "key": key.public})
    return pack({"payload": payload, "signature": key.signer.sign(payload)})


@dataclass(frozen=True)
class Decision:
    host: str
    hold_id: str
    verdict: str
    reason: str | None
    remember: str | None
    claimed_signer: str
    time: float
    public: bytes

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public)


def open_decision(raw: bytes) -> tuple[Decision, bytes, bytes]:
    """The decision, its payload and signature, not yet verified."""
    try:
        outer = msgpack.unpackb(raw, raw=False)
        payload, signature = outer["payload"], outer["signature"]
        obj = msgpack.unpackb(payload, raw=False)
        if obj.get("v") != DECISION_VERSION:
            raise ValueError(f"version {obj.get('v')!r}")
        decision = Decision(obj["host"], obj["hold_id"], obj["verdict"], obj.get("reason"),
                            obj.get("remember"), obj["signer"], float(obj["time"]), obj["key"])
    except (ValueError, TypeError, KeyError, AttributeError, msgpack.UnpackException) as exc:
        raise FleetError(f"not a signed decision ({exc})") from None
    if not (isinstance(decision.host, str) and isinstance(decision.hold_id, str)
            and decision.verdict in ("approve", "deny") and isinstance(decision.public, bytes)
            and isinstance(payload, bytes) and isinstance(signature, bytes)
            and isinstance(decision.reason, (str, type(None)))
            and isinstance(decision.remember, (str, type(None)))):
        raise FleetError("a signed decision with fields of the wrong type")
    return decision, payload, signature


def verify_decision(raw: bytes, admins: dict[bytes, str], host: str,
                    now: float | None = None) -> tuple[Decision, str]:
    """A decision this host accepts, and the admin's name from the host's own
    list; FleetError says why not (the caller records it)."""
    ed25519, _ = _ed25519()
    decision, payload, signature = open_decision(raw)
    name = admins.get(decision.public)
    if name is None:
        raise FleetError(f"signed by key {decision.fingerprint} (claims {decision.claimed_signer!r}), "
                         "which is not in this host's fleet_admin_keys")
    try:
        ed25519.Ed25519PublicKey.from_public_bytes(decision.public).verify(signature, payload)
    except Exception:
        raise FleetError(f"the signature by {name}'s key {decision.fingerprint} does not match") from None
    if decision.host != host:
        raise FleetError(f"meant for host {decision.host!r}, not this host {host!r}")
    now = time.time() if now is None else now
    if abs(now - decision.time) > DECISION_MAX_AGE:
        raise FleetError(f"signed {now - decision.time:.0f}s ago; decisions older than "
                         f"{DECISION_MAX_AGE:.0f}s (or clocks that far apart) are refused")
    return decision, name


# ---- credentials and the client -----------------------------------------------------

@dataclass(frozen=True)
class Credentials:
    user: str | None
    password: str | None


def load_credentials(path: Path | None) -> Credentials:
    """A TOML file with `user` and `password` (the NATS account of this host,
    admin or collector); none configured: connect without."""
    if path is None:
        return Credentials(None, None)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise FleetError(f"fleet credentials file {path} does not exist") from None
    except PermissionError:
        raise FleetError(f"cannot read the fleet credentials {path}: permission denied (run with sudo)") from None
    except OSError as exc:
        raise FleetError(f"cannot read the fleet credentials {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise FleetError(f"{path}: not valid TOML: {exc}") from None
    user, password = data.get("user"), data.get("password")
    if not isinstance(user, str) or not isinstance(password, str):
        raise FleetError(f'{path}: needs user = "NAME" and password = "SECRET"')
    return Credentials(user, password)


def nats_module():
    """nats-py: from the venv, or the host's private copy (VENDOR_DIR)."""
    try:
        return importlib.import_module("nats")
    except ImportError:
        pass
    if VENDOR_DIR.is_dir() and str(VENDOR_DIR) not in sys.path:
        sys.path.append(str(VENDOR_DIR))
        try:
            return importlib.import_module("nats")
        except ImportError:
            pass
    raise FleetError(f"the fleet needs nats-py, which Debian does not package: "
                     f"pip install --target {VENDOR_DIR} --no-deps nats-py=={NATS_PY_VERSION} "
                     "(see docs/fleet.md)")


def connect_options(credentials: Credentials) -> dict[str, Any]:
    """nats.connect's account options. Replies come to _INBOX.<user>, the only
    inbox the server lets that account read: a host subscribed to all of
    _INBOX could read the replies of others' requests (an admin's view of every
    host's holds, the collector's records)."""
    if credentials.user is None:
        return {}
    return {"user": credentials.user, "password": credentials.password,
            "inbox_prefix": inbox_prefix(credentials.user)}


def inbox_prefix(user: str) -> str:
    return f"{INBOX_PREFIX}.{token(user)}"


def servers(url: str) -> list[str]:
    return [u.strip() for u in url.split(",") if u.strip()]
