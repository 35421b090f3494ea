import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServedVersion(_message.Message):
    __slots__ = ("version", "state", "serving_since", "published_at", "sha256", "install_ms")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SERVING_SINCE_FIELD_NUMBER: _ClassVar[int]
    PUBLISHED_AT_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    INSTALL_MS_FIELD_NUMBER: _ClassVar[int]
    version: str
    state: str
    serving_since: _timestamp_pb2.Timestamp
    published_at: _timestamp_pb2.Timestamp
    sha256: str
    install_ms: float
    def __init__(self, version: _Optional[str] = ..., state: _Optional[str] = ..., serving_since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., published_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., sha256: _Optional[str] = ..., install_ms: _Optional[float] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("base_model", "base_model_path", "versions", "started_at", "swaps")
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_PATH_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    SWAPS_FIELD_NUMBER: _ClassVar[int]
    base_model: str
    base_model_path: str
    versions: _containers.RepeatedCompositeFieldContainer[ServedVersion]
    started_at: _timestamp_pb2.Timestamp
    swaps: int
    def __init__(self, base_model: _Optional[str] = ..., base_model_path: _Optional[str] = ..., versions: _Optional[_Iterable[_Union[ServedVersion, _Mapping]]] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., swaps: _Optional[int] = ...) -> None: ...

class ListVersionsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class VersionInfo(_message.Message):
    __slots__ = ("version", "state", "parent", "published_at", "reason", "evidence_json")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PARENT_FIELD_NUMBER: _ClassVar[int]
    PUBLISHED_AT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    EVIDENCE_JSON_FIELD_NUMBER: _ClassVar[int]
    version: str
    state: str
    parent: str
    published_at: _timestamp_pb2.Timestamp
    reason: str
    evidence_json: str
    def __init__(self, version: _Optional[str] = ..., state: _Optional[str] = ..., parent: _Optional[str] = ..., published_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., reason: _Optional[str] = ..., evidence_json: _Optional[str] = ...) -> None: ...

class ListVersionsResponse(_message.Message):
    __slots__ = ("versions",)
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    versions: _containers.RepeatedCompositeFieldContainer[VersionInfo]
    def __init__(self, versions: _Optional[_Iterable[_Union[VersionInfo, _Mapping]]] = ...) -> None: ...

class PromoteRequest(_message.Message):
    __slots__ = ("version", "reason")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    version: str
    reason: str
    def __init__(self, version: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ("version", "reason")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    version: str
    reason: str
    def __init__(self, version: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ForgetUserRequest(_message.Message):
    __slots__ = ("user_id",)
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    def __init__(self, user_id: _Optional[str] = ...) -> None: ...

class ForgetUserResponse(_message.Message):
    __slots__ = ("answers_deleted", "feedback_deleted", "already_forgotten")
    ANSWERS_DELETED_FIELD_NUMBER: _ClassVar[int]
    FEEDBACK_DELETED_FIELD_NUMBER: _ClassVar[int]
    ALREADY_FORGOTTEN_FIELD_NUMBER: _ClassVar[int]
    answers_deleted: int
    feedback_deleted: int
    already_forgotten: bool
    def __init__(self, answers_deleted: _Optional[int] = ..., feedback_deleted: _Optional[int] = ..., already_forgotten: _Optional[bool] = ...) -> None: ...
