"""The index: what the worker writes and the query service reads.

``catalogue`` (SQLite, the truth: one row per instance with its vector), ``segments`` and ``vector_index``
(immutable FAISS segments and the in-memory tail), ``store`` (the one writer and the readers over both) and
``search`` (a study's most similar studies). The worker writes it; the query service reads it. Orthanc's process
never opens the FAISS side.
"""
