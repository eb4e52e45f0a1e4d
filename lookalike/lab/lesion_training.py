"""Train the lesion finder (:mod:`lookalike.encoders.lesion`) on lesion masks; select on val Dice.

``lookalike train-lesions --data DIR [DIR ...] --out lesion.pt [--epochs N]``: the ``train`` rows of every
set train, their ``val`` rows select (best mean Dice over val images with a mask, the finder's own box rule
applied), ``test`` is never read. Images are cropped to their imaging region exactly as the worker crops
ultrasound, and each mask with its image. Rows without a mask (normal images) train the finder to find
nothing. Loss: MONAI ``DiceCELoss`` (sigmoid, Dice over the whole batch so that empty masks are fine).
Augmentation: flips and an affine (rotation, zoom, shift) on image and mask together, then the scanner
intensity steps (:func:`lookalike.lab.augment.scanner_intensity_steps`) on the image.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from monai.transforms import Compose, EnsureTyped, Lambdad, RandAffined, RandFlipd, ScaleIntensityRanged

from lookalike.encoders.lesion import build_net, component_box, default_arch
from lookalike.encoders.lesion_backbone import BACKBONE
from lookalike.encoders.preprocessing import build_preprocess
from lookalike.lab.augment import scanner_intensity_steps
from lookalike.lab.images import load_image_with_region
from lookalike.lab.lesions import dice, load_mask
from lookalike.lab.training import (Log, plain_tensors, print_log, run_command, save_checkpoint, split_rows,
                                         start_run)


def load_pairs(rows: Sequence[dict[str, str]], size: int) -> tuple[Any, Any]:
    """Images and masks of the rows at ``size`` px: (n, 1, S, S) image tensor, (n, 1, S, S) mask in [0, 1].

    The image goes through the serving preprocessing; the mask (empty where the row has none) is cropped to
    the same imaging region and area-resized, so its values are the lesion's share of each pixel.
    """
    pre = build_preprocess(size)
    xs, ms = [], []
    for r in rows:
        img, region = load_image_with_region(r["path"], "us")
        xs.append(pre(img))
        mask = load_mask(r["mask"], region) if r.get("mask") else np.zeros(img.shape, bool)
        if mask.shape != img.shape:
            raise ValueError(f"{r['mask']}: mask shape {mask.shape} differs from its image's {img.shape}")
        m = torch.from_numpy(mask.astype(np.float32))[None, None]
        ms.append(F.interpolate(m, size=(size, size), mode="area")[0])
    return torch.stack(xs), torch.stack(ms)


def build_pair_augment(size: int) -> Any:
    """Spatial augmentation of image and mask together, then scanner intensity variation of the image."""
    intensity = Compose(scanner_intensity_steps())
    return Compose(
        [
            RandFlipd(keys=("image", "mask"), prob=0.5, spatial_axis=1),
            RandAffined(
                keys=("image", "mask"),
                prob=0.8,
                rotate_range=(0.26,),
                scale_range=((-0.3, 0.3), (-0.3, 0.3)),
                translate_range=(0.15 * size, 0.15 * size),
                padding_mode="zeros",
            ),
            Lambdad(keys="image", func=intensity),
            ScaleIntensityRanged(keys="image", a_min=0.0, a_max=1.0, b_min=0.0, b_max=1.0, clip=True),
            EnsureTyped(keys=("image", "mask"), data_type="tensor", track_meta=False),
        ]
    )


def val_dice(net: Any, x: Any, m: Any, arch: dict[str, Any], batch: int = 128) -> float:
    """Mean Dice on the rows that have a lesion, with the finder's component rule, at the training size."""
    net.eval()
    with torch.no_grad():
        probs = torch.cat([torch.sigmoid(net(x[i : i + batch])) for i in range(0, len(x), batch)])[:, 0].numpy()
    truth = m[:, 0].numpy() > 0.5
    scores = []
    for p, t in zip(probs, truth):
        if not t.any():
            continue
        found = component_box(p, arch["threshold"], arch["min_area"])
        scores.append(dice(found[2] if found else np.zeros_like(t), t))
    return float(np.mean(scores))


@plain_tensors
def train_finder(
    data: Sequence[Path],
    out: Path,
    epochs: int = 30,
    seed: int = 0,
    *,
    image_size: int = 96,
    backbone: str | None = None,
    batch_size: int = 32,
    lr: float = 2e-3,
    threads: int | None = None,
    max_train: int | None = None,
    command: str | None = None,
    log: Log = print_log,
) -> dict[str, Any]:
    """Train the finder on the sets' ``train`` masks, keep the epoch with the best ``val`` Dice, save it.

    Parameters
    ----------
    data : sequence of Path
        Folders holding ``manifest.csv`` with ``path,split`` and an optional ``mask`` column.
    out : Path
        Checkpoint (``{"arch", "state_dict", "meta"}``) that :func:`lookalike.lab.lesions.load_finder` reads.
    backbone : str, optional
        ``"efficientnet-lite0"``: MONAI ``FlexibleUNet`` over that network, started from its packaged ImageNet
        weights; None: the small ``UNet`` from nothing (:func:`lookalike.encoders.lesion.default_arch`).
    max_train : int, optional
        A random subset of this many training rows (tests, CPU budget).

    Returns
    -------
    dict
        The checkpoint's ``meta``.
    """
    t_begin = time.time()
    device, amp = start_run(seed, threads)
    rng = np.random.default_rng(seed)
    _, _, train_rows, val_rows = split_rows(data, max_train, rng)
    val_rows = [r for r in val_rows if r.get("mask")]
    if not train_rows or not val_rows:
        raise ValueError(f"need train rows and val rows with masks ({len(train_rows)}, {len(val_rows)})")
    arch = default_arch(image_size, backbone)
    x_tr, m_tr = load_pairs(train_rows, image_size)
    x_va, m_va = load_pairs(val_rows, image_size)
    log(f"[lesion] {len(train_rows)} train ({sum(bool(r.get('mask')) for r in train_rows)} with a mask), "
        f"{len(val_rows)} val images, {image_size} px, {device}; read in {time.time() - t_begin:.0f} s")
    aug = build_pair_augment(image_size)
    aug.set_random_state(seed=seed)
    net = build_net(arch, pretrained=True).to(device)
    loss_fn = DiceCELoss(sigmoid=True, batch=True)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    n_batches = max(1, len(x_tr) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, epochs * n_batches), pct_start=0.1)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    best, best_state, history = -1.0, None, []

    def describe(status: str) -> dict[str, Any]:
        """The checkpoint's ``meta`` as of now; ``status`` says whether the run had finished."""
        return {
            "status": f"{status} after epoch {len(history)} of {epochs}",
            "val_best": {"dice": best, "epoch": max(history, key=lambda h: h["val_dice"])["epoch"]},
            "history": history,
            "data": {"dirs": [str(d) for d in data], "n_train": len(train_rows), "n_val": len(val_rows)},
            "hyper": {"epochs": epochs, "image_size": image_size, "backbone": backbone, "batch_size": batch_size,
                      "lr": lr, "max_train": max_train},
            "seed": seed,
            "train_seconds": round(time.time() - t_begin, 1),
            "command": run_command(command),
            "torch": torch.__version__,
            "device": device.type,
        }

    for ep in range(epochs):
        net.train()
        t0, tot = time.time(), 0.0
        perm = rng.permutation(len(x_tr))
        for b in range(n_batches):
            idx = perm[b * batch_size : (b + 1) * batch_size]
            pairs = [aug({"image": x_tr[i], "mask": m_tr[i]}) for i in idx]
            xb = torch.stack([p["image"] for p in pairs]).to(device)
            mb = torch.stack([p["mask"] for p in pairs]).to(device)
            with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp):
                loss = loss_fn(net(xb).float(), mb)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            tot += float(loss.detach())
        v = val_dice(net.cpu(), x_va, m_va, arch)
        net.to(device)
        history.append({"epoch": ep + 1, "loss": round(tot / n_batches, 4), "val_dice": round(v, 4)})
        log(f"[lesion] epoch {ep + 1}/{epochs} loss {tot / n_batches:.4f} val Dice {v:.3f} ({time.time() - t0:.0f} s)")
        if v > best:
            best = v
            best_state = {k: t.detach().cpu().clone() for k, t in net.state_dict().items()}
            # the best so far is on disk at every improvement: a run stopped early keeps it
            save_checkpoint(out, arch, best_state, describe("running"))
    meta = describe("finished")
    save_checkpoint(out, arch, best_state, meta)
    log(f"[lesion] saved {out} (best val Dice {best:.3f}, {meta['train_seconds']} s)")
    return meta


def main(argv: list[str] | None = None) -> int:
    """``lookalike train-lesions --data DIR [DIR ...] --out FILE [--epochs N] [--seed S] [--threads T]``."""
    p = argparse.ArgumentParser(prog="lookalike train-lesions", description="Train the ultrasound lesion finder.")
    p.add_argument("--data", type=Path, nargs="+", required=True, help="folders with manifest.csv (path,split,mask)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--backbone", choices=[BACKBONE], default=None,
                   help="a pretrained encoder under MONAI's FlexibleUNet (default: the small UNet from nothing)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--max-train", type=int, default=None)
    a = p.parse_args(argv)
    train_finder(a.data, a.out, a.epochs, a.seed, image_size=a.image_size, backbone=a.backbone,
                 batch_size=a.batch_size, lr=a.lr,
                 threads=a.threads, max_train=a.max_train)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
