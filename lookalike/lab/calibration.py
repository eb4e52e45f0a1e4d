"""Similarity floors: the score below which a match shares the query's label no more often than chance.

A cosine score is not a probability, and an encoder always has *some* nearest neighbour: without a floor, a lookup
fills its ten rows with studies that resemble the query no more than any random study does. ``lookalike
calibrate`` measures, on the validation split of labelled data sets (``shared/eval/PROTOCOL.md``: models tune on
``val``), how often an image pair of a given score shares its label, fits that precision as a non-decreasing
function of the score (isotonic regression), and calls **floor** the lowest score from which the fitted precision
is above chance (the share of same-label pairs among all validation pairs).

The floor is stored beside the checkpoint (``us.pt`` -> ``us.calibration.json``) keyed by model version (the
architecture tag and the weights' sha256, :func:`lookalike.encoders.load_encoder`), so it travels with the weights
and a retrained model never inherits the floor of another. The lookup reads it with
:class:`lookalike.encoders.floors.SimilarityFloors`; this module is the measurement and the command.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import isotonic_regression

from lookalike.encoders import load_encoder
from lookalike.encoders.base import ENCODER_NAMES, WEIGHTS_DIR
from lookalike.encoders.floors import CALIBRATION_SUFFIX, calibration_path, read_calibrations  # noqa: F401 (re-exported)
from lookalike.lab.embed import ImageReadError, embed_paths, set_torch_threads
from lookalike.lab.images import read_manifest

#: Score bands of the table a calibration keeps (for the model card): precision of same-label pairs per band.
BANDS: tuple[float, ...] = (-1.0, -0.5, 0.0, 0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


# -- fitting -------------------------------------------------------------------------------------------------------

def fit_floor(scores: np.ndarray, same_label: np.ndarray) -> dict[str, Any]:
    """The floor of one set of pairs: lowest score where the isotonic fit of P(same label | score) beats chance.

    Parameters
    ----------
    scores
        Cosine score of each pair.
    same_label
        Whether the pair's two images share their label.

    Returns
    -------
    dict
        ``floor`` (None when no score beats chance: the model separates nothing), ``chance`` (share of same-label
        pairs), ``pairs``, ``precision_above_floor`` (share of same-label pairs scoring at or above the floor) and
        ``bands`` (per score band of :data:`BANDS`: pairs and share of same label), for the model card.
    """
    scores = np.asarray(scores, dtype=np.float64)
    same = np.asarray(same_label, dtype=np.float64)
    if scores.shape != same.shape or scores.ndim != 1 or scores.size == 0:
        raise ValueError(f"need as many labels as scores, at least one pair; got {scores.shape} and {same.shape}")
    order = np.argsort(scores, kind="stable")
    fitted = isotonic_regression(same[order], increasing=True).x
    chance = float(same.mean())
    above = np.flatnonzero(fitted > chance + 1e-12)
    floor = float(scores[order][above[0]]) if above.size else None
    kept = scores >= floor if floor is not None else np.zeros_like(scores, dtype=bool)
    bands = []
    for low, high in zip(BANDS[:-1], BANDS[1:]):
        inside = (scores >= low) & ((scores < high) if high < 1.0 else (scores <= high))
        bands.append({"from": low, "to": high, "pairs": int(inside.sum()),
                      "same_label": round(float(same[inside].mean()), 4) if inside.any() else None})
    return {
        "floor": None if floor is None else round(floor, 4),
        "chance": round(chance, 4),
        "pairs": int(scores.size),
        "precision_above_floor": round(float(same[kept].mean()), 4) if kept.any() else None,
        "bands": bands,
    }


def validation_pairs(embeddings: np.ndarray, labels: Sequence[str],
                     groups: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Cosine score and same-label flag of every pair of distinct validation images of different groups.

    A pair within one group (near-duplicates, one patient) would say how alike one case is to itself, which the
    protocol never counts.
    """
    vectors = np.asarray(embeddings, dtype=np.float32)
    vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    sim = vectors @ vectors.T
    lab, grp = np.asarray(labels), np.asarray(groups)
    i, j = np.triu_indices(len(vectors), k=1)
    keep = grp[i] != grp[j]
    i, j = i[keep], j[keep]
    return sim[i, j], lab[i] == lab[j]


def calibrate(modality: str, data: Sequence[str | os.PathLike], model: str | os.PathLike | None = None,
              split: str = "val") -> dict[str, Any]:
    """Embed the ``split`` rows of the data sets once with the encoder and fit its floor (:func:`fit_floor`).

    Raises
    ------
    ValueError
        Fewer than two images of ``split`` or a manifest without label/group/split columns.
    """
    rows: list[dict[str, str]] = []
    for folder in data:
        found = read_manifest(folder)
        missing = [c for c in ("label", "group", "split") if found and c not in found[0]]
        if missing:
            raise ValueError(f"{folder}: manifest lacks column(s) {missing}")
        rows += [r for r in found if r["split"] == split]
    if len(rows) < 2:
        raise ValueError(f"fewer than two rows with split == {split} in {', '.join(map(str, data))}")
    encoder = load_encoder(modality, model)
    scores, same = validation_pairs(embed_paths(encoder, [r["path"] for r in rows]),
                                    [r["label"] for r in rows], [r["group"] for r in rows])
    return {
        "model_version": encoder.model_version,
        **fit_floor(scores, same),
        "images": len(rows),
        "split": split,
        "data": [str(d) for d in data],
        "measured": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


# -- storing -------------------------------------------------------------------------------------------------------

def write_calibration(weights: str | os.PathLike, calibration: dict[str, Any]) -> Path:
    """Add ``calibration`` (keyed by its ``model_version``) to the file beside ``weights``, replacing the file
    atomically so a lookup reading it meanwhile sees the old or the new content, never half of it."""
    path = calibration_path(weights)
    entries = read_calibrations(path)
    entries[calibration["model_version"]] = calibration
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(entries, fh, indent=1, sort_keys=True)
            fh.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# -- the command ---------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    """``lookalike calibrate --modality us|xr --data DIR [DIR...] [--model FILE] [--dry-run]``.

    Exit status 0 on success, 1 when the data or the model cannot be read, 2 on bad arguments.
    """
    p = argparse.ArgumentParser(
        prog="lookalike calibrate",
        description="Measure an encoder's similarity floor on the validation split and store it beside its weights.",
    )
    p.add_argument("--modality", choices=ENCODER_NAMES, required=True)
    p.add_argument("--data", type=Path, nargs="+", required=True, help="folder(s) with manifest.csv")
    p.add_argument("--model", type=Path, default=None, help="checkpoint (default: the shipped encoder)")
    p.add_argument("--dry-run", action="store_true", help="print the calibration; write nothing")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    a = p.parse_args(argv)
    try:
        set_torch_threads(a.threads)
        found = calibrate(a.modality, a.data, a.model)
    except (OSError, ValueError, ImageReadError) as exc:
        print(f"lookalike calibrate: {exc}", file=sys.stderr)
        return 1
    found["command"] = " ".join(["lookalike calibrate", *(argv if argv is not None else sys.argv[1:])])
    print(json.dumps(found, indent=1))
    if not a.dry_run:
        weights = a.model if a.model is not None else WEIGHTS_DIR / f"{a.modality}.pt"
        print(f"written to {write_calibration(weights, found)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
