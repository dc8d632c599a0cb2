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

class AuditChainProblem(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AUDIT_CHAIN_PROBLEM_UNSPECIFIED: _ClassVar[AuditChainProblem]
    AUDIT_CHAIN_PROBLEM_DIGEST_MISMATCH: _ClassVar[AuditChainProblem]
    AUDIT_CHAIN_PROBLEM_LINK_MISMATCH: _ClassVar[AuditChainProblem]
    AUDIT_CHAIN_PROBLEM_MISSING: _ClassVar[AuditChainProblem]
    AUDIT_CHAIN_PROBLEM_CHECKPOINT_INVALID: _ClassVar[AuditChainProblem]
    AUDIT_CHAIN_PROBLEM_TRUNCATED: _ClassVar[AuditChainProblem]
    AUDIT_CHAIN_PROBLEM_HEAD_MISMATCH: _ClassVar[AuditChainProblem]
    AUDIT_CHAIN_PROBLEM_CHAIN_MISSING: _ClassVar[AuditChainProblem]
    AUDIT_CHAIN_PROBLEM_HEADS_INVALID: _ClassVar[AuditChainProblem]

class AuditRefusalReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AUDIT_REFUSAL_REASON_UNSPECIFIED: _ClassVar[AuditRefusalReason]
    AUDIT_REFUSAL_REASON_NOT_A_DECISION: _ClassVar[AuditRefusalReason]
    AUDIT_REFUSAL_REASON_MALFORMED_ID: _ClassVar[AuditRefusalReason]
    AUDIT_REFUSAL_REASON_MISSING_TIME: _ClassVar[AuditRefusalReason]
    AUDIT_REFUSAL_REASON_FUTURE_TIME: _ClassVar[AuditRefusalReason]
    AUDIT_REFUSAL_REASON_TOO_LARGE: _ClassVar[AuditRefusalReason]
    AUDIT_REFUSAL_REASON_MALFORMED_WORKSPACE: _ClassVar[AuditRefusalReason]
    AUDIT_REFUSAL_REASON_CONFLICT: _ClassVar[AuditRefusalReason]
    AUDIT_REFUSAL_REASON_NUL_CHARACTER: _ClassVar[AuditRefusalReason]
AUDIT_CHAIN_PROBLEM_UNSPECIFIED: AuditChainProblem
AUDIT_CHAIN_PROBLEM_DIGEST_MISMATCH: AuditChainProblem
AUDIT_CHAIN_PROBLEM_LINK_MISMATCH: AuditChainProblem
AUDIT_CHAIN_PROBLEM_MISSING: AuditChainProblem
AUDIT_CHAIN_PROBLEM_CHECKPOINT_INVALID: AuditChainProblem
AUDIT_CHAIN_PROBLEM_TRUNCATED: AuditChainProblem
AUDIT_CHAIN_PROBLEM_HEAD_MISMATCH: AuditChainProblem
AUDIT_CHAIN_PROBLEM_CHAIN_MISSING: AuditChainProblem
AUDIT_CHAIN_PROBLEM_HEADS_INVALID: AuditChainProblem
AUDIT_REFUSAL_REASON_UNSPECIFIED: AuditRefusalReason
AUDIT_REFUSAL_REASON_NOT_A_DECISION: AuditRefusalReason
AUDIT_REFUSAL_REASON_MALFORMED_ID: AuditRefusalReason
AUDIT_REFUSAL_REASON_MISSING_TIME: AuditRefusalReason
AUDIT_REFUSAL_REASON_FUTURE_TIME: AuditRefusalReason
AUDIT_REFUSAL_REASON_TOO_LARGE: AuditRefusalReason
AUDIT_REFUSAL_REASON_MALFORMED_WORKSPACE: AuditRefusalReason
AUDIT_REFUSAL_REASON_CONFLICT: AuditRefusalReason
AUDIT_REFUSAL_REASON_NUL_CHARACTER: AuditRefusalReason

class AuditRecord(_message.Message):
    __slots__ = ("id", "time", "actor", "action", "workspace", "target", "outcome", "reason", "request_id", "metadata", "cursor", "chain_seq", "prev_digest", "digest")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    WORKSPACE_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    CHAIN_SEQ_FIELD_NUMBER: _ClassVar[int]
    PREV_DIGEST_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    id: str
    time: _timestamp_pb2.Timestamp
    actor: str
    action: str
    workspace: str
    target: str
    outcome: str
    reason: str
    request_id: str
    metadata: _containers.ScalarMap[str, str]
    cursor: str
    chain_seq: int
    prev_digest: str
    digest: str
    def __init__(self, id: _Optional[str] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., actor: _Optional[str] = ..., action: _Optional[str] = ..., workspace: _Optional[str] = ..., target: _Optional[str] = ..., outcome: _Optional[str] = ..., reason: _Optional[str] = ..., request_id: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., cursor: _Optional[str] = ..., chain_seq: _Optional[int] = ..., prev_digest: _Optional[str] = ..., digest: _Optional[str] = ...) -> None: ...

class AuditFilter(_message.Message):
    __slots__ = ("workspace", "action", "actor", "since", "until")
    WORKSPACE_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    UNTIL_FIELD_NUMBER: _ClassVar[int]
    workspace: str
    action: str
    actor: str
    since: _timestamp_pb2.Timestamp
    until: _timestamp_pb2.Timestamp
    def __init__(self, workspace: _Optional[str] = ..., action: _Optional[str] = ..., actor: _Optional[str] = ..., since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListAuditRecordsRequest(_message.Message):
    __slots__ = ("filter", "page_size", "page_token")
    FILTER_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    filter: AuditFilter
    page_size: int
    page_token: str
    def __init__(self, filter: _Optional[_Union[AuditFilter, _Mapping]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListAuditRecordsResponse(_message.Message):
    __slots__ = ("records", "next_page_token")
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[AuditRecord]
    next_page_token: str
    def __init__(self, records: _Optional[_Iterable[_Union[AuditRecord, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class TailAuditRecordsRequest(_message.Message):
    __slots__ = ("filter", "cursor")
    FILTER_FIELD_NUMBER: _ClassVar[int]
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    filter: AuditFilter
    cursor: str
    def __init__(self, filter: _Optional[_Union[AuditFilter, _Mapping]] = ..., cursor: _Optional[str] = ...) -> None: ...

class TailAuditRecordsResponse(_message.Message):
    __slots__ = ("record", "cursor")
    RECORD_FIELD_NUMBER: _ClassVar[int]
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    record: AuditRecord
    cursor: str
    def __init__(self, record: _Optional[_Union[AuditRecord, _Mapping]] = ..., cursor: _Optional[str] = ...) -> None: ...

class ExportAuditRecordsRequest(_message.Message):
    __slots__ = ("filter", "cursor")
    FILTER_FIELD_NUMBER: _ClassVar[int]
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    filter: AuditFilter
    cursor: str
    def __init__(self, filter: _Optional[_Union[AuditFilter, _Mapping]] = ..., cursor: _Optional[str] = ...) -> None: ...

class ExportAuditRecordsResponse(_message.Message):
    __slots__ = ("record",)
    RECORD_FIELD_NUMBER: _ClassVar[int]
    record: AuditRecord
    def __init__(self, record: _Optional[_Union[AuditRecord, _Mapping]] = ...) -> None: ...

class VerifyAuditChainRequest(_message.Message):
    __slots__ = ("workspace",)
    WORKSPACE_FIELD_NUMBER: _ClassVar[int]
    workspace: str
    def __init__(self, workspace: _Optional[str] = ...) -> None: ...

class AuditChainBreak(_message.Message):
    __slots__ = ("problem", "record_id", "chain_seq", "detail")
    PROBLEM_FIELD_NUMBER: _ClassVar[int]
    RECORD_ID_FIELD_NUMBER: _ClassVar[int]
    CHAIN_SEQ_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    problem: AuditChainProblem
    record_id: str
    chain_seq: int
    detail: str
    def __init__(self, problem: _Optional[_Union[AuditChainProblem, str]] = ..., record_id: _Optional[str] = ..., chain_seq: _Optional[int] = ..., detail: _Optional[str] = ...) -> None: ...

class AuditChainStatus(_message.Message):
    __slots__ = ("workspace", "ok", "records_checked", "head_chain_seq", "head_digest", "checkpoint_chain_seq", "first_break")
    WORKSPACE_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    RECORDS_CHECKED_FIELD_NUMBER: _ClassVar[int]
    HEAD_CHAIN_SEQ_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIGEST_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_CHAIN_SEQ_FIELD_NUMBER: _ClassVar[int]
    FIRST_BREAK_FIELD_NUMBER: _ClassVar[int]
    workspace: str
    ok: bool
    records_checked: int
    head_chain_seq: int
    head_digest: str
    checkpoint_chain_seq: int
    first_break: AuditChainBreak
    def __init__(self, workspace: _Optional[str] = ..., ok: _Optional[bool] = ..., records_checked: _Optional[int] = ..., head_chain_seq: _Optional[int] = ..., head_digest: _Optional[str] = ..., checkpoint_chain_seq: _Optional[int] = ..., first_break: _Optional[_Union[AuditChainBreak, _Mapping]] = ...) -> None: ...

class VerifyAuditChainResponse(_message.Message):
    __slots__ = ("chains",)
    CHAINS_FIELD_NUMBER: _ClassVar[int]
    chains: _containers.RepeatedCompositeFieldContainer[AuditChainStatus]
    def __init__(self, chains: _Optional[_Iterable[_Union[AuditChainStatus, _Mapping]]] = ...) -> None: ...

class IngestAuditRecordsRequest(_message.Message):
    __slots__ = ("records", "report_refused")
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    REPORT_REFUSED_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[AuditRecord]
    report_refused: bool
    def __init__(self, records: _Optional[_Iterable[_Union[AuditRecord, _Mapping]]] = ..., report_refused: _Optional[bool] = ...) -> None: ...

class IngestAuditRecordsResponse(_message.Message):
    __slots__ = ("acknowledged_ids", "stored", "cursor", "refused")
    ACKNOWLEDGED_IDS_FIELD_NUMBER: _ClassVar[int]
    STORED_FIELD_NUMBER: _ClassVar[int]
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    acknowledged_ids: _containers.RepeatedScalarFieldContainer[str]
    stored: int
    cursor: str
    refused: _containers.RepeatedCompositeFieldContainer[RefusedAuditRecord]
    def __init__(self, acknowledged_ids: _Optional[_Iterable[str]] = ..., stored: _Optional[int] = ..., cursor: _Optional[str] = ..., refused: _Optional[_Iterable[_Union[RefusedAuditRecord, _Mapping]]] = ...) -> None: ...

class RefusedAuditRecord(_message.Message):
    __slots__ = ("index", "id", "reason", "detail")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    index: int
    id: str
    reason: AuditRefusalReason
    detail: str
    def __init__(self, index: _Optional[int] = ..., id: _Optional[str] = ..., reason: _Optional[_Union[AuditRefusalReason, str]] = ..., detail: _Optional[str] = ...) -> None: ...
