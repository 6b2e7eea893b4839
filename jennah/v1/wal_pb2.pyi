from jennah.v1 import deployment_pb2 as _deployment_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WalEvent(_message.Message):
    __slots__ = ("event", "tenant_id", "dedup_key", "offset", "end")
    EVENT_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    DEDUP_KEY_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    event: _deployment_pb2.JobEvent
    tenant_id: str
    dedup_key: str
    offset: int
    end: int
    def __init__(self, event: _Optional[_Union[_deployment_pb2.JobEvent, _Mapping]] = ..., tenant_id: _Optional[str] = ..., dedup_key: _Optional[str] = ..., offset: _Optional[int] = ..., end: _Optional[int] = ...) -> None: ...
