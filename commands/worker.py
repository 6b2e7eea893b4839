"""``jennah worker``: load settings, build the worker, serve it.

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
    return main_of("worker", APP, partial(load_worker_settings, providers=PROVIDERS,
                                          stores=STORES))
