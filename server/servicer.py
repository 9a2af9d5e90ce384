"""The gRPC servicer: translates between protobuf messages and the service layer, and nothing else.

Identity, error mapping and revocation are the wrapper's (``auth``); what each call does is the
service's (``service``). ``context.call.caller`` is the authenticated caller.
"""

from __future__ import annotations

from offsite.server.service import JobView, OffsiteService, WriteMessage
from offsite.server.storage.base import SubmissionRecord, SubmissionState
from offsite.wire.v1 import offsite_pb2 as pb
from offsite.wire.v1 import offsite_pb2_grpc as pb_grpc

_STATES = {
    SubmissionState.UPLOADING: pb.SUBMISSION_STATE_UPLOADING,
    SubmissionState.RECEIVED: pb.SUBMISSION_STATE_RECEIVED,
    SubmissionState.REJECTED: pb.SUBMISSION_STATE_REJECTED,
    SubmissionState.ACCEPTED: pb.SUBMISSION_STATE_ACCEPTED,
    SubmissionState.PLUGGED: pb.SUBMISSION_STATE_PLUGGED,
    SubmissionState.EXPIRED: pb.SUBMISSION_STATE_EXPIRED,
}


def _job(view: JobView) -> pb.Job:
    job = view.job
    return pb.Job(
        job_id=job.job_id,
        bundle_id=job.bundle_id,
        manifest=view.manifest,
        manifest_signature=view.signature,
        policy=pb.Policy(
            max_epsilon=job.max_epsilon,
            max_delta=job.max_delta,
            allow_no_dp=job.allow_no_dp,
            max_adapter_bytes=job.max_adapter_bytes,
        ),
        published_at=job.published_at,
    )


def _submission(record: SubmissionRecord) -> pb.Submission:
    return pb.Submission(
        submission_id=record.submission_id,
        job_id=record.job_id,
        state=_STATES[record.state],
        reason=record.reason,
        adapter_sha256=record.adapter_sha256,
        dataset_id=record.dataset_id,
        epsilon=record.epsilon,
        delta=record.delta,
        created_at=record.created_at,
        decided_at=record.decided_at or "",
        ledger_checkpoint=record.ledger_checkpoint or b"",
    )


def _budget(view) -> pb.DatasetBudget:
    grant = view.grant
    spent = view.spent() if grant is not None else 0.0
    return pb.DatasetBudget(
        dataset_id=view.dataset_id,
        granted=grant is not None,
        grant_epsilon=grant.epsilon if grant else 0.0,
        grant_delta=grant.delta if grant else 0.0,
        granted_at=grant.at if grant else "",
        spent_epsilon=spent,
        remaining_epsilon=(grant.epsilon - spent) if grant else 0.0,
        accepted_submissions=view.accepted,
        runs=[
            pb.RecordedRun(
                run_id=r["run_id"],
                noise_multiplier=r["noise_multiplier"],
                sample_rate=r["sample_rate"],
                steps=r["steps"],
            )
            for r in view.union
        ],
    )


class OffsiteServicer(pb_grpc.OffsiteServiceServicer):
    def __init__(self, service: OffsiteService):
        self._service = service

    def ListJobs(self, request, context):
        views, token = self._service.list_jobs(context.call.caller, request.page_token)
        return pb.ListJobsResponse(jobs=[_job(v) for v in views], next_page_token=token)

    def DownloadFile(self, request, context):
        for c in self._service.download(context.call.caller, request.job_id, request.path, request.offset):
            yield pb.FileChunk(offset=c.offset, data=c.data, sha256=c.sha256, file_size=c.file_size)

    def BeginSubmission(self, request, context):
        record = self._service.begin_submission(context.call.caller, request.envelope, request.signature)
        return pb.BeginSubmissionResponse(
            submission_id=record.submission_id, committed_size=record.committed, total_size=record.total
        )

    def WriteSubmission(self, request_iterator, context):
        messages = (
            WriteMessage(m.submission_id, m.offset, m.data, m.sha256, m.finish_write)
            for m in request_iterator
        )
        committed, record = self._service.write_submission(context.call, messages)
        return pb.WriteSubmissionResponse(
            committed_size=committed, submission=_submission(record) if record else None
        )

    def QueryWriteStatus(self, request, context):
        committed, total, complete = self._service.query_write_status(
            context.call.caller, request.submission_id
        )
        return pb.QueryWriteStatusResponse(committed_size=committed, total_size=total, complete=complete)

    def GetSubmission(self, request, context):
        return _submission(self._service.get_submission(context.call.caller, request.submission_id))

    def ListReceipts(self, request, context):
        records = self._service.list_receipts(context.call.caller, request.dataset_id)
        return pb.ListReceiptsResponse(
            receipts=[
                pb.Receipt(
                    submission_id=r.submission_id,
                    job_id=r.job_id,
                    dataset_id=r.dataset_id,
                    receipt=r.receipt or b"",
                    signature=r.receipt_signature or b"",
                    accepted_at=r.decided_at or "",
                )
                for r in records
            ]
        )

    def GetBudget(self, request, context):
        views, checkpoint = self._service.budgets(context.call.caller, request.dataset_id)
        return pb.GetBudgetResponse(datasets=[_budget(v) for v in views], ledger_checkpoint=checkpoint or b"")
