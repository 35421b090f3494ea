from google.protobuf import empty_pb2 as _empty_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Thumb(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    THUMB_UNSPECIFIED: _ClassVar[Thumb]
    THUMB_UP: _ClassVar[Thumb]
    THUMB_DOWN: _ClassVar[Thumb]
THUMB_UNSPECIFIED: Thumb
THUMB_UP: Thumb
THUMB_DOWN: Thumb

class Feedback(_message.Message):
    __slots__ = ("event_id", "response_id", "user_id", "thumb", "rating", "click", "dwell_ms", "copy", "regenerate", "comment", "correction")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    THUMB_FIELD_NUMBER: _ClassVar[int]
    RATING_FIELD_NUMBER: _ClassVar[int]
    CLICK_FIELD_NUMBER: _ClassVar[int]
    DWELL_MS_FIELD_NUMBER: _ClassVar[int]
    COPY_FIELD_NUMBER: _ClassVar[int]
    REGENERATE_FIELD_NUMBER: _ClassVar[int]
    COMMENT_FIELD_NUMBER: _ClassVar[int]
    CORRECTION_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    response_id: str
    user_id: str
    thumb: Thumb
    rating: int
    click: _empty_pb2.Empty
    dwell_ms: int
    copy: _empty_pb2.Empty
    regenerate: _empty_pb2.Empty
    comment: str
    correction: str
    def __init__(self, event_id: _Optional[str] = ..., response_id: _Optional[str] = ..., user_id: _Optional[str] = ..., thumb: _Optional[_Union[Thumb, str]] = ..., rating: _Optional[int] = ..., click: _Optional[_Union[_empty_pb2.Empty, _Mapping]] = ..., dwell_ms: _Optional[int] = ..., copy: _Optional[_Union[_empty_pb2.Empty, _Mapping]] = ..., regenerate: _Optional[_Union[_empty_pb2.Empty, _Mapping]] = ..., comment: _Optional[str] = ..., correction: _Optional[str] = ...) -> None: ...

class FeedbackBatch(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[Feedback]
    def __init__(self, events: _Optional[_Iterable[_Union[Feedback, _Mapping]]] = ...) -> None: ...

class FeedbackAck(_message.Message):
    __slots__ = ("accepted", "duplicates", "superseded")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    SUPERSEDED_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    duplicates: int
    superseded: int
    def __init__(self, accepted: _Optional[int] = ..., duplicates: _Optional[int] = ..., superseded: _Optional[int] = ...) -> None: ...

class WithdrawRequest(_message.Message):
    __slots__ = ("response_id", "user_id", "kind")
    RESPONSE_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    response_id: str
    user_id: str
    kind: str
    def __init__(self, response_id: _Optional[str] = ..., user_id: _Optional[str] = ..., kind: _Optional[str] = ...) -> None: ...

class WithdrawAck(_message.Message):
    __slots__ = ("withdrawn",)
    WITHDRAWN_FIELD_NUMBER: _ClassVar[int]
    withdrawn: int
    def __init__(self, withdrawn: _Optional[int] = ...) -> None: ...
