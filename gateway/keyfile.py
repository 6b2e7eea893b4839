"""The API key file ``JENNAH_API_KEYS_FILE``: its format, reading it, writing it atomically
(docs/design.md §7, §11).

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

The gateway reads this file through :class:`gateway.keys.KeyStore`; operators change it
with ``jennah keys …`` (``commands/keys.py``).
"""


from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from jennah.errors import InvalidArgument
from jennah.models import validate_tenant

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


def revoked(entry: ApiKey) -> ApiKey:
    """``entry`` revoked now (it stays in the file, never accepted again)."""
    return replace(entry, revoked_at=_now())


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
