"""Serve an ASGI app with the configured server (docs/design.md §11 "Serving").

uvicorn (default) speaks Connect and gRPC-Web over HTTP/1.1; hypercorn adds gRPC over h2c.
On SIGTERM both stop accepting, let in-flight calls finish for ``grace`` seconds, then run
the app's lifespan shutdown (which flushes the WAL and releases leases).

**pyvoy** (``JENNAH_SERVER=pyvoy``, the optional ``pyvoy`` extra) serves HTTP/1.1 and h2c,
so Connect, gRPC-Web and gRPC, from Envoy with the app embedded in it. How it differs:

* pyvoy runs Envoy as a **child process** that embeds Python and imports the app by an
  import string (``module:attr``); an app object built in this process cannot be handed
  over. The app is therefore built again *inside* Envoy, from the same environment, by
  the attribute ``jennah.serve:worker_app`` or ``jennah.serve:gateway_app`` (the module
  ``__getattr__`` below builds it on first access, exactly as ``worker/main.py`` and
  ``gateway/main.py`` do: settings, logging, tracing, ``create_app``). Which one is
  taken from the ``role`` argument, or else from the calling module (``worker.main`` or
  ``gateway.main``). The app object this process built is not served; building it is
  cheap and does no I/O (stores connect lazily; the WAL opens in the lifespan).
* Envoy's embedded interpreter runs the ASGI **lifespan** (checked: startup before the
  listener answers, shutdown when Envoy gets SIGTERM), so the worker's loops start and
  its leases are released exactly as under uvicorn. Envoy's stderr is inherited, so the
  app's log lines land in the same stream as ours.
* This process stays the parent and owns the signals. On SIGTERM/SIGINT it drains: the
  Envoy admin endpoint ``POST /drain_listeners`` closes the listener (new connections are
  refused, open ones finish), then it waits up to ``grace`` seconds for
  ``http.ingress_http.downstream_rq_active`` to reach 0, then sends Envoy SIGTERM, which
  runs the lifespan shutdown, and waits for Envoy to exit (bounded: ``grace`` + 10 s, then
  SIGKILL). The admin address comes from ``PyvoyServer._admin_address`` (pyvoy 1.3 has no
  public accessor); without it the drain step is skipped. Exit status: 0 after a
  requested stop, 1 if Envoy fails to start (e.g. the lifespan startup failed) or exits
  on its own.
* Known pyvoy 1.3 wart: when a handler returns, connectrpc cancels its disconnect
  watcher, which is parked in ``receive()``; pyvoy later completes that cancelled future
  and asyncio logs ``InvalidStateError`` at ERROR ("Exception in callback
  <_pyvoy.asgi.RecvFutureExecutor ...>"). The response is already sent and nothing is
  lost, so :class:`_PyvoyCancelledRecvFilter` drops exactly that record (same exception
  type, same callback class) rather than let it page anyone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
import urllib.request
from collections.abc import Callable
from typing import Any

from jennah.asgi import ASGIApp

log = logging.getLogger("jennah.serve")

# The apps pyvoy can build inside Envoy, by role; the calling module that implies each.
PYVOY_ROLES = ("worker", "gateway")
_ROLE_OF_CALLER = {"worker.main": "worker", "gateway.main": "gateway"}


def serve(
    app: ASGIApp, *, host: str, port: int, server: str, grace: float, role: str | None = None
) -> None:
    if server == "hypercorn":
        _serve_hypercorn(app, host=host, port=port, grace=grace)
        return
    if server == "pyvoy":
        caller = sys._getframe(1).f_globals.get("__name__", "")
        _serve_pyvoy(role or _ROLE_OF_CALLER.get(caller, ""), host=host, port=port,
                     grace=grace)
        return
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            _run_stop_hooks()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
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
    Server(config).run()


# Called once when SIGTERM/SIGINT arrives, *before* the server drains its in-flight calls:
# a worker uses it to hand its leases over at once instead of after the drain. Hooks run
# in the signal handler: they must only schedule work (``loop.call_soon_threadsafe``).
_STOP_HOOKS: list[Callable[[], None]] = []
_stop_hooks_ran = False


def on_stop_signal(hook: Callable[[], None]) -> None:
    """Run ``hook`` (once) when the process is asked to stop (uvicorn and hypercorn; under
    pyvoy the app lives in Envoy, which hears of the stop only after the drain)."""
    _STOP_HOOKS.append(hook)


def _run_stop_hooks() -> None:
    global _stop_hooks_ran
    if _stop_hooks_ran:
        return
    _stop_hooks_ran = True
    for hook in list(_STOP_HOOKS):
        try:
            hook()
        except Exception:  # a hook must never stop the shutdown itself
            log.exception("stop hook failed")


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
        def stopping() -> None:
            _run_stop_hooks()
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping)
        await hypercorn_serve(app, config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]

    asyncio.run(main())


# --- pyvoy -----------------------------------------------------------------------------

_built: dict[str, ASGIApp] = {}


def __getattr__(name: str) -> Any:
    """``worker_app`` / ``gateway_app``: the app, built once, for pyvoy to import."""
    role = name.removesuffix("_app")
    if name.endswith("_app") and role in PYVOY_ROLES:
        if role not in _built:
            _built[role] = _build(role)
        return _built[role]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _PyvoyCancelledRecvFilter(logging.Filter):
    """Drop asyncio's report of pyvoy completing an already-cancelled ``receive()``."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (isinstance(exc, asyncio.InvalidStateError)
                    and "_pyvoy.asgi.RecvFutureExecutor" in record.getMessage())


def _build(role: str) -> ASGIApp:
    """Build the role's app from the environment, as its ``main`` does (inside Envoy)."""
    from jennah.logging import configure_logging
    from jennah.tracing import configure_tracing

    logging.getLogger("asyncio").addFilter(_PyvoyCancelledRecvFilter())

    if role == "worker":
        from jennah.settings import load_worker_settings
        from worker.app import create_app

        settings = load_worker_settings()
        configure_logging("worker", worker_id=settings.worker_id)
        configure_tracing("worker", os.environ)
        return create_app(settings)
    from prometheus_client import REGISTRY

    from gateway.app import create_app as create_gateway
    from jennah.settings import load_gateway_settings

    gateway_settings = load_gateway_settings()
    configure_logging("gateway")
    configure_tracing("gateway", os.environ)
    return create_gateway(gateway_settings, registry=REGISTRY)


def _admin(address: str, path: str, method: str = "GET") -> str:
    req = urllib.request.Request(f"http://{address}{path}", method=method)
    with urllib.request.urlopen(req, timeout=2) as resp:
        body: bytes = resp.read()
    return body.decode()


def _active_requests(address: str) -> int:
    text = _admin(address, "/stats?filter=^http%5C.ingress_http%5C.downstream_rq_active$")
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "http.ingress_http.downstream_rq_active":
            return int(value)
    return 0


async def _drain(admin: str | None, grace: float) -> None:
    """Close the listener, then wait (at most ``grace``) for in-flight requests."""
    if not admin:
        return
    deadline = time.monotonic() + grace
    try:
        await asyncio.to_thread(_admin, admin, "/drain_listeners", "POST")
        while time.monotonic() < deadline:
            if await asyncio.to_thread(_active_requests, admin) == 0:
                return
            await asyncio.sleep(0.05)
        log.warning("shutdown: requests still in flight after %.1f s grace", grace)
    except OSError as exc:
        log.warning("shutdown: could not drain Envoy: %s", exc)


def _serve_pyvoy(role: str, *, host: str, port: int, grace: float) -> None:
    if role not in PYVOY_ROLES:
        raise SystemExit(
            "JENNAH_SERVER=pyvoy serves only `jennah worker` and `jennah gateway` "
            "(pyvoy imports the app in its own process)"
        )
    try:
        from pyvoy import PyvoyServer, StartupError
    except ImportError:
        raise SystemExit(
            "JENNAH_SERVER=pyvoy needs the pyvoy extra: pip install 'jennah[pyvoy]'"
        ) from None

    async def main() -> int:
        server = PyvoyServer(
            f"{__name__}:{role}_app", address=host, port=port, lifespan=True,
            stdout=None, stderr=None,  # inherit: the app logs to our stderr
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await server.start()
        except StartupError as exc:
            log.error("pyvoy: Envoy failed to start: %s", exc)
            return 1
        log.info("pyvoy: serving %s on %s:%d", role, server.listener_address,
                 server.listener_port)
        exited = asyncio.ensure_future(server.wait())
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait({exited, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not stop.is_set():
            stopping.cancel()
            log.error("pyvoy: Envoy exited on its own with status %s", exited.result())
            return 1
        await _drain(getattr(server, "_admin_address", None), grace)
        try:  # SIGTERM to Envoy: it runs the lifespan shutdown, then exits
            await asyncio.wait_for(server.stop(), timeout=grace + 10)
        except TimeoutError:
            log.error("pyvoy: Envoy did not exit within %.0f s; killing it", grace + 10)
            process = getattr(server, "_process", None)
            with contextlib.suppress(ProcessLookupError, AttributeError):
                process.kill()  # type: ignore[union-attr]
            return 1
        return 0

    code = asyncio.run(main())
    if code:
        raise SystemExit(code)
