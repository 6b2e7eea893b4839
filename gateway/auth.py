"""Who is calling the gateway: the tenant id and how we know it (DESIGN §7, §11).

* **Dev mode** (``JENNAH_DEV_MODE=1``): the ``X-Tenant-Id`` header is trusted. A missing
  or malformed tenant is ``invalid_argument`` (the §11 table).
* **Otherwise**: API keys (``JENNAH_API_KEYS_FILE``, keys stored hashed) are a later
  issue. Until they exist every RPC is refused with ``unauthenticated`` ("API keys are not
  configured"), so a production gateway can never fall back to trusting a header.
  ``/health``, ``/ready`` and ``/metrics`` are not RPCs and stay open.

``identify`` returns ``(tenant_id, auth_method)``; an API-key check slots in as another
branch returning ``(tenant, "api-key")``.
"""

from __future__ import annotations

from collections.abc import Mapping

from jennah.errors import InvalidArgument, Unauthenticated
from jennah.rpc import TENANT_HEADER
from worker.validation import validate_tenant

DEV_HEADER = "dev-header"


class TenantAuth:
    """Identify the tenant of an incoming RPC from its headers."""

    def __init__(self, *, dev_mode: bool) -> None:
        self.dev_mode = dev_mode

    def identify(self, headers: Mapping[str, str]) -> tuple[str, str]:
        """Return ``(tenant_id, auth_method)``; raise InvalidArgument or Unauthenticated."""
        if not self.dev_mode:
            raise Unauthenticated("API keys are not configured")
        tenant = headers.get(TENANT_HEADER, "").strip()
        if not tenant:
            raise InvalidArgument("missing X-Tenant-Id header")
        return validate_tenant(tenant), DEV_HEADER
