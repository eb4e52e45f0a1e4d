"""The worker side: catalogue and FAISS index, the Celery app and its tasks, and study-level lookup."""
