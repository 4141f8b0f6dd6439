"""Image jobs (``Prefer: respond-async``): their rows, their kept input images, their states and the object a client
polls. A job moves queued → running → succeeded | failed, or to cancelled; every move is one conditional UPDATE, so
runners and sweepers on several processes and nodes never move a job twice. ``gateway/services.py`` submits and runs
them; ``gateway/job_runner.py`` claims their tasks."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.core.files.base import ContentFile
from django.core.files.storage import storages
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db.models import F, Q
from django.db.models.functions import Coalesce
from django.utils import timezone
from django.utils.datastructures import MultiValueDict

from gateway.models import ApiToken, ImageJob
from gateway.tasks import webhook_enqueue
from openopen8.core.errors import GatewayError, NotFound, RateLimited
from openopen8.core.schemas import ImageRequest, JSONDict

ACTIVE = (ImageJob.Status.QUEUED, ImageJob.Status.RUNNING)
FILE_FIELDS = ("images", "mask", "markup")


def new_job_id() -> str:
    return f"imgjob_{uuid.uuid4().hex}"


def job_admit(token: ApiToken) -> None:
    """Raise ``RateLimited`` when the token has as many jobs waiting or running as it may."""
    limit = token.max_queued_jobs
    if limit is not None and ImageJob.objects.filter(token=token, status__in=ACTIVE).count() >= limit:
        raise RateLimited(f"This API key already has {limit} image job(s) queued or running; wait for one to end.",
                          code="too_many_jobs", retry_after=5)


def job_create(*, job_id: str, token: ApiToken, request_id: str, body: JSONDict, req: ImageRequest,
               files_url: str, callback_url: str = "") -> ImageJob:
    """Save a job with its checked fields and its input images (kept in the ``jobs`` storage until it ends)."""
    storage, inputs = storages["jobs"], []
    files = [("image[]", image) for image in req.images]
    files += [(name, image) for name, image in (("mask", req.mask), ("markup", req.markup)) if image is not None]
    for index, (field, image) in enumerate(files):
        path = storage.save(f"{job_id}/{index}-{field.strip('[]')}", ContentFile(image.read()))
        inputs.append({"field": field, "name": image.filename, "content_type": image.content_type, "path": path})
    kept = {k: v for k, v in body.items() if k not in FILE_FIELDS}  # references were fetched: the files are kept
    return ImageJob.objects.create(id=job_id, token=token, request_id=request_id, endpoint=req.endpoint,
                                   model=req.model, body=kept, inputs=inputs, files_url=files_url,
                                   callback_url=callback_url)


def job_inputs(job: ImageJob) -> MultiValueDict[str, Any] | None:
    """The job's input images as a multipart request's files, or ``None`` for a job without any."""
    if not job.inputs:
        return None
    storage, files = storages["jobs"], MultiValueDict[str, Any]()
    for item in job.inputs:
        with storage.open(item["path"], "rb") as stored:
            files.appendlist(item["field"], SimpleUploadedFile(item["name"], stored.read(), item["content_type"]))
    return files


def _forget_inputs(job: ImageJob) -> None:
    storage = storages["jobs"]
    for item in job.inputs:
        storage.delete(item["path"])


def job_start(job_id: str) -> ImageJob | None:
    """Take a queued job for this runner: the job, or ``None`` if it is not queued (cancelled, or taken)."""
    now = timezone.now()
    taken = ImageJob.objects.filter(pk=job_id, status=ImageJob.Status.QUEUED, cancel_requested=False).update(
        status=ImageJob.Status.RUNNING, started_at=now, heartbeat_at=now, provider_called_at=None, run_after=None,
        runs=F("runs") + 1)
    if not taken:
        return None
    return ImageJob.objects.select_related("token", "token__group").get(pk=job_id)


def job_beat(job_id: str) -> None:
    ImageJob.objects.filter(pk=job_id, status=ImageJob.Status.RUNNING).update(heartbeat_at=timezone.now())


def job_calling(job_id: str, channel_id: int) -> None:
    """The run is about to ask this channel's provider for images: from now on a lost run may have made (billable)
    images."""
    ImageJob.objects.filter(pk=job_id).update(called_channel_id=channel_id,
                                              provider_called_at=Coalesce("provider_called_at", timezone.now()))


def job_wait(job: ImageJob, *, seconds: float) -> bool:
    """Put a running job back in the queue until ``seconds`` from now (its channels are at their limits); ``False``
    when it has waited as long as it may (OPENOPEN8_JOB_MAX_WAIT), and must fail instead."""
    if timezone.now() - job.created_at > timedelta(seconds=settings.OPENOPEN8_JOB_MAX_WAIT):
        return False
    return bool(ImageJob.objects.filter(pk=job.pk, status=ImageJob.Status.RUNNING).update(
        status=ImageJob.Status.QUEUED, run_after=timezone.now() + timedelta(seconds=seconds), heartbeat_at=None))


def job_succeeded(job: ImageJob, answer: JSONDict) -> None:
    ended = ImageJob.objects.filter(pk=job.pk, status=ImageJob.Status.RUNNING).update(
        status=ImageJob.Status.SUCCEEDED, result=answer, completed_at=timezone.now())
    _ended(job, bool(ended))


def job_failed(job: ImageJob, error: GatewayError, *, status: ImageJob.Status = ImageJob.Status.FAILED,
               was: tuple[str, ...] = (ImageJob.Status.RUNNING,)) -> bool:
    """End the job with ``error`` (as failed, or ``status``) if it is still in one of the states ``was``."""
    ended = ImageJob.objects.filter(pk=job.pk, status__in=was).update(
        status=status, error=error.to_body()["error"], error_status=error.status, completed_at=timezone.now())
    _ended(job, bool(ended))
    return bool(ended)


def _ended(job: ImageJob, ended: bool) -> None:
    """The job has just ended: its inputs go, and its callback URL is sent it."""
    if not ended:
        return
    _forget_inputs(job)
    if job.callback_url:
        webhook_enqueue(job.id)


def job_of(token: ApiToken, job_id: str) -> ImageJob:
    """The token's job. Raises ``NotFound`` for an unknown id or another key's job."""
    job = ImageJob.objects.filter(pk=job_id, token=token).first()
    if job is None:
        raise NotFound(f"No image job with id '{job_id}'.", param="job_id", code="job_not_found")
    return job


def jobs_of(token: ApiToken, *, limit: int, after: str | None) -> tuple[list[ImageJob], bool]:
    """The token's jobs newest first, after the job ``after`` (a cursor), at most ``limit``; and whether there
    are more."""
    jobs = ImageJob.objects.filter(token=token)
    if after:
        cursor = job_of(token, after)
        jobs = jobs.filter(Q(created_at__lt=cursor.created_at) | Q(created_at=cursor.created_at, id__lt=cursor.id))
    page = list(jobs.order_by("-created_at", "-id")[: limit + 1])
    return page[:limit], len(page) > limit


def job_stale(now: datetime) -> list[ImageJob]:
    """Running jobs whose runner stopped renewing them (its process died)."""
    cutoff = now - timedelta(seconds=settings.OPENOPEN8_JOB_LEASE)
    return list(ImageJob.objects.filter(status=ImageJob.Status.RUNNING, heartbeat_at__lt=cutoff)
                .select_related("called_channel"))


def job_requeue(job: ImageJob) -> bool:
    """Put a job whose runner died back in the queue (it had asked no provider yet, or only one on a channel safe to
    retry)."""
    return bool(ImageJob.objects.filter(pk=job.pk, status=ImageJob.Status.RUNNING,
                                        heartbeat_at=job.heartbeat_at).update(
        status=ImageJob.Status.QUEUED, heartbeat_at=None, started_at=None))


def job_object(job: ImageJob) -> JSONDict:
    """The job as its key sees it."""
    def stamp(moment: datetime | None) -> int | None:
        return int(moment.timestamp()) if moment is not None else None

    return {"id": job.id, "object": "image.job", "status": job.status, "endpoint": job.endpoint, "model": job.model,
            "created_at": stamp(job.created_at), "started_at": stamp(job.started_at),
            "completed_at": stamp(job.completed_at), "result": job.result, "error": job.error,
            "error_status": job.error_status}


def jobs_page(jobs: list[ImageJob], more: bool) -> JSONDict:
    return {"object": "list", "data": [job_object(job) for job in jobs],
            "first_id": jobs[0].id if jobs else None, "last_id": jobs[-1].id if jobs else None, "has_more": more}

