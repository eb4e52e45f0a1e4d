"""The script Orthanc's Python plugin loads (``PythonScript``): puts Lookalike on the path and registers it.

Orthanc embeds Debian's Python 3.11; the project's virtual environment is made from that same interpreter, so
its packages import here. Inserted first, so that they win over Debian's dist-packages. If Lookalike cannot
start, Orthanc keeps running as a PACS and the reason is in its log.
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

    from lookalike.plugin.entry import register

    register(orthanc)
except Exception:
    orthanc.LogError("Lookalike: plugin not started, Orthanc runs without it: " + traceback.format_exc())
