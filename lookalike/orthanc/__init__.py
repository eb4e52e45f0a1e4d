"""Orthanc as every Lookalike program sees it: ``client`` (REST calls over HTTP or, in the plugin, in-process) and
``ingest`` (what an Orthanc change means for the index, and whether an instance is queued).

No program-specific code here: the plugin, the worker and the query service all import it.
"""
