import datetime

from google.api import annotations_pb2 as _annotations_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ApiKeyState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    API_KEY_STATE_UNSPECIFIED: _ClassVar[ApiKeyState]
    API_KEY_STATE_ACTIVE: _ClassVar[ApiKeyState]
    API_KEY_STATE_EXPIRED: _ClassVar[ApiKeyState]
    API_KEY_STATE_REVOKED: _ClassVar[ApiKeyState]
    API_KEY_STATE_SUSPENDED: _ClassVar[ApiKeyState]
API_KEY_STATE_UNSPECIFIED: ApiKeyState
API_KEY_STATE_ACTIVE: ApiKeyState
API_KEY_STATE_EXPIRED: ApiKeyState
API_KEY_STATE_REVOKED: ApiKeyState
API_KEY_STATE_SUSPENDED: ApiKeyState

class ApiKey(_message.Message):
    __slots__ = ("id", "name", "workspace", "scopes", "state", "create_time", "expire_time", "revoke_time", "revoke_reason", "replaces", "replaced_by", "last_four", "grace_deadline", "created_by", "rate_limit", "last_use_time", "description", "client_cidrs", "suspend_time", "rotation_period_seconds", "rotation_due_time")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    WORKSPACE_FIELD_NUMBER: _ClassVar[int]
    SCOPES_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    REVOKE_TIME_FIELD_NUMBER: _ClassVar[int]
    REVOKE_REASON_FIELD_NUMBER: _ClassVar[int]
    REPLACES_FIELD_NUMBER: _ClassVar[int]
    REPLACED_BY_FIELD_NUMBER: _ClassVar[int]
    LAST_FOUR_FIELD_NUMBER: _ClassVar[int]
    GRACE_DEADLINE_FIELD_NUMBER: _ClassVar[int]
    CREATED_BY_FIELD_NUMBER: _ClassVar[int]
    RATE_LIMIT_FIELD_NUMBER: _ClassVar[int]
    LAST_USE_TIME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    CLIENT_CIDRS_FIELD_NUMBER: _ClassVar[int]
    SUSPEND_TIME_FIELD_NUMBER: _ClassVar[int]
    ROTATION_PERIOD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ROTATION_DUE_TIME_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    workspace: str
    scopes: _containers.RepeatedScalarFieldContainer[str]
    state: ApiKeyState
    create_time: _timestamp_pb2.Timestamp
    expire_time: _timestamp_pb2.Timestamp
    revoke_time: _timestamp_pb2.Timestamp
    revoke_reason: str
    replaces: str
    replaced_by: str
    last_four: str
    grace_deadline: _timestamp_pb2.Timestamp
    created_by: str
    rate_limit: RateLimit
    last_use_time: _timestamp_pb2.Timestamp
    description: str
    client_cidrs: _containers.RepeatedScalarFieldContainer[str]
    suspend_time: _timestamp_pb2.Timestamp
    rotation_period_seconds: int
    rotation_due_time: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., workspace: _Optional[str] = ..., scopes: _Optional[_Iterable[str]] = ..., state: _Optional[_Union[ApiKeyState, str]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., revoke_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., revoke_reason: _Optional[str] = ..., replaces: _Optional[str] = ..., replaced_by: _Optional[str] = ..., last_four: _Optional[str] = ..., grace_deadline: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., created_by: _Optional[str] = ..., rate_limit: _Optional[_Union[RateLimit, _Mapping]] = ..., last_use_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., description: _Optional[str] = ..., client_cidrs: _Optional[_Iterable[str]] = ..., suspend_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., rotation_period_seconds: _Optional[int] = ..., rotation_due_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class DailyUse(_message.Message):
    __slots__ = ("date", "uses")
    DATE_FIELD_NUMBER: _ClassVar[int]
    USES_FIELD_NUMBER: _ClassVar[int]
    date: str
    uses: int
    def __init__(self, date: _Optional[str] = ..., uses: _Optional[int] = ...) -> None: ...

class RateLimit(_message.Message):
    __slots__ = ("requests", "period_seconds")
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    PERIOD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    requests: int
    period_seconds: int
    def __init__(self, requests: _Optional[int] = ..., period_seconds: _Optional[int] = ...) -> None: ...

class CreateApiKeyRequest(_message.Message):
    __slots__ = ("workspace", "name", "scopes", "expires_in_seconds", "rate_limit", "description", "client_cidrs", "rotation_period_seconds")
    WORKSPACE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SCOPES_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_IN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    RATE_LIMIT_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    CLIENT_CIDRS_FIELD_NUMBER: _ClassVar[int]
    ROTATION_PERIOD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    workspace: str
    name: str
    scopes: _containers.RepeatedScalarFieldContainer[str]
    expires_in_seconds: int
    rate_limit: RateLimit
    description: str
    client_cidrs: _containers.RepeatedScalarFieldContainer[str]
    rotation_period_seconds: int
    def __init__(self, workspace: _Optional[str] = ..., name: _Optional[str] = ..., scopes: _Optional[_Iterable[str]] = ..., expires_in_seconds: _Optional[int] = ..., rate_limit: _Optional[_Union[RateLimit, _Mapping]] = ..., description: _Optional[str] = ..., client_cidrs: _Optional[_Iterable[str]] = ..., rotation_period_seconds: _Optional[int] = ...) -> None: ...

class CreateApiKeyResponse(_message.Message):
    __slots__ = ("api_key", "key")
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    api_key: ApiKey
    key: str
    def __init__(self, api_key: _Optional[_Union[ApiKey, _Mapping]] = ..., key: _Optional[str] = ...) -> None: ...

class ListApiKeysRequest(_message.Message):
    __slots__ = ("workspace", "state", "page_size", "page_token", "unused_for_seconds", "expiring_within_seconds", "rotation_due")
    WORKSPACE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    UNUSED_FOR_SECONDS_FIELD_NUMBER: _ClassVar[int]
    EXPIRING_WITHIN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ROTATION_DUE_FIELD_NUMBER: _ClassVar[int]
    workspace: str
    state: ApiKeyState
    page_size: int
    page_token: str
    unused_for_seconds: int
    expiring_within_seconds: int
    rotation_due: bool
    def __init__(self, workspace: _Optional[str] = ..., state: _Optional[_Union[ApiKeyState, str]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., unused_for_seconds: _Optional[int] = ..., expiring_within_seconds: _Optional[int] = ..., rotation_due: _Optional[bool] = ...) -> None: ...

class ListApiKeysResponse(_message.Message):
    __slots__ = ("api_keys", "next_page_token")
    API_KEYS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    api_keys: _containers.RepeatedCompositeFieldContainer[ApiKey]
    next_page_token: str
    def __init__(self, api_keys: _Optional[_Iterable[_Union[ApiKey, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetApiKeyRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class GetApiKeyResponse(_message.Message):
    __slots__ = ("api_key", "daily_uses")
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    DAILY_USES_FIELD_NUMBER: _ClassVar[int]
    api_key: ApiKey
    daily_uses: _containers.RepeatedCompositeFieldContainer[DailyUse]
    def __init__(self, api_key: _Optional[_Union[ApiKey, _Mapping]] = ..., daily_uses: _Optional[_Iterable[_Union[DailyUse, _Mapping]]] = ...) -> None: ...

class CreateReplacementApiKeyRequest(_message.Message):
    __slots__ = ("id", "grace_seconds", "expires_in_seconds")
    ID_FIELD_NUMBER: _ClassVar[int]
    GRACE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_IN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    id: str
    grace_seconds: int
    expires_in_seconds: int
    def __init__(self, id: _Optional[str] = ..., grace_seconds: _Optional[int] = ..., expires_in_seconds: _Optional[int] = ...) -> None: ...

class CreateReplacementApiKeyResponse(_message.Message):
    __slots__ = ("api_key", "key", "replaced")
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    REPLACED_FIELD_NUMBER: _ClassVar[int]
    api_key: ApiKey
    key: str
    replaced: ApiKey
    def __init__(self, api_key: _Optional[_Union[ApiKey, _Mapping]] = ..., key: _Optional[str] = ..., replaced: _Optional[_Union[ApiKey, _Mapping]] = ...) -> None: ...

class RevokeApiKeyRequest(_message.Message):
    __slots__ = ("id", "reason", "force")
    ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    id: str
    reason: str
    force: bool
    def __init__(self, id: _Optional[str] = ..., reason: _Optional[str] = ..., force: _Optional[bool] = ...) -> None: ...

class RevokeApiKeyResponse(_message.Message):
    __slots__ = ("api_key",)
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    api_key: ApiKey
    def __init__(self, api_key: _Optional[_Union[ApiKey, _Mapping]] = ...) -> None: ...

class WhoAmIRequest(_message.Message):
    __slots__ = ("method", "path")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    method: str
    path: str
    def __init__(self, method: _Optional[str] = ..., path: _Optional[str] = ...) -> None: ...

class RouteDecision(_message.Message):
    __slots__ = ("allowed", "reason", "http_status", "route", "required_scopes")
    ALLOWED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    HTTP_STATUS_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_SCOPES_FIELD_NUMBER: _ClassVar[int]
    allowed: bool
    reason: str
    http_status: int
    route: str
    required_scopes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, allowed: _Optional[bool] = ..., reason: _Optional[str] = ..., http_status: _Optional[int] = ..., route: _Optional[str] = ..., required_scopes: _Optional[_Iterable[str]] = ...) -> None: ...

class WhoAmIResponse(_message.Message):
    __slots__ = ("api_key", "decision")
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    api_key: ApiKey
    decision: RouteDecision
    def __init__(self, api_key: _Optional[_Union[ApiKey, _Mapping]] = ..., decision: _Optional[_Union[RouteDecision, _Mapping]] = ...) -> None: ...

class ClientCidrs(_message.Message):
    __slots__ = ("cidrs",)
    CIDRS_FIELD_NUMBER: _ClassVar[int]
    cidrs: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, cidrs: _Optional[_Iterable[str]] = ...) -> None: ...

class UpdateApiKeyRequest(_message.Message):
    __slots__ = ("id", "name", "description", "rate_limit", "clear_rate_limit", "client_cidrs", "rotation_period_seconds")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    RATE_LIMIT_FIELD_NUMBER: _ClassVar[int]
    CLEAR_RATE_LIMIT_FIELD_NUMBER: _ClassVar[int]
    CLIENT_CIDRS_FIELD_NUMBER: _ClassVar[int]
    ROTATION_PERIOD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    description: str
    rate_limit: RateLimit
    clear_rate_limit: bool
    client_cidrs: ClientCidrs
    rotation_period_seconds: int
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., description: _Optional[str] = ..., rate_limit: _Optional[_Union[RateLimit, _Mapping]] = ..., clear_rate_limit: _Optional[bool] = ..., client_cidrs: _Optional[_Union[ClientCidrs, _Mapping]] = ..., rotation_period_seconds: _Optional[int] = ...) -> None: ...

class UpdateApiKeyResponse(_message.Message):
    __slots__ = ("api_key",)
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    api_key: ApiKey
    def __init__(self, api_key: _Optional[_Union[ApiKey, _Mapping]] = ...) -> None: ...

class SuspendApiKeyRequest(_message.Message):
    __slots__ = ("id", "reason")
    ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    id: str
    reason: str
    def __init__(self, id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class SuspendApiKeyResponse(_message.Message):
    __slots__ = ("api_key",)
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    api_key: ApiKey
    def __init__(self, api_key: _Optional[_Union[ApiKey, _Mapping]] = ...) -> None: ...

class ResumeApiKeyRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class ResumeApiKeyResponse(_message.Message):
    __slots__ = ("api_key",)
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    api_key: ApiKey
    def __init__(self, api_key: _Optional[_Union[ApiKey, _Mapping]] = ...) -> None: ...

class RecordApiKeyRotationStepRequest(_message.Message):
    __slots__ = ("id", "step", "target", "detail")
    ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    id: str
    step: str
    target: str
    detail: str
    def __init__(self, id: _Optional[str] = ..., step: _Optional[str] = ..., target: _Optional[str] = ..., detail: _Optional[str] = ...) -> None: ...

class RecordApiKeyRotationStepResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
