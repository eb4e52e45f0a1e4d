"""Similarity floors at run time: the score below which a match shares the query's label no more often than chance.

The floor of each model version is measured by ``lookalike calibrate`` (:mod:`lookalike.lab.calibration`) and
stored beside the checkpoint (``us.pt`` -> ``us.calibration.json``) keyed by model version (the architecture tag
and the weights' sha256, :func:`lookalike.encoders.load_encoder`), so it travels with the weights and a retrained
model never inherits the floor of another. The lookup reads it with :class:`SimilarityFloors`, in processes that
never load torch (the query service, Orthanc's plugin): this module imports the standard library and the
encoders' names alone.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lookalike.encoders.base import ENCODER_NAMES, WEIGHTS_DIR

if TYPE_CHECKING:
    from lookalike.index.catalogue import Catalogue

log = logging.getLogger("lookalike.calibration")

#: What follows a checkpoint's stem in the name of its calibration file: ``us.pt`` -> ``us.calibration.json``.
CALIBRATION_SUFFIX = ".calibration.json"


def calibration_path(weights: str | os.PathLike) -> Path:
    """The calibration file that travels with the checkpoint ``weights`` (same folder, same stem)."""
    path = Path(weights)
    return path.with_name(path.stem + CALIBRATION_SUFFIX)


def read_calibrations(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The calibrations in ``path`` by model version; {} when the file is missing or unreadable (logged)."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("calibration file %s cannot be read (%s): its floors are not applied", path, exc)
        return {}
    if not isinstance(data, dict):
        log.warning("calibration file %s is not a JSON object: its floors are not applied", path)
        return {}
    return {version: entry for version, entry in data.items() if isinstance(entry, dict)}


class SimilarityFloors:
    """The floor of each model version, read from the calibration files of the checkpoints in use.

    Looked for beside each checkpoint of ``weights`` (``Settings.weights``), beside each model the catalogue has
    switched to (``lookalike reindex``), then beside the shipped weights; the first that knows the model version
    gives its floor. Files are read again when they change, so that a calibration written while the service runs
    is applied from the next lookup.
    """

    def __init__(self, weights: Iterable[str | os.PathLike] = (), catalogue: "Catalogue | None" = None) -> None:
        self.weights = [Path(w) for w in weights if w]
        self.catalogue = catalogue
        self._cache: dict[Path, tuple[tuple[int, int], dict[str, dict[str, Any]]]] = {}

    def _files(self) -> list[Path]:
        """Calibration files, the site's own first: a site that measured its copy of a model on its own data
        wins over the floor shipped with it."""
        checkpoints = list(self.weights)
        if self.catalogue is not None:
            for name in ENCODER_NAMES:
                active = self.catalogue.active_model(name)
                if active and active[1]:
                    checkpoints.append(Path(active[1]))
        checkpoints += [WEIGHTS_DIR / f"{name}.pt" for name in ENCODER_NAMES]
        return list(dict.fromkeys(calibration_path(c) for c in checkpoints))

    def _read(self, path: Path) -> dict[str, dict[str, Any]]:
        try:
            st = path.stat()
        except OSError:
            self._cache.pop(path, None)
            return {}
        stamp = (st.st_mtime_ns, st.st_size)
        cached = self._cache.get(path)
        if cached is None or cached[0] != stamp:
            cached = (stamp, read_calibrations(path))
            self._cache[path] = cached
        return cached[1]

    def calibration(self, model_version: str) -> dict[str, Any] | None:
        """The calibration of ``model_version``, or None when none of the files has one."""
        for path in self._files():
            found = self._read(path).get(model_version)
            if found is not None:
                return found
        return None

    def floor(self, model_version: str) -> float | None:
        """The floor of ``model_version``; None when it was never calibrated (every match is kept)."""
        found = self.calibration(model_version)
        value = None if found is None else found.get("floor")
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
