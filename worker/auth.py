"""Who is calling a worker: the gateway (with the shared token) or, in dev mode, anyone.

A worker trusts ``X-Tenant-Id`` only from a caller that presented
``X-Jennah-Worker-Token`` (compared in constant time), or in dev mode. The RPCs and the
nudge endpoint (``worker/nudge.py``) check the token with the same method,
:meth:`CallerAuth.check_token`.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping

from jennah.errors import InvalidArgument, Unauthenticated
from jennah.models import validate_tenant
from jennah.rpc import TENANT_HEADER, WORKER_TOKEN_HEADER


class CallerAuth:
    def __init__(self, *, dev_mode: bool, worker_token: str) -> None:
        self.dev_mode = dev_mode
        self._token = worker_token.encode()

    def check_token(self, presented: bytes) -> bool:
        """True when ``presented`` is the worker token; False when it is not but dev mode
        lets any caller in; otherwise raise ``Unauthenticated``."""
        trusted = bool(self._token) and hmac.compare_digest(presented, self._token)
        if not trusted and not self.dev_mode:
            raise Unauthenticated("missing or invalid worker token")
        return trusted

    def identify(self, headers: Mapping[str, str]) -> tuple[str, str]:
        """Return ``(tenant_id, auth_method)`` or raise Unauthenticated/InvalidArgument."""
        trusted = self.check_token(headers.get(WORKER_TOKEN_HEADER, "").encode())
        tenant = headers.get(TENANT_HEADER, "").strip()
        if not tenant:
            raise InvalidArgument("missing X-Tenant-Id header")
        return validate_tenant(tenant), "worker-token" if trusted else "dev-header"
