"""The web console at ``/ui/``: static files the gateway serves from this package.

The console is a small static app (``static/``: one HTML shell, hand-written ES modules,
one stylesheet, an icon) that calls the gateway's own Connect JSON endpoints from the
browser, with the same credentials as any client. It has no server-side logic: it never
sees a tenant, a key or a job here, so it cannot leak one (docs/console.md says why this
shape was chosen over server-rendered pages).

What this module does:

* ``/ui`` redirects to ``/ui/`` (keeping the query, e.g. ``?tenant=acme``);
* ``/ui/``, ``/ui/submit``, ``/ui/notifications`` and ``/ui/jobs/<id>`` serve the shell,
  whose script renders the page; any other path under ``/ui/`` serves the shell with
  404, and the script shows "page not found". Whether a job exists is only known to an
  authenticated RPC, so an unknown job (or another tenant's) is a "not found" the page
  shows, never a server error;
* ``/ui/static/<name>`` serves the files of ``static/``, read once at start-up into
  memory: a request can only name one of them (no filesystem path is ever built from a
  URL), each with its type, an ``ETag`` and ``Cache-Control: no-cache`` (the browser
  revalidates, so an upgraded gateway never runs a stale script against a new API).

Every answer carries a strict ``Content-Security-Policy``: scripts, styles and images only
from the gateway itself, no inline script, no plugins, no framing, no form submission.
The pages never turn data into HTML (they set ``textContent``), and the policy is the
second lock should one ever do so.

In dev mode the shell says so (``data-dev-mode="1"`` on ``<body>``), and the sign-in
prompt then also asks for a tenant, sent as ``X-Tenant-Id``.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources

from jennah.asgi import ASGIApp, Receive, Scope, Send

PREFIX = "/ui"
STATIC_PREFIX = f"{PREFIX}/static/"
SHELL = "index.html"
# The page routes the script knows how to render (static/app.js ``route``).
PAGES = re.compile(r"/ui/(?:|submit|notifications|jobs/[^/]+)")
DEV_MARKER = 'data-dev-mode="0"'

TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}

CSP = "; ".join((
    "default-src 'none'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self'",
    "connect-src 'self'",
    "base-uri 'none'",
    "form-action 'none'",
    "frame-ancestors 'none'",
))
SECURITY_HEADERS = (
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
)


@dataclass(frozen=True)
class Asset:
    body: bytes
    content_type: str
    etag: str

    @classmethod
    def of(cls, name: str, body: bytes) -> Asset:
        suffix = name[name.rfind("."):]
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        return cls(body, TYPES[suffix], etag)


def load_assets(dev_mode: bool) -> dict[str, Asset]:
    """Every file of ``static/`` by name, the shell marked for dev mode if need be.

    A file with a type not in ``TYPES`` stops start-up (KeyError): the package ships only
    what the console serves."""
    folder = resources.files(__package__) / "static"
    assets = {}
    for entry in folder.iterdir():
        if entry.is_file():
            assets[entry.name] = Asset.of(entry.name, entry.read_bytes())
    shell = assets[SHELL].body.decode()
    if shell.count(DEV_MARKER) != 1:
        raise RuntimeError(f"{SHELL} must carry {DEV_MARKER} exactly once")
    if dev_mode:
        shell = shell.replace(DEV_MARKER, 'data-dev-mode="1"')
        assets[SHELL] = Asset.of(SHELL, shell.encode())
    return assets


def _header(scope: Scope, name: bytes) -> bytes:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value)
    return b""


async def _respond(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]], *, head: bool
) -> None:
    """Send one answer; ``head`` (a HEAD request) keeps the headers and drops the body. A
    304 has no length: it describes the representation the browser already holds."""
    length = [] if status == 304 else [(b"content-length", str(len(body)).encode())]
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [*SECURITY_HEADERS, *headers, *length],
    })
    await send({"type": "http.response.body", "body": b"" if head else body})


class Console:
    """The ``/ui`` ASGI app; :meth:`mount` puts it in front of the rest of the gateway."""

    def __init__(self, *, dev_mode: bool) -> None:
        self.assets = load_assets(dev_mode)

    def mount(self, app: ASGIApp) -> ASGIApp:
        """``app`` with ``/ui`` and everything under ``/ui/`` answered by the console."""

        async def mounted(scope: Scope, receive: Receive, send: Send) -> None:
            path = scope.get("path", "") if scope["type"] == "http" else ""
            if path == PREFIX or path.startswith(PREFIX + "/"):
                await self(scope, receive, send)
            else:
                await app(scope, receive, send)

        return mounted

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = scope.get("method", "GET")
        head = method == "HEAD"
        path: str = scope["path"]
        if method not in ("GET", "HEAD"):
            await _respond(send, 405, b"method not allowed\n",
                           [(b"allow", b"GET, HEAD"), (b"content-type", TYPES[".html"].encode())],
                           head=head)
        elif path == PREFIX:
            query = scope.get("query_string", b"")
            location = PREFIX.encode() + b"/" + (b"?" + query if query else b"")
            await _respond(send, 308, b"", [(b"location", location)], head=head)
        elif path.startswith(STATIC_PREFIX):
            asset = self.assets.get(path.removeprefix(STATIC_PREFIX))
            if asset is None:
                await _respond(send, 404, b"not found\n",
                               [(b"content-type", b"text/plain; charset=utf-8")], head=head)
            else:
                await self._asset(scope, send, asset, 200, head=head)
        else:
            status = 200 if PAGES.fullmatch(path) else 404
            await self._asset(scope, send, self.assets[SHELL], status, head=head)

    async def _asset(self, scope: Scope, send: Send, asset: Asset, status: int, *,
                     head: bool) -> None:
        headers = [(b"content-type", asset.content_type.encode()),
                   (b"cache-control", b"no-cache"), (b"etag", asset.etag.encode())]
        if status == 200 and _header(scope, b"if-none-match") == asset.etag.encode():
            await _respond(send, 304, b"", headers, head=True)
        else:
            await _respond(send, status, asset.body, headers, head=head)
