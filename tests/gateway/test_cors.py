"""CORS at the gateway (``JENNAH_CORS_ORIGINS``, docs/design.md §11 "CORS"), over real HTTP.

A browser on a listed origin gets its Connect and gRPC-Web preflights answered and can
read the answer (and the headers we expose); any other origin gets no CORS grant; a
gateway without the setting answers no CORS at all, as before.
"""

from __future__ import annotations

import http.client
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry

from gateway.app import create_app
from jennah.errors import SettingsError
from jennah.settings import load_gateway_settings
from tests.helpers import ThreadServer

CONSOLE = "https://console.example.com"
ENV = {"JENNAH_DEV_MODE": "1", "WORKER_ENDPOINTS": "http://127.0.0.1:9"}
CURRENT_TENANT = "/jennah.v1.DeploymentService/GetCurrentTenant"


def _gateway(origins: str) -> ThreadServer:
    settings = load_gateway_settings({**ENV, "JENNAH_CORS_ORIGINS": origins})
    return ThreadServer(create_app(settings, registry=CollectorRegistry()))


@pytest.fixture(scope="module")
def cors_gateway() -> Iterator[ThreadServer]:
    with _gateway(f"{CONSOLE}, http://localhost:5173") as server:
        yield server


def _call(server: ThreadServer, method: str, path: str,
          headers: dict[str, str], body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request(method, path, body=body or None, headers=headers)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def _preflight(server: ThreadServer, origin: str, headers: str) -> tuple[int, dict[str, str]]:
    status, got, _ = _call(server, "OPTIONS", CURRENT_TENANT, {
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": headers})
    return status, got


@pytest.mark.parametrize("headers", [
    "content-type,connect-protocol-version,connect-timeout-ms,authorization",  # Connect
    "content-type,x-grpc-web,x-user-agent,grpc-timeout",  # gRPC-Web
    "authorization,last-event-id",  # SSE read with fetch, resumed
])  # fmt: skip
def test_a_listed_origin_gets_its_preflight_answered(
    cors_gateway: ThreadServer, headers: str
) -> None:
    status, got = _preflight(cors_gateway, CONSOLE, headers)
    assert status == 200
    assert got["access-control-allow-origin"] == CONSOLE
    assert "POST" in got["access-control-allow-methods"]
    allowed = {h.strip().lower() for h in got["access-control-allow-headers"].split(",")}
    assert set(headers.split(",")) <= allowed
    assert "access-control-allow-credentials" not in got  # keys travel in a header, not cookies


def test_another_origin_gets_no_grant(cors_gateway: ThreadServer) -> None:
    status, got = _preflight(cors_gateway, "https://evil.example.net", "content-type")
    assert status == 400
    assert "access-control-allow-origin" not in got
    # A simple request from it is served (CORS is the browser's rule) but not granted.
    status, got, _ = _call(cors_gateway, "POST", CURRENT_TENANT, {
        "Origin": "https://evil.example.net", "Content-Type": "application/json",
        "X-Tenant-Id": "acme"}, b"{}")
    assert status == 200 and "access-control-allow-origin" not in got


def test_a_listed_origin_can_read_the_answer_and_the_exposed_headers(
    cors_gateway: ThreadServer,
) -> None:
    status, got, body = _call(cors_gateway, "POST", CURRENT_TENANT, {
        "Origin": CONSOLE, "Content-Type": "application/json", "X-Tenant-Id": "acme"}, b"{}")
    assert status == 200 and b'"tenantId":"acme"' in body
    assert got["access-control-allow-origin"] == CONSOLE
    exposed = {h.strip().lower() for h in got["access-control-expose-headers"].split(",")}
    assert {"grpc-status", "grpc-message", "retry-after"} <= exposed


def test_no_setting_means_no_cors_at_all() -> None:
    with _gateway("") as server:
        status, got = _preflight(server, CONSOLE, "content-type")
        assert "access-control-allow-origin" not in got
        assert status != 200


@pytest.mark.parametrize("bad", ["*", "console.example.com", "https://x.example.com/path",
                                 "ftp://x.example.com"])
def test_an_origin_that_is_not_one_stops_start_up(bad: str) -> None:
    with pytest.raises(SettingsError, match="JENNAH_CORS_ORIGINS"):
        load_gateway_settings({**ENV, "JENNAH_CORS_ORIGINS": f"{CONSOLE},{bad}"})
