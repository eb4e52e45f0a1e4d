"""The similarity floor: measured on validation pairs by ``lookalike calibrate``, stored beside the weights under
their model version, read back by the lookup's processes without torch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from lookalike import cli
from lookalike.encoders.base import WEIGHTS_DIR
from lookalike.encoders.floors import SimilarityFloors, calibration_path
from lookalike.lab.calibration import fit_floor, validation_pairs

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_the_floor_is_where_same_label_pairs_become_likelier_than_chance() -> None:
    rng = np.random.default_rng(0)
    scores = rng.uniform(-1, 1, 20_000)
    # Below 0.3 a pair shares its label at 45 % (under the 62 % of all pairs), above it at 90 %.
    same = rng.random(scores.size) < np.where(scores < 0.3, 0.45, 0.9)
    found = fit_floor(scores, same)
    assert abs(found["floor"] - 0.3) < 0.05
    assert found["chance"] == round(float(same.mean()), 4)
    assert found["precision_above_floor"] > 0.85 and found["pairs"] == scores.size


def test_a_model_that_separates_nothing_has_no_floor() -> None:
    scores = np.linspace(-1, 1, 1000)
    same = scores < 0  # the higher the score, the less often the labels agree: no score says "alike"
    assert fit_floor(scores, same)["floor"] is None


def test_validation_pairs_leave_out_pairs_of_one_group() -> None:
    vectors = np.eye(3, dtype=np.float32)
    scores, same = validation_pairs(vectors, ["a", "a", "b"], ["g1", "g1", "g2"])
    assert len(scores) == 2 and list(same) == [False, False]  # (0, 1) is one group: not a pair


def test_calibrate_stores_the_floor_beside_the_weights_under_their_model_version(tmp_path: Path) -> None:
    """The command on a tiny labelled set: the floor lands beside the checkpoint it measured, keyed by its model
    version, and the lookup's reader finds it there."""
    from lookalike.encoders import load_encoder

    data = tmp_path / "set"
    rng = np.random.default_rng(1)
    rows = ["path,label,group,split"]
    for i in range(10):
        label = "normal" if i % 2 else "pneumonia"
        image = (rng.random((64, 64)) * (120 if i % 2 else 250)).astype(np.uint8)
        (data / "images").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(data / "images" / f"{i}.png")
        rows.append(f"images/{i}.png,{label},g{i},{'val' if i < 8 else 'train'}")
    (data / "manifest.csv").write_text("\n".join(rows) + "\n")
    weights = tmp_path / "site" / "xr.pt"
    weights.parent.mkdir()
    shutil.copy(WEIGHTS_DIR / "xr.pt", weights)

    assert cli.main(["calibrate", "--modality", "xr", "--data", str(data), "--model", str(weights)]) == 0

    version = load_encoder("xr", weights).model_version
    stored = json.loads(calibration_path(weights).read_text())
    assert list(stored) == [version]
    assert (stored[version]["images"], stored[version]["pairs"], stored[version]["split"]) == (8, 28, "val")
    assert SimilarityFloors([weights]).calibration(version) == stored[version]


def test_the_shipped_models_carry_their_floor() -> None:
    from lookalike.encoders import load_encoder

    floors = SimilarityFloors()
    for name in ("us", "xr"):
        assert floors.floor(load_encoder(name).model_version) is not None, name


def test_reading_floors_imports_no_torch() -> None:
    code = ("import sys, lookalike.index.search, lookalike.encoders.floors as c; c.SimilarityFloors().floor('x');"
            " print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert result.stdout.strip() == "False", result.stderr
