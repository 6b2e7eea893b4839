"""The on-disk format of a WAL file (docs/design.md §6): a 16-byte header, then records.

Header: magic ``JNWAL001``, ``u32`` LE version 1, 4 reserved zero bytes.

Record (little-endian)::

    u32 total_len   32 + N, counting this field
    i64 lsn         the record's log sequence number (v1 logs: the event's seq)
    u8  kind        1..11: an event (EventKind number); see ``KIND_META``/``KIND_CHECKPOINT``
    3 reserved bytes
    i64 unix_ms
    N   payload     a serialized protobuf (``jennah.v1.WalEvent``; v1: ``JobEvent``)
    u64 crc         CRC-64/NVME of every byte after total_len up to the CRC

A worker's WAL is a directory of segments named by their first LSN; v1 wrote one file
per job execution instead (``legacy.py`` reads those for the upgrade). The format of a
file is the same in both.

``scan`` is the one parser: it never raises on any byte sequence and stops at the first
short, oversized or CRC-bad record, reporting that offset so the caller can truncate.
"""

from __future__ import annotations

import importlib
import struct
from collections.abc import Callable
from typing import NamedTuple

import crcmod

from jennah.errors import JennahError

MAGIC = b"JNWAL001"
VERSION = 1
HEADER_SIZE = 16
RECORD_OVERHEAD = 32
MIN_RECORD = RECORD_OVERHEAD
MAX_RECORD = 10 * 1024 * 1024

# Records that are not events. Their payload is still a protobuf (or empty).
KIND_META = 0x80  # v1 only: lsn 0; payload: jennah.v1.Job with the job's identity fields
KIND_CHECKPOINT = 0x81  # lsn = the highest LSN the store has acknowledged; empty payload

_HEADER = struct.Struct("<8sI4x")
_PREFIX = struct.Struct("<IqB3xq")  # total_len, lsn, kind, unix_ms: 24 bytes
_LEN = struct.Struct("<I")
_CRC = struct.Struct("<Q")

# CRC-64/NVME. crcmod pre-XORs its init value, so ``initCrc=0`` here (docs/design.md §6).
crc64: Callable[[bytes | bytearray | memoryview], int] = crcmod.mkCrcFun(
    0x1AD93D23594C93659, initCrc=0, rev=True, xorOut=0xFFFFFFFFFFFFFFFF
)
CRC_CHECK = 0xAE8B14860A799888


def crc_uses_c_extension() -> bool:
    """True when crcmod runs its C extension (about 100 times the pure-Python speed)."""
    return bool(getattr(importlib.import_module("crcmod.crcmod"), "_usingExtension", False))


class WalError(JennahError):
    """A WAL operation failed (I/O error, a log in use by another process)."""


class WalFull(WalError):
    """Too many events wait for the store: refused (nothing written) until it catches up."""


class WalFormatError(WalError):
    """The file is not a Jennah WAL (wrong magic or version, or shorter than the header).
    Such a file is never truncated or deleted."""


class Record(NamedTuple):
    offset: int
    lsn: int
    kind: int
    unix_ms: int
    payload: bytes
    crc: int

    @property
    def size(self) -> int:
        return RECORD_OVERHEAD + len(self.payload)


class ScanResult(NamedTuple):
    records: list[Record]
    end: int  # offset just after the last valid record
    error: str  # "" when the whole buffer is valid records; else why the scan stopped


def encode_header() -> bytes:
    return _HEADER.pack(MAGIC, VERSION)


def check_header(data: bytes | memoryview, name: str) -> None:
    """Raise ``WalFormatError`` naming ``name`` unless ``data`` starts with our header."""
    if len(data) < HEADER_SIZE:
        raise WalFormatError(f"{name}: not a Jennah WAL file ({len(data)} bytes, header is 16)")
    magic, version = _HEADER.unpack_from(data, 0)
    if magic != MAGIC:
        raise WalFormatError(f"{name}: not a Jennah WAL file (magic {bytes(magic)!r})")
    if version != VERSION:
        raise WalFormatError(f"{name}: unsupported WAL version {version} (expected {VERSION})")


def encode_record(lsn: int, kind: int, unix_ms: int, payload: bytes) -> bytes:
    """One record, CRC included."""
    total = RECORD_OVERHEAD + len(payload)
    if total > MAX_RECORD:
        raise WalError(f"record of {total} bytes is over the {MAX_RECORD}-byte limit")
    buf = bytearray(total)
    _PREFIX.pack_into(buf, 0, total, lsn, kind, unix_ms)
    buf[24 : total - 8] = payload
    _CRC.pack_into(buf, total - 8, crc64(memoryview(buf)[4 : total - 8]))
    return bytes(buf)


def scan(data: bytes | memoryview, start: int = HEADER_SIZE) -> ScanResult:
    """Every valid record from ``start`` on, stopping at the first bad one."""
    view = memoryview(data)
    n = len(view)
    pos = start
    records: list[Record] = []
    append = records.append
    unpack_len, unpack_prefix, unpack_crc = _LEN.unpack_from, _PREFIX.unpack_from, _CRC.unpack_from
    crc = crc64
    while pos < n:
        if n - pos < 4:
            return ScanResult(records, pos, f"short record length at offset {pos}")
        (total,) = unpack_len(view, pos)
        if total < MIN_RECORD or total > MAX_RECORD:
            return ScanResult(records, pos, f"bad record length {total} at offset {pos}")
        end = pos + total
        if end > n:
            return ScanResult(records, pos, f"short record at offset {pos}")
        (stored,) = unpack_crc(view, end - 8)
        if crc(view[pos + 4 : end - 8]) != stored:
            return ScanResult(records, pos, f"CRC mismatch at offset {pos}")
        _, lsn, kind, unix_ms = unpack_prefix(view, pos)
        append(Record(pos, lsn, kind, unix_ms, bytes(view[pos + 24 : end - 8]), stored))
        pos = end
    return ScanResult(records, pos, "")
