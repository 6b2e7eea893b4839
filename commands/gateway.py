"""``jennah gateway``: load settings, build the gateway, serve it.

The app is served by import string (:data:`APP`), as every server loads it
(``commands/serve.py``); :func:`build` is what that import runs.
"""

from __future__ import annotations

import os
import sys

from commands.serve import for_server, serve
from database import STORES
from jennah.asgi import ASGIApp
from jennah.errors import SettingsError
from jennah.logging import configure_logging
from jennah.settings import GatewaySettings, load_gateway_settings
from jennah.tracing import configure_tracing

APP = "commands.gateway_app:app"


def build(settings: GatewaySettings) -> ASGIApp:
    """The gateway app for ``settings``, with this process's logging and tracing set up."""
    from prometheus_client import REGISTRY

    from gateway.app import create_app

    configure_logging("gateway")  # JENNAH_LOG_FORMAT=json|text (jennah/logging.py)
    configure_tracing("gateway", os.environ)  # only if OTLP/console is configured
    return for_server(create_app(settings, registry=REGISTRY), settings.server)


def main() -> int:
    try:
        settings = load_gateway_settings(stores=STORES)
        serve(APP, host=settings.host, port=settings.port, server=settings.server,
              grace=settings.shutdown_grace_seconds)
    except SettingsError as exc:
        print(f"jennah gateway: {exc}", file=sys.stderr)
        return 2
    return 0
