"""``lookalike evaluate`` and ``lookalike embed`` on a tiny data set made here, with the shipped weights."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lookalike import cli
from lookalike.encoders import load_encoder
from lookalike.lab.evaluate import figure_queries, protocol_sets
from lookalike.lab.metrics import rank_gallery, retrieval_metrics
from lookalike.lab.images import load_image, read_manifest
from tests.support import write_image_set

# (label, group, split, size (w, h), format) — sizes and aspects differ, PNG 8-bit, PNG 16-bit and JPEG
ROWS = [
    ("benign", "g0", "train", (64, 64), "png"),
    ("benign", "g0", "test", (80, 40), "png"),
    ("benign", "g1", "train", (33, 97), "jpg"),
    ("benign", "g2", "val", (120, 90), "png16"),
    ("benign", "g3", "test", (50, 50), "jpg"),
    ("benign", "g4", "train", (70, 31), "png"),
    ("malignant", "g5", "train", (64, 64), "png"),
    ("malignant", "g5", "test", (90, 45), "jpg"),
    ("malignant", "g6", "val", (41, 77), "png"),
    ("malignant", "g7", "train", (100, 100), "png16"),
    ("malignant", "g8", "test", (36, 60), "png"),
    ("normal", "g9", "train", (60, 60), "png"),
]


def _picture(label: str, w: int, h: int, rng: np.random.Generator) -> np.ndarray:
    """A dark round lesion (benign: smooth, malignant: with a shadow below) on speckle; normal: speckle only."""
    yy, xx = np.mgrid[0:h, 0:w] / np.array([h, w])[:, None, None]
    img = 0.55 + 0.15 * rng.standard_normal((h, w))
    r = np.hypot(yy - 0.4, xx - 0.5)
    if label != "normal":
        img[r < 0.2] = 0.1
    if label == "malignant":
        img[(yy > 0.55) & (np.abs(xx - 0.5) < 0.2)] *= 0.3
    return np.clip(img, 0, 1)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(0)

    def rows():
        for i, (label, group, split, (w, h), fmt) in enumerate(ROWS):
            img = _picture(label, w, h, rng)
            name = f"images/{i:02d}_{label}.{'jpg' if fmt == 'jpg' else 'png'}"
            pixels = (img * 65535).astype(np.uint16) if fmt == "png16" else (img * 255).astype(np.uint8)
            yield name, Image.fromarray(pixels), label, group, split

    return write_image_set(tmp_path_factory.mktemp("tiny"), rows())


def _run(*argv: str) -> int:
    return cli.main([str(a) for a in argv])


# ---------------------------------------------------------------- embed


def test_embed_rows_follow_manifest_order(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "vectors.npy"
    assert _run("embed", "--modality", "us", "--data", dataset, "--out", out) == 0
    vecs = np.load(out)
    enc = load_encoder("us")
    rows = read_manifest(dataset)
    assert vecs.shape == (len(ROWS), enc.dim) and vecs.dtype == np.float32
    # row i is image i, read by the one shared reader (8-bit, 16-bit and JPEG alike)
    expected = np.concatenate([enc.embed([load_image(r["path"])]) for r in rows])
    np.testing.assert_allclose(vecs, expected, atol=1e-5)
    # a CSV given directly, rows reversed, absolute paths: rows come back reversed
    rev = tmp_path / "reversed.csv"
    with open(rev, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path"])
        w.writerows([[r["path"]] for r in reversed(rows)])
    out2 = tmp_path / "rev.vectors"  # written at exactly this path, no .npy appended
    assert _run("embed", "--modality", "us", "--data", rev, "--out", out2) == 0
    np.testing.assert_allclose(np.load(out2), vecs[::-1], atol=1e-5)


def test_embed_xr_and_a_chosen_checkpoint(dataset: Path, tmp_path: Path) -> None:
    from lookalike.encoders.base import WEIGHTS_DIR

    out = tmp_path / "xr.npy"
    assert _run("embed", "--modality", "xr", "--model", WEIGHTS_DIR / "xr.pt", "--data", dataset, "--out", out) == 0
    assert np.load(out).shape == (len(ROWS), load_encoder("xr").dim)
    # a checkpoint of the other modality is refused
    assert _run("embed", "--modality", "xr", "--model", WEIGHTS_DIR / "us.pt", "--data", dataset, "--out", out) == 1


def test_embed_exit_codes(dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "v.npy"
    assert _run("embed", "--modality", "us", "--data", tmp_path / "nowhere", "--out", out) == 1
    bad = tmp_path / "bad.csv"
    bad.write_text(f"path\n{dataset / 'images' / '00_benign.png'}\nmissing.png\n")
    assert _run("embed", "--modality", "us", "--data", bad, "--out", out) == 1
    assert "missing.png" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(SystemExit) as exc:
        _run("embed", "--modality", "ct", "--data", dataset, "--out", out)
    assert exc.value.code == 2


# ---------------------------------------------------------------- evaluate


def test_evaluate_report_figure_and_scored_sets(dataset: Path, tmp_path: Path) -> None:
    js, png = tmp_path / "r" / "report.json", tmp_path / "r" / "top5.png"
    assert _run("evaluate", "--modality", "us", "--data", dataset, "--out-json", js, "--out-png", png, "--rows", "3") == 0
    rep = json.loads(js.read_text())
    keys = {"P@5", "R@5", "mAP@5", "MAR@5", "mAP", "AUC", "macro-P@5", "chance-P@5", "n_queries", "n_gallery"}
    assert keys <= set(rep["encoder"]) and keys <= set(rep["raw_pixels"])
    assert rep["model_version"] == load_encoder("us").model_version
    assert (rep["n_queries"], rep["n_gallery"], rep["k"]) == (4, 8, 5)
    assert rep["labels"] == ["benign", "malignant", "normal"]
    assert rep["command"].startswith("lookalike evaluate --modality us")
    # the figures are exactly the protocol's: test vs train+val, scored on the vectors `embed` writes
    vec = tmp_path / "v.npy"
    assert _run("embed", "--modality", "us", "--data", dataset, "--out", vec) == 0
    e = np.load(vec)
    rows = read_manifest(dataset)
    q = [i for i, r in enumerate(rows) if r["split"] == "test"]
    g = [i for i, r in enumerate(rows) if r["split"] != "test"]
    col = lambda idx, key: [rows[i][key] for i in idx]  # noqa: E731
    want = retrieval_metrics(e[q], col(q, "label"), col(q, "group"), e[g], col(g, "label"), col(g, "group"))
    for key in keys:
        assert rep["encoder"][key] == pytest.approx(want[key], abs=1e-6), key
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as im:
        w, h = im.size
    assert w > 300 and h > 150 and w > h  # 3 rows of 6 images


def test_per_device_table_has_one_row_per_scanner_of_the_queries(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    devices = ["Scanner A", "Scanner B", "Scanner C"]
    rng = np.random.default_rng(1)

    def rows():
        seen = {"test": 0, "train": 0, "val": 0}
        for i, (label, group, split, (w, h), _fmt) in enumerate(ROWS):
            img = (_picture(label, w, h, rng) * 255).astype(np.uint8)
            device = devices[seen[split] % 3]  # every scanner among the queries, one of them twice
            seen[split] += 1
            yield f"images/{i:02d}.png", Image.fromarray(img), label, group, split, {"device": device}

    data = write_image_set(tmp_path / "set", rows(), extra_columns=("device",))
    js = tmp_path / "r.json"
    assert _run("evaluate", "--modality", "us", "--data", data, "--out-json", js) == 0
    rep = json.loads(js.read_text())
    manifest = read_manifest(data)
    q = [i for i, r in enumerate(manifest) if r["split"] == "test"]
    assert sorted(r["device"] for r in rep["per_device"]) == sorted({manifest[i]["device"] for i in q}) == devices
    assert sum(r["n_queries"] for r in rep["per_device"]) == rep["n_queries"]
    printed = capsys.readouterr().out
    assert all(d in printed for d in devices)
    # each row is the protocol's figure for that scanner's queries against the whole gallery
    vec = tmp_path / "v.npy"
    assert _run("embed", "--modality", "us", "--data", data, "--out", vec) == 0
    e = np.load(vec)
    g = [i for i, r in enumerate(manifest) if r["split"] != "test"]
    col = lambda idx, key: [manifest[i][key] for i in idx]  # noqa: E731
    for row in rep["per_device"]:
        qd = [i for i in q if manifest[i]["device"] == row["device"]]
        want = retrieval_metrics(e[qd], col(qd, "label"), col(qd, "group"), e[g], col(g, "label"), col(g, "group"))
        assert row["n_queries"] == len(qd)
        assert row["P@5"] == pytest.approx(want["P@5"]) and row["macro-P@5"] == pytest.approx(want["macro-P@5"])


def test_evaluate_cross_domain_is_leave_one_out_without_normal(dataset: Path, tmp_path: Path) -> None:
    js = tmp_path / "cd.json"
    assert _run("evaluate", "--modality", "us", "--data", dataset, "--cross-domain", "--out-json", js) == 0
    rep = json.loads(js.read_text())
    n = sum(1 for r in ROWS if r[0] != "normal")
    assert rep["n_queries"] == rep["n_gallery"] == n
    assert rep["labels"] == ["benign", "malignant"]
    assert "figure" not in rep and "per_device" not in rep


def test_evaluate_exit_codes(dataset: Path, tmp_path: Path) -> None:
    no_test = tmp_path / "no_test.csv"
    rows = [r for r in read_manifest(dataset) if r["split"] != "test"]
    with open(no_test, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["path", "label", "group", "split"])
        w.writeheader()
        w.writerows(rows)
    assert _run("evaluate", "--modality", "us", "--data", no_test) == 1
    assert _run("evaluate", "--modality", "us", "--data", tmp_path / "nowhere") == 1
    for bad in (["--modality", "us", "--k", "0"], ["--modality", "ct"], []):  # the last lacks --modality
        with pytest.raises(SystemExit) as exc:
            _run("evaluate", "--data", dataset, *bad)
        assert exc.value.code == 2


def test_protocol_sets_and_figure_picks() -> None:
    rows = [
        {"label": "a", "group": "1", "split": "test"},
        {"label": "b", "group": "2", "split": "train"},
        {"label": "normal", "group": "3", "split": "val"},
        {"label": "benign", "group": "4", "split": "test"},
    ]
    assert protocol_sets(rows, False) == ([0, 3], [1, 2], False)
    assert protocol_sets(rows, True) == ([3], [3], True)
    with pytest.raises(ValueError):
        protocol_sets([{"label": "a", "group": "1"}], False)  # no split column
    # spread over labels: 2 of each when 4 are asked of 2 labels, first and last of each label
    assert figure_queries(["x", "x", "x", "y", "y", "y", "y"], 4) == [0, 2, 3, 6]
    assert figure_queries(["x", "y", "y", "y"], 3) == [0, 1, 3]
    assert figure_queries(["x"], 5) == [0]


def test_rank_gallery_excluded_last_ties_in_gallery_order() -> None:
    q = np.array([[1.0, 0.0]])
    g = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [2.0, 0.0]])
    sim, excluded, order = rank_gallery(q, ["own"], g, ["own", "b", "c", "d"])
    assert order.tolist() == [[2, 3, 1, 0]]  # item 0 is of the query's group: last, despite cosine 1
    assert excluded.tolist() == [[True, False, False, False]]
    np.testing.assert_allclose(sim, [[1.0, 0.0, 1.0, 1.0]])
