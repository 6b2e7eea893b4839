"""The one error tree of Jennah.

Adapters (stores, providers) translate their vendor errors into these classes inside
themselves; only the RPC layer (``jennah/rpc.py``) turns them into Connect codes.
"""

from __future__ import annotations


class JennahError(Exception):
    """Base of every error Jennah raises on purpose."""


class InvalidArgument(JennahError):
    """A request field is malformed; nothing was stored."""


class Unauthenticated(JennahError):
    """No or bad credentials."""


class FailedPrecondition(JennahError):
    """The request is well-formed but the job's state forbids it (cancel of a terminal job)."""


class ResourceExhausted(JennahError):
    """Over a limit or a rate."""

    def __init__(self, message: str, retry_after_seconds: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds


class ShuttingDown(JennahError):
    """This process is draining for shutdown and takes no new jobs; retry (the gateway
    sends the retry to another worker)."""


class SettingsError(JennahError):
    """Start-up configuration is missing or invalid; the message names every variable."""


# --- job stores ----------------------------------------------------------------------


class StoreError(JennahError):
    """A job store operation failed."""


ECHO_CHARS = 128


def echoed(value: str) -> str:
    """``value`` as an error message may repeat it: at most ``ECHO_CHARS`` characters
    (a client's 500 KB job id is not sent back to it)."""
    return value if len(value) <= ECHO_CHARS else value[:ECHO_CHARS] + "…"


class NotFound(StoreError):
    """No such job for this tenant (also used for another tenant's job)."""

    @classmethod
    def job(cls, job_id: str) -> NotFound:
        return cls(f"job {echoed(job_id)} not found")


class LeaseLost(StoreError):
    """A fenced write failed: this worker no longer owns the job at that lease version."""


class Conflict(StoreError):
    """The write conflicts with the stored state (for example a backwards transition)."""


class StoreUnavailable(StoreError):
    """The store cannot be reached; the operation may be retried later."""


class StoreBusy(StoreError, ResourceExhausted):
    """The store is up but saturated (every pooled connection is in use, or this worker's
    bound on in-flight store work is reached): back-pressure, not an outage. Maps to
    ``resource_exhausted`` with a retry hint (docs/design.md §8)."""

    def __init__(self, message: str, retry_after_seconds: float | None = 1.0) -> None:
        ResourceExhausted.__init__(self, message, retry_after_seconds)


# --- batch providers ------------------------------------------------------------------


class ProviderError(JennahError):
    """A batch provider call failed. ``retryable`` says whether trying again may succeed."""

    retryable: bool = False

    def __init__(self, message: str, *, retryable: bool | None = None) -> None:
        super().__init__(message)
        if retryable is not None:
            self.retryable = retryable


class ProviderUnavailable(ProviderError):
    """The provider cannot be reached or is throttling us."""

    retryable = True


class ProviderRejected(ProviderError):
    """The provider refused the job (bad spec, permissions); retrying will not help."""


class ProviderQuotaExceeded(ProviderError):
    """The provider's quota is exhausted."""

    retryable = True
