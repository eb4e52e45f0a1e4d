"""Alias kept for installed sites: ``celery -A lookalike.indexer.celery_app`` names the worker's Celery app.

The worker's code moved to :mod:`lookalike.worker`; systemd units written before the move (copied into
``/etc/systemd/system``, not rewritten by an upgrade) still start ``celery -A lookalike.indexer.celery_app``.
This file makes that module path the same module object as :mod:`lookalike.worker.celery_app`, so those units
keep working. New units and ``lookalike run`` name :mod:`lookalike.worker.celery_app`. Nothing else lives here.
"""

import sys

from lookalike.worker import celery_app

sys.modules[__name__ + ".celery_app"] = celery_app
