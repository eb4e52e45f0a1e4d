"""Training and evaluation read PNGs into exactly what the worker gets from a DICOM instance of the same pixels."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from PIL import Image

from lookalike.dicom.decode import decode_image
from lookalike.lab.samples import wrap_image
from lookalike.lab.images import load_image
from tests.support import write_image_set


def _three_scans(root, seed: int) -> None:
    """Three noise images of different shapes, each with a dark "lesion", as a training set (``0.png`` ...)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i, shape in enumerate([(300, 400), (256, 256), (180, 240)]):
        img = (rng.random(shape) * 255).astype(np.uint8)
        img[shape[0] // 3 : shape[0] // 2, shape[1] // 3 : shape[1] // 2] //= 4
        rows.append((f"{i}.png", Image.fromarray(img), "benign", f"g{i}", "train"))
    write_image_set(root, rows)


def _scan_with_text() -> np.ndarray:
    rng = np.random.default_rng(0)
    img = np.zeros((300, 400), np.uint8)
    img[60:260, 90:330] = rng.integers(40, 220, (200, 240))  # the scan area
    img[10:14, 20:380] = 255  # a line of burned-in text above it
    img[280:283, 50:120] = 200  # a ruler below
    return img


def test_ultrasound_png_is_cropped_as_the_worker_crops_the_dicom(tmp_path) -> None:
    pixels = _scan_with_text()
    Image.fromarray(pixels).save(tmp_path / "scan.png")
    ds = wrap_image(
        pixels, "US", patient_id="P", patient_name="T^T", patient_birth_date="19700101", patient_sex="F",
        study_instance_uid=pydicom.uid.generate_uid(), study_date="20250101", study_time="090000",
        accession_number="A", study_description="parity",
    )
    served = decode_image(ds)
    trained = load_image(tmp_path / "scan.png", "us")
    assert served.region is not None
    x0, y0, x1, y1 = served.region
    assert (x1 - x0, y1 - y0) == trained.shape[::-1] and trained.shape[0] < 300
    # The worker min-max scales the 8-bit values of the crop, PNG reading divides by 255: an affine map that the
    # encoders' own preprocessing (per-image min-max) removes. After it, both are the same image.
    def unit(a: np.ndarray) -> np.ndarray:
        return (a - a.min()) / (a.max() - a.min())

    np.testing.assert_allclose(unit(trained), unit(served.pixels), atol=1e-5)


def test_xray_png_is_not_cropped(tmp_path) -> None:
    pixels = _scan_with_text()
    Image.fromarray(pixels).save(tmp_path / "cxr.png")
    assert load_image(tmp_path / "cxr.png", "xr").shape == (300, 400)


def test_fused_ultrasound_encoder_serves_what_training_cached(tmp_path) -> None:
    """The fused encoder's vectors (worker, ``lookalike embed``, evaluate) equal the head applied to the blocks that
    training cached for the same files: one code path for views, both branches and the centre."""
    import torch

    from lookalike.encoders import load_encoder
    from lookalike.encoders.base import WEIGHTS_DIR
    from lookalike.encoders.fused import FusedUltrasoundNet, base_checkpoint, fused_arch
    from lookalike.lab.training_fused import apply, cache_set, joined

    _three_scans(tmp_path, seed=1)
    cached = dict(np.load(cache_set(tmp_path, WEIGHTS_DIR / "us.pt", tmp_path / "cache" / "set.npz")))

    shipped = base_checkpoint(torch.load(WEIGHTS_DIR / "us.pt", map_location="cpu", weights_only=True))
    arch = fused_arch(shipped["arch"], "vector", ("lesion",), 160, 224)
    torch.manual_seed(0)
    net = FusedUltrasoundNet(arch)
    net.base.load_state_dict(shipped["state_dict"], strict=False)
    center = np.random.default_rng(2).normal(size=arch["dim"]).astype(np.float32) * 0.1
    arch["center"] = center.tolist()
    torch.save({"arch": arch, "state_dict": net.state_dict(), "lesion": shipped["lesion"]}, tmp_path / "fused.pt")

    enc = load_encoder("us", weights=tmp_path / "fused.pt")
    assert enc.model_version.startswith("us-vaediff-imnet-1-")
    served = enc.embed([load_image(tmp_path / f"{i}.png", "us") for i in range(3)])
    trained = apply(net.head.eval(), joined(cached, ("vec", "crop160")), center)
    np.testing.assert_allclose(served, trained, atol=1e-5)


@pytest.mark.parametrize(("blocks", "base_input", "side", "blur"), [(("vec128", "crop128"), "vector", 128, 0.0),
                                                                    (("vae160", "crop160"), "features", 160, 0.0),
                                                                    (("vec128", "blur128"), "vector", 128, 1.0)])
def test_fused_encoder_at_a_smaller_side_serves_what_round3_cached(tmp_path, blocks, base_input, side, blur) -> None:
    """Round 3 makes both views once at the ImageNet side (128 or 160) from one finder pass, the VAE-diffusion branch
    resizing them to 64: a checkpoint whose views are made at that side serves exactly the cached blocks' vectors,
    with its ImageNet view smoothed (round 6's ``blurS`` blocks) or not."""
    import torch

    from lookalike.encoders import load_encoder
    from lookalike.encoders.base import WEIGHTS_DIR
    from lookalike.encoders.fused import FusedUltrasoundNet, base_checkpoint, fused_arch
    from lookalike.lab.training_fused import apply, cache_set_sides, joined

    _three_scans(tmp_path, seed=3)
    cached = dict(np.load(cache_set_sides(tmp_path, WEIGHTS_DIR / "us.pt", tmp_path / "c.npz", sides=(side,), blur=blur)))

    shipped = base_checkpoint(torch.load(WEIGHTS_DIR / "us.pt", map_location="cpu", weights_only=True))
    base_arch = dict(shipped["arch"])
    if base_input == "features":
        base_arch["features"] = ["h", "z"]
    arch = fused_arch(base_arch, base_input, ("lesion",), side, side, smooth_sigma=blur)
    torch.manual_seed(0)
    net = FusedUltrasoundNet(arch)
    state = shipped["state_dict"] if base_input == "vector" else {
        k: v for k, v in shipped["state_dict"].items() if not k.startswith("head.")}
    net.base.load_state_dict(state, strict=False)
    torch.save({"arch": arch, "state_dict": net.state_dict(), "lesion": shipped["lesion"]}, tmp_path / "fused.pt")

    enc = load_encoder("us", weights=tmp_path / "fused.pt")
    assert enc.image_size == side
    served = enc.embed([load_image(tmp_path / f"{i}.png", "us") for i in range(3)])
    np.testing.assert_allclose(served, apply(net.head.eval(), joined(cached, blocks)), atol=1e-5)


def test_a_retrained_finder_travels_from_the_cache_into_the_served_checkpoint(tmp_path) -> None:
    """Round 10: blocks cached with another finder (``cache --finder``) are what a checkpoint carrying that finder
    serves, the cache names the finder it was made with, and ``fit`` refuses a cache made with another one."""
    import torch

    from lookalike.encoders import load_encoder
    from lookalike.encoders.base import WEIGHTS_DIR
    from lookalike.encoders.fused import FusedUltrasoundNet, base_checkpoint, fused_arch
    from lookalike.encoders.lesion import build_net, default_arch
    from lookalike.lab.training import save_checkpoint
    from lookalike.lab.training_fused import apply, cache_set_sides, finder_entry, fit, joined, state_sha256

    torch.manual_seed(0)
    arch = default_arch(64, "efficientnet-lite0")
    finder_file = save_checkpoint(tmp_path / "finder.pt", arch, build_net(arch, pretrained=True).state_dict(), {})
    _three_scans(tmp_path, seed=7)
    cached = dict(np.load(cache_set_sides(tmp_path, WEIGHTS_DIR / "us.pt", tmp_path / "c" / "set.npz", sides=(128,),
                                          finder_path=finder_file)))
    shipped = base_checkpoint(torch.load(WEIGHTS_DIR / "us.pt", map_location="cpu", weights_only=True))
    lesion = finder_entry(shipped, finder_file)
    assert str(cached["finder_sha256"]) == state_sha256(lesion) != state_sha256(shipped["lesion"])

    fused = fused_arch(dict(shipped["arch"]), "vector", ("lesion",), 128, 128)
    net = FusedUltrasoundNet(fused)
    net.base.load_state_dict(shipped["state_dict"], strict=False)
    torch.save({"arch": fused, "state_dict": net.state_dict(), "lesion": lesion}, tmp_path / "fused.pt")
    enc = load_encoder("us", weights=tmp_path / "fused.pt")
    served = enc.embed([load_image(tmp_path / f"{i}.png", "us") for i in range(3)])
    np.testing.assert_allclose(served, apply(net.head.eval(), joined(cached, ("vec128", "crop128"))), atol=1e-5)

    with pytest.raises(ValueError, match="another lesion finder"):
        fit(tmp_path / "c", "head_vec128_crop128_aug_inst_base65_e30", WEIGHTS_DIR / "us.pt", tmp_path / "x.pt")


def test_head_served_beside_the_base_vector_is_what_training_scored(tmp_path) -> None:
    """Round 7: a checkpoint whose head is served beside the base vector (``base_share``) serves exactly
    ``lab.training_fused.served`` on the cached blocks, which is what selection scored; its cosine between two
    images is the weighted sum of the head's (centred) cosine and the base vector's."""
    import torch

    from lookalike.encoders import load_encoder
    from lookalike.encoders.base import WEIGHTS_DIR
    from lookalike.encoders.fused import FusedUltrasoundNet, base_checkpoint, fused_arch
    from lookalike.lab.training_fused import apply, cache_set_sides, joined, served

    _three_scans(tmp_path, seed=5)
    blocks = ("vec128", "blur128")
    cached = dict(np.load(cache_set_sides(tmp_path, WEIGHTS_DIR / "us.pt", tmp_path / "c.npz", sides=(128,), blur=1.0)))

    shipped = base_checkpoint(torch.load(WEIGHTS_DIR / "us.pt", map_location="cpu", weights_only=True))
    torch.manual_seed(0)
    arch = fused_arch(dict(shipped["arch"]), "vector", ("lesion",), 128, 128, smooth_sigma=1.0)
    head_net = FusedUltrasoundNet(arch)
    center = apply(head_net.head.eval(), joined(cached, blocks)).mean(axis=0)
    arch.update(dim=arch["dim"] + shipped["arch"]["dim"], head_dim=arch["dim"], base_share=0.5,
                head_center=[float(v) for v in center], center=None)
    net = FusedUltrasoundNet(arch)
    net.head.load_state_dict(head_net.head.state_dict())
    net.base.load_state_dict(shipped["state_dict"], strict=False)
    torch.save({"arch": arch, "state_dict": net.state_dict(), "lesion": shipped["lesion"]}, tmp_path / "beside.pt")

    enc = load_encoder("us", weights=tmp_path / "beside.pt")
    got = enc.embed([load_image(tmp_path / f"{i}.png", "us") for i in range(3)])
    assert got.shape == (3, arch["dim"])
    want = served(cached, blocks, net.head.eval(), center, 0.5)
    np.testing.assert_allclose(got, want, atol=1e-5)
    head_part = apply(net.head.eval(), joined(cached, blocks), center)
    base_part = cached["vec128"] / np.linalg.norm(cached["vec128"], axis=1, keepdims=True)
    np.testing.assert_allclose(got @ got.T, 0.5 * head_part @ head_part.T + 0.5 * base_part @ base_part.T, atol=1e-5)


@pytest.mark.parametrize("hidden", [256, 0])
def test_fused_xray_encoder_serves_what_training_cached(tmp_path, hidden) -> None:
    """``lab.training_fused_xr`` caches the ViT's served vector and the ImageNet block per image; a checkpoint that
    ``fit`` writes (a trained head, or plain cosine over both blocks) serves exactly the vectors the head gives on
    those cached blocks, and the ViT branch's block is the shipped ViT's own vector for the same pixels."""
    import torch

    from lookalike.encoders import load_encoder
    from lookalike.encoders.base import WEIGHTS_DIR
    from lookalike.lab.training_fused import apply, joined
    from lookalike.lab.training_fused_xr import cache_set, load_net

    rng = np.random.default_rng(5)
    lines = ["path,label,group,split"]
    for i, shape in enumerate([(224, 224), (300, 260), (96, 96)]):
        img = (rng.random(shape) * 255).astype(np.uint8)
        img[shape[0] // 4 : shape[0] // 2, :] //= 3  # something for the networks to see
        Image.fromarray(img).save(tmp_path / f"{i}.png")
        lines.append(f"{i}.png,{'normal' if i else 'pneumonia'},g{i},train")
    (tmp_path / "manifest.csv").write_text("\n".join(lines) + "\n")
    cached = dict(np.load(cache_set(tmp_path, WEIGHTS_DIR / "xr.pt", tmp_path / "c.npz", sides=(128,), chunk=2)))
    images = [load_image(tmp_path / f"{i}.png", "xr") for i in range(3)]

    _, vit = load_net(WEIGHTS_DIR / "xr.pt", 128)  # the shipped ViT (itself, or the shipped fused file's branch)
    torch.save(vit, tmp_path / "vit.pt")
    np.testing.assert_allclose(cached["vec96"], load_encoder("xr", weights=tmp_path / "vit.pt").embed(images), atol=1e-5)

    torch.manual_seed(0)
    net, _ = load_net(WEIGHTS_DIR / "xr.pt", 128, hidden)
    torch.save({"arch": net.arch, "state_dict": net.state_dict()}, tmp_path / "fused.pt")
    enc = load_encoder("xr", weights=tmp_path / "fused.pt")
    assert enc.image_size == 128 and enc.model_version.startswith("xr-vit-imnet-1-")
    head = net.head.eval() if hidden else None
    expected = apply(head, joined(cached, ("vec128", "whole128")))
    np.testing.assert_allclose(enc.embed(images), expected, atol=1e-5)
    assert enc.dim == expected.shape[1] == (128 if hidden else 128 + 1280)
