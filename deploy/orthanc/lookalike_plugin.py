"""The script Orthanc's Python plugin loads (``PythonScript``): puts Lookalike on the path and registers it.

Orthanc embeds Debian's Python 3.11; the project's virtual environment is made from that same interpreter, so
its packages import here. Inserted first, so that they win over Debian's dist-packages. If Lookalike cannot
start, Orthanc keeps running as a PACS and the reason is in its log. Python warnings go to Orthanc's log too, with
the values they quote blanked: highdicom's, for one, quotes a PatientName.
"""

import json
import sys
import traceback

import orthanc

try:
    _section = json.loads(orthanc.GetConfiguration()).get("Lookalike", {})
    for _path in (_section.get("site_packages"), _section.get("source_root")):
        if _path and _path not in sys.path:
            sys.path.insert(0, _path)

    import logging

    from lookalike.config import redact_warnings

    class _OrthancLog(logging.Handler):
        """Python warnings into Orthanc's own log (owner-only), not its standard output."""

        def emit(self, record: logging.LogRecord) -> None:
            orthanc.LogWarning("Lookalike: " + self.format(record))

    redact_warnings(_OrthancLog())  # from here on, warnings reach Orthanc's log with their quoted values blanked

    from lookalike.plugin.entry import register

    register(orthanc)
except Exception:
    orthanc.LogError("Lookalike: plugin not started, Orthanc runs without it: " + traceback.format_exc())
