"""The checkpoints Lookalike ships, this release's and earlier releases', known without loading torch.

A model version is the architecture tag plus the first 8 hex digits of the checkpoint's sha256
(:func:`lookalike.encoders.load_encoder`), so whether a version is the shipped file's is a question of the file's
hash alone: the Orthanc plugin's status can ask it, and the worker can ask it before any model is loaded.

When a release replaces a shipped checkpoint (``weights/us.pt``), the one it replaces is kept byte for byte as
``weights/previous/<model version>.pt`` (with its calibration as ``<model version>.calibration.json``), so that a
site whose archive was indexed with it keeps searching and indexing with it until ``lookalike reindex`` moves the
archive over (:mod:`lookalike.index.upgrade`)::

    git show <commit before the change>:lookalike/encoders/weights/xr.pt \\
        > lookalike/encoders/weights/previous/<its model version>.pt
"""

from __future__ import annotations

import threading
from pathlib import Path

from lookalike.encoders.base import WEIGHTS_DIR, file_sha256
from lookalike.encoders.floors import calibration_path, read_calibrations

#: Earlier releases' shipped checkpoints, each named by its model version.
PREVIOUS_DIR = WEIGHTS_DIR / "previous"

_HASHES: dict[Path, tuple[tuple[int, int], str]] = {}
_LOCK = threading.Lock()


def shipped_path(name: str) -> Path:
    """This release's checkpoint of encoder ``name`` (``weights/us.pt``)."""
    return WEIGHTS_DIR / f"{name}.pt"


def version_hash(model_version: str) -> str:
    """The weights' hash a model version ends with (``us-vaediff-1-4b7811ef`` -> ``4b7811ef``)."""
    return model_version.rsplit("-", 1)[-1]


def weights_hash(path: str | Path) -> str:
    """The first 8 hex digits of a checkpoint's sha256, as its model version ends; kept per file until it changes
    (the status asks on every request, and a checkpoint is megabytes)."""
    path = Path(path).resolve()
    st = path.stat()
    stamp = (st.st_mtime_ns, st.st_size)
    with _LOCK:
        hit = _HASHES.get(path)
        if hit is None or hit[0] != stamp:
            hit = (stamp, file_sha256(path)[:8])
            _HASHES[path] = hit
        return hit[1]


def is_shipped(model_version: str) -> bool:
    """Whether ``model_version`` is this release's shipped checkpoint of its encoder."""
    name = model_version.split("-", 1)[0]
    path = shipped_path(name)
    return path.exists() and version_hash(model_version) == weights_hash(path)


def shipped_version(name: str) -> str | None:
    """This release's model version of encoder ``name``, read without torch from the calibration shipped beside it
    (keyed by model version); None when the calibration does not know the file (then only its hash is known)."""
    path = shipped_path(name)
    if not path.exists():
        return None
    digest = weights_hash(path)
    found = [v for v in read_calibrations(calibration_path(path)) if v.startswith(f"{name}-") and
             version_hash(v) == digest]
    return found[0] if len(found) == 1 else None


def previous_checkpoint(name: str, model_version: str) -> Path | None:
    """The kept checkpoint of an earlier release's ``model_version`` of encoder ``name``, or None when this release
    does not have it (or the file there is not that version's: its hash is checked)."""
    if not model_version.startswith(f"{name}-"):
        return None
    path = PREVIOUS_DIR / f"{model_version}.pt"
    if not path.is_file() or weights_hash(path) != version_hash(model_version):
        return None
    return path


def local_checkpoint(weights: str) -> str:
    """``weights`` as this host can open it: a kept checkpoint recorded by the index host at its install path is
    this host's copy when the path is not here (an embedding host installed elsewhere); any other path as given."""
    path = Path(weights)
    if weights and not path.exists() and path.parent.name == PREVIOUS_DIR.name and (PREVIOUS_DIR / path.name).is_file():
        return str(PREVIOUS_DIR / path.name)
    return weights
