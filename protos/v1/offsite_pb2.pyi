from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SubmissionState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SUBMISSION_STATE_UNSPECIFIED: _ClassVar[SubmissionState]
    SUBMISSION_STATE_UPLOADING: _ClassVar[SubmissionState]
    SUBMISSION_STATE_RECEIVED: _ClassVar[SubmissionState]
    SUBMISSION_STATE_REJECTED: _ClassVar[SubmissionState]
    SUBMISSION_STATE_ACCEPTED: _ClassVar[SubmissionState]
    SUBMISSION_STATE_PLUGGED: _ClassVar[SubmissionState]
    SUBMISSION_STATE_EXPIRED: _ClassVar[SubmissionState]
SUBMISSION_STATE_UNSPECIFIED: SubmissionState
SUBMISSION_STATE_UPLOADING: SubmissionState
SUBMISSION_STATE_RECEIVED: SubmissionState
SUBMISSION_STATE_REJECTED: SubmissionState
SUBMISSION_STATE_ACCEPTED: SubmissionState
SUBMISSION_STATE_PLUGGED: SubmissionState
SUBMISSION_STATE_EXPIRED: SubmissionState

class ListJobsRequest(_message.Message):
    __slots__ = ("page_token",)
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_token: str
    def __init__(self, page_token: _Optional[str] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs", "next_page_token")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    next_page_token: str
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class Policy(_message.Message):
    __slots__ = ("max_epsilon", "max_delta", "allow_no_dp", "max_adapter_bytes")
    MAX_EPSILON_FIELD_NUMBER: _ClassVar[int]
    MAX_DELTA_FIELD_NUMBER: _ClassVar[int]
    ALLOW_NO_DP_FIELD_NUMBER: _ClassVar[int]
    MAX_ADAPTER_BYTES_FIELD_NUMBER: _ClassVar[int]
    max_epsilon: float
    max_delta: float
    allow_no_dp: bool
    max_adapter_bytes: int
    def __init__(self, max_epsilon: _Optional[float] = ..., max_delta: _Optional[float] = ..., allow_no_dp: _Optional[bool] = ..., max_adapter_bytes: _Optional[int] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("job_id", "bundle_id", "manifest", "manifest_signature", "policy", "published_at")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_ID_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    PUBLISHED_AT_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    bundle_id: str
    manifest: bytes
    manifest_signature: bytes
    policy: Policy
    published_at: str
    def __init__(self, job_id: _Optional[str] = ..., bundle_id: _Optional[str] = ..., manifest: _Optional[bytes] = ..., manifest_signature: _Optional[bytes] = ..., policy: _Optional[_Union[Policy, _Mapping]] = ..., published_at: _Optional[str] = ...) -> None: ...

class DownloadFileRequest(_message.Message):
    __slots__ = ("job_id", "path", "offset")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    path: str
    offset: int
    def __init__(self, job_id: _Optional[str] = ..., path: _Optional[str] = ..., offset: _Optional[int] = ...) -> None: ...

class FileChunk(_message.Message):
    __slots__ = ("offset", "data", "sha256", "file_size")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    FILE_SIZE_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    sha256: str
    file_size: int
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ..., sha256: _Optional[str] = ..., file_size: _Optional[int] = ...) -> None: ...

class BeginSubmissionRequest(_message.Message):
    __slots__ = ("envelope", "signature")
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    envelope: bytes
    signature: bytes
    def __init__(self, envelope: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class BeginSubmissionResponse(_message.Message):
    __slots__ = ("submission_id", "committed_size", "total_size")
    SUBMISSION_ID_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_SIZE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    submission_id: str
    committed_size: int
    total_size: int
    def __init__(self, submission_id: _Optional[str] = ..., committed_size: _Optional[int] = ..., total_size: _Optional[int] = ...) -> None: ...

class WriteSubmissionRequest(_message.Message):
    __slots__ = ("submission_id", "offset", "data", "sha256", "finish_write")
    SUBMISSION_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    FINISH_WRITE_FIELD_NUMBER: _ClassVar[int]
    submission_id: str
    offset: int
    data: bytes
    sha256: str
    finish_write: bool
    def __init__(self, submission_id: _Optional[str] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., sha256: _Optional[str] = ..., finish_write: _Optional[bool] = ...) -> None: ...

class WriteSubmissionResponse(_message.Message):
    __slots__ = ("committed_size", "submission")
    COMMITTED_SIZE_FIELD_NUMBER: _ClassVar[int]
    SUBMISSION_FIELD_NUMBER: _ClassVar[int]
    committed_size: int
    submission: Submission
    def __init__(self, committed_size: _Optional[int] = ..., submission: _Optional[_Union[Submission, _Mapping]] = ...) -> None: ...

class QueryWriteStatusRequest(_message.Message):
    __slots__ = ("submission_id",)
    SUBMISSION_ID_FIELD_NUMBER: _ClassVar[int]
    submission_id: str
    def __init__(self, submission_id: _Optional[str] = ...) -> None: ...

class QueryWriteStatusResponse(_message.Message):
    __slots__ = ("committed_size", "total_size", "complete")
    COMMITTED_SIZE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    committed_size: int
    total_size: int
    complete: bool
    def __init__(self, committed_size: _Optional[int] = ..., total_size: _Optional[int] = ..., complete: _Optional[bool] = ...) -> None: ...

class GetSubmissionRequest(_message.Message):
    __slots__ = ("submission_id",)
    SUBMISSION_ID_FIELD_NUMBER: _ClassVar[int]
    submission_id: str
    def __init__(self, submission_id: _Optional[str] = ...) -> None: ...

class Submission(_message.Message):
    __slots__ = ("submission_id", "job_id", "state", "reason", "adapter_sha256", "dataset_id", "epsilon", "delta", "created_at", "decided_at", "ledger_checkpoint")
    SUBMISSION_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_SHA256_FIELD_NUMBER: _ClassVar[int]
    DATASET_ID_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    DECIDED_AT_FIELD_NUMBER: _ClassVar[int]
    LEDGER_CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    submission_id: str
    job_id: str
    state: SubmissionState
    reason: str
    adapter_sha256: str
    dataset_id: str
    epsilon: float
    delta: float
    created_at: str
    decided_at: str
    ledger_checkpoint: bytes
    def __init__(self, submission_id: _Optional[str] = ..., job_id: _Optional[str] = ..., state: _Optional[_Union[SubmissionState, str]] = ..., reason: _Optional[str] = ..., adapter_sha256: _Optional[str] = ..., dataset_id: _Optional[str] = ..., epsilon: _Optional[float] = ..., delta: _Optional[float] = ..., created_at: _Optional[str] = ..., decided_at: _Optional[str] = ..., ledger_checkpoint: _Optional[bytes] = ...) -> None: ...

class ListReceiptsRequest(_message.Message):
    __slots__ = ("dataset_id",)
    DATASET_ID_FIELD_NUMBER: _ClassVar[int]
    dataset_id: str
    def __init__(self, dataset_id: _Optional[str] = ...) -> None: ...

class Receipt(_message.Message):
    __slots__ = ("submission_id", "job_id", "dataset_id", "receipt", "signature", "accepted_at")
    SUBMISSION_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    DATASET_ID_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_AT_FIELD_NUMBER: _ClassVar[int]
    submission_id: str
    job_id: str
    dataset_id: str
    receipt: bytes
    signature: bytes
    accepted_at: str
    def __init__(self, submission_id: _Optional[str] = ..., job_id: _Optional[str] = ..., dataset_id: _Optional[str] = ..., receipt: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., accepted_at: _Optional[str] = ...) -> None: ...

class ListReceiptsResponse(_message.Message):
    __slots__ = ("receipts",)
    RECEIPTS_FIELD_NUMBER: _ClassVar[int]
    receipts: _containers.RepeatedCompositeFieldContainer[Receipt]
    def __init__(self, receipts: _Optional[_Iterable[_Union[Receipt, _Mapping]]] = ...) -> None: ...

class GetBudgetRequest(_message.Message):
    __slots__ = ("dataset_id",)
    DATASET_ID_FIELD_NUMBER: _ClassVar[int]
    dataset_id: str
    def __init__(self, dataset_id: _Optional[str] = ...) -> None: ...

class RecordedRun(_message.Message):
    __slots__ = ("run_id", "noise_multiplier", "sample_rate", "steps")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    NOISE_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    def __init__(self, run_id: _Optional[str] = ..., noise_multiplier: _Optional[float] = ..., sample_rate: _Optional[float] = ..., steps: _Optional[int] = ...) -> None: ...

class DatasetBudget(_message.Message):
    __slots__ = ("dataset_id", "granted", "grant_epsilon", "grant_delta", "granted_at", "spent_epsilon", "remaining_epsilon", "accepted_submissions", "runs")
    DATASET_ID_FIELD_NUMBER: _ClassVar[int]
    GRANTED_FIELD_NUMBER: _ClassVar[int]
    GRANT_EPSILON_FIELD_NUMBER: _ClassVar[int]
    GRANT_DELTA_FIELD_NUMBER: _ClassVar[int]
    GRANTED_AT_FIELD_NUMBER: _ClassVar[int]
    SPENT_EPSILON_FIELD_NUMBER: _ClassVar[int]
    REMAINING_EPSILON_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_SUBMISSIONS_FIELD_NUMBER: _ClassVar[int]
    RUNS_FIELD_NUMBER: _ClassVar[int]
    dataset_id: str
    granted: bool
    grant_epsilon: float
    grant_delta: float
    granted_at: str
    spent_epsilon: float
    remaining_epsilon: float
    accepted_submissions: int
    runs: _containers.RepeatedCompositeFieldContainer[RecordedRun]
    def __init__(self, dataset_id: _Optional[str] = ..., granted: _Optional[bool] = ..., grant_epsilon: _Optional[float] = ..., grant_delta: _Optional[float] = ..., granted_at: _Optional[str] = ..., spent_epsilon: _Optional[float] = ..., remaining_epsilon: _Optional[float] = ..., accepted_submissions: _Optional[int] = ..., runs: _Optional[_Iterable[_Union[RecordedRun, _Mapping]]] = ...) -> None: ...

class GetBudgetResponse(_message.Message):
    __slots__ = ("datasets", "ledger_checkpoint")
    DATASETS_FIELD_NUMBER: _ClassVar[int]
    LEDGER_CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    datasets: _containers.RepeatedCompositeFieldContainer[DatasetBudget]
    ledger_checkpoint: bytes
    def __init__(self, datasets: _Optional[_Iterable[_Union[DatasetBudget, _Mapping]]] = ..., ledger_checkpoint: _Optional[bytes] = ...) -> None: ...
