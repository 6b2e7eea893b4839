"""The per-job event write-ahead log (DESIGN §6, §11 "WAL operations").

Modules: ``format`` (bytes on disk, CRC, the scanner), ``log`` (one file: durable appends
with group commit, recovery), ``codec`` (protobuf payloads), ``joblog`` (events, seq and
the persisted sent watermark), ``sender`` (async delivery), ``archive`` (zstd archive,
retention), ``eventlog`` (the ``EventLog`` implementation), ``metrics`` and ``cli``.
"""

from worker.wal.eventlog import WalEventLog
from worker.wal.format import WalError, WalFormatError
from worker.wal.log import WalLocked
from worker.wal.sender import EventSink, SenderConfig, StoreSink

__all__ = [
    "EventSink",
    "SenderConfig",
    "StoreSink",
    "WalError",
    "WalEventLog",
    "WalFormatError",
    "WalLocked",
]
