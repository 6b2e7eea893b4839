"""The web console's HTTP side: what the gateway serves under ``/ui`` (gateway/console/).

A real gateway (``create_app``) on 127.0.0.1, no workers: the console's files need none.
What the pages do in a browser is ``tests/gateway/test_console_browser.py``.
"""

from __future__ import annotations

import fnmatch
import http.client
import re
import signal
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import commands.dev
from gateway.console import CSP, Console
from tests.gateway.test_gateway_app import Gateway, settings_for
from tests.helpers import REPO

STATIC = REPO / "gateway" / "console" / "static"
PAGES = ["/ui/", "/ui/submit", "/ui/notifications", "/ui/jobs/4f0c-job", "/ui/jobs/%3Cb%3E"]


@pytest.fixture(scope="module")
def gateway() -> Iterator[Gateway]:
    gw = Gateway(settings_for([]))
    yield gw
    gw.stop()


def fetch(gw: Gateway, path: str, method: str = "GET", headers: dict[str, str] | None = None,
          body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    """One raw request (no redirect following, the path sent exactly as given)."""
    conn = http.client.HTTPConnection("127.0.0.1", gw.server.port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def test_every_page_route_serves_the_shell_under_a_strict_policy(gateway: Gateway) -> None:
    for path in PAGES:
        status, headers, body = fetch(gateway, path)
        assert status == 200, path
        assert headers["content-type"] == "text/html; charset=utf-8"
        assert b'<script type="module" src="/ui/static/app.js"></script>' in body
        assert b'data-dev-mode="1"' in body  # settings_for is dev mode
        assert headers["content-security-policy"] == CSP
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["x-frame-options"] == "DENY"
    policy = dict(p.split(" ", 1) for p in CSP.split("; "))
    assert policy["script-src"] == "'self'" and policy["default-src"] == "'none'"
    assert "unsafe" not in CSP


def test_the_shell_says_when_the_gateway_is_not_in_dev_mode() -> None:
    gw = Gateway(settings_for([], dev_mode=False))
    try:
        body = fetch(gw, "/ui/")[2]
        assert b'data-dev-mode="0"' in body and b'data-dev-mode="1"' not in body
    finally:
        gw.stop()


def test_ui_redirects_to_the_console_keeping_the_query(gateway: Gateway) -> None:
    status, headers, _ = fetch(gateway, "/ui?tenant=acme")
    assert (status, headers["location"]) == (308, "/ui/?tenant=acme")
    assert fetch(gateway, "/ui")[1]["location"] == "/ui/"


def test_unknown_paths_are_404_and_never_reach_the_filesystem(gateway: Gateway) -> None:
    for path in ["/ui/nope", "/ui/jobs/a/b", "/ui/jobs/"]:
        status, headers, body = fetch(gateway, path)
        assert status == 404, path
        assert b"/ui/static/app.js" in body  # the shell: its script says "page not found"
        assert "content-security-policy" in headers
    for path in ["/ui/static/nope.js", "/ui/static/../__init__.py", "/ui/static/%2e%2e/__init__.py",
                 "/ui/static/..%2F__init__.py", "/ui/static/", "/ui/static//etc/passwd"]:
        status, _, body = fetch(gateway, path)
        assert status == 404, path
        assert b"import" not in body and b"root:" not in body


def test_assets_are_served_with_their_types_and_revalidated(gateway: Gateway) -> None:
    types = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
             ".svg": "image/svg+xml", ".html": "text/html; charset=utf-8"}
    names = sorted(p.name for p in STATIC.iterdir())
    assert {"app.js", "api.js", "style.css", "index.html", "favicon.svg"} <= set(names)
    for name in names:
        status, headers, body = fetch(gateway, f"/ui/static/{name}")
        assert status == 200, name
        assert headers["content-type"] == types[Path(name).suffix]
        assert headers["cache-control"] == "no-cache"
        if name != "index.html":  # the served shell is marked for dev mode
            assert body == (STATIC / name).read_bytes()
        again = fetch(gateway, f"/ui/static/{name}", headers={"If-None-Match": headers["etag"]})
        assert (again[0], again[2]) == (304, b"")
        head = fetch(gateway, f"/ui/static/{name}", "HEAD")
        assert (head[0], head[2], head[1]["content-length"]) == (200, b"", str(len(body)))
    stale = fetch(gateway, "/ui/static/app.js", headers={"If-None-Match": '"stale"'})
    assert stale[0] == 200 and stale[2]


def test_only_get_and_head(gateway: Gateway) -> None:
    status, headers, _ = fetch(gateway, "/ui/", "POST")
    assert (status, headers["allow"]) == (405, "GET, HEAD")


def test_the_rest_of_the_gateway_is_untouched(gateway: Gateway) -> None:
    assert fetch(gateway, "/health")[:3:2] == (200, b"ok\n")
    status, headers, _ = fetch(gateway, "/uifoo")
    assert status != 200 and "content-security-policy" not in headers
    status, headers, body = fetch(
        gateway, "/jennah.v1.DeploymentService/GetCurrentTenant", "POST",
        {"Content-Type": "application/json", "X-Tenant-Id": "acme"}, b"{}")
    assert status == 200 and b'"tenantId":"acme"' in body.replace(b" ", b"")


def _texts() -> dict[str, str]:
    return {p.name: p.read_text() for p in STATIC.iterdir()}


def test_nothing_is_fetched_from_anywhere_but_the_gateway() -> None:
    """No CDN: no absolute URL in any file (an SVG's XML namespace is a name, not a
    fetch), and every file a page refers to is one the gateway serves."""
    served = set(_texts())
    for name, text in _texts().items():
        urls = re.findall(r"(?:https?:)?//[\w.-]+\.[a-z]{2,}[^\s\"')]*", text)
        assert [u for u in urls if u != "http://www.w3.org/2000/svg"] == [], name
        refs = re.findall(r"/ui/static/([\w.-]+)", text)
        refs += re.findall(r"""from\s+["']\./([\w.-]+)["']""", text)
        refs += re.findall(r"""url\(["']?([\w.-]+)["']?\)""", text)
        assert set(refs) <= served, (name, set(refs) - served)


def test_no_script_turns_data_into_markup() -> None:
    """The pages build the DOM from text nodes; a script that parses HTML (or code) from
    strings would put every job name, label and output line one bug away from XSS."""
    sinks = re.compile(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|\beval\(|"
                       r"new Function|setTimeout\(\s*[\"'`]|createContextualFragment|srcdoc")
    for name, text in _texts().items():
        if name.endswith(".js"):
            assert sinks.findall(text) == [], name


def test_the_wheel_ships_every_console_file() -> None:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    globs = config["tool"]["setuptools"]["package-data"]["gateway"]
    for path in STATIC.iterdir():
        relative = path.relative_to(REPO / "gateway").as_posix()
        assert any(fnmatch.fnmatch(relative, g) for g in globs), relative
    # What is shipped is what is served: every file, by the console itself.
    assert set(Console(dev_mode=False).assets) == {p.name for p in STATIC.iterdir()}


def test_jennah_dev_prints_the_console_url(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """``jennah dev`` (``make run``) names the console once everything is up. The
    processes are stand-ins that report healthy, then exit (which ends the run)."""

    class Exited:
        returncode = 0

        def __init__(self, *args: Any, **kwargs: Any) -> None: ...
        def poll(self) -> int:
            return 0

        def wait(self, timeout: float | None = None) -> int:
            return 0

    monkeypatch.setenv("JENNAH_HOME", str(tmp_path))
    monkeypatch.setattr(subprocess, "Popen", Exited)
    monkeypatch.setattr(commands.dev, "_wait_healthy", lambda *a: True)
    monkeypatch.setattr(signal, "signal", lambda *a: signal.SIG_DFL)
    commands.dev.run_dev(workers=1, port=18080)
    assert "console on http://127.0.0.1:18080/ui/?tenant=acme" in capsys.readouterr().out
