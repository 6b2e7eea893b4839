"""``jennah worker``: load settings, build the worker, serve it."""

from __future__ import annotations

import logging
import sys

from jennah.errors import SettingsError
from jennah.serve import serve
from jennah.settings import load_worker_settings


def main() -> int:
    try:
        settings = load_worker_settings()
        from worker.app import create_app

        app = create_app(settings)
    except SettingsError as exc:
        print(f"jennah worker: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    serve(app, host=settings.host, port=settings.port, server=settings.server,
          grace=settings.shutdown_grace_seconds)
    return 0
