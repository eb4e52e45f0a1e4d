"""Orthanc as every Lookalike program sees it: ``client`` (REST calls over HTTP or, in the plugin, in-process).

No program-specific code here: the plugin, the worker and the query service all import it.
"""
