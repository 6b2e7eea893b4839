"""Wire-level fakes of the cloud batch services, for the provider tests and the polling
benchmark: each speaks the real protocol (gRPC for GCP, REST-JSON for AWS and Azure), so
the official SDKs talk to them unchanged; each is stateful, steps its jobs through the
provider's own states on ``advance()``, and can inject throttling.

This module holds the small HTTP server the two REST fakes share.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from threading import Thread
from typing import Any
from urllib.parse import parse_qsl, urlsplit


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: Mapping[str, str]
    headers: Mapping[str, str]  # lower-case names
    body: Any  # parsed JSON, or None


@dataclass(frozen=True)
class Response:
    status: int
    body: Any = None
    headers: Mapping[str, str] = field(default_factory=dict)


Handler = Callable[[Request], Response]


@contextmanager
def serve_http(handle: Handler) -> Iterator[str]:
    """Serve ``handle`` over HTTP/1.1 on 127.0.0.1 (a free port); yield the base URL."""

    class _Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms stalls

        def _serve(self) -> None:
            url = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            request = Request(self.command, url.path, dict(parse_qsl(url.query)),
                              {k.lower(): v for k, v in self.headers.items()},
                              json.loads(raw) if raw.strip() else None)
            try:
                response = handle(request)
            except Exception as exc:  # a bug in a fake must be loud, not a hang
                response = Response(500, {"message": f"fake crashed: {exc!r}"})
            body = response.body  # bytes go out as they are (a file's content), else JSON
            raw_body = isinstance(body, bytes)
            payload = body if raw_body else b"" if body is None else json.dumps(body).encode()
            self.send_response(response.status)
            for name, value in response.headers.items():
                self.send_header(name, value)
            if payload:
                self.send_header("Content-Type",
                                 "application/octet-stream" if raw_body else "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _serve

        def log_message(self, format: str, *args: Any) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    server.block_on_close = False
    thread = Thread(target=server.serve_forever, args=(0.05,), name="http-fake", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
