import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ProcessingStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PROCESSING_STATUS_UNSPECIFIED: _ClassVar[ProcessingStatus]
    PROCESSING_STATUS_PENDING: _ClassVar[ProcessingStatus]
    PROCESSING_STATUS_PROCESSING: _ClassVar[ProcessingStatus]
    PROCESSING_STATUS_COMPLETED: _ClassVar[ProcessingStatus]
    PROCESSING_STATUS_FAILED: _ClassVar[ProcessingStatus]
    PROCESSING_STATUS_NOT_APPLICABLE: _ClassVar[ProcessingStatus]

class MediaKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MEDIA_KIND_UNSPECIFIED: _ClassVar[MediaKind]
    MEDIA_KIND_IMAGE: _ClassVar[MediaKind]
    MEDIA_KIND_VIDEO: _ClassVar[MediaKind]

class MediaView(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MEDIA_VIEW_UNSPECIFIED: _ClassVar[MediaView]
    MEDIA_VIEW_BASIC: _ClassVar[MediaView]
    MEDIA_VIEW_FULL: _ClassVar[MediaView]

class MediaContentState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MEDIA_CONTENT_STATE_UNSPECIFIED: _ClassVar[MediaContentState]
    MEDIA_CONTENT_STATE_INCLUDED: _ClassVar[MediaContentState]
    MEDIA_CONTENT_STATE_NOT_FOUND: _ClassVar[MediaContentState]
    MEDIA_CONTENT_STATE_READ_SEPARATELY: _ClassVar[MediaContentState]

class WebhookDeliveryState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WEBHOOK_DELIVERY_STATE_UNSPECIFIED: _ClassVar[WebhookDeliveryState]
    WEBHOOK_DELIVERY_STATE_RETRYING: _ClassVar[WebhookDeliveryState]
    WEBHOOK_DELIVERY_STATE_DEAD: _ClassVar[WebhookDeliveryState]
PROCESSING_STATUS_UNSPECIFIED: ProcessingStatus
PROCESSING_STATUS_PENDING: ProcessingStatus
PROCESSING_STATUS_PROCESSING: ProcessingStatus
PROCESSING_STATUS_COMPLETED: ProcessingStatus
PROCESSING_STATUS_FAILED: ProcessingStatus
PROCESSING_STATUS_NOT_APPLICABLE: ProcessingStatus
MEDIA_KIND_UNSPECIFIED: MediaKind
MEDIA_KIND_IMAGE: MediaKind
MEDIA_KIND_VIDEO: MediaKind
MEDIA_VIEW_UNSPECIFIED: MediaView
MEDIA_VIEW_BASIC: MediaView
MEDIA_VIEW_FULL: MediaView
MEDIA_CONTENT_STATE_UNSPECIFIED: MediaContentState
MEDIA_CONTENT_STATE_INCLUDED: MediaContentState
MEDIA_CONTENT_STATE_NOT_FOUND: MediaContentState
MEDIA_CONTENT_STATE_READ_SEPARATELY: MediaContentState
WEBHOOK_DELIVERY_STATE_UNSPECIFIED: WebhookDeliveryState
WEBHOOK_DELIVERY_STATE_RETRYING: WebhookDeliveryState
WEBHOOK_DELIVERY_STATE_DEAD: WebhookDeliveryState

class MediaFile(_message.Message):
    __slots__ = ("filename", "content_type", "content")
    FILENAME_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    filename: str
    content_type: str
    content: bytes
    def __init__(self, filename: _Optional[str] = ..., content_type: _Optional[str] = ..., content: _Optional[bytes] = ...) -> None: ...

class AnalysisError(_message.Message):
    __slots__ = ("reason", "message", "attempt")
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    reason: str
    message: str
    attempt: int
    def __init__(self, reason: _Optional[str] = ..., message: _Optional[str] = ..., attempt: _Optional[int] = ...) -> None: ...

class Media(_message.Message):
    __slots__ = ("id", "owner_id", "category", "context", "filename", "content_type", "kind", "size_bytes", "sha256", "width", "height", "priority", "status", "not_applicable_reason", "tags", "embedding", "embedding_dimensions", "analyzer_name", "analyzer_version", "reused", "attempt", "error", "create_time", "update_time", "status_revision")
    class ContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    OWNER_ID_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    FILENAME_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    NOT_APPLICABLE_REASON_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    ANALYZER_NAME_FIELD_NUMBER: _ClassVar[int]
    ANALYZER_VERSION_FIELD_NUMBER: _ClassVar[int]
    REUSED_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    STATUS_REVISION_FIELD_NUMBER: _ClassVar[int]
    id: str
    owner_id: str
    category: str
    context: _containers.ScalarMap[str, str]
    filename: str
    content_type: str
    kind: MediaKind
    size_bytes: int
    sha256: str
    width: int
    height: int
    priority: int
    status: ProcessingStatus
    not_applicable_reason: str
    tags: _containers.RepeatedScalarFieldContainer[str]
    embedding: _containers.RepeatedScalarFieldContainer[float]
    embedding_dimensions: int
    analyzer_name: str
    analyzer_version: str
    reused: bool
    attempt: int
    error: AnalysisError
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    status_revision: int
    def __init__(self, id: _Optional[str] = ..., owner_id: _Optional[str] = ..., category: _Optional[str] = ..., context: _Optional[_Mapping[str, str]] = ..., filename: _Optional[str] = ..., content_type: _Optional[str] = ..., kind: _Optional[_Union[MediaKind, str]] = ..., size_bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., priority: _Optional[int] = ..., status: _Optional[_Union[ProcessingStatus, str]] = ..., not_applicable_reason: _Optional[str] = ..., tags: _Optional[_Iterable[str]] = ..., embedding: _Optional[_Iterable[float]] = ..., embedding_dimensions: _Optional[int] = ..., analyzer_name: _Optional[str] = ..., analyzer_version: _Optional[str] = ..., reused: _Optional[bool] = ..., attempt: _Optional[int] = ..., error: _Optional[_Union[AnalysisError, _Mapping]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., status_revision: _Optional[int] = ...) -> None: ...

class UploadMediaRequest(_message.Message):
    __slots__ = ("owner_id", "category", "context", "request_id", "priority", "files")
    class ContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    OWNER_ID_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    owner_id: str
    category: str
    context: _containers.ScalarMap[str, str]
    request_id: str
    priority: int
    files: _containers.RepeatedCompositeFieldContainer[MediaFile]
    def __init__(self, owner_id: _Optional[str] = ..., category: _Optional[str] = ..., context: _Optional[_Mapping[str, str]] = ..., request_id: _Optional[str] = ..., priority: _Optional[int] = ..., files: _Optional[_Iterable[_Union[MediaFile, _Mapping]]] = ...) -> None: ...

class UploadMediaResponse(_message.Message):
    __slots__ = ("media", "count", "message")
    MEDIA_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    media: _containers.RepeatedCompositeFieldContainer[Media]
    count: int
    message: str
    def __init__(self, media: _Optional[_Iterable[_Union[Media, _Mapping]]] = ..., count: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class UploadHeader(_message.Message):
    __slots__ = ("owner_id", "category", "context", "filename", "content_type", "request_id", "priority", "size_bytes", "sha256")
    class ContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    OWNER_ID_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    FILENAME_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    owner_id: str
    category: str
    context: _containers.ScalarMap[str, str]
    filename: str
    content_type: str
    request_id: str
    priority: int
    size_bytes: int
    sha256: str
    def __init__(self, owner_id: _Optional[str] = ..., category: _Optional[str] = ..., context: _Optional[_Mapping[str, str]] = ..., filename: _Optional[str] = ..., content_type: _Optional[str] = ..., request_id: _Optional[str] = ..., priority: _Optional[int] = ..., size_bytes: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class UploadMediaStreamRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: UploadHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[UploadHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class UploadMediaStreamResponse(_message.Message):
    __slots__ = ("media", "message")
    MEDIA_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    media: Media
    message: str
    def __init__(self, media: _Optional[_Union[Media, _Mapping]] = ..., message: _Optional[str] = ...) -> None: ...

class GetMediaRequest(_message.Message):
    __slots__ = ("media_id", "view")
    MEDIA_ID_FIELD_NUMBER: _ClassVar[int]
    VIEW_FIELD_NUMBER: _ClassVar[int]
    media_id: str
    view: MediaView
    def __init__(self, media_id: _Optional[str] = ..., view: _Optional[_Union[MediaView, str]] = ...) -> None: ...

class GetMediaResponse(_message.Message):
    __slots__ = ("media",)
    MEDIA_FIELD_NUMBER: _ClassVar[int]
    media: Media
    def __init__(self, media: _Optional[_Union[Media, _Mapping]] = ...) -> None: ...

class ListMediaRequest(_message.Message):
    __slots__ = ("owner_id", "status", "page_size", "page_token", "view")
    OWNER_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    VIEW_FIELD_NUMBER: _ClassVar[int]
    owner_id: str
    status: ProcessingStatus
    page_size: int
    page_token: str
    view: MediaView
    def __init__(self, owner_id: _Optional[str] = ..., status: _Optional[_Union[ProcessingStatus, str]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., view: _Optional[_Union[MediaView, str]] = ...) -> None: ...

class ListMediaResponse(_message.Message):
    __slots__ = ("media", "next_page_token")
    MEDIA_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    media: _containers.RepeatedCompositeFieldContainer[Media]
    next_page_token: str
    def __init__(self, media: _Optional[_Iterable[_Union[Media, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ReprocessMediaRequest(_message.Message):
    __slots__ = ("media_ids", "owner_id", "status")
    MEDIA_IDS_FIELD_NUMBER: _ClassVar[int]
    OWNER_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    media_ids: _containers.RepeatedScalarFieldContainer[str]
    owner_id: str
    status: ProcessingStatus
    def __init__(self, media_ids: _Optional[_Iterable[str]] = ..., owner_id: _Optional[str] = ..., status: _Optional[_Union[ProcessingStatus, str]] = ...) -> None: ...

class ReprocessMediaResponse(_message.Message):
    __slots__ = ("media_ids", "count")
    MEDIA_IDS_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    media_ids: _containers.RepeatedScalarFieldContainer[str]
    count: int
    def __init__(self, media_ids: _Optional[_Iterable[str]] = ..., count: _Optional[int] = ...) -> None: ...

class ReadMediaContentRequest(_message.Message):
    __slots__ = ("media_id",)
    MEDIA_ID_FIELD_NUMBER: _ClassVar[int]
    media_id: str
    def __init__(self, media_id: _Optional[str] = ...) -> None: ...

class ReadMediaContentResponse(_message.Message):
    __slots__ = ("data", "content_type", "size_bytes", "sha256")
    DATA_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    content_type: str
    size_bytes: int
    sha256: str
    def __init__(self, data: _Optional[bytes] = ..., content_type: _Optional[str] = ..., size_bytes: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class ReadMediaContentsRequest(_message.Message):
    __slots__ = ("media_ids",)
    MEDIA_IDS_FIELD_NUMBER: _ClassVar[int]
    media_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, media_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class ReadMediaContentsResponse(_message.Message):
    __slots__ = ("contents",)
    CONTENTS_FIELD_NUMBER: _ClassVar[int]
    contents: _containers.RepeatedCompositeFieldContainer[MediaContent]
    def __init__(self, contents: _Optional[_Iterable[_Union[MediaContent, _Mapping]]] = ...) -> None: ...

class MediaContent(_message.Message):
    __slots__ = ("media_id", "state", "data", "content_type", "size_bytes", "sha256")
    MEDIA_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    media_id: str
    state: MediaContentState
    data: bytes
    content_type: str
    size_bytes: int
    sha256: str
    def __init__(self, media_id: _Optional[str] = ..., state: _Optional[_Union[MediaContentState, str]] = ..., data: _Optional[bytes] = ..., content_type: _Optional[str] = ..., size_bytes: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class WebhookDelivery(_message.Message):
    __slots__ = ("id", "endpoint", "message_id", "media_id", "owner_id", "status", "revision", "state", "attempts", "last_error", "event_time", "create_time", "next_attempt_time", "dead_time")
    ID_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    MEDIA_ID_FIELD_NUMBER: _ClassVar[int]
    OWNER_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    EVENT_TIME_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    NEXT_ATTEMPT_TIME_FIELD_NUMBER: _ClassVar[int]
    DEAD_TIME_FIELD_NUMBER: _ClassVar[int]
    id: int
    endpoint: str
    message_id: str
    media_id: str
    owner_id: str
    status: ProcessingStatus
    revision: int
    state: WebhookDeliveryState
    attempts: int
    last_error: str
    event_time: _timestamp_pb2.Timestamp
    create_time: _timestamp_pb2.Timestamp
    next_attempt_time: _timestamp_pb2.Timestamp
    dead_time: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[int] = ..., endpoint: _Optional[str] = ..., message_id: _Optional[str] = ..., media_id: _Optional[str] = ..., owner_id: _Optional[str] = ..., status: _Optional[_Union[ProcessingStatus, str]] = ..., revision: _Optional[int] = ..., state: _Optional[_Union[WebhookDeliveryState, str]] = ..., attempts: _Optional[int] = ..., last_error: _Optional[str] = ..., event_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., next_attempt_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., dead_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListWebhookDeliveriesRequest(_message.Message):
    __slots__ = ("state", "endpoint", "owner_id", "page_size", "page_token")
    STATE_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    OWNER_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    state: WebhookDeliveryState
    endpoint: str
    owner_id: str
    page_size: int
    page_token: str
    def __init__(self, state: _Optional[_Union[WebhookDeliveryState, str]] = ..., endpoint: _Optional[str] = ..., owner_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListWebhookDeliveriesResponse(_message.Message):
    __slots__ = ("deliveries", "next_page_token")
    DELIVERIES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    deliveries: _containers.RepeatedCompositeFieldContainer[WebhookDelivery]
    next_page_token: str
    def __init__(self, deliveries: _Optional[_Iterable[_Union[WebhookDelivery, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class RetryWebhookDeliveriesRequest(_message.Message):
    __slots__ = ("delivery_ids", "endpoint")
    DELIVERY_IDS_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    delivery_ids: _containers.RepeatedScalarFieldContainer[int]
    endpoint: str
    def __init__(self, delivery_ids: _Optional[_Iterable[int]] = ..., endpoint: _Optional[str] = ...) -> None: ...

class RetryWebhookDeliveriesResponse(_message.Message):
    __slots__ = ("count",)
    COUNT_FIELD_NUMBER: _ClassVar[int]
    count: int
    def __init__(self, count: _Optional[int] = ...) -> None: ...
