"""The nudge: "I released leases, claim now" between workers (docs/design.md §5).

A worker that hands its leases over ``POST``s ``/internal/claim`` to its live peers
(:func:`nudge_peers`); a peer's :func:`nudge_handler` wakes its claim loop. The nudge
carries no data and grants nothing, so a lost or forged one costs one extra claim query
at most, and without it released leases are still claimed at the peers' next claim tick.
Outside dev mode it needs the worker token, checked exactly as for the RPCs
(``CallerAuth.check_token``, ``worker/auth.py``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

from pyqwest import Client

from jennah.asgi import Receive, Scope, Send, send_text
from jennah.errors import Unauthenticated
from jennah.rpc import WORKER_TOKEN_HEADER
from worker.auth import CallerAuth

log = logging.getLogger("jennah.worker.nudge")

NUDGE_PATH = "/internal/claim"
NUDGE_TIMEOUT_SECONDS = 0.5
_TOKEN_HEADER = WORKER_TOKEN_HEADER.lower().encode("latin-1")


async def nudge_peers(
    peers: Sequence[str], token: str, *, client: Client | None = None,
    timeout: float = NUDGE_TIMEOUT_SECONDS,
) -> int:
    """POST ``/internal/claim`` to each peer concurrently; return how many answered 204."""
    client = client or Client()
    headers = {WORKER_TOKEN_HEADER: token} if token else {}

    async def one(url: str) -> bool:
        try:
            async with asyncio.timeout(timeout):
                resp = await client.post(f"{url}{NUDGE_PATH}", headers, b"")
        except Exception as exc:  # a peer that is down or slow simply claims at its tick
            log.debug("nudge of %s failed: %s", url, exc)
            return False
        return resp.status == 204

    return sum(await asyncio.gather(*(one(url) for url in peers)))


def nudge_handler(
    wake: Callable[[], None], auth: CallerAuth
) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """The ASGI endpoint for ``POST /internal/claim``: with the worker token (or in dev
    mode), it calls ``wake`` (``LeaseKeeper.wake``) and answers 204."""

    async def handle(scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("method") != "POST":
            await send_text(send, 405, "method not allowed\n")
            return
        presented = b""
        for name, value in scope.get("headers", []):
            if name.lower() == _TOKEN_HEADER:
                presented = value
        try:
            auth.check_token(presented)
        except Unauthenticated:
            await send_text(send, 401, "missing or invalid worker token\n")
            return
        wake()
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    return handle
