"""``jennah gateway``: load settings, build the gateway, serve it."""

from __future__ import annotations

import os
import sys

from jennah.errors import SettingsError
from jennah.logging import configure_logging
from jennah.serve import serve
from jennah.settings import load_gateway_settings
from jennah.tracing import configure_tracing


def main() -> int:
    try:
        settings = load_gateway_settings()
        configure_logging("gateway")  # JENNAH_LOG_FORMAT=json|text (jennah/logging.py)
        configure_tracing("gateway", os.environ)  # only if OTLP/console is configured
        from prometheus_client import REGISTRY

        from gateway.app import create_app

        app = create_app(settings, registry=REGISTRY)
    except SettingsError as exc:
        print(f"jennah gateway: {exc}", file=sys.stderr)
        return 2
    serve(app, host=settings.host, port=settings.port, server=settings.server,
          grace=settings.shutdown_grace_seconds)
    return 0
