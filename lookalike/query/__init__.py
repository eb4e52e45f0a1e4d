"""The query service: the one process that reads the index and answers lookups.

``query_scp`` (the DICOM endpoint: C-FIND, C-MOVE, C-ECHO; it also serves ``lookup_service``), ``lookup_service``
(the Unix socket the plugin asks, and its client) and ``audit`` (the audit trail every lookup is written to before
it is answered).
"""
