import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AuthorizeRequest(_message.Message):
    __slots__ = ("credential", "required_scopes", "method", "path", "host", "workspace")
    CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_SCOPES_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    WORKSPACE_FIELD_NUMBER: _ClassVar[int]
    credential: str
    required_scopes: _containers.RepeatedScalarFieldContainer[str]
    method: str
    path: str
    host: str
    workspace: str
    def __init__(self, credential: _Optional[str] = ..., required_scopes: _Optional[_Iterable[str]] = ..., method: _Optional[str] = ..., path: _Optional[str] = ..., host: _Optional[str] = ..., workspace: _Optional[str] = ...) -> None: ...

class AuthorizeResponse(_message.Message):
    __slots__ = ("allowed", "reason", "http_status", "workspace", "key_id", "subject", "scopes", "decision_id")
    ALLOWED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    HTTP_STATUS_FIELD_NUMBER: _ClassVar[int]
    WORKSPACE_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    SCOPES_FIELD_NUMBER: _ClassVar[int]
    DECISION_ID_FIELD_NUMBER: _ClassVar[int]
    allowed: bool
    reason: str
    http_status: int
    workspace: str
    key_id: str
    subject: str
    scopes: _containers.RepeatedScalarFieldContainer[str]
    decision_id: str
    def __init__(self, allowed: _Optional[bool] = ..., reason: _Optional[str] = ..., http_status: _Optional[int] = ..., workspace: _Optional[str] = ..., key_id: _Optional[str] = ..., subject: _Optional[str] = ..., scopes: _Optional[_Iterable[str]] = ..., decision_id: _Optional[str] = ...) -> None: ...

class IntrospectRequest(_message.Message):
    __slots__ = ("credential",)
    CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    credential: str
    def __init__(self, credential: _Optional[str] = ...) -> None: ...

class IntrospectResponse(_message.Message):
    __slots__ = ("active", "reason", "workspace", "scopes", "expire_time", "key_id", "subject", "client_id", "kind")
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    WORKSPACE_FIELD_NUMBER: _ClassVar[int]
    SCOPES_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    active: bool
    reason: str
    workspace: str
    scopes: _containers.RepeatedScalarFieldContainer[str]
    expire_time: _timestamp_pb2.Timestamp
    key_id: str
    subject: str
    client_id: str
    kind: str
    def __init__(self, active: _Optional[bool] = ..., reason: _Optional[str] = ..., workspace: _Optional[str] = ..., scopes: _Optional[_Iterable[str]] = ..., expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., key_id: _Optional[str] = ..., subject: _Optional[str] = ..., client_id: _Optional[str] = ..., kind: _Optional[str] = ...) -> None: ...
