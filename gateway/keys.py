"""API keys and proxy identities: the file ``JENNAH_API_KEYS_FILE`` (docs/design.md §7, §11).

**File format** (JSON, written only by ``jennah keys …``; hand edits are fine if they
keep this shape)::

    {
      "version": 1,
      "keys": [
        {"id": "3f9a0c1b2d4e", "tenant": "acme", "hash": "sha256:<64 hex>",
         "label": "ci", "created_at": "2026-12-01T18:40:00Z", "revoked_at": null}
      ],
      "identities": {"alice@example.com": "acme"}
    }

* ``keys``: one entry per key ever issued. A revoked key keeps its entry with
  ``revoked_at`` set, so ``jennah keys list`` shows the history; it is never accepted.
* ``identities``: email → tenant, for the trusted-proxy mode (oauth2-proxy's
  ``X-Auth-Request-Email``). Emails are compared case-insensitively. The email itself is
  never used as a tenant id (docs/design.md §11).

**Keys** look like ``jk_<id>_<secret>``: ``jk_`` makes them recognisable (secret
scanners, logs), ``<id>`` is 12 hex characters naming the entry (shown by ``list`` and
used by ``revoke``), ``<secret>`` is ``secrets.token_urlsafe(32)`` (256 random bits).
The plain key is printed once by ``jennah keys create`` and never stored.

**Why plain SHA-256 is enough.** The file stores ``sha256(whole key)``. Slow password
hashes (bcrypt, scrypt, argon2) exist to make guessing *low-entropy* human passwords
expensive; a 256-bit random secret cannot be guessed however fast the hash is, so a
leaked file does not reveal usable keys, and verifying a key stays a microsecond on
every request instead of tens of milliseconds. The id in the key selects the single
entry to check (no scan over all keys), and the digest comparison is
``hmac.compare_digest`` (constant time).

**Writes** are atomic: a temp file in the same directory (created 0600), fsync, rename
over the old file, fsync of the directory; read-modify-write by the CLI holds an
exclusive ``flock`` on ``<file>.lock``, so two concurrent ``create`` calls do not lose
one another's key.

**Reloading.** The gateway's :class:`KeyStore` stats the file at most once per second
(``min_check_interval``) and re-reads it when its ``(inode, mtime, size)`` changed, so a
``revoke`` takes effect within about a second without a restart. The stat and the read
of this small file happen on the event loop; at most once a second that is cheaper than
a thread hop. If a reload fails (the file vanished or no longer parses) the gateway
**fails closed**: every key and identity lookup fails until the file is good again, and
the error is logged once per change. Keeping the old contents would keep honouring a
key an operator was trying to remove.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from jennah.errors import InvalidArgument, SettingsError
from worker.validation import validate_tenant

log = logging.getLogger("jennah.gateway.keys")

FORMAT_VERSION = 1
KEY_PREFIX = "jk_"
HASH_PREFIX = "sha256:"
_ID_RE = re.compile(r"[0-9a-f]{12}")
_HASH_RE = re.compile(r"sha256:[0-9a-f]{64}")
_KEY_RE = re.compile(r"jk_([0-9a-f]{12})_([A-Za-z0-9_-]{20,200})")


class KeyFileError(ValueError):
    """The key file is missing, unreadable or malformed (the message says where)."""


@dataclass(frozen=True)
class ApiKey:
    id: str
    tenant: str
    hash: str
    label: str = ""
    created_at: str = ""
    revoked_at: str | None = None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


@dataclass
class KeyFile:
    keys: list[ApiKey] = field(default_factory=list)
    identities: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": FORMAT_VERSION,
            "keys": [
                {"id": k.id, "tenant": k.tenant, "hash": k.hash, "label": k.label,
                 "created_at": k.created_at, "revoked_at": k.revoked_at}
                for k in self.keys
            ],
            "identities": dict(sorted(self.identities.items())),
        }


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def hash_key(key: str) -> str:
    return HASH_PREFIX + hashlib.sha256(key.encode()).hexdigest()


def key_id_of(key: str) -> str | None:
    """The entry id a presented key names, or None if it is not shaped like our keys."""
    m = _KEY_RE.fullmatch(key)
    return m.group(1) if m else None


def new_key(
    tenant: str, label: str = "", taken: frozenset[str] = frozenset()
) -> tuple[ApiKey, str]:
    """A fresh key for ``tenant``: ``(entry to store, plain key to show once)``."""
    tenant = validate_tenant(tenant)
    while True:
        key_id = secrets.token_hex(6)
        if key_id not in taken:
            break
    plain = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
    return ApiKey(key_id, tenant, hash_key(plain), label, _now(), None), plain


def _tenant(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise KeyFileError(f"{where}: tenant must be a string")
    try:
        return validate_tenant(value)
    except InvalidArgument as exc:
        raise KeyFileError(f"{where}: {exc}") from None


def parse_key_file(data: Any) -> KeyFile:
    """Validate the decoded JSON of a key file; ``KeyFileError`` names the first problem."""
    if not isinstance(data, dict):
        raise KeyFileError("top level must be a JSON object")
    if data.get("version") != FORMAT_VERSION:
        raise KeyFileError(f"unsupported version {data.get('version')!r} (expected 1)")
    raw_keys = data.get("keys", [])
    raw_ids = data.get("identities", {})
    if not isinstance(raw_keys, list):
        raise KeyFileError("'keys' must be a list")
    if not isinstance(raw_ids, dict):
        raise KeyFileError("'identities' must be an object (email -> tenant)")
    out = KeyFile()
    seen: set[str] = set()
    for i, entry in enumerate(raw_keys):
        where = f"keys[{i}]"
        if not isinstance(entry, dict):
            raise KeyFileError(f"{where} must be an object")
        key_id, digest = entry.get("id"), entry.get("hash")
        if not isinstance(key_id, str) or not _ID_RE.fullmatch(key_id):
            raise KeyFileError(f"{where}: id must be 12 lowercase hex characters")
        if key_id in seen:
            raise KeyFileError(f"{where}: duplicate id {key_id}")
        seen.add(key_id)
        if not isinstance(digest, str) or not _HASH_RE.fullmatch(digest):
            raise KeyFileError(f"{where}: hash must be 'sha256:' + 64 lowercase hex characters")
        label, created, revoked = (entry.get("label") or "", entry.get("created_at") or "",
                                   entry.get("revoked_at"))
        if not isinstance(label, str) or not isinstance(created, str):
            raise KeyFileError(f"{where}: label and created_at must be strings")
        if revoked is not None and not isinstance(revoked, str):
            raise KeyFileError(f"{where}: revoked_at must be a string or null")
        out.keys.append(ApiKey(key_id, _tenant(entry.get("tenant"), where), digest, label,
                               created, revoked))
    for email, tenant in raw_ids.items():
        if not email.strip() or "@" not in email:
            raise KeyFileError(f"identities: {email!r} is not an email address")
        out.identities[email.strip().lower()] = _tenant(tenant, f"identities[{email!r}]")
    return out


def read_key_file(path: Path) -> KeyFile:
    """Read and validate ``path``; ``KeyFileError`` if missing, unreadable or malformed."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise KeyFileError(f"{path}: {exc.strerror or exc}") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise KeyFileError(f"{path}: not valid JSON ({exc})") from None
    try:
        return parse_key_file(data)
    except KeyFileError as exc:
        raise KeyFileError(f"{path}: {exc}") from None


def write_key_file(path: Path, contents: KeyFile) -> None:
    """Atomically replace ``path`` (temp file 0600 + fsync + rename + directory fsync)."""
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(contents.to_json(), out, indent=2)
            out.write("\n")
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@contextlib.contextmanager
def editing(path: Path) -> Iterator[KeyFile]:
    """Read-modify-write under an exclusive lock; a missing file starts empty."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        contents = read_key_file(path) if path.exists() else KeyFile()
        yield contents
        write_key_file(path, contents)
    finally:
        os.close(lock_fd)


# --- the gateway's view ----------------------------------------------------------------


@dataclass(frozen=True)
class _Index:
    active: Mapping[str, ApiKey]  # id -> entry, revoked ones left out
    identities: Mapping[str, str]


_EMPTY = _Index({}, {})


class KeyStore:
    """Key and identity lookups for the gateway, following the file as it changes."""

    def __init__(
        self, path: Path | str, *, min_check_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = Path(path).expanduser()
        self.min_check_interval = min_check_interval
        self._clock = clock
        self._index = _EMPTY
        self._signature: tuple[int, int, int] | None = None
        self._checked_at = float("-inf")
        self.error: str | None = None
        self.reloads = 0

    def load(self) -> None:
        """First load, at start-up: a bad file is a ``SettingsError`` (one line)."""
        try:
            self._read(self._stat())
        except KeyFileError as exc:
            raise SettingsError(f"invalid gateway settings: JENNAH_API_KEYS_FILE {exc}") from None
        self._checked_at = self._clock()

    def _stat(self) -> tuple[int, int, int]:
        try:
            st = os.stat(self.path)
        except OSError as exc:
            raise KeyFileError(f"{self.path}: {exc.strerror or exc}") from None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def _read(self, signature: tuple[int, int, int]) -> None:
        contents = read_key_file(self.path)
        self._index = _Index(
            {k.id: k for k in contents.keys if not k.revoked}, dict(contents.identities)
        )
        self._signature = signature
        self.error = None
        self.reloads += 1

    def refresh(self) -> None:
        """Re-read the file if it changed; stat at most once per ``min_check_interval``."""
        now = self._clock()
        if now - self._checked_at < self.min_check_interval:
            return
        self._checked_at = now
        try:
            signature = self._stat()
            if signature == self._signature:
                return
            self._read(signature)
            log.info("reloaded %s: %d active key(s), %d identities", self.path,
                     len(self._index.active), len(self._index.identities))
        except KeyFileError as exc:
            self._signature = None
            self._index = _EMPTY
            if self.error != str(exc):
                log.error("API key file unusable, refusing every key until fixed: %s", exc)
            self.error = str(exc)

    def tenant_for_key(self, key: str) -> str | None:
        """The tenant of an active key, or None (unknown, malformed or revoked)."""
        self.refresh()
        key_id = key_id_of(key)
        entry = self._index.active.get(key_id) if key_id else None
        # Hash even when there is no entry, so a miss costs about what a hit does.
        presented = hash_key(key).encode()
        stored = entry.hash.encode() if entry else b"sha256:" + b"0" * 64
        if hmac.compare_digest(presented, stored) and entry is not None:
            return entry.tenant
        return None

    def tenant_for_email(self, email: str) -> str | None:
        self.refresh()
        return self._index.identities.get(email.strip().lower())


# --- jennah keys … -----------------------------------------------------------------------


def _file_of(args: argparse.Namespace) -> Path:
    raw = args.file or os.environ.get("JENNAH_API_KEYS_FILE", "").strip()
    if not raw:
        raise SettingsError("no key file: pass --file or set JENNAH_API_KEYS_FILE")
    return Path(raw).expanduser()


def _create(args: argparse.Namespace) -> int:
    path = _file_of(args)
    with editing(path) as contents:
        entry, plain = new_key(args.tenant, args.label,
                               frozenset(k.id for k in contents.keys))
        contents.keys.append(entry)
    print(f"created key {entry.id} for tenant {entry.tenant} in {path}", file=sys.stderr)
    print("this is the only time the key is shown; store it now:", file=sys.stderr)
    print(plain)
    return 0


def _list(args: argparse.Namespace) -> int:
    path = _file_of(args)
    contents = read_key_file(path)
    rows = [(k.id, k.tenant, k.label or "-", k.created_at or "-", k.revoked_at or "-")
            for k in contents.keys]
    header = ("ID", "TENANT", "LABEL", "CREATED", "REVOKED")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    for row in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row[:4], widths, strict=True)) + "  " + row[4])
    if contents.identities:
        print()
        print("IDENTITY -> TENANT")
        for email, tenant in sorted(contents.identities.items()):
            print(f"{email} -> {tenant}")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    path = _file_of(args)
    with editing(path) as contents:
        for i, entry in enumerate(contents.keys):
            if entry.id == args.id:
                if entry.revoked:
                    print(f"key {entry.id} was already revoked at {entry.revoked_at}")
                else:
                    contents.keys[i] = replace(entry, revoked_at=_now())
                    print(f"revoked key {entry.id} (tenant {entry.tenant})")
                return 0
    print(f"jennah: no key with id {args.id!r} in {path}", file=sys.stderr)
    return 1


def _map(args: argparse.Namespace) -> int:
    email = args.email.strip().lower()
    if "@" not in email:
        raise SettingsError(f"{args.email!r} is not an email address")
    tenant = validate_tenant(args.tenant)
    with editing(_file_of(args)) as contents:
        contents.identities[email] = tenant
    print(f"{email} -> {tenant}")
    return 0


def _unmap(args: argparse.Namespace) -> int:
    email = args.email.strip().lower()
    with editing(_file_of(args)) as contents:
        found = contents.identities.pop(email, None) is not None
    if not found:
        print(f"jennah: {email} was not mapped", file=sys.stderr)
        return 1
    print(f"removed {email}")
    return 0


def _guard(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except (KeyFileError, InvalidArgument) as exc:
            print(f"jennah: {exc}", file=sys.stderr)
            return 2

    return run


def add_keys_commands(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``keys create|list|revoke|map|unmap`` on the ``jennah`` parser."""
    keys = subparsers.add_parser("keys", help="manage API keys and proxy identities",
                                 description=__doc__.split("\n\n")[0] if __doc__ else None)
    sub = keys.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")

    def add(name: str, fn: Callable[[argparse.Namespace], int], help_: str
            ) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(name, help=help_)
        p.add_argument("--file", "-f", default="",
                       help="key file (default: $JENNAH_API_KEYS_FILE)")
        p.set_defaults(fn=_guard(fn))
        return p

    p = add("create", _create, "issue a key for a tenant (printed once, stored hashed)")
    p.add_argument("--tenant", "-t", required=True)
    p.add_argument("--label", "-l", default="", help="a note, e.g. who holds the key")
    add("list", _list, "list keys (id, tenant, label, created, revoked) and identities")
    add("revoke", _revoke, "revoke a key by id (the gateway notices within ~1 s)").add_argument(
        "id")
    p = add("map", _map, "map a proxy identity (email) to a tenant")
    p.add_argument("email")
    p.add_argument("--tenant", "-t", required=True)
    add("unmap", _unmap, "remove a proxy identity").add_argument("email")
