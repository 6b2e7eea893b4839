"""Proxy trust under every server (docs/design.md §8 "Proxy trust"), with real processes.

A client's address is the TCP peer, never ``X-Forwarded-For`` or ``Forwarded``: uvicorn
rewrote it from ``X-Forwarded-For`` sent from 127.0.0.1 (its default
``forwarded_allow_ips``) and Envoy (pyvoy) from anyone, so a caller on the gateway's host
could pose as a trusted proxy, and a same-host proxy appending ``X-Forwarded-For`` was
refused. commands/serve.py turns that rewriting off for every server.

For each server (uvicorn, hypercorn, and pyvoy when its extra is installed) two real
``jennah gateway`` processes run outside dev mode with a key file that maps
alice@example.com to ``acme`` (``jennah keys map``): one trusts only 10.9.9.9, the other
127.0.0.1. No worker is needed: ``GetCurrentTenant`` is answered by the gateway.
"""

from __future__ import annotations

import importlib.util
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from commands.serve import client_is_tcp_peer
from tests.gateway.test_auth import call_from, code_of, jennah_cli
from tests.helpers import free_port, start_jennah, stop, wait_http

pytestmark = pytest.mark.timeout(120)

SERVERS = [
    "uvicorn",
    "hypercorn",
    pytest.param("pyvoy", marks=pytest.mark.skipif(
        importlib.util.find_spec("pyvoy") is None, reason="the pyvoy extra is not installed")),
]
ALICE = {"X-Auth-Request-Email": "alice@example.com"}
ALICE_IS_ACME = (200, {"tenantId": "acme", "authMethod": "proxy"})


@dataclass
class Gateways:
    server: str
    trusts_other: int  # port of the gateway with JENNAH_TRUSTED_PROXIES=10.9.9.9
    trusts_loopback: int  # port of the gateway with JENNAH_TRUSTED_PROXIES=127.0.0.1


@pytest.fixture(scope="module", params=SERVERS)
def gateways(request: pytest.FixtureRequest,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateways]:
    server: str = request.param
    tmp = tmp_path_factory.mktemp(f"proxy-{server}")
    keys_file = tmp / "keys.json"
    mapped = jennah_cli("keys", "map", "alice@example.com", "--tenant", "acme",
                        keys_file=keys_file)
    assert mapped.returncode == 0, mapped.stderr
    common = {
        "JENNAH_SERVER": server, "JENNAH_DEV_MODE": "0", "HOST": "127.0.0.1",
        "JENNAH_WORKER_TOKEN": secrets.token_hex(8), "JENNAH_HOME": str(tmp),
        "JENNAH_API_KEYS_FILE": str(keys_file), "JENNAH_LOG_FORMAT": "text",
        "WORKER_ENDPOINTS": f"http://127.0.0.1:{free_port()}",  # nobody: not needed here
        "SHUTDOWN_GRACE_SECONDS": "1",
    }
    ports = {"10.9.9.9": free_port(), "127.0.0.1": free_port()}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for trusted, port in ports.items():
            procs.append(start_jennah("gateway", dict(
                common, GATEWAY_PORT=str(port), JENNAH_TRUSTED_PROXIES=trusted,
            ), tmp / f"gateway-{port}.log"))
        for proc, port in zip(procs, ports.values(), strict=True):
            wait_http(f"http://127.0.0.1:{port}/health", timeout=30, proc=proc)
        yield Gateways(server, ports["10.9.9.9"], ports["127.0.0.1"])
    finally:
        for proc in procs:
            stop(proc)


def whoami_from(source: str, port: int, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    return call_from(source, port, "GetCurrentTenant", {}, headers)


FORGED = [{"X-Forwarded-For": "10.9.9.9"}, {"Forwarded": "for=10.9.9.9"},
          {"X-Forwarded-For": "10.9.9.9", "Forwarded": "for=10.9.9.9"}]


@pytest.mark.parametrize("forged", FORGED, ids=["xff", "forwarded", "both"])
def test_a_forwarded_address_from_an_untrusted_peer_is_not_a_trusted_proxy(
    gateways: Gateways, forged: dict[str, str]
) -> None:
    # 127.0.0.1 is not trusted by this gateway; claiming 10.9.9.9 (trusted) changes nothing.
    assert code_of(whoami_from("127.0.0.1", gateways.trusts_other, {**ALICE, **forged})) \
        == (401, "unauthenticated")


@pytest.mark.parametrize("forwarded", [
    {"X-Forwarded-For": "203.0.113.5"},
    {"X-Forwarded-For": "198.51.100.7, 203.0.113.5"},
    {"Forwarded": "for=203.0.113.5"},
], ids=["xff", "xff-chain", "forwarded"])
def test_a_trusted_same_host_proxy_that_appends_x_forwarded_for_is_believed(
    gateways: Gateways, forwarded: dict[str, str]
) -> None:
    # nginx or Go's ReverseProxy on the gateway's host, appending the real client.
    assert whoami_from("127.0.0.1", gateways.trusts_loopback, {**ALICE, **forwarded}) \
        == ALICE_IS_ACME


def test_an_untrusted_peer_cannot_claim_the_trusted_loopback(gateways: Gateways) -> None:
    for header in ({"X-Forwarded-For": "127.0.0.1"}, {"Forwarded": "for=127.0.0.1"}):
        assert code_of(whoami_from("127.0.0.2", gateways.trusts_loopback, {**ALICE, **header})) \
            == (401, "unauthenticated"), header
    # The same gateway still believes the real loopback peer, with or without XFF.
    assert whoami_from("127.0.0.1", gateways.trusts_loopback, ALICE) == ALICE_IS_ACME


def test_client_is_tcp_peer_patches_every_connection_manager_or_refuses() -> None:
    pyvoy = pytest.importorskip("pyvoy")
    config = client_is_tcp_peer(pyvoy.PyvoyServer("m:app").get_envoy_config())
    managers = [f["typed_config"] for listener in config["static_resources"]["listeners"]
                for chain in listener["filter_chains"] for f in chain["filters"]
                if f["name"] == "envoy.filters.network.http_connection_manager"]
    assert managers and all(m["use_remote_address"] and m["skip_xff_append"]
                            for m in managers)
    with pytest.raises(RuntimeError, match="no HTTP connection manager"):
        client_is_tcp_peer({"static_resources": {"listeners": []}})
