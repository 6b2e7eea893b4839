"""The gateway's ASGI app, built from the environment on import: ``commands.gateway_app:app``.

What ``jennah gateway`` serves, under any server (uvicorn and hypercorn import it in the
gateway's process, pyvoy inside Envoy); also ``uvicorn commands.gateway_app:app`` by hand.
"""

from commands.gateway import build
from jennah.settings import load_gateway_settings

app = build(load_gateway_settings())
