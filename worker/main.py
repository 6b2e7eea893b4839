"""``jennah worker``: load settings, build the worker, serve it."""

from __future__ import annotations

import os
import sys

from jennah.errors import SettingsError
from jennah.logging import configure_logging
from jennah.serve import serve
from jennah.settings import load_worker_settings
from jennah.tracing import configure_tracing


def main() -> int:
    try:
        settings = load_worker_settings()
        configure_logging("worker", worker_id=settings.worker_id)  # jennah/logging.py
        configure_tracing("worker", os.environ)  # only if OTLP/console is configured
        from worker.app import create_app

        app = create_app(settings)
    except SettingsError as exc:
        print(f"jennah worker: {exc}", file=sys.stderr)
        return 2
    serve(app, host=settings.host, port=settings.port, server=settings.server,
          grace=settings.shutdown_grace_seconds)
    return 0
