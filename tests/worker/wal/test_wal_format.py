"""The WAL byte format (docs/design.md §6): header, record layout, CRC-64/NVME, the scanner, and
the record payloads (v2 ``WalEvent``, v1 ``JobEvent`` and META)."""

from __future__ import annotations

import struct
from datetime import UTC, datetime

import pytest

from jennah.errors import JennahError
from jennah.models import EventKind, JobEvent, JobStatus
from jennah.v1 import deployment_pb2 as pb
from worker.wal import codec
from worker.wal.format import (
    CRC_CHECK,
    HEADER_SIZE,
    KIND_CHECKPOINT,
    KIND_META,
    MAX_RECORD,
    WalError,
    WalFormatError,
    check_header,
    crc64,
    crc_uses_c_extension,
    encode_header,
    encode_record,
    scan,
)


def test_crc_is_crc64_nvme_with_the_c_extension() -> None:
    assert crc64(b"123456789") == CRC_CHECK == 0xAE8B14860A799888
    assert crc64(b"") == 0
    assert crc_uses_c_extension()


def test_header_is_magic_version_and_reserved_zeros() -> None:
    h = encode_header()
    assert h == b"JNWAL001" + struct.pack("<I", 1) + b"\0\0\0\0"
    assert len(h) == HEADER_SIZE
    check_header(h, "x")


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"", "0 bytes"),
        (b"JNWAL00", "7 bytes"),
        (b"NOTAWAL!" + struct.pack("<I", 1) + bytes(4), "magic"),
        (b"JNWAL001" + struct.pack("<I", 2) + bytes(4), "version 2"),
    ],
)
def test_foreign_headers_are_refused_naming_the_file(data: bytes, words: str) -> None:
    with pytest.raises(WalFormatError) as info:
        check_header(data, "/some/file.wal")
    assert isinstance(info.value, JennahError)
    assert "/some/file.wal" in str(info.value) and words in str(info.value)


def test_record_layout_is_exactly_the_contract() -> None:
    payload = b"hello payload"
    rec = encode_record(lsn=-5, kind=11, unix_ms=1_700_000_000_123, payload=payload)
    n = len(payload)
    assert len(rec) == 32 + n
    total, lsn, kind = struct.unpack_from("<IqB", rec, 0)
    assert (total, lsn, kind) == (32 + n, -5, 11)
    assert rec[13:16] == b"\0\0\0"
    assert struct.unpack_from("<q", rec, 16)[0] == 1_700_000_000_123
    assert rec[24 : 24 + n] == payload
    assert struct.unpack_from("<Q", rec, 24 + n)[0] == crc64(rec[4 : 24 + n])


def test_record_size_limits() -> None:
    assert len(encode_record(1, 1, 0, b"")) == 32
    assert len(encode_record(1, 1, 0, bytes(MAX_RECORD - 32))) == MAX_RECORD
    with pytest.raises(WalError):
        encode_record(1, 1, 0, bytes(MAX_RECORD - 31))


def _log(*records: bytes) -> bytes:
    return encode_header() + b"".join(records)


def test_scan_returns_every_valid_record() -> None:
    recs = [encode_record(i, 11, i * 10, b"p" * i) for i in range(1, 6)]
    result = scan(_log(*recs))
    assert result.error == ""
    assert [r.lsn for r in result.records] == [1, 2, 3, 4, 5]
    assert [r.payload for r in result.records] == [b"p" * i for i in range(1, 6)]
    assert result.records[0].offset == HEADER_SIZE
    assert result.end == HEADER_SIZE + sum(map(len, recs))


def test_scan_stops_at_a_short_record() -> None:
    good = encode_record(1, 11, 0, b"a")
    bad = encode_record(2, 11, 0, b"bb")
    for cut in (1, 3, 4, 20, len(bad) - 1):
        result = scan(_log(good, bad[:cut]))
        assert [r.lsn for r in result.records] == [1]
        assert result.end == HEADER_SIZE + len(good)
        assert "short" in result.error


@pytest.mark.parametrize("length", [0, 31, MAX_RECORD + 1, 0xFFFFFFFF])
def test_scan_stops_at_an_impossible_length(length: int) -> None:
    good = encode_record(1, 11, 0, b"a")
    bad = bytearray(encode_record(2, 11, 0, b"b"))
    struct.pack_into("<I", bad, 0, length)
    result = scan(_log(good, bytes(bad), encode_record(3, 11, 0, b"c")))
    assert [r.lsn for r in result.records] == [1]
    assert "length" in result.error


def test_scan_stops_at_a_crc_mismatch_and_keeps_the_prefix() -> None:
    recs = [encode_record(i, 11, 0, b"x" * 10) for i in range(1, 4)]
    data = bytearray(_log(*recs))
    data[HEADER_SIZE + len(recs[0]) + 30] ^= 0x01  # inside record 2's payload
    result = scan(bytes(data))
    assert [r.lsn for r in result.records] == [1]
    assert result.end == HEADER_SIZE + len(recs[0])
    assert "CRC" in result.error


def test_event_payload_is_a_jobevent_protobuf() -> None:
    ev = JobEvent(
        job_id="j1", tenant_id="acme", seq=7, kind=EventKind.STATUS_DETAIL,
        status=JobStatus.RUNNING, message="m", output="out\n",
        created_at=datetime(2025, 5, 1, 12, 0, 0, 123000, tzinfo=UTC), worker_id="w1",
    )
    msg = pb.JobEvent.FromString(codec.event_payload(ev))
    assert msg.kind == pb.EVENT_KIND_STATUS_DETAIL
    assert msg.status == pb.JOB_STATUS_RUNNING
    assert (msg.job_id, msg.seq, msg.message, msg.output, msg.worker_id) == (
        "j1", 7, "m", "out\n", "w1")
    assert msg.created_at.ToDatetime(tzinfo=UTC) == ev.created_at
    assert codec.event_from_payload(codec.event_payload(ev), "acme") == ev
    assert codec.kind_byte(EventKind.OUTPUT) == pb.EVENT_KIND_OUTPUT


def test_every_kind_and_status_round_trips() -> None:
    t = datetime(2025, 1, 1, tzinfo=UTC)
    for kind in EventKind:
        for status in [None, *JobStatus]:
            ev = JobEvent("j", "t", 1, kind, status, "", t, "w")
            assert codec.event_from_payload(codec.event_payload(ev), "t") == ev
    assert codec.kind_name(KIND_META) == "META"
    assert codec.kind_name(KIND_CHECKPOINT) == "CHECKPOINT"
    assert codec.kind_name(pb.EVENT_KIND_COMPLETED) == "COMPLETED"


def test_meta_payload_is_a_job_protobuf_without_spec() -> None:
    meta = codec.Meta("j1", "acme", 2, "w1", 3)
    msg = pb.Job.FromString(codec.meta_payload(meta))
    assert (msg.job_id, msg.tenant_id, msg.retry_count, msg.lease_version) == ("j1", "acme", 2, 3)
    assert not msg.env_var_names and not msg.commands
    assert codec.meta_from_payload(codec.meta_payload(meta)) == meta


def test_undecodable_payloads_raise_payload_error() -> None:
    with pytest.raises(codec.PayloadError):
        codec.event_from_payload(b"\xff\xff\xff", "t")
    with pytest.raises(codec.PayloadError):
        codec.event_from_payload(pb.JobEvent(kind=99).SerializeToString(), "t")  # type: ignore[arg-type]


def test_v2_payload_round_trips_every_field_of_an_execution_event() -> None:
    ev = JobEvent(
        job_id="j1", tenant_id="acme", seq=0, kind=EventKind.OUTPUT,
        status=JobStatus.RUNNING, message="stderr", output="héllo\n",
        created_at=datetime(2025, 5, 1, 12, 0, 0, 123000, tzinfo=UTC), worker_id="w1",
        attempt=2, dedup_key="out:2:0:stderr:40", offset=40, end=47,
    )
    assert codec.wal_event(codec.wal_payload(ev)) == ev
    detail = JobEvent("j2", "t", 0, EventKind.STATUS_DETAIL, None, "QUEUED -> SCHEDULED",
                      datetime(2025, 1, 1, tzinfo=UTC), "w", dedup_key="detail:x")
    assert codec.wal_event(codec.wal_payload(detail)) == detail
    with pytest.raises(codec.PayloadError):
        codec.wal_event(b"\xff\xff\xff")


def test_scan_from_an_offset_and_of_an_empty_log() -> None:
    assert scan(encode_header()) == ([], HEADER_SIZE, "")
    recs = [encode_record(i, 11, 0, b"z") for i in range(1, 4)]
    data = _log(*recs)
    second = HEADER_SIZE + len(recs[0])
    assert [r.lsn for r in scan(data, second).records] == [2, 3]
