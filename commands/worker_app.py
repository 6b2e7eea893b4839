"""The worker's ASGI app, built from the environment on import: ``commands.worker_app:app``.

What ``jennah worker`` serves, under any server (uvicorn and hypercorn import it in the
worker's process, pyvoy inside Envoy); also ``uvicorn commands.worker_app:app`` by hand.
"""

from commands.worker import build
from jennah.settings import load_worker_settings

app = build(load_worker_settings())
