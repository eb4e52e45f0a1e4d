"""An updated Lookalike over an archive indexed with an earlier shipped model: the archive stays on that model.

Lookups search the active model's vectors only (:mod:`lookalike.index.search`), and the worker embeds new instances
with the active model's checkpoint, ``""`` standing for the settings' one, which is the shipped file unless
``Settings.weights`` names another. When a release replaces the shipped file, a catalogue that records no active
model (or records ``""``) would move to the new model at once: new instances would be embedded with it, and their
lookups would find only other new instances while the archive's vectors, of the earlier model, wait for a re-index.

:func:`keep_archive_models` prevents that: where the catalogue's vectors are of an earlier shipped version and the
release keeps its checkpoint (:func:`lookalike.encoders.shipped.previous_checkpoint`), that checkpoint is recorded
active; lookups and new instances stay on it until ``lookalike reindex --encoder NAME`` moves the archive to the
shipped model with no gap (:mod:`lookalike.worker.reindex`). The index host's worker asks once when it opens the
index, before its first batch; ``lookalike reindex`` asks before it starts. :func:`model_status` says, for
``/lookalike/status``, where a newer shipped model waits. Torch and FAISS are not imported: the plugin asks too.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lookalike.encoders.base import ENCODER_NAMES
from lookalike.encoders.shipped import (is_shipped, previous_checkpoint, shipped_path, shipped_version, version_hash,
                                        weights_hash)
from lookalike.index.catalogue import Catalogue

log = logging.getLogger(__name__)


def _archive_version(catalogue: Catalogue, name: str) -> str | None:
    """The model the archive's ``name`` vectors are of: the recorded active one, else the one most instances have
    (as ``lookalike reindex`` judges it); None for an archive with no vector of ``name``."""
    recorded = catalogue.active_model(name)
    if recorded is not None:
        return recorded[0]
    versions = catalogue.live_versions(name)
    return max(versions, key=versions.get) if versions else None


def archive_model(catalogue: Catalogue, name: str, settings_weights: str = "") -> tuple[str, str] | None:
    """The (model version, checkpoint) to record active for ``name`` so that its archive stays on the model it was
    indexed with, or None when nothing should change.

    Something changes only while the site runs the shipped checkpoint (``settings_weights`` empty: a site's own
    checkpoint is its to replace) and the archive's model is an earlier shipped one kept in ``weights/previous``:
    none is recorded active and most vectors are of it, or ``""`` is recorded with its version (the shipped file
    then), or a kept checkpoint is recorded at a path that is gone (the package was installed elsewhere).
    """
    if settings_weights:
        return None
    recorded = catalogue.active_model(name)
    if recorded is not None and recorded[1] and Path(recorded[1]).exists():
        return None  # a checkpoint of its own: a re-index, or an earlier shipped model kept already
    version = _archive_version(catalogue, name)
    if version is None or is_shipped(version):
        return None
    kept = previous_checkpoint(name, version)
    if kept is None:
        log.warning("the %s archive is indexed with %s, which this release neither ships nor keeps in %s: lookups"
                    " of new instances will not find it until `lookalike reindex --encoder %s`", name, version,
                    shipped_path(name).parent / "previous", name)
        return None
    return version, str(kept)


def keep_archive_model(catalogue: Catalogue, name: str, settings_weights: str = "") -> tuple[str, str] | None:
    """Record the model the archive of ``name`` stays on (:func:`archive_model`); returns what was recorded, if any.

    A compare-and-set (:meth:`Catalogue.replace_active_model`): a switch ``lookalike reindex`` made between the read
    and the write wins.
    """
    expected = catalogue.active_model(name)
    wanted = archive_model(catalogue, name, settings_weights)
    if wanted is None or not catalogue.replace_active_model(name, expected, *wanted):
        return None
    log.warning("%s: the archive stays on %s (%s), which it was indexed with; the shipped %s is newer: `lookalike"
                " reindex --encoder %s` moves the archive to it", name, wanted[0], wanted[1],
                shipped_version(name) or shipped_path(name).name, name)
    return wanted


def keep_archive_models(catalogue: Catalogue, weights: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    """:func:`keep_archive_model` for every encoder, ``weights`` being ``Settings.weights``; returns what was
    recorded."""
    kept = {name: keep_archive_model(catalogue, name, weights.get(name, "")) for name in ENCODER_NAMES}
    return {name: model for name, model in kept.items() if model is not None}


def model_status(catalogue: Catalogue, weights: Mapping[str, str]) -> list[dict[str, Any]]:
    """Per encoder with vectors: the model lookups use, the shipped one, and whether the archive should move to it.

    ``newer_shipped_model`` is true where the site runs the shipped checkpoint (no ``Settings.weights`` for the
    encoder) and the archive's model is not this release's shipped file; ``action`` then gives the command.
    """
    models = []
    for name in ENCODER_NAMES:
        version = _archive_version(catalogue, name)
        if version is None:
            continue
        recorded = catalogue.active_model(name)
        path = shipped_path(name)
        entry: dict[str, Any] = {
            "encoder": name,
            "active_model": version,
            "checkpoint": (recorded[1] if recorded and recorded[1] else weights.get(name) or "shipped"),
            "shipped_model": shipped_version(name) or (f"{path.name} (sha256 {weights_hash(path)}...)"
                                                       if path.exists() else None),
            "newer_shipped_model": bool(not weights.get(name) and path.exists()
                                        and version_hash(version) != weights_hash(path)),
        }
        if entry["newer_shipped_model"]:
            entry["action"] = (f"lookalike reindex --encoder {name}: embeds every {name} instance again with the"
                               f" shipped {entry['shipped_model']} while lookups stay on {version}, then switches"
                               " lookups to it at once")
        models.append(entry)
    return models
