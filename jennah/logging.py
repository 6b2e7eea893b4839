"""Process logging: one JSON object per line on stdout, or plain text for development.

``JENNAH_LOG_FORMAT`` picks the format:

* ``json``: the Cloud Logging *structured* format, which Cloud Run, GKE and the Ops Agent
  parse from stdout without an agent-side configuration. Every line is one object::

    {"severity": "INFO", "message": "...", "time": "2026-12-01T18:40:04.123456Z",
     "logger": "jennah.worker", "service": "worker", "worker_id": "w-1",
     "tenant_id": "acme", "job_id": "4f0c...",
     "logging.googleapis.com/trace": "projects/P/traces/<32 hex>",
     "logging.googleapis.com/spanId": "<16 hex>",
     "logging.googleapis.com/trace_sampled": true,
     "logging.googleapis.com/sourceLocation": {"file": ..., "line": ..., "function": ...}}

  The trace fields appear only while an OpenTelemetry span is active (see
  ``jennah.tracing``); ``projects/P/`` only when ``GOOGLE_CLOUD_PROJECT`` (or
  ``JENNAH_TRACE_PROJECT``) names the project, as Cloud Trace needs it to link the entry.
  ``job_id``, ``tenant_id`` and ``worker_id`` appear when known: from ``extra=`` on the
  call, else from the context variables the RPC and provider paths bind
  (:func:`log_context`), else (``worker_id``) the process default.
* ``text``: ``time logger LEVEL message [tenant_id=... job_id=...]`` for a terminal.

**Decision.** ``text`` is the default, because ``jennah dev`` and ``make run`` are read by
people; the images (``Dockerfile.*``) and the systemd env files in ``docs/deploy.md`` set
``json``, because there the reader is a log pipeline. An unknown value stops start-up.

**Servers' own lines.** ``commands.serve`` hands uvicorn ``log_config=None`` and hypercorn
its ``hypercorn.error`` logger, so their rare lines (a malformed HTTP request, an
exception outside the RPC handlers, which the error mapper does not see) go through the
handlers configured here, in the same format.

**Secrets.** Nothing here logs the environment. As defence in depth, the values of the
process's secret-looking variables (names containing TOKEN, SECRET, PASSWORD, KEY,
CREDENTIAL, or ``DATABASE_URL``; values of 8+ characters) are replaced by ``[REDACTED]``
in every formatted line. Job env var values never reach a log call at all (they are
write-only in the API, docs/design.md §2).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
from collections.abc import Iterator, Mapping
from contextvars import ContextVar, Token
from datetime import UTC, datetime
from typing import Any, TextIO

from jennah.errors import SettingsError

LOG_FORMATS = ("json", "text")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
CONTEXT_FIELDS = ("job_id", "tenant_id", "worker_id")
TRACE_KEY = "logging.googleapis.com/trace"
SPAN_KEY = "logging.googleapis.com/spanId"
SAMPLED_KEY = "logging.googleapis.com/trace_sampled"
SOURCE_KEY = "logging.googleapis.com/sourceLocation"
REDACTED = "[REDACTED]"

_SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|KEY|CREDENTIAL|^DATABASE_URL$", re.I)
_MIN_SECRET_LEN = 8

job_id_var: ContextVar[str | None] = ContextVar("jennah_job_id", default=None)
tenant_id_var: ContextVar[str | None] = ContextVar("jennah_tenant_id", default=None)
worker_id_var: ContextVar[str | None] = ContextVar("jennah_worker_id", default=None)
_VARS: dict[str, ContextVar[str | None]] = {
    "job_id": job_id_var, "tenant_id": tenant_id_var, "worker_id": worker_id_var,
}


def bind(**fields: str | None) -> list[tuple[ContextVar[str | None], Token[str | None]]]:
    """Set context fields (``job_id``, ``tenant_id``, ``worker_id``) for the current
    context; empty values are skipped. Returns the tokens for :func:`unbind`."""
    tokens = []
    for name, value in fields.items():
        if value:
            var = _VARS[name]
            tokens.append((var, var.set(value)))
    return tokens


def unbind(tokens: list[tuple[ContextVar[str | None], Token[str | None]]]) -> None:
    for var, token in reversed(tokens):
        with contextlib.suppress(ValueError):  # set in another context: nothing to undo
            var.reset(token)


@contextlib.contextmanager
def log_context(**fields: str | None) -> Iterator[None]:
    """``with log_context(job_id=..., tenant_id=...):`` every record inside carries them."""
    tokens = bind(**fields)
    try:
        yield
    finally:
        unbind(tokens)


def context_fields(record: logging.LogRecord | None = None) -> dict[str, str]:
    """The known job/tenant/worker ids: ``extra=`` on the record wins over the context."""
    out: dict[str, str] = {}
    for name in CONTEXT_FIELDS:
        value = getattr(record, name, None) if record is not None else None
        if not value:
            value = _VARS[name].get() or _defaults.get(name)
        if value:
            out[name] = str(value)
    return out


_defaults: dict[str, str] = {}


def _trace_fields(project: str) -> dict[str, Any]:
    try:
        from opentelemetry import trace
    except ImportError:  # pragma: no cover - a dependency of the package
        return {}
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return {}
    trace_id = format(ctx.trace_id, "032x")
    return {
        TRACE_KEY: f"projects/{project}/traces/{trace_id}" if project else trace_id,
        SPAN_KEY: format(ctx.span_id, "016x"),
        SAMPLED_KEY: ctx.trace_flags.sampled,
    }


class Redactor:
    """Replaces known secret values in text."""

    def __init__(self, secrets: list[str]) -> None:
        # Longest first, so a secret containing another is replaced whole.
        self.secrets = sorted({s for s in secrets if len(s) >= _MIN_SECRET_LEN}, key=len,
                              reverse=True)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Redactor:
        return cls([v for k, v in env.items() if _SECRET_NAME.search(k) and v.strip()])

    def __call__(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return text


class JsonFormatter(logging.Formatter):
    """One Cloud Logging structured entry per record (see the module docstring)."""

    def __init__(self, service: str = "", project: str = "",
                 redact: Redactor | None = None) -> None:
        super().__init__()
        self.service = service
        self.project = project
        self.redact = redact or Redactor([])

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            # Error Reporting reads the stack trace from the message itself.
            message = f"{message}\n{self.formatException(record.exc_info)}"
        elif record.stack_info:
            message = f"{message}\n{self.formatStack(record.stack_info)}"
        entry: dict[str, Any] = {
            "severity": record.levelname if record.levelname in LOG_LEVELS else "DEFAULT",
            "message": self.redact(message),
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="microseconds").replace("+00:00", "Z"),
            "logger": record.name,
        }
        if self.service:
            entry["service"] = self.service
        entry.update(context_fields(record))
        entry.update(_trace_fields(self.project))
        entry[SOURCE_KEY] = {
            "file": record.pathname, "line": str(record.lineno), "function": record.funcName,
        }
        return json.dumps(entry, ensure_ascii=False, default=str)


# Control characters a text log must not carry raw (a NUL byte or a carriage return from
# a client's value would corrupt or forge lines); newlines and tabs stay, for tracebacks.
_CONTROL_ESCAPES = {c: f"\\x{c:02x}" for c in [*range(0x20), 0x7F] if chr(c) not in "\n\t"}


class TextFormatter(logging.Formatter):
    """The developer format, with the known ids appended, and control characters other
    than newline and tab escaped (``\\x00``)."""

    def __init__(self, redact: Redactor | None = None) -> None:
        super().__init__("%(asctime)s %(name)s %(levelname)s %(message)s")
        self.redact = redact or Redactor([])

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = {k: v for k, v in context_fields(record).items() if k != "worker_id"}
        if fields:
            text += " [" + " ".join(f"{k}={v}" for k, v in fields.items()) + "]"
        return self.redact(text).translate(_CONTROL_ESCAPES)


def configure_logging(
    service: str,
    env: Mapping[str, str] | None = None,
    *,
    worker_id: str = "",
    stream: TextIO | None = None,
) -> logging.Handler:
    """Install the root handler for ``service`` (``worker`` or ``gateway``).

    Reads ``JENNAH_LOG_FORMAT`` (json|text, default text) and ``JENNAH_LOG_LEVEL``
    (default INFO); raises ``SettingsError`` naming every bad variable. Replaces any
    handler installed earlier, so calling it twice does not duplicate lines.
    """
    env = os.environ if env is None else env
    fmt = env.get("JENNAH_LOG_FORMAT", "").strip().lower() or "text"
    level = env.get("JENNAH_LOG_LEVEL", "").strip().upper() or "INFO"
    problems = []
    if fmt not in LOG_FORMATS:
        problems.append(f"JENNAH_LOG_FORMAT={fmt!r} (expected json or text)")
    if level not in LOG_LEVELS:
        problems.append(f"JENNAH_LOG_LEVEL={level!r} (expected one of {', '.join(LOG_LEVELS)})")
    if problems:
        raise SettingsError("invalid logging settings: " + "; ".join(problems))
    redact = Redactor.from_env(env)
    handler = logging.StreamHandler(stream or sys.stdout)
    if fmt == "json":
        project = env.get("JENNAH_TRACE_PROJECT", "") or env.get("GOOGLE_CLOUD_PROJECT", "")
        handler.setFormatter(JsonFormatter(service, project.strip(), redact))
    else:
        handler.setFormatter(TextFormatter(redact))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    _defaults.clear()
    if worker_id:
        _defaults["worker_id"] = worker_id
    return handler
