"""Who is calling the gateway: the tenant id and how we know it (docs/design.md §7, §8, §11).

``identify(headers, peer)`` returns ``(tenant_id, auth_method)``. The ways in, checked in
this order:

1. **API key** (``"api-key"``): ``Authorization: Bearer jk_…``, looked up in the key file
   (``JENNAH_API_KEYS_FILE``, see :mod:`gateway.keys`). Unknown, malformed or revoked
   keys are ``unauthenticated``; the message does not say which.
2. **Trusted proxy** (``"proxy"``): ``X-Auth-Request-Email`` (set by oauth2-proxy) is
   believed **only** when the TCP peer is in ``JENNAH_TRUSTED_PROXIES`` (IPs or CIDRs),
   and the email must map to a tenant in the key file's ``identities``; the raw email is
   never a tenant id. From any other peer the header is refused, not ignored, so a
   misrouted deployment fails loudly. A ``Bearer`` that is not a ``jk_`` key (oauth2-proxy
   may pass the user's ID token along) does not stop the proxy identity from applying.
   The peer is the TCP peer: ``X-Forwarded-For`` and ``Forwarded`` never change it (no
   server rewrites ``scope["client"]``, see :mod:`commands.serve`), so a call through a
   trusted proxy is judged by the proxy's own address, whatever those headers say.
3. **Dev mode only** (``"dev-header"``, ``JENNAH_DEV_MODE=1``): ``X-Tenant-Id`` is
   trusted; missing or malformed is ``invalid_argument`` (§11 table). Outside dev mode
   ``X-Tenant-Id`` is ignored: a call carrying only it is ``unauthenticated``.

Outside dev mode a gateway with no key file refuses every RPC ("API keys are not
configured"); ``load_gateway_settings`` already refuses to start that way, this is the
second lock. ``/health``, ``/ready`` and ``/metrics`` are not RPCs and stay open.

What reaches the workers is decided by :class:`gateway.forward.Forwarder` alone: it
builds fresh headers (the authenticated tenant and the gateway's own worker token) and
never copies the client's, so a client-supplied ``X-Tenant-Id`` or
``X-Jennah-Worker-Token`` cannot pass through.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping

from gateway.keys import KEY_PREFIX, KeyStore
from jennah.errors import InvalidArgument, Unauthenticated
from jennah.models import validate_tenant
from jennah.rpc import TENANT_HEADER

DEV_HEADER = "dev-header"
API_KEY = "api-key"
PROXY = "proxy"
AUTHORIZATION_HEADER = "authorization"
PROXY_EMAIL_HEADER = "x-auth-request-email"

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(entries: Iterable[str]) -> tuple[Network, ...]:
    """``10.0.0.0/8``, ``192.168.1.7``, ``::1`` … → networks; ValueError if malformed."""
    return tuple(ipaddress.ip_network(e.strip(), strict=False) for e in entries if e.strip())


def peer_ip(peer: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP of a connectrpc ``client_address`` (``"host:port"``, IPv6 unbracketed)."""
    if not peer:
        return None
    # connectrpc always appends ":port" (so "::1:5555" is ::1, never the address ::1:5555).
    host = peer.rsplit(":", 1)[0] if ":" in peer else peer
    try:
        addr = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _bearer(headers: Mapping[str, str]) -> str | None:
    raw = headers.get(AUTHORIZATION_HEADER, "").strip()
    scheme, _, token = raw.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None if not raw else ""
    return token.strip()


class TenantAuth:
    """Identify the tenant of an incoming RPC from its headers and TCP peer."""

    def __init__(
        self, *, dev_mode: bool, keys: KeyStore | None = None,
        trusted_proxies: Iterable[str] = (),
    ) -> None:
        self.dev_mode = dev_mode
        self.keys = keys
        self.trusted_proxies = parse_networks(trusted_proxies)

    def _trusted(self, peer: str | None) -> bool:
        ip = peer_ip(peer)
        return ip is not None and any(ip in net for net in self.trusted_proxies)

    def identify(self, headers: Mapping[str, str], peer: str | None = None) -> tuple[str, str]:
        """Return ``(tenant_id, auth_method)``; raise InvalidArgument or Unauthenticated.

        ``peer`` is the TCP peer as ``"host:port"`` (connectrpc's ``ctx.client_address``,
        never taken from ``X-Forwarded-For``: see the module docstring)."""
        token = _bearer(headers)
        if self.keys is not None:
            if token is not None and token.startswith(KEY_PREFIX):
                tenant = self.keys.tenant_for_key(token)
                if tenant is None:
                    raise Unauthenticated("invalid or revoked API key")
                return tenant, API_KEY
            email = headers.get(PROXY_EMAIL_HEADER, "").strip()
            if email:
                if not self._trusted(peer):
                    raise Unauthenticated(
                        "X-Auth-Request-Email is accepted only from a trusted proxy")
                tenant = self.keys.tenant_for_email(email)
                if tenant is None:
                    raise Unauthenticated("this identity is not mapped to a tenant")
                return tenant, PROXY
            if token is not None:
                raise Unauthenticated("invalid or revoked API key")
        if not self.dev_mode:
            if self.keys is None:
                raise Unauthenticated("API keys are not configured")
            raise Unauthenticated("missing credentials: send Authorization: Bearer <API key>")
        tenant = headers.get(TENANT_HEADER, "").strip()
        if not tenant:
            raise InvalidArgument("missing X-Tenant-Id header")
        return validate_tenant(tenant), DEV_HEADER
