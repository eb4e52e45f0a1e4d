"""Train the lesion finder (:mod:`lookalike.encoders.lesion`) on lesion masks; select on val Dice.

``lookalike train-lesions --data DIR [DIR ...] --out lesion.pt [--epochs N]``: the ``train`` rows of every
set train, their ``val`` rows select (best mean Dice over val images with a mask, the finder's own box rule
applied), ``test`` is never read. Images are cropped to their imaging region exactly as the worker crops
ultrasound, and each mask with its image. Rows without a mask (normal images) train the finder to find
nothing. Loss: MONAI ``DiceCELoss`` (sigmoid, Dice over the whole batch so that empty masks are fine).
Augmentation: flips and an affine (rotation, zoom, shift) on image and mask together, then the scanner
intensity steps (:func:`lookalike.lab.augment.scanner_intensity_steps`) on the image.

Steadiness (``--consistency W``): the finder decides box or none by a threshold, and an encoder that crops
to its box jumps when that decision flips on a re-encoded copy of the same image. With W > 0 every step also
sees a near copy of its batch (:func:`lookalike.lab.augment.noisy_copy`'s grey-level noise), the copy is
trained on the same mask, and W times the mean squared difference of the two probability maps is added. Every
epoch counts the val images whose box changes on their own near copy (box on one side only, or box IoU under
0.8; copies seeded apart from ``bench/near_copy.py``'s); the kept epoch is the steadiest of those within 2 % of
the best val Dice, then the best Dice. ``--init FILE`` starts from a trained finder (same architecture).
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
from lookalike.lab.augment import noisy_copy, scanner_intensity_steps
from lookalike.lab.images import load_image_with_region
from lookalike.lab.lesions import box_iou, dice, load_mask
from lookalike.lab.training import (Log, plain_tensors, print_log, run_command, save_checkpoint, split_rows,
                                         start_run)


STEADY_IOU = 0.8  # a box that moves this far between an image and its near copy counts as unsteady
STEADY_DICE_SHARE = 0.98  # epochs within this share of the best val Dice compete on steadiness


def load_pairs(rows: Sequence[dict[str, str]], size: int,
               copy_rng: np.random.Generator | None = None) -> tuple[Any, Any, Any]:
    """Images and masks of the rows at ``size`` px: (n, 1, S, S) image tensor, (n, 1, S, S) mask in [0, 1], and
    with ``copy_rng`` each image's near copy made in its own pixels as ``bench/near_copy.py`` makes it (else None).

    The image goes through the serving preprocessing; the mask (empty where the row has none) is cropped to
    the same imaging region and area-resized, so its values are the lesion's share of each pixel.
    """
    pre = build_preprocess(size)
    xs, cs, ms = [], [], []
    for r in rows:
        img, region = load_image_with_region(r["path"], "us")
        xs.append(pre(img))
        if copy_rng is not None:
            cs.append(pre(noisy_copy(img, copy_rng)))
        mask = load_mask(r["mask"], region) if r.get("mask") else np.zeros(img.shape, bool)
        if mask.shape != img.shape:
            raise ValueError(f"{r['mask']}: mask shape {mask.shape} differs from its image's {img.shape}")
        m = torch.from_numpy(mask.astype(np.float32))[None, None]
        ms.append(F.interpolate(m, size=(size, size), mode="area")[0])
    return torch.stack(xs), torch.stack(ms), torch.stack(cs) if cs else None


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


def probabilities(net: Any, x: Any, batch: int = 128) -> np.ndarray:
    """The finder's (n, S, S) lesion probabilities at the training size, in eval mode."""
    net.eval()
    with torch.no_grad():
        return torch.cat([torch.sigmoid(net(x[i : i + batch])) for i in range(0, len(x), batch)])[:, 0].numpy()


def unsteady(probs: np.ndarray, copy_probs: np.ndarray, arch: dict[str, Any]) -> int:
    """How many images change their box on their near copy: a box on one side only, or box IoU < STEADY_IOU."""
    n = 0
    for p, c in zip(probs, copy_probs):
        a = component_box(p, arch["threshold"], arch["min_area"])
        b = component_box(c, arch["threshold"], arch["min_area"])
        if (a is None) != (b is None) or (a is not None and box_iou(a[0], b[0]) < STEADY_IOU):
            n += 1
    return n


def kept_epoch(history: list[dict[str, Any]]) -> dict[str, Any]:
    """The epoch a run keeps: the best val Dice, or with steadiness counted, the steadiest epoch within
    STEADY_DICE_SHARE of the best val Dice, then the best Dice among those."""
    best = max(h["val_dice"] for h in history)
    if "val_unsteady" not in history[0]:
        return max(history, key=lambda h: h["val_dice"])
    close = [h for h in history if h["val_dice"] >= STEADY_DICE_SHARE * best]
    return min(close, key=lambda h: (h["val_unsteady"], -h["val_dice"]))


def val_dice(probs: np.ndarray, m: Any, arch: dict[str, Any]) -> float:
    """Mean Dice of the finder's ``probs`` on the rows that have a lesion, with its component rule, at the training
    size."""
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
    init: Path | None = None,
    consistency: float = 0.0,
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
    init : Path, optional
        A trained finder to start from; its architecture must be the one ``image_size`` and ``backbone`` name.
        Its own val figures become epoch 0 of the history, so a run that makes it no better keeps it.
    consistency : float
        Weight of the near-copy term (module docstring); 0 trains as before, without copies.
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
    if not train_rows or not any(r.get("mask") for r in val_rows):
        raise ValueError(f"need train rows and val rows with masks ({len(train_rows)}, {len(val_rows)})")
    arch = default_arch(image_size, backbone)
    steady = consistency > 0
    x_tr, m_tr, _ = load_pairs(train_rows, image_size)
    # Dice counts the val rows with a lesion; steadiness counts every val row (a normal image boxed on its copy)
    x_va, m_va, c_va = load_pairs(val_rows, image_size, np.random.default_rng(seed + 1) if steady else None)
    log(f"[lesion] {len(train_rows)} train ({sum(bool(r.get('mask')) for r in train_rows)} with a mask), "
        f"{len(val_rows)} val images, {image_size} px, {device}; read in {time.time() - t_begin:.0f} s")
    aug = build_pair_augment(image_size)
    aug.set_random_state(seed=seed)
    net = build_net(arch, pretrained=init is None).to(device)
    if init is not None:
        start = torch.load(init, map_location="cpu", weights_only=True)
        if start["arch"] != arch:
            raise ValueError(f"{init}: its finder is {start['arch']}, this run trains {arch}")
        net.load_state_dict(start["state_dict"])
    loss_fn = DiceCELoss(sigmoid=True, batch=True)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    n_batches = max(1, len(x_tr) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, epochs * n_batches), pct_start=0.1)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    history: list[dict[str, Any]] = []
    states: dict[int, dict[str, Any]] = {}  # epochs that may still be kept
    saved = -1

    def describe(status: str) -> dict[str, Any]:
        """The checkpoint's ``meta`` as of now; ``status`` says whether the run had finished."""
        kept = kept_epoch(history)
        return {
            "status": f"{status} after epoch {history[-1]['epoch']} of {epochs}",
            "val_best": {"dice": kept["val_dice"], "epoch": kept["epoch"],
                         **({"unsteady": kept["val_unsteady"]} if steady else {})},
            "history": history,
            "data": {"dirs": [str(d) for d in data], "n_train": len(train_rows), "n_val": len(val_rows)},
            "hyper": {"epochs": epochs, "image_size": image_size, "backbone": backbone, "batch_size": batch_size,
                      "lr": lr, "max_train": max_train, "init": str(init) if init else None,
                      "consistency": consistency},
            "seed": seed,
            "train_seconds": round(time.time() - t_begin, 1),
            "command": run_command(command),
            "torch": torch.__version__,
            "device": device.type,
        }

    def end_epoch(epoch: int, loss: float | None, seconds: float) -> None:
        """Validate, remember the epoch, and write the checkpoint when the kept epoch changes."""
        nonlocal saved
        net.cpu()
        probs = probabilities(net, x_va)
        entry: dict[str, Any] = {"epoch": epoch, "loss": loss, "val_dice": round(val_dice(probs, m_va, arch), 4)}
        if steady:
            entry["val_unsteady"] = unsteady(probs, probabilities(net, c_va), arch)
        net.to(device)
        history.append(entry)
        states[epoch] = {k: t.detach().cpu().clone() for k, t in net.state_dict().items()}
        top = max(h["val_dice"] for h in history)
        for h in history:
            if h["val_dice"] < STEADY_DICE_SHARE * top:
                states.pop(h["epoch"], None)
        log(f"[lesion] epoch {epoch}/{epochs} loss {loss if loss is not None else '-'} val Dice {entry['val_dice']:.3f}"
            + (f" unsteady {entry['val_unsteady']}/{len(c_va)}" if steady else "") + f" ({seconds:.0f} s)")
        kept = kept_epoch(history)["epoch"]
        if kept != saved:
            # the kept epoch is on disk whenever it changes: a run stopped early keeps it
            save_checkpoint(out, arch, states[kept], describe("running"))
            saved = kept

    if init is not None:
        end_epoch(0, None, 0.0)
    for ep in range(epochs):
        net.train()
        t0, tot = time.time(), 0.0
        perm = rng.permutation(len(x_tr))
        for b in range(n_batches):
            idx = perm[b * batch_size : (b + 1) * batch_size]
            pairs = [aug({"image": x_tr[i], "mask": m_tr[i]}) for i in idx]
            xb = torch.stack([p["image"] for p in pairs])
            mb = torch.stack([p["mask"] for p in pairs]).to(device)
            if steady:
                xb = torch.cat([xb, torch.from_numpy(noisy_copy(xb.numpy(), rng))])
            with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=amp):
                logits = net(xb.to(device)).float()
            if steady:
                own, copy = logits.chunk(2)
                loss = 0.5 * (loss_fn(own, mb) + loss_fn(copy, mb))
                loss = loss + consistency * F.mse_loss(torch.sigmoid(own), torch.sigmoid(copy))
            else:
                loss = loss_fn(logits, mb)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            tot += float(loss.detach())
        end_epoch(ep + 1, round(tot / n_batches, 4), time.time() - t0)
    meta = describe("finished")
    save_checkpoint(out, arch, states[meta["val_best"]["epoch"]], meta)
    log(f"[lesion] saved {out} (epoch {meta['val_best']['epoch']}, val Dice {meta['val_best']['dice']:.3f}, "
        f"{meta['train_seconds']} s)")
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
    p.add_argument("--init", type=Path, help="start from this trained finder (same architecture)")
    p.add_argument("--consistency", type=float, default=0.0,
                   help="weight of the near-copy term; > 0 also keeps the steadiest epoch near the best val Dice")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--max-train", type=int, default=None)
    a = p.parse_args(argv)
    train_finder(a.data, a.out, a.epochs, a.seed, image_size=a.image_size, backbone=a.backbone, init=a.init,
                 consistency=a.consistency, batch_size=a.batch_size, lr=a.lr,
                 threads=a.threads, max_train=a.max_train)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
