"""``jennah gateway``: load settings, build the gateway, serve it."""

from __future__ import annotations

import logging
import sys

from jennah.errors import SettingsError
from jennah.serve import serve
from jennah.settings import load_gateway_settings


def main() -> int:
    try:
        settings = load_gateway_settings()
        from prometheus_client import REGISTRY

        from gateway.app import create_app

        app = create_app(settings, registry=REGISTRY)
    except SettingsError as exc:
        print(f"jennah gateway: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    serve(app, host=settings.host, port=settings.port, server=settings.server,
          grace=settings.shutdown_grace_seconds)
    return 0
