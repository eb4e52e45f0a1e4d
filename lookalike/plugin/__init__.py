"""The Orthanc side: thin callbacks that queue work and answer lookups, never a model in Orthanc's process.

Every handler takes the ``orthanc`` module (or an :class:`~lookalike.orthanc.client.OrthancApi`) and a task sender
as arguments, so tests exercise them without Orthanc; :mod:`lookalike.plugin.entry` wires them to Orthanc.
"""
