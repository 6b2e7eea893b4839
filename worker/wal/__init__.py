"""The worker's event write-ahead log (docs/design.md §6, §11 "WAL operations").

Modules: ``format`` (bytes on disk, CRC, the scanner), ``log`` (one file: durable appends
with group commit, recovery), ``codec`` (protobuf payloads), ``segments`` (one WAL per
worker: LSNs, segments, checkpoints, recovery), ``sender`` (async delivery to the store),
``archive`` (zstd archive, retention), ``eventlog`` (the ``ExecutionLog``
implementation), ``legacy`` (delivering v1 per-execution logs once, for the upgrade),
``metrics`` and ``cli``.
"""

from worker.wal.eventlog import WalExecutionLog
from worker.wal.format import WalError, WalFormatError, WalFull
from worker.wal.log import WalLocked
from worker.wal.sender import EventSink, SenderConfig

__all__ = [
    "EventSink",
    "SenderConfig",
    "WalError",
    "WalExecutionLog",
    "WalFormatError",
    "WalFull",
    "WalLocked",
]
