"""The tasks of Django's tasks framework (django-tasks, kept in the database by django-tasks-db) that the gateway
enqueues: an image job's run, a finished job's webhook delivery, and an operator alert's delivery."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.utils import timezone
from django_tasks import task
from django_tasks.base import Task


@task()
def deliver_job_webhook(job_id: str, attempt: int) -> None:
    from gateway.webhooks import webhook_deliver

    _try_again(deliver_job_webhook, webhook_deliver(job_id, attempt), job_id, attempt)


def _try_again(delivery: Task[Any, None], after: float | None, target: Any, attempt: int) -> None:
    """Enqueue the delivery's next try ``after`` seconds from now, unless it is done (``None``)."""
    if after is not None:
        delivery.using(run_after=timezone.now() + timedelta(seconds=after)).enqueue(target, attempt + 1)


def webhook_enqueue(job_id: str) -> None:
    """Have the finished job delivered to its callback URL (its first try, or a new series of tries)."""
    deliver_job_webhook.enqueue(job_id, 1)
    _nudge()


@task()
def run_image_job(job_id: str) -> None:
    from gateway.services import job_run  # the service layer imports this module to enqueue

    job_run(job_id)


def job_enqueue(job_id: str, *, after: float = 0.0) -> None:
    """Have a runner run the job, at once or ``after`` seconds from now."""
    if after > 0:
        run_image_job.using(run_after=timezone.now() + timedelta(seconds=after)).enqueue(job_id)
    else:
        run_image_job.enqueue(job_id)
    _nudge()


def _nudge() -> None:
    from gateway.job_runner import runner_nudge  # the runner runs these tasks: it imports this module

    runner_nudge()


@task()
def deliver_alert(alert_id: int, attempt: int) -> None:
    from gateway.alerts import alert_deliver

    _try_again(deliver_alert, alert_deliver(alert_id, attempt), alert_id, attempt)


def alert_enqueue(alert_id: int) -> None:
    """Have the operator's alert delivered (to the webhook, the mailbox)."""
    deliver_alert.enqueue(alert_id, 1)
    _nudge()
