"""Running Lookalike on one machine: ``stack`` (``lookalike run``/``configure``: start and supervise Redis,
Orthanc, the worker and the query service), ``demo`` (what ``make run`` shows) and ``check`` (``lookalike check``).
"""
