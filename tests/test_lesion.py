"""The lesion finder: its box rule, a tiny finder trained here on synthetic ellipses, and ``lookalike lesions``.

No test trains for real or checks a figure: the finder below is the shipped architecture at 48 px trained for
a few seeded epochs on bright ellipses drawn here, which it learns to find; the tests check what is done with
what it finds (boxes in which pixels, which component, the CSV's rows and order).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lookalike import cli
from lookalike.encoders.lesion import (
    LesionBox,
    component_box,
    crop_with_margin,
    prepare_views,
    scale_box,
)
from lookalike.encoders.preprocessing import build_preprocess
from lookalike.lab.lesions import box_iou, load_finder
from tests.support import write_image_set


def scan(rng: np.random.Generator, w: int, h: int, ellipse: tuple[float, float, float, float] | None) -> tuple[np.ndarray, np.ndarray]:
    """Speckle with a bright ellipse (cx, cy, rx, ry in pixels) or none: (uint8 image, bool mask)."""
    img = np.clip(0.3 + 0.1 * rng.standard_normal((h, w)), 0, 1)
    mask = np.zeros((h, w), bool)
    if ellipse is not None:
        cx, cy, rx, ry = ellipse
        yy, xx = np.mgrid[0:h, 0:w]
        mask = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
        img[mask] = np.clip(0.85 + 0.05 * rng.standard_normal(int(mask.sum())), 0, 1)
    return (img * 255).astype(np.uint8), mask


def true_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def random_ellipse(rng: np.random.Generator, w: int, h: int) -> tuple[float, float, float, float]:
    rx, ry = rng.uniform(0.1, 0.2) * w, rng.uniform(0.1, 0.2) * h
    return rng.uniform(rx + 2, w - rx - 2), rng.uniform(ry + 2, h - ry - 2), rx, ry


@pytest.fixture(scope="module")
def finder_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finder trained for a few seeded epochs on 64 synthetic scans (8 without a lesion), selected on 8 val."""
    from lookalike.lab.lesion_training import train_finder

    rng = np.random.default_rng(0)

    def rows():
        for n in range(72):
            split = "val" if n >= 64 else "train"
            normal = split == "train" and n % 8 == 0
            img, mask = scan(rng, 96, 80, None if normal else random_ellipse(rng, 96, 80))
            extra = {} if normal else {"mask": (f"masks/{n:03d}.png", Image.fromarray((mask * 255).astype(np.uint8)))}
            yield f"images/{n:03d}.png", Image.fromarray(img), "normal" if normal else "benign", f"g{n}", split, extra

    root = write_image_set(tmp_path_factory.mktemp("lesion-set"), rows(), extra_columns=("mask",))
    out = root / "lesion.pt"
    meta = train_finder([root], out, epochs=30, seed=0, image_size=48, batch_size=8, lr=5e-3, threads=1,
                        log=lambda s: None)
    assert meta["history"][-1]["loss"] < meta["history"][0]["loss"]
    return out


def test_a_finder_run_stopped_mid_way_leaves_its_best_epoch_on_disk(finder_file: Path, tmp_path: Path) -> None:
    """Training on a shared CPU may be stopped: the best-so-far checkpoint is written at every improvement."""
    from lookalike.lab.lesion_training import train_finder

    root = finder_file.parent
    out = tmp_path / "stopped.pt"

    class Stop(Exception):
        pass

    def log(line: str) -> None:
        if "epoch 3/" in line:
            raise Stop(line)

    with pytest.raises(Stop):
        train_finder([root], out, epochs=30, seed=0, image_size=48, batch_size=8, lr=5e-3, threads=1, log=log)
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["meta"]["status"].startswith("running after epoch"), "a stopped run never says it finished"
    assert len(ckpt["meta"]["history"]) in (1, 2, 3)
    finder = load_finder(out)
    assert finder.image_size == 48


def test_finder_finds_the_box_of_a_bright_ellipse(finder_file: Path) -> None:
    finder = load_finder(finder_file)
    rng = np.random.default_rng(42)
    # another size and aspect than training: the box must come back in this image's own pixels
    img, mask = scan(rng, 150, 110, (100.0, 40.0, 22.0, 15.0))
    (box,) = finder.find([img / 255.0])
    assert box is not None and 0.5 < box.confidence <= 1.0
    assert box_iou((box.x0, box.y0, box.x1, box.y1), true_box(mask)) >= 0.5
    assert 0 <= box.x0 < box.x1 <= 150 and 0 <= box.y0 < box.y1 <= 110
    speckle_only, _ = scan(rng, 150, 110, None)
    assert finder.find([speckle_only / 255.0]) == [None]


def test_a_finder_trained_for_steadiness_starts_from_its_init_and_counts_unsteady_images(finder_file: Path,
                                                                                          tmp_path: Path) -> None:
    """``--init`` + ``--consistency``: the starting finder's own val figures are epoch 0, every epoch counts the
    val images whose box changes on a near copy, and the kept checkpoint is the epoch the history names."""
    from lookalike.lab.lesion_training import train_finder

    start = torch.load(finder_file, weights_only=True)["meta"]
    out = tmp_path / "steady.pt"
    meta = train_finder([finder_file.parent], out, epochs=2, seed=0, image_size=48, init=finder_file, consistency=20.0,
                        batch_size=8, lr=1e-3, threads=1, log=lambda s: None)
    history = meta["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2]
    assert history[0]["val_dice"] == start["val_best"]["dice"], "epoch 0 is the starting finder, unchanged"
    assert all(0 <= h["val_unsteady"] <= meta["data"]["n_val"] for h in history)
    kept = next(h for h in history if h["epoch"] == meta["val_best"]["epoch"])
    assert (meta["val_best"]["dice"], meta["val_best"]["unsteady"]) == (kept["val_dice"], kept["val_unsteady"])
    none = train_finder([finder_file.parent], tmp_path / "none.pt", epochs=0, image_size=48, init=finder_file,
                        consistency=20.0, threads=1, log=lambda s: None)
    assert none["val_best"]["epoch"] == 0, "no epoch trained: the starting finder is kept"
    saved, began = (torch.load(f, weights_only=True)["state_dict"] for f in (tmp_path / "none.pt", finder_file))
    assert saved.keys() == began.keys() and all(torch.equal(saved[k], began[k]) for k in began)


def test_a_finder_of_another_architecture_is_refused_as_a_start(finder_file: Path, tmp_path: Path) -> None:
    from lookalike.lab.lesion_training import train_finder

    with pytest.raises(ValueError, match="this run trains"):
        train_finder([finder_file.parent], tmp_path / "x.pt", epochs=1, image_size=64, init=finder_file,
                     threads=1, log=lambda s: None)


def test_unsteady_counts_a_box_lost_found_or_moved_on_the_copy() -> None:
    from lookalike.encoders.lesion import default_arch
    from lookalike.lab.lesion_training import unsteady

    arch = default_arch(32)
    blob = np.zeros((32, 32), np.float32)
    blob[8:16, 8:16] = 0.9
    moved = np.roll(blob, 6, axis=1)
    empty = np.zeros_like(blob)
    probs = np.stack([blob, blob, empty, blob, empty])
    copies = np.stack([blob, empty, blob, moved, empty])
    assert unsteady(probs, copies, arch) == 3
    assert unsteady(probs, probs, arch) == 0


def test_the_kept_epoch_is_the_steadiest_near_the_best_dice() -> None:
    """Without steadiness counted, the best val Dice; with it, the fewest unsteady images among epochs within 2 %
    of the best Dice (an epoch further off is never kept for its steadiness), then the best Dice."""
    from lookalike.lab.lesion_training import kept_epoch

    plain = [{"epoch": 1, "val_dice": 0.80}, {"epoch": 2, "val_dice": 0.85}, {"epoch": 3, "val_dice": 0.84}]
    assert kept_epoch(plain)["epoch"] == 2
    steady = [{**h, "val_unsteady": u} for h, u in zip(plain, (0, 5, 2))]
    assert kept_epoch(steady)["epoch"] == 3
    tied = [{**h, "val_unsteady": 2} for h in plain]
    assert kept_epoch(tied)["epoch"] == 2


@pytest.fixture(scope="module")
def pretrained_finder_file(finder_file: Path) -> Path:
    """The pretrained FlexibleUNet finder, fine-tuned for a few seeded epochs on the same synthetic scans."""
    from lookalike.lab.lesion_training import train_finder

    out = finder_file.parent / "lesion-lite0.pt"
    meta = train_finder([finder_file.parent], out, epochs=8, seed=0, image_size=64, backbone="efficientnet-lite0",
                        batch_size=8, lr=2e-3, threads=1, log=lambda s: None)
    assert meta["hyper"]["backbone"] == "efficientnet-lite0"
    return out


def test_pretrained_backbone_starts_from_the_packaged_imagenet_weights() -> None:
    """The finder's encoder is EfficientNet-Lite0 with the weights of the installed package (no download), giving
    MONAI's FlexibleUNet five maps at strides 2-32; without ``pretrained`` those weights are not read."""
    from lookalike.encoders.lesion import build_net, default_arch
    from lookalike.encoders.lesion_backbone import CHANNELS
    from lookalike.encoders.pretrained import weights_file

    imagenet = torch.load(weights_file(), map_location="cpu", weights_only=True)
    arch = default_arch(64, "efficientnet-lite0")
    net = build_net(arch, pretrained=True).eval()
    torch.testing.assert_close(net.encoder.stem[0].weight, imagenet["_conv_stem.weight"])
    torch.testing.assert_close(net.encoder.blocks[-1]._project_conv.weight, imagenet["_blocks.15._project_conv.weight"])
    torch.manual_seed(0)
    fresh = build_net(arch, pretrained=False)
    assert not torch.equal(fresh.encoder.stem[0].weight, imagenet["_conv_stem.weight"])
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        maps = net.encoder(x)
        assert [tuple(m.shape[1:]) for m in maps] == [(c, 64 // 2 ** (i + 1), 64 // 2 ** (i + 1))
                                                      for i, c in enumerate(CHANNELS)]
        assert net(x).shape == (2, 1, 64, 64)
    with pytest.raises(ValueError, match="multiple of 32"):
        build_net(default_arch(48, "efficientnet-lite0"))
    with pytest.raises(ValueError, match="unknown lesion backbone"):
        default_arch(64, "resnet-50")


def test_pretrained_finder_finds_the_ellipse_and_serves_without_the_package_weights(
    pretrained_finder_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Serving loads the checkpoint's own (fine-tuned) weights over an unpretrained network: the packaged ImageNet
    file is never read, and two loads give the same box."""
    import lookalike.encoders.pretrained as pretrained

    def no_file() -> Path:
        raise AssertionError("serving read the ImageNet weights file")

    monkeypatch.setattr(pretrained, "weights_file", no_file)
    rng = np.random.default_rng(42)
    img, mask = scan(rng, 150, 110, (100.0, 40.0, 22.0, 15.0))
    (box,) = load_finder(pretrained_finder_file).find([img / 255.0])
    assert box is not None and 0.5 < box.confidence <= 1.0
    assert box_iou((box.x0, box.y0, box.x1, box.y1), true_box(mask)) >= 0.5
    assert load_finder(pretrained_finder_file).find([img / 255.0]) == [box]


def test_component_rule_keeps_the_most_probable_lesion_and_drops_specks() -> None:
    prob = np.zeros((48, 48), np.float32)
    prob[5:10, 5:10] = 0.95  # small, confident: mass 25 * 0.95
    prob[20:40, 24:34] = 0.7  # large, less confident: mass 200 * 0.7 wins
    box, conf, mask = component_box(prob, 0.5, 0.002)
    assert box == (24, 20, 34, 40) and conf == pytest.approx(0.7) and mask.sum() == 200
    speck = np.zeros((48, 48), np.float32)
    speck[3, 3] = 0.9  # 1 pixel < 0.002 * 2304
    assert component_box(speck, 0.5, 0.002) is None
    assert component_box(np.zeros((48, 48), np.float32), 0.5, 0.002) is None


def test_boxes_scale_outward_and_crops_keep_context() -> None:
    assert scale_box((24, 20, 34, 40), 48, (96, 144)) == (72, 40, 102, 80)
    assert scale_box((0, 0, 48, 48), 48, (50, 70)) == (0, 0, 70, 50)
    image = np.arange(100 * 200, dtype=np.float32).reshape(100, 200) / 20000
    crop = crop_with_margin(image, LesionBox(50, 40, 90, 60, 0.9), 0.5)  # 40 x 20 box, + 20 / 10 each side
    np.testing.assert_array_equal(crop, image[30:70, 30:110])
    edge = crop_with_margin(image, LesionBox(0, 0, 20, 20, 0.9), 0.5)  # clipped at the border
    np.testing.assert_array_equal(edge, image[0:30, 0:30])
    assert crop_with_margin(image, None, 0.5) is image


def test_views_are_the_whole_image_and_the_lesion_crop(finder_file: Path) -> None:
    finder = load_finder(finder_file)
    rng = np.random.default_rng(3)
    img, _ = scan(rng, 120, 100, (40.0, 60.0, 15.0, 12.0))
    pre = build_preprocess(32)
    x, (box,) = prepare_views([img / 255.0], pre, ("whole", "lesion"), finder, 0.5)
    assert x.shape == (1, 2, 32, 32) and box is not None
    np.testing.assert_allclose(x[0, 0].numpy(), pre(img / 255.0)[0].numpy(), atol=1e-6)
    np.testing.assert_allclose(x[0, 1].numpy(), pre(crop_with_margin(img / 255.0, box, 0.5))[0].numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="lesion finder"):
        prepare_views([img / 255.0], pre, ("whole", "lesion"), None)


def test_lesions_command_writes_file_pixel_boxes_in_manifest_order(finder_file: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    truths = []

    def rows():
        for n, ellipse in enumerate([(70.0, 50.0, 14.0, 10.0), None, (30.0, 60.0, 12.0, 12.0)]):
            img, mask = scan(rng, 110, 90, ellipse)
            # a black frame with burned-in text around the scan: the imaging region crop applies, and the box
            # must still be in the file's own pixels
            framed = np.zeros((140, 170), np.uint8)
            framed[30:120, 40:150] = img
            framed[8:12, 10:160] = 255
            full = np.zeros((140, 170), bool)
            full[30:120, 40:150] = mask
            truths.append(true_box(full) if ellipse else None)
            yield f"images/{n}.png", Image.fromarray(framed), "benign", f"g{n}", "test"

    data = write_image_set(tmp_path / "set", rows())
    out = tmp_path / "boxes.csv"
    assert cli.main(["lesions", "--data", str(data), "--out", str(out), "--model", str(finder_file)]) == 0
    with open(out, newline="") as fh:
        got = list(csv.DictReader(fh))
    assert [Path(r["path"]).name for r in got] == ["0.png", "1.png", "2.png"]
    for r, truth in zip(got, truths):
        if truth is None:
            assert r["x0"] == r["confidence"] == ""
        else:
            box = tuple(int(r[c]) for c in ("x0", "y0", "x1", "y1"))
            assert box_iou(box, truth) >= 0.5 and 0 < float(r["confidence"]) <= 1


def test_lesions_command_scores_against_masks_and_names_bad_input(finder_file: Path, tmp_path: Path, capsys) -> None:
    rng = np.random.default_rng(11)

    def rows():
        for n in range(4):
            img, mask = scan(rng, 96, 80, random_ellipse(rng, 96, 80))
            yield (f"images/{n}.png", Image.fromarray(img), "benign", f"g{n}", "test",
                   {"mask": (f"masks/{n}.png", Image.fromarray((mask * 255).astype(np.uint8)))})

    data = write_image_set(tmp_path / "set", rows(), extra_columns=("mask",))
    assert cli.main(["lesions", "--data", str(data), "--out", str(tmp_path / "b.csv"), "--model", str(finder_file),
                     "--score"]) == 0
    printed = capsys.readouterr().out
    import json

    report = json.loads(printed[printed.index("{") : printed.rindex("}") + 1])
    assert report["n_masks"] == 4 and 0.5 <= report["dice"] <= 1.0 and 0.5 <= report["box_iou"] <= 1.0
    assert cli.main(["lesions", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "c.csv")]) == 1
    assert "no manifest" in capsys.readouterr().err


def test_worker_embed_and_lesions_agree_on_the_same_image(finder_file: Path, tmp_path: Path) -> None:
    """Train/serve parity: the worker's decode-crop-embed, ``lookalike embed`` and ``lookalike lesions``."""
    import pydicom

    from lookalike.dicom.decode import decode_image
    from lookalike.lab.samples import wrap_image
    from lookalike.encoders import load_encoder
    from lookalike.lab.train import train
    from lookalike.worker.pipeline import _instance_vector

    us = tmp_path / "us.pt"
    train("us", finder_file.parent, us, epochs=1, pretrain_epochs=0, diffusion_epochs=0, per_class=4, image_size=32,
          threads=1, head_refit_epochs=0, lesion_finder=finder_file, log=lambda s: None)
    rng = np.random.default_rng(5)
    img, mask = scan(rng, 110, 90, (60.0, 40.0, 15.0, 11.0))
    framed = np.zeros((140, 170), np.uint8)
    framed[30:120, 40:150] = img
    framed[8:12, 10:160] = 255  # burned-in text: the worker and load_image both crop it off
    data = write_image_set(tmp_path / "one", [("images/scan.png", Image.fromarray(framed), "benign", "g0", "test")])

    ds = wrap_image(
        framed, "US", patient_id="P", patient_name="T^T", patient_birth_date="19700101", patient_sex="F",
        study_instance_uid=pydicom.uid.generate_uid(), study_date="20250101", study_time="090000",
        accession_number="A", study_description="parity",
    )
    served = decode_image(ds)
    enc = load_encoder("us", us)
    assert enc.views == ("whole", "lesion") and enc.finder is not None
    worker_vector, stored_box = _instance_vector(enc, served)
    (worker_box,) = enc.embed_with_boxes([served.pixels]).boxes
    assert worker_box is not None and served.region is not None
    worker_box = worker_box.shifted(served.region[0], served.region[1])
    # What the catalogue keeps: the same box in the instance's stored pixels.
    assert stored_box == (worker_box.x0, worker_box.y0, worker_box.x1, worker_box.y1, worker_box.confidence)

    assert cli.main(["embed", "--modality", "us", "--model", str(us), "--data", str(data), "--out", str(tmp_path / "v.npy")]) == 0
    assert cli.main(["lesions", "--model", str(us), "--data", str(data), "--out", str(tmp_path / "b.csv")]) == 0
    with open(tmp_path / "b.csv", newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    assert tuple(int(row[c]) for c in ("x0", "y0", "x1", "y1")) == (worker_box.x0, worker_box.y0, worker_box.x1, worker_box.y1)
    np.testing.assert_allclose(np.load(tmp_path / "v.npy")[0], worker_vector, atol=1e-5)
    full = np.zeros((140, 170), bool)
    full[30:120, 40:150] = mask
    assert box_iou((worker_box.x0, worker_box.y0, worker_box.x1, worker_box.y1), true_box(full)) >= 0.5
