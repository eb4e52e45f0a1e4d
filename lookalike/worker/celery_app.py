"""The Celery application: Redis as broker, settings that make a task survive a crashed worker.

Both sides import it: the worker runs it (``celery -A lookalike.worker.celery_app worker``) and the plugin
sends tasks by name through it. Importing it loads no model and no torch.
"""

from __future__ import annotations

from celery import Celery

from lookalike.config import EMBED_QUEUE, QUEUE, TASK_EMBED, TASK_WRITE, WRITE_QUEUE, Settings

#: Seconds before Redis hands an unacknowledged task to another worker; tasks are idempotent, so early is safe.
VISIBILITY_TIMEOUT = 300


def make_app(settings: Settings | None = None) -> Celery:
    """A Celery app for ``settings`` (default: ``$LOOKALIKE_CONFIG``)."""
    settings = settings or Settings.load()
    app = Celery("lookalike", broker=settings.redis_url, include=["lookalike.worker.tasks"])
    app.conf.update(
        task_default_queue=QUEUE,
        # A task is acknowledged only once it has finished: a worker killed mid-task leaves it queued.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # Indexing tasks run in batches (lookalike.worker.batching): the worker holds three batches' messages (one
        # running, the next one decoded ahead, one filling); unacknowledged, so a lost worker's are handed out again.
        worker_prefetch_multiplier=3 * max(1, settings.batch_size),
        task_routes={TASK_EMBED: {"queue": EMBED_QUEUE}, TASK_WRITE: {"queue": WRITE_QUEUE}},
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        # Redis redelivers an unacknowledged task after this long (a worker killed outright acknowledges nothing):
        # well past the few seconds a task takes, short enough that a lost worker's task waits minutes, not hours.
        broker_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT},
        worker_hijack_root_logger=False,
    )
    app.conf.lookalike_settings = settings
    return app


app = make_app()
