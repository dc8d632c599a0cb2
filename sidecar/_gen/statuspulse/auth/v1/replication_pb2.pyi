from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SubscribeRequest(_message.Message):
    __slots__ = ("after_revision", "sidecar_id", "log_id", "packed_keys")
    AFTER_REVISION_FIELD_NUMBER: _ClassVar[int]
    SIDECAR_ID_FIELD_NUMBER: _ClassVar[int]
    LOG_ID_FIELD_NUMBER: _ClassVar[int]
    PACKED_KEYS_FIELD_NUMBER: _ClassVar[int]
    after_revision: int
    sidecar_id: str
    log_id: str
    packed_keys: bool
    def __init__(self, after_revision: _Optional[int] = ..., sidecar_id: _Optional[str] = ..., log_id: _Optional[str] = ..., packed_keys: _Optional[bool] = ...) -> None: ...

class ReplicaChange(_message.Message):
    __slots__ = ("revision", "kind", "subject", "payload_json")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_JSON_FIELD_NUMBER: _ClassVar[int]
    revision: int
    kind: str
    subject: str
    payload_json: str
    def __init__(self, revision: _Optional[int] = ..., kind: _Optional[str] = ..., subject: _Optional[str] = ..., payload_json: _Optional[str] = ...) -> None: ...

class Snapshot(_message.Message):
    __slots__ = ("revision", "entries", "complete", "log_id", "packed_keys")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    LOG_ID_FIELD_NUMBER: _ClassVar[int]
    PACKED_KEYS_FIELD_NUMBER: _ClassVar[int]
    revision: int
    entries: _containers.RepeatedCompositeFieldContainer[ReplicaChange]
    complete: bool
    log_id: str
    packed_keys: bytes
    def __init__(self, revision: _Optional[int] = ..., entries: _Optional[_Iterable[_Union[ReplicaChange, _Mapping]]] = ..., complete: _Optional[bool] = ..., log_id: _Optional[str] = ..., packed_keys: _Optional[bytes] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("head_revision",)
    HEAD_REVISION_FIELD_NUMBER: _ClassVar[int]
    head_revision: int
    def __init__(self, head_revision: _Optional[int] = ...) -> None: ...

class SubscribeResponse(_message.Message):
    __slots__ = ("snapshot", "change", "heartbeat")
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    CHANGE_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    snapshot: Snapshot
    change: ReplicaChange
    heartbeat: Heartbeat
    def __init__(self, snapshot: _Optional[_Union[Snapshot, _Mapping]] = ..., change: _Optional[_Union[ReplicaChange, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ...) -> None: ...
