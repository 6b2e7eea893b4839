"""Serve an ASGI app with the configured server (DESIGN §11 "Serving").

uvicorn (default) speaks Connect and gRPC-Web over HTTP/1.1; hypercorn adds gRPC over h2c.
On SIGTERM both stop accepting, let in-flight calls finish for ``grace`` seconds, then run
the app's lifespan shutdown (which flushes the WAL and releases leases).
"""

from __future__ import annotations

import asyncio
import signal

from jennah.asgi import ASGIApp


def serve(app: ASGIApp, *, host: str, port: int, server: str, grace: float) -> None:
    if server == "hypercorn":
        _serve_hypercorn(app, host=host, port=port, grace=grace)
        return
    import uvicorn

    uvicorn.run(
        app,
        host=host,
        port=port,
        lifespan="on",
        access_log=False,
        log_level="warning",
        # Our logging (jennah/logging.py, JSON in the images) is already configured:
        # without this uvicorn would install its own plain-text handlers beside it.
        log_config=None,
        timeout_graceful_shutdown=int(grace) if grace else None,
    )


def _serve_hypercorn(app: ASGIApp, *, host: str, port: int, grace: float) -> None:
    from hypercorn.asyncio import serve as hypercorn_serve
    from hypercorn.config import Config

    config = Config()
    config.bind = [f"{host}:{port}"]
    config.graceful_timeout = grace
    config.accesslog = None

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await hypercorn_serve(app, config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]

    asyncio.run(main())
