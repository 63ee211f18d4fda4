import datetime

from google.protobuf import duration_pb2 as _duration_pb2
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

class JobView(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_VIEW_UNSPECIFIED: _ClassVar[JobView]
    JOB_VIEW_BASIC: _ClassVar[JobView]
    JOB_VIEW_FULL: _ClassVar[JobView]

class ReplicaState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REPLICA_STATE_UNSPECIFIED: _ClassVar[ReplicaState]
    REPLICA_STATE_LIVE: _ClassVar[ReplicaState]
    REPLICA_STATE_GONE: _ClassVar[ReplicaState]
PROCESSING_STATUS_UNSPECIFIED: ProcessingStatus
PROCESSING_STATUS_PENDING: ProcessingStatus
PROCESSING_STATUS_PROCESSING: ProcessingStatus
PROCESSING_STATUS_COMPLETED: ProcessingStatus
PROCESSING_STATUS_FAILED: ProcessingStatus
PROCESSING_STATUS_NOT_APPLICABLE: ProcessingStatus
JOB_VIEW_UNSPECIFIED: JobView
JOB_VIEW_BASIC: JobView
JOB_VIEW_FULL: JobView
REPLICA_STATE_UNSPECIFIED: ReplicaState
REPLICA_STATE_LIVE: ReplicaState
REPLICA_STATE_GONE: ReplicaState

class JobSpec(_message.Message):
    __slots__ = ("media_id", "owner_id", "category", "context", "sha256", "size_bytes", "content_type", "content_ref", "priority")
    class ContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MEDIA_ID_FIELD_NUMBER: _ClassVar[int]
    OWNER_ID_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_REF_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    media_id: str
    owner_id: str
    category: str
    context: _containers.ScalarMap[str, str]
    sha256: str
    size_bytes: int
    content_type: str
    content_ref: str
    priority: int
    def __init__(self, media_id: _Optional[str] = ..., owner_id: _Optional[str] = ..., category: _Optional[str] = ..., context: _Optional[_Mapping[str, str]] = ..., sha256: _Optional[str] = ..., size_bytes: _Optional[int] = ..., content_type: _Optional[str] = ..., content_ref: _Optional[str] = ..., priority: _Optional[int] = ...) -> None: ...

class AnalysisResult(_message.Message):
    __slots__ = ("tags", "embedding", "embedding_dimensions", "analyzer_name", "analyzer_version", "reused")
    TAGS_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    ANALYZER_NAME_FIELD_NUMBER: _ClassVar[int]
    ANALYZER_VERSION_FIELD_NUMBER: _ClassVar[int]
    REUSED_FIELD_NUMBER: _ClassVar[int]
    tags: _containers.RepeatedScalarFieldContainer[str]
    embedding: _containers.RepeatedScalarFieldContainer[float]
    embedding_dimensions: int
    analyzer_name: str
    analyzer_version: str
    reused: bool
    def __init__(self, tags: _Optional[_Iterable[str]] = ..., embedding: _Optional[_Iterable[float]] = ..., embedding_dimensions: _Optional[int] = ..., analyzer_name: _Optional[str] = ..., analyzer_version: _Optional[str] = ..., reused: _Optional[bool] = ...) -> None: ...

class JobError(_message.Message):
    __slots__ = ("reason", "message", "transient")
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TRANSIENT_FIELD_NUMBER: _ClassVar[int]
    reason: str
    message: str
    transient: bool
    def __init__(self, reason: _Optional[str] = ..., message: _Optional[str] = ..., transient: _Optional[bool] = ...) -> None: ...

class Attempt(_message.Message):
    __slots__ = ("number", "start_time", "end_time", "outcome", "error")
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    number: int
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    outcome: str
    error: JobError
    def __init__(self, number: _Optional[int] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., outcome: _Optional[str] = ..., error: _Optional[_Union[JobError, _Mapping]] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("media_id", "owner_id", "category", "context", "sha256", "size_bytes", "content_type", "priority", "status", "attempt", "max_attempts", "next_attempt_time", "submit_time", "update_time", "result", "error", "attempts", "revision")
    class ContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MEDIA_ID_FIELD_NUMBER: _ClassVar[int]
    OWNER_ID_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    MAX_ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_ATTEMPT_TIME_FIELD_NUMBER: _ClassVar[int]
    SUBMIT_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    media_id: str
    owner_id: str
    category: str
    context: _containers.ScalarMap[str, str]
    sha256: str
    size_bytes: int
    content_type: str
    priority: int
    status: ProcessingStatus
    attempt: int
    max_attempts: int
    next_attempt_time: _timestamp_pb2.Timestamp
    submit_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    result: AnalysisResult
    error: JobError
    attempts: _containers.RepeatedCompositeFieldContainer[Attempt]
    revision: int
    def __init__(self, media_id: _Optional[str] = ..., owner_id: _Optional[str] = ..., category: _Optional[str] = ..., context: _Optional[_Mapping[str, str]] = ..., sha256: _Optional[str] = ..., size_bytes: _Optional[int] = ..., content_type: _Optional[str] = ..., priority: _Optional[int] = ..., status: _Optional[_Union[ProcessingStatus, str]] = ..., attempt: _Optional[int] = ..., max_attempts: _Optional[int] = ..., next_attempt_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., submit_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., result: _Optional[_Union[AnalysisResult, _Mapping]] = ..., error: _Optional[_Union[JobError, _Mapping]] = ..., attempts: _Optional[_Iterable[_Union[Attempt, _Mapping]]] = ..., revision: _Optional[int] = ...) -> None: ...

class SubmitJobsRequest(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[JobSpec]
    def __init__(self, jobs: _Optional[_Iterable[_Union[JobSpec, _Mapping]]] = ...) -> None: ...

class SubmitJobsResponse(_message.Message):
    __slots__ = ("accepted_count", "existing_count")
    ACCEPTED_COUNT_FIELD_NUMBER: _ClassVar[int]
    EXISTING_COUNT_FIELD_NUMBER: _ClassVar[int]
    accepted_count: int
    existing_count: int
    def __init__(self, accepted_count: _Optional[int] = ..., existing_count: _Optional[int] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("media_id", "view")
    MEDIA_ID_FIELD_NUMBER: _ClassVar[int]
    VIEW_FIELD_NUMBER: _ClassVar[int]
    media_id: str
    view: JobView
    def __init__(self, media_id: _Optional[str] = ..., view: _Optional[_Union[JobView, str]] = ...) -> None: ...

class GetJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: Job
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("status", "owner_id", "error_reason", "page_size", "page_token", "view")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    OWNER_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_REASON_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    VIEW_FIELD_NUMBER: _ClassVar[int]
    status: ProcessingStatus
    owner_id: str
    error_reason: str
    page_size: int
    page_token: str
    view: JobView
    def __init__(self, status: _Optional[_Union[ProcessingStatus, str]] = ..., owner_id: _Optional[str] = ..., error_reason: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., view: _Optional[_Union[JobView, str]] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs", "next_page_token")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    next_page_token: str
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class WatchStatusRequest(_message.Message):
    __slots__ = ("media_ids", "owner_id", "start_revision", "send_initial_state", "until_terminal", "include_embedding")
    MEDIA_IDS_FIELD_NUMBER: _ClassVar[int]
    OWNER_ID_FIELD_NUMBER: _ClassVar[int]
    START_REVISION_FIELD_NUMBER: _ClassVar[int]
    SEND_INITIAL_STATE_FIELD_NUMBER: _ClassVar[int]
    UNTIL_TERMINAL_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    media_ids: _containers.RepeatedScalarFieldContainer[str]
    owner_id: str
    start_revision: int
    send_initial_state: bool
    until_terminal: bool
    include_embedding: bool
    def __init__(self, media_ids: _Optional[_Iterable[str]] = ..., owner_id: _Optional[str] = ..., start_revision: _Optional[int] = ..., send_initial_state: _Optional[bool] = ..., until_terminal: _Optional[bool] = ..., include_embedding: _Optional[bool] = ...) -> None: ...

class StatusChange(_message.Message):
    __slots__ = ("media_id", "owner_id", "status", "previous_status", "attempt", "result", "error", "event_time", "next_attempt_time", "initial_state")
    MEDIA_ID_FIELD_NUMBER: _ClassVar[int]
    OWNER_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_STATUS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    EVENT_TIME_FIELD_NUMBER: _ClassVar[int]
    NEXT_ATTEMPT_TIME_FIELD_NUMBER: _ClassVar[int]
    INITIAL_STATE_FIELD_NUMBER: _ClassVar[int]
    media_id: str
    owner_id: str
    status: ProcessingStatus
    previous_status: ProcessingStatus
    attempt: int
    result: AnalysisResult
    error: JobError
    event_time: _timestamp_pb2.Timestamp
    next_attempt_time: _timestamp_pb2.Timestamp
    initial_state: bool
    def __init__(self, media_id: _Optional[str] = ..., owner_id: _Optional[str] = ..., status: _Optional[_Union[ProcessingStatus, str]] = ..., previous_status: _Optional[_Union[ProcessingStatus, str]] = ..., attempt: _Optional[int] = ..., result: _Optional[_Union[AnalysisResult, _Mapping]] = ..., error: _Optional[_Union[JobError, _Mapping]] = ..., event_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., next_attempt_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., initial_state: _Optional[bool] = ...) -> None: ...

class Bookmark(_message.Message):
    __slots__ = ("initial_state_end",)
    INITIAL_STATE_END_FIELD_NUMBER: _ClassVar[int]
    initial_state_end: bool
    def __init__(self, initial_state_end: _Optional[bool] = ...) -> None: ...

class WatchStatusResponse(_message.Message):
    __slots__ = ("revision", "change", "bookmark")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    CHANGE_FIELD_NUMBER: _ClassVar[int]
    BOOKMARK_FIELD_NUMBER: _ClassVar[int]
    revision: int
    change: StatusChange
    bookmark: Bookmark
    def __init__(self, revision: _Optional[int] = ..., change: _Optional[_Union[StatusChange, _Mapping]] = ..., bookmark: _Optional[_Union[Bookmark, _Mapping]] = ...) -> None: ...

class GetQueueStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusCount(_message.Message):
    __slots__ = ("status", "count")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    status: ProcessingStatus
    count: int
    def __init__(self, status: _Optional[_Union[ProcessingStatus, str]] = ..., count: _Optional[int] = ...) -> None: ...

class RateLimit(_message.Message):
    __slots__ = ("api", "rate_per_second", "burst", "current_use", "throttled_until", "quota_errors")
    API_FIELD_NUMBER: _ClassVar[int]
    RATE_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    BURST_FIELD_NUMBER: _ClassVar[int]
    CURRENT_USE_FIELD_NUMBER: _ClassVar[int]
    THROTTLED_UNTIL_FIELD_NUMBER: _ClassVar[int]
    QUOTA_ERRORS_FIELD_NUMBER: _ClassVar[int]
    api: str
    rate_per_second: float
    burst: int
    current_use: float
    throttled_until: _timestamp_pb2.Timestamp
    quota_errors: int
    def __init__(self, api: _Optional[str] = ..., rate_per_second: _Optional[float] = ..., burst: _Optional[int] = ..., current_use: _Optional[float] = ..., throttled_until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., quota_errors: _Optional[int] = ...) -> None: ...

class Replica(_message.Message):
    __slots__ = ("replica_id", "host", "pid", "workers_total", "workers_busy", "start_time", "last_seen_time", "state")
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    WORKERS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    WORKERS_BUSY_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_TIME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    host: str
    pid: int
    workers_total: int
    workers_busy: int
    start_time: _timestamp_pb2.Timestamp
    last_seen_time: _timestamp_pb2.Timestamp
    state: ReplicaState
    def __init__(self, replica_id: _Optional[str] = ..., host: _Optional[str] = ..., pid: _Optional[int] = ..., workers_total: _Optional[int] = ..., workers_busy: _Optional[int] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_seen_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., state: _Optional[_Union[ReplicaState, str]] = ...) -> None: ...

class GetQueueStatusResponse(_message.Message):
    __slots__ = ("counts", "workers_busy", "workers_total", "paused", "rate_limits", "completed_last_minute", "oldest_pending_age", "estimated_wait", "current_revision", "analyzer_name", "analyzer_version", "replicas", "replica_id")
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    WORKERS_BUSY_FIELD_NUMBER: _ClassVar[int]
    WORKERS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    PAUSED_FIELD_NUMBER: _ClassVar[int]
    RATE_LIMITS_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_LAST_MINUTE_FIELD_NUMBER: _ClassVar[int]
    OLDEST_PENDING_AGE_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_WAIT_FIELD_NUMBER: _ClassVar[int]
    CURRENT_REVISION_FIELD_NUMBER: _ClassVar[int]
    ANALYZER_NAME_FIELD_NUMBER: _ClassVar[int]
    ANALYZER_VERSION_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    counts: _containers.RepeatedCompositeFieldContainer[StatusCount]
    workers_busy: int
    workers_total: int
    paused: bool
    rate_limits: _containers.RepeatedCompositeFieldContainer[RateLimit]
    completed_last_minute: int
    oldest_pending_age: _duration_pb2.Duration
    estimated_wait: _duration_pb2.Duration
    current_revision: int
    analyzer_name: str
    analyzer_version: str
    replicas: _containers.RepeatedCompositeFieldContainer[Replica]
    replica_id: str
    def __init__(self, counts: _Optional[_Iterable[_Union[StatusCount, _Mapping]]] = ..., workers_busy: _Optional[int] = ..., workers_total: _Optional[int] = ..., paused: _Optional[bool] = ..., rate_limits: _Optional[_Iterable[_Union[RateLimit, _Mapping]]] = ..., completed_last_minute: _Optional[int] = ..., oldest_pending_age: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., estimated_wait: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., current_revision: _Optional[int] = ..., analyzer_name: _Optional[str] = ..., analyzer_version: _Optional[str] = ..., replicas: _Optional[_Iterable[_Union[Replica, _Mapping]]] = ..., replica_id: _Optional[str] = ...) -> None: ...

class RetryJobsRequest(_message.Message):
    __slots__ = ("media_ids", "owner_id", "status")
    MEDIA_IDS_FIELD_NUMBER: _ClassVar[int]
    OWNER_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    media_ids: _containers.RepeatedScalarFieldContainer[str]
    owner_id: str
    status: ProcessingStatus
    def __init__(self, media_ids: _Optional[_Iterable[str]] = ..., owner_id: _Optional[str] = ..., status: _Optional[_Union[ProcessingStatus, str]] = ...) -> None: ...

class RetryJobsResponse(_message.Message):
    __slots__ = ("media_ids", "count")
    MEDIA_IDS_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    media_ids: _containers.RepeatedScalarFieldContainer[str]
    count: int
    def __init__(self, media_ids: _Optional[_Iterable[str]] = ..., count: _Optional[int] = ...) -> None: ...

class PauseQueueRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PauseQueueResponse(_message.Message):
    __slots__ = ("paused",)
    PAUSED_FIELD_NUMBER: _ClassVar[int]
    paused: bool
    def __init__(self, paused: _Optional[bool] = ...) -> None: ...

class ResumeQueueRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ResumeQueueResponse(_message.Message):
    __slots__ = ("paused",)
    PAUSED_FIELD_NUMBER: _ClassVar[int]
    paused: bool
    def __init__(self, paused: _Optional[bool] = ...) -> None: ...
