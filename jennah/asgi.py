"""A tiny ASGI router: the Connect app, with ``/health``, ``/ready`` and ``/metrics`` beside it.

Those three paths need no token or key (DESIGN §11). Lifespan events go to the Connect
app, which drives the service's async-generator lifecycle (start-up and shutdown).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import CollectorRegistry, make_asgi_app

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
# A readiness probe returns (ok, detail).
Probe = Callable[[], Awaitable[tuple[bool, str]]]


async def send_text(send: Send, status: int, body: str, content_type: str = "text/plain") -> None:
    data = body.encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", f"{content_type}; charset=utf-8".encode()),
                (b"content-length", str(len(data)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})


def compose(
    rpc_app: ASGIApp,
    *,
    ready: Probe,
    registry: CollectorRegistry | None = None,
    info: Callable[[], dict[str, Any]] | None = None,
) -> ASGIApp:
    """Route ``/health`` (liveness: the process serves), ``/ready`` (the probe, 503 when
    not ready), ``/metrics`` (Prometheus) and everything else to ``rpc_app``."""
    metrics_app: ASGIApp = make_asgi_app(registry) if registry else make_asgi_app()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await rpc_app(scope, receive, send)
            return
        path = scope["path"]
        if path == "/health":
            await send_text(send, 200, "ok\n")
        elif path == "/ready":
            ok, detail = await ready()
            word = "ready" if ok else "not ready"
            await send_text(send, 200 if ok else 503, f"{word}: {detail}\n")
        elif path == "/metrics":
            await metrics_app(scope, receive, send)
        elif path == "/info" and info is not None:
            await send_text(send, 200, json.dumps(info()), "application/json")
        else:
            await rpc_app(scope, receive, send)

    return app
