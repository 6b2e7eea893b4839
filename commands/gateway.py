"""``jennah gateway``: load settings, build the gateway, serve it.

The app is served by import string (:data:`APP`), as every server loads it
(``commands/serve.py``); :func:`build` is what that import runs.
"""

from __future__ import annotations

import os
from functools import partial

from commands.serve import for_server, main_of
from database import STORES
from jennah.asgi import ASGIApp
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
    return main_of("gateway", APP, partial(load_gateway_settings, stores=STORES))
