"""The gateway's view of the API key file (``gateway/keyfile.py``): key and identity lookups.

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

import hmac
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from gateway.keyfile import (
    KEY_PREFIX,
    ApiKey,
    KeyFileError,
    hash_key,
    key_id_of,
    read_key_file,
)
from jennah.errors import SettingsError

__all__ = ["KEY_PREFIX", "KeyStore"]

log = logging.getLogger("jennah.gateway.keys")

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
