"""Serve an ASGI app, named by import string, with the configured server (docs/design.md §11
"Serving").

uvicorn (default) speaks Connect and gRPC-Web over HTTP/1.1; hypercorn adds gRPC over h2c.
On SIGTERM both stop accepting, let in-flight calls finish for ``grace`` seconds, then run
the app's lifespan shutdown (which flushes the WAL and releases leases).

**pyvoy** (``JENNAH_SERVER=pyvoy``, the optional ``pyvoy`` extra) serves HTTP/1.1 and h2c,
so Connect, gRPC-Web and gRPC, from Envoy with the app embedded in it. How it differs:

* pyvoy runs Envoy as a **child process** that embeds Python and imports the app by an
  import string (``module:attr``); an app object built in this process cannot be handed
  over. So every server is given the app the same way, by an ordinary import string:
  ``commands.worker_app:app`` or ``commands.gateway_app:app``, modules that build the app
  from the environment when imported (settings, logging, tracing, ``create_app``). uvicorn
  imports it in this process; Envoy imports it inside itself, from the same environment.
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
* pyvoy 1.3 wart (read in its source, reproduced): once the request body has ended, its
  ``receive()`` answers ``http.request`` (empty, ``more_body=False``) again and again at
  once, instead of waiting for ``http.disconnect``, which comes only when the stream is
  over (response sent, client gone). connectrpc watches for a disconnect with ``while
  not disconnected: await receive()`` as soon as a handler suspends. A request that
  ended with its headers (no body: an empty binary message such as ``ListJobs({})`` in
  ``application/proto``, i.e. ``Content-Length: 0``, or h2 HEADERS with END_STREAM) gets
  a ``receive()`` whose awaitable completes *without suspending*: the watch never yields,
  the one event loop inside Envoy is stuck, and that call and every other one hang until
  the clients' deadlines (a gateway then marks its workers down). With a body each turn
  goes through Envoy: no hang, but a busy loop per call in flight.
  :class:`_ReceiveWaitsAfterBody` wraps the app under pyvoy: after the body, its
  ``receive()`` polls pyvoy's every :data:`DISCONNECT_POLL_SECONDS` and returns only
  ``http.disconnect``, as the ASGI spec asks of a server, so a client that leaves is
  noticed within that interval. It also orders the stop (its docstring): calls still in
  flight when the lifespan shutdown arrives are ended before the app shuts down.

**Client addresses.** ``scope["client"]`` (connectrpc's ``ctx.client_address``) is what
:mod:`gateway.auth` matches against ``JENNAH_TRUSTED_PROXIES``, so it must be the TCP
peer, never something a client wrote (docs/design.md §8 "Proxy trust"). No server may
rewrite it from ``X-Forwarded-For`` or ``Forwarded``:

* uvicorn does by default (``proxy_headers=True``, trusting ``FORWARDED_ALLOW_IPS``,
  default 127.0.0.1): anyone on the gateway's host could claim a trusted proxy's address,
  and a same-host proxy that appends ``X-Forwarded-For`` lost its own address. We pass
  ``proxy_headers=False``.
* hypercorn takes the client from ``getpeername()``; its ``ProxyFixMiddleware`` is
  opt-in and we do not use it.
* Envoy (pyvoy) with its default ``use_remote_address: false`` takes the *last*
  ``X-Forwarded-For`` entry as the downstream address, and pyvoy reports that as
  ``scope["client"]`` (checked: ``("10.9.9.9", 0)``). :func:`client_is_tcp_peer` sets
  ``use_remote_address: true`` (the connection's address) with ``skip_xff_append: true``
  (the app sees the headers the client sent, as under the other two servers) on every
  HTTP connection manager of the config pyvoy generates, and refuses to start if it
  finds none.

None of the three writes an access log here (uvicorn ``access_log=False``, hypercorn
``accesslog=None``, pyvoy configures none) and no log line of ours carries a client
address.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import signal
import sys
import time
import urllib.request
from collections.abc import Callable
from typing import Any, Protocol

from jennah.asgi import ASGIApp, Receive, Scope, Send
from jennah.blocking import blocking
from jennah.errors import SettingsError
from jennah.lifecycle import run_stop_hooks

log = logging.getLogger("jennah.serve")


class ServedSettings(Protocol):
    """What serving needs of a role's settings (``WorkerSettings``, ``GatewaySettings``)."""

    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def server(self) -> str: ...
    @property
    def shutdown_grace_seconds(self) -> float: ...


def main_of(role: str, target: str, load: Callable[[], ServedSettings]) -> int:
    """A role's main: ``load`` its settings, serve ``target`` until stopped. A settings
    problem (from loading or from building the app) is one line on stderr, exit 2."""
    try:
        settings = load()
        serve(target, host=settings.host, port=settings.port, server=settings.server,
              grace=settings.shutdown_grace_seconds)
    except SettingsError as exc:
        print(f"jennah {role}: {exc}", file=sys.stderr)
        return 2
    return 0


def serve(target: str, *, host: str, port: int, server: str, grace: float) -> None:
    """Serve the app at import string ``target`` (``module:attr``) until SIGTERM/SIGINT.

    ``target`` is imported here first, under every server, so that an error building the
    app (a ``SettingsError``) reaches the caller before anything listens: uvicorn then
    finds the module already imported, and under pyvoy the app Envoy builds from the same
    environment will build too."""
    app = import_app(target)
    if server == "hypercorn":
        _serve_hypercorn(app, host=host, port=port, grace=grace)
        return
    if server == "pyvoy":
        _serve_pyvoy(target, host=host, port=port, grace=grace)
        return
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            run_stop_hooks()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        target,
        host=host,
        port=port,
        lifespan="on",
        access_log=False,
        log_level="warning",
        # Our logging (jennah/logging.py, JSON in the images) is already configured:
        # without this uvicorn would install its own plain-text handlers beside it.
        log_config=None,
        # The client address is the TCP peer, never X-Forwarded-For (module docstring).
        proxy_headers=False,
        timeout_graceful_shutdown=int(grace) if grace else None,
    )
    Server(config).run()


def import_app(target: str) -> ASGIApp:
    """The object at import string ``module:attr`` (importing the module builds it)."""
    module_name, _, attr = target.partition(":")
    app: ASGIApp = getattr(importlib.import_module(module_name), attr)
    return app


def for_server(app: ASGIApp, server: str) -> ASGIApp:
    """``app`` as ``server`` needs it: under pyvoy, wrapped in :class:`_ReceiveWaitsAfterBody`
    with pyvoy's cancelled-receive report filtered (module docstring); else unchanged."""
    if server != "pyvoy":
        return app
    logging.getLogger("asyncio").addFilter(_PyvoyCancelledRecvFilter())
    return _ReceiveWaitsAfterBody(app)


def _serve_hypercorn(app: ASGIApp, *, host: str, port: int, grace: float) -> None:
    from hypercorn.asyncio import serve as hypercorn_serve
    from hypercorn.config import Config

    config = Config()
    config.bind = [f"{host}:{port}"]
    config.graceful_timeout = grace
    config.accesslog = None  # no ProxyFixMiddleware either: the client is the TCP peer
    # hypercorn's own lines go through our logging (JSON in the images), not a plain-text
    # stderr handler of its own.
    config.errorlog = logging.getLogger("hypercorn.error")

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        def stopping() -> None:
            run_stop_hooks()
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping)
        await hypercorn_serve(app, config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]

    asyncio.run(main())


# --- pyvoy -----------------------------------------------------------------------------

class _PyvoyCancelledRecvFilter(logging.Filter):
    """Drop asyncio's report of pyvoy completing an already-cancelled ``receive()``."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (isinstance(exc, asyncio.InvalidStateError)
                    and "_pyvoy.asgi.RecvFutureExecutor" in record.getMessage())


# How often, once the request body has ended, pyvoy is asked whether the client is gone.
DISCONNECT_POLL_SECONDS = 0.5
# At the lifespan shutdown, how long the calls still in flight get to end first.
CALLS_END_SECONDS = 2.0


class _ReceiveWaitsAfterBody:
    """ASGI middleware for pyvoy: after the request body, ``receive()`` waits for
    ``http.disconnect`` instead of repeating the end of the body (module docstring).

    The stop needs care. Envoy resets the streams still open (a follow-watch that
    outlived the drain) as it exits, and then runs the lifespan shutdown on pyvoy's
    executor thread, the same thread that would answer a ``receive()`` on a reset stream:
    a poll made then waits until the app has shut down, and the call is torn down with
    the event loop, mid-generator (asyncio logs "aclose(): asynchronous generator is
    already running"). So at ``lifespan.shutdown`` every polling ``receive()`` returns
    ``http.disconnect`` without asking pyvoy (connectrpc then cancels the handler), and
    the shutdown reaches the app once those calls are done, or after
    :data:`CALLS_END_SECONDS`, as uvicorn and hypercorn end their calls before it too.
    One event loop serves the lifespan and the calls (pyvoy's default, one worker thread).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._stopping = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._calls = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, self._lifespan_receive(receive), send)
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self._calls += 1
        self._idle.clear()
        try:
            await self.app(scope, self._http_receive(receive), send)
        finally:
            self._calls -= 1
            if not self._calls:
                self._idle.set()

    def _http_receive(self, receive: Receive) -> Receive:
        body_ended = False

        async def receive_until_disconnect() -> dict[str, Any]:
            nonlocal body_ended
            if not body_ended:
                message = await receive()
                body_ended = message["type"] != "http.request" or not message.get(
                    "more_body", False)
                return message
            # pyvoy answers the end of the body again, maybe without suspending: poll.
            while not self._stopping.is_set():
                message = await receive()
                if message["type"] != "http.request":
                    return message
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), DISCONNECT_POLL_SECONDS)
            # Stopping: not pyvoy's receive() any more, whose answer to a stream Envoy has
            # reset now waits for the thread that is busy running the lifespan shutdown.
            return {"type": "http.disconnect"}

        return receive_until_disconnect

    def _lifespan_receive(self, receive: Receive) -> Receive:
        async def receive_after_calls_end() -> dict[str, Any]:
            message = await receive()
            if message["type"] == "lifespan.shutdown":
                self._stopping.set()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._idle.wait(), CALLS_END_SECONDS)
            return message

        return receive_after_calls_end


def client_is_tcp_peer(config: dict[str, Any]) -> dict[str, Any]:
    """Make every HTTP connection manager in a pyvoy Envoy config report the TCP peer as
    the client, whatever ``X-Forwarded-For`` says (module docstring). In place; returns it."""
    managers = [
        f["typed_config"]
        for listener in config.get("static_resources", {}).get("listeners", [])
        for chain in listener.get("filter_chains", [])
        for f in chain.get("filters", [])
        if f.get("name") == "envoy.filters.network.http_connection_manager"
    ]
    if not managers:  # pyvoy changed its config: refuse rather than trust X-Forwarded-For
        raise RuntimeError("pyvoy: no HTTP connection manager found in the Envoy config")
    for manager in managers:
        manager["use_remote_address"] = True
        manager["skip_xff_append"] = True
    return config


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
        await blocking(_admin, admin, "/drain_listeners", "POST")
        while time.monotonic() < deadline:
            if await blocking(_active_requests, admin) == 0:
                return
            await asyncio.sleep(0.05)
        log.warning("shutdown: requests still in flight after %.1f s grace", grace)
    except OSError as exc:
        log.warning("shutdown: could not drain Envoy: %s", exc)


def _serve_pyvoy(target: str, *, host: str, port: int, grace: float) -> None:
    try:
        from pyvoy import PyvoyServer, StartupError
    except ImportError:
        raise SystemExit(
            "JENNAH_SERVER=pyvoy needs the pyvoy extra: pip install 'jennah[pyvoy]'"
        ) from None

    class Server(PyvoyServer):
        def get_envoy_config(self) -> dict[str, Any]:
            return client_is_tcp_peer(super().get_envoy_config())

    async def main() -> int:
        server = Server(
            target, address=host, port=port, lifespan=True,
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
        log.info("pyvoy: serving %s on %s:%d", target, server.listener_address,
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
