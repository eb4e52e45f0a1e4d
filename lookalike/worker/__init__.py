"""The worker: the Celery app and its tasks, which embed Orthanc's instances and write the index.

``celery_app`` (the app both sides share), ``tasks`` (the Celery tasks), ``batching`` (messages into batches),
``pipeline`` (plan -> embed -> apply of a batch), ``change_log`` (the catch-up over Orthanc's ``/changes``),
``backfill`` and ``reindex`` (``lookalike backfill`` and ``lookalike reindex``).
"""
