"""``jennah worker``: load settings, build the worker, serve it.

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
from jennah.settings import WorkerSettings, load_worker_settings
from jennah.tracing import configure_tracing
from providers import PROVIDERS

APP = "commands.worker_app:app"


def build(settings: WorkerSettings) -> ASGIApp:
    """The worker app for ``settings``, with this process's logging and tracing set up."""
    from worker.app import create_app

    configure_logging("worker", worker_id=settings.worker_id)  # jennah/logging.py
    configure_tracing("worker", os.environ)  # only if OTLP/console is configured
    return for_server(create_app(settings), settings.server)


def main() -> int:
    try:
        settings = load_worker_settings(providers=PROVIDERS, stores=STORES)
        serve(APP, host=settings.host, port=settings.port, server=settings.server,
              grace=settings.shutdown_grace_seconds)
    except SettingsError as exc:
        print(f"jennah worker: {exc}", file=sys.stderr)
        return 2
    return 0
